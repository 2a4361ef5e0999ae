"""Exp 3: do some representations roll out better than others? Mimi vs EnCodec (and log-mel).

For each representation: its Phase 0 latent store (cached), Phase 1 models and battery, and the injection
diagnostic. The comparison is made fair in two ways:

- errors are in each store's train-standardised space, i.e. normalised by each representation's
  per-dimension variance (an MSE of 1 means "as far off as the data's own spread", whatever D or scale);
- horizons, contexts and rollout lengths are given in **seconds** and converted to frames at each frame
  rate (12.5 Hz Mimi frames and 75 Hz EnCodec frames cover the same wall-clock span), and the divergence
  step is reported as a divergence time in seconds.

The injection diagnostic rolls out each representation's one-frame model at its native frame rate.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from latentdyn.config import conf_dir
from latentdyn.experiments.common import write_csv_rows
from latentdyn.experiments.exp1_vmf import model_battery, train_horizon
from latentdyn.experiments.exp2_injection import injection_diagnostic
from latentdyn.experiments.phase0 import prepare_latent_store
from latentdyn.tracking.run import METRICS_NAME, write_json

log = logging.getLogger(__name__)


def seconds_to_frames(seconds: float, frame_rate: float, what: str = "horizon") -> int:
    """Whole frames covering ``seconds`` at ``frame_rate``; at least 1. Logs when rounding changes the span."""
    if seconds <= 0:
        raise ValueError(f"{what} must be positive seconds, got {seconds}")
    frames = max(1, round(seconds * frame_rate))
    if not math.isclose(frames / frame_rate, seconds, rel_tol=1e-6):
        log.warning(
            "%s %.4g s is %.3g frames at %g Hz; using %d (%.4g s)",
            what,
            seconds,
            seconds * frame_rate,
            frame_rate,
            frames,
            frames / frame_rate,
        )
    return frames


def representation_config(cfg: DictConfig, name: str) -> DictConfig:
    """``cfg`` with ``representation`` replaced by ``conf/representation/<name>.yaml`` (interpolations resolve
    against ``cfg``, so ``pretrained: ${pretrained}`` follows the run) and outputs under ``<run_dir>/<name>``."""
    path = conf_dir() / "representation" / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"unknown representation {name!r} in exp3 representations; available: {available}")
    rep_cfg = cfg.copy()
    with open_dict(rep_cfg):
        rep_cfg.representation = OmegaConf.load(path)
        rep_cfg.run_dir = str(Path(cfg.run_dir) / name)
    return rep_cfg


def compare_one(cfg: DictConfig, name: str, logger: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Phase 0, Phase 1 and the injection diagnostic of one representation; summary rows and its diagnostic."""
    rep_cfg = representation_config(cfg, name)
    store = prepare_latent_store(rep_cfg)
    fr = float(store.frame_rate)
    context = seconds_to_frames(cfg.context_seconds, fr, "context")
    with open_dict(rep_cfg):
        rep_cfg.model.context = context
    horizons = {float(s): seconds_to_frames(float(s), fr) for s in cfg.horizon_seconds}
    rows: list[dict[str, Any]] = []
    models: dict[int, Any] = {}
    for seconds, k in horizons.items():
        model, _, _ = train_horizon(rep_cfg, store, k, logger)
        models[k] = model
        battery = model_battery(rep_cfg, model, store)
        for row in battery:
            rows.append(
                {
                    "representation": name,
                    "frame_rate": fr,
                    "dim": store.dim,
                    "horizon_s": seconds,
                    "horizon_frames": k,
                    "context_frames": context,
                    **row,
                }
            )
    one_frame = models[1] if 1 in models else train_horizon(rep_cfg, store, 1, logger)[0]
    diag_cfg = rep_cfg.diagnostic.copy()
    with open_dict(diag_cfg):
        diag_cfg.horizon = seconds_to_frames(cfg.injection_seconds, fr, "injection horizon")
        diag_cfg.period = seconds_to_frames(cfg.period_seconds, fr, "re-injection period")
        diag_cfg.inject_step = seconds_to_frames(cfg.inject_seconds, fr, "one-shot injection time")
    result = injection_diagnostic(one_frame.net, store, diag_cfg)
    result.write(Path(rep_cfg.run_dir) / "injection", frame_rate=fr)
    diag = result.to_dict()
    diag["frame_rate"] = fr
    for mode, summary in result.summaries.items():
        rows.append(
            {
                "representation": name,
                "frame_rate": fr,
                "dim": store.dim,
                "predictor": "model",
                "slice": "injection",
                "mode": mode,
                "horizon_frames": 1,
                "context_frames": context,
                "injection_steps": diag_cfg.horizon,
                "auc_mse_s": summary["auc_mse"] / fr,
                "mse_at_H": summary["mse_at_H"],
                "nll_mean": summary["nll_mean"],
                "divergence_time_s": summary["divergence_step"] / fr,
                "diverged_fraction": summary["diverged_fraction"],
            }
        )
    return rows, diag


def run(cfg: DictConfig) -> dict[str, float]:
    from latentdyn.models.training import job_logger

    run_dir = Path(cfg.run_dir)
    rows: list[dict[str, Any]] = []
    diagnostics: dict[str, Any] = {}
    with job_logger(cfg) as logger:
        for name in cfg.representations:
            rep_rows, diagnostics[name] = compare_one(cfg, str(name), logger)
            rows += rep_rows
    write_csv_rows(rows, run_dir / "summary.csv")
    (run_dir / "injection_diag.json").write_text(json.dumps(diagnostics, indent=2) + "\n")
    key: dict[str, float] = {}
    for row in rows:
        rep = row["representation"]
        if row["slice"] == "injection" and row["mode"] == "D_rollout":
            key[f"{rep}/D_rollout/divergence_time_s"] = row["divergence_time_s"]
            key[f"{rep}/D_rollout/auc_mse_s"] = row["auc_mse_s"]
        elif row.get("slice") == "all" and row["predictor"] == "model" and math.isfinite(row["nll_per_dim"]):
            key[f"{rep}/h{row['horizon_s']:g}s/nll_per_dim"] = row["nll_per_dim"]
    write_json(run_dir / METRICS_NAME, key)
    return key
