"""Exp 6: can a learned score pull a free-running rollout back onto the data manifold?

Method (the reference study's Exp 6). A σ-conditioned score model ``s(z, σ)`` of the latent frames
(:mod:`latentdyn.models.score`; optionally conditioned on the dynamics model's context window) is trained by
denoising score matching on the train split of the store the dynamics checkpoint was trained on, in that
model's space; it is a cached artifact, so every job of a correction sweep shares one. The injection
diagnostic then rolls the dynamics model out freely from the seeded start points twice: as is (``D_rollout``)
and with the configured correction applied to the state after every step (``D_corrected``: Langevin steps
``z += η σ² s(z, σ)`` or one Tweedie step ``z += c σ² s(z, σ)``), from the same starts with the same seeds.
Both are scored step by step as in Exp 2; ``corrected_vs_rollout/*`` compares them (the final-step state
error's change in percent, ΔNLL and cos as differences).

The correction's settings form a grid that runs as a Hydra multirun (``latentdyn -m
experiment=exp6_score_correction``); each job is one point of it, and the sweep's aggregate
(``sweep_results.json``, ``summary.csv``, ``heatmap.png``) is written when the multirun ends.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from latentdyn.diagnostics.injection import merge_modes, run_injection
from latentdyn.diagnostics.plots import figure_title
from latentdyn.pipeline.common import plain
from latentdyn.pipeline.injection import dynamics_and_store, injection_inputs
from latentdyn.pipeline.score import build_correction, prepare_score_model, score_training_record
from latentdyn.tracking.run import METRICS_NAME, write_json

log = logging.getLogger(__name__)

#: The uncorrected rollout and the corrected one.
ROLLOUT, CORRECTED = "D_rollout", "D_corrected"
#: Per-mode summaries in the results table (metrics.json has them all).
KEY_SUMMARIES = ("dnll", "cos", "state_err", "state_err_at_K")


def compare(metrics: dict[str, float]) -> dict[str, float]:
    """``corrected_vs_rollout/state_err_at_K_pct`` (the final-step state error's change in percent of the
    uncorrected one: < 0 the correction helps) and ``corrected_vs_rollout/{dnll,cos}`` (differences: ΔNLL < 0
    helps)."""
    out = {}
    rollout_err, corrected_err = metrics[f"{ROLLOUT}/state_err_at_K"], metrics[f"{CORRECTED}/state_err_at_K"]
    if rollout_err > 0:
        out["corrected_vs_rollout/state_err_at_K_pct"] = 100.0 * (corrected_err - rollout_err) / rollout_err
    for name in ("dnll", "cos"):
        out[f"corrected_vs_rollout/{name}"] = metrics[f"{CORRECTED}/{name}"] - metrics[f"{ROLLOUT}/{name}"]
    return out


def run(cfg: DictConfig) -> dict[str, float]:
    from latentdyn.models.training import job_logger

    run_dir = Path(cfg.run_dir)
    with job_logger(cfg) as logger:
        dynamics, store, ckpt = dynamics_and_store(cfg, logger)
        log.info("dynamics checkpoint: %s", ckpt)
        # correction=none needs no score model: D_corrected is then D_rollout itself.
        needs_score = bool(cfg.correction.get("_target_"))
        score_model, score_dir = (
            prepare_score_model(cfg, store, dynamics.net, logger) if needs_score else (None, None)
        )
    correction = build_correction(cfg, score_model)

    inputs = injection_inputs(dynamics.net, store, cfg.diagnostic)
    inj = dataclasses.replace(inputs.config, modes=[ROLLOUT])
    common = (dynamics.net, inputs.segments, inj, inputs.baseline, inputs.bank)
    with torch.no_grad():
        rollout = run_injection(*common, None, inputs.n_utterances, inputs.raw_scale)
        corrected = run_injection(*common, correction, inputs.n_utterances, inputs.raw_scale)
    result = merge_modes([(ROLLOUT, rollout, ROLLOUT), (CORRECTED, corrected, ROLLOUT)])

    setting = OmegaConf.to_container(cfg.correction, resolve=True)
    title = figure_title(
        cfg.name, cfg.run_id, horizon=int(dynamics.horizon), extra=f"correction {_label(setting)}"
    )
    result.write(run_dir, frame_rate=store.frame_rate, title=title)
    metrics = result.to_metrics()
    metrics.update(compare(metrics))
    training = score_training_record(score_dir) if score_dir is not None else {}
    score_record = (
        {"artifact": str(score_dir), "config": plain(cfg.score), "training": training}
        if needs_score
        else None
    )
    write_json(
        run_dir / METRICS_NAME,
        {
            "key_metrics": metrics,
            "correction": setting,
            "checkpoint": str(ckpt),
            "latent_store": str(store.root),
            "score_model": score_record,
        },
    )
    key = {k: v for k, v in metrics.items() if k.split("/", 1)[1] in KEY_SUMMARIES or "_vs_" in k}
    if "metrics" in training and "score/val/dsm" in training["metrics"]:
        key["score/val_dsm"] = float(training["metrics"]["score/val/dsm"])
    return key


def _label(setting: Any) -> str:
    """``langevin n_steps=3 step_size=0.01 sigma=0.1`` from a correction config (``none`` for none)."""
    if not isinstance(setting, dict) or not setting.get("_target_"):
        return "none"
    name = str(setting["_target_"]).rsplit(".", 1)[-1].removesuffix("Correction").lower()
    values = " ".join(f"{k}={v}" for k, v in setting.items() if not k.startswith("_"))
    return f"{name} {values}".strip()
