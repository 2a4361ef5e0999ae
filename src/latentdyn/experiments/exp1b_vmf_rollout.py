"""Exp 1B: rollout fine-tuning of an Exp 1 dynamics checkpoint, then the injection diagnostic before vs after.

The checkpoint (``checkpoint=PATH|RUN_DIR|latest``, ``horizon_k`` picks the horizon in a run directory) is
fine-tuned on the latent store it was trained on with the reference's loss (:mod:`latentdyn.models.rollout`):
the mean NLL of the true one-frame delta under the rollout's own context over K = 16 unrolled steps, plus 0.1
x the teacher-forced NLL; the state advances by the point prediction without gradient; scheduled sampling
feeds GT with a probability ramping 0.2 -> 0 over 2000 steps (AdamW 2e-4, 5000 steps, batch 256). Outputs in
the run directory:

* ``checkpoints/<name>_rollout_final.ckpt`` (``vmf_rollout_final.ckpt`` for a vMF model): a dynamics
  checkpoint (``load_dynamics``) whose embedded config has the source's data, representation and model;
  while fine-tuning, ``<name>_rollout_last.ckpt`` holds the latest periodic checkpoint (``resume=true``
  continues from it);
* ``injection_diag.json``: the injection diagnostic of the fine-tuned model (``InjectionResult.to_dict``);
* ``summary.json``: per-mode summaries of the original (``before``) and fine-tuned (``after``) models on
  the *same* start points and manifold bank, and ``delta = after - before``;
* ``metrics.json``: the key metrics and the run's details.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from latentdyn.data.latent_store import LatentStore
from latentdyn.diagnostics.injection import InjectionResult, run_injection
from latentdyn.diagnostics.plots import figure_title
from latentdyn.pipeline.common import checkpoint_dir, plain, window_datamodule
from latentdyn.pipeline.injection import injection_inputs, store_of_checkpoint
from latentdyn.tracking.lookup import resolve_checkpoint
from latentdyn.tracking.run import METRICS_NAME, write_json

log = logging.getLogger(__name__)

SOURCE_EXPERIMENT = "exp1_vmf"
# Key metrics (results table): these modes' summaries, before and after fine-tuning.
KEY_MODES = ("A_teacher", "D_rollout")
KEY_SUMMARIES = ("dnll", "cos", "state_err_at_K")
# Config keys that describe the trained model and its data: inherited from the source checkpoint.
INHERITED_KEYS = ("data", "representation", "model", "variant")


def finetune_run_config(cfg: DictConfig, source_config: dict[str, Any], source: Path) -> dict[str, Any]:
    """The config embedded in the fine-tuned checkpoint: this run's, with the source checkpoint's data,
    representation, model (and derived-store variant), so ``store_of_checkpoint`` finds the same store."""
    config = plain(cfg)
    for key in INHERITED_KEYS:
        if key in source_config:
            config[key] = source_config[key]
    config["source"] = {
        "checkpoint": str(source),
        "experiment": source_config.get("name"),
        "run_id": source_config.get("run_id"),
    }
    return config


def build_finetune_module(cfg: DictConfig, source: Any, source_path: Path) -> Any:
    """The :class:`RolloutFinetuneModule` warm-started from ``source`` with this run's rollout settings."""
    from latentdyn.models.rollout import RolloutFinetuneModule

    rollout = cfg.rollout
    optimizer = {
        "lr": float(cfg.lr),
        "weight_decay": float(rollout.weight_decay),
        "warmup_steps": int(rollout.warmup_steps),
    }
    return RolloutFinetuneModule.from_dynamics(
        source,
        optimizer=optimizer,
        run_config=finetune_run_config(cfg, source.run_config, source_path),
        k_steps=int(rollout.k_steps),
        teacher_weight=float(rollout.teacher_weight),
        feed=str(rollout.feed),
        bptt=bool(rollout.bptt),
        clip_delta_l2=None if rollout.clip_delta_l2 is None else float(rollout.clip_delta_l2),
        teacher_prob_start=float(rollout.teacher_prob.start),
        teacher_prob_end=float(rollout.teacher_prob.end),
        ramp_steps=int(rollout.teacher_prob.ramp_steps),
        feed_seed=int(cfg.seed),
    )


def rollout_datamodule(cfg: DictConfig, store: LatentStore, module: Any) -> Any:
    """Window datamodule whose windows are ``module``'s whole ``W + k - 1 + K`` segments, in its space."""
    return window_datamodule(cfg, store, module.segment_spec, module.standardized)


def before_after(
    before: Any, after: Any, store: LatentStore, diag_cfg: DictConfig
) -> tuple[InjectionResult, InjectionResult, dict[str, Any]]:
    """Injection diagnostics of two models with the same geometry and space on one set of start segments,
    baseline and bank.

    The inputs are drawn as Exp 2 draws them, so each result equals what Exp 2 reports for that checkpoint.
    Returns both results and a description of the start points (count, split, seed and a SHA-1 of the
    segments).
    """
    geometry = ("context", "horizon", "context_stride", "horizon_mode", "standardized")
    if any(getattr(before, name) != getattr(after, name) for name in geometry):
        raise ValueError(f"before/after models must share {', '.join(geometry)}")
    inputs = injection_inputs(before, store, diag_cfg)
    args = (inputs.segments, inputs.config, inputs.baseline, inputs.bank)
    extra = {"n_utterances": inputs.n_utterances, "raw_scale": inputs.raw_scale}
    with torch.no_grad():
        results = run_injection(before, *args, **extra), run_injection(after, *args, **extra)
    starts = {
        "n_starts": int(inputs.segments.shape[0]),
        "n_utterances": inputs.n_utterances,
        "segment_frames": int(inputs.segments.shape[1]),
        "split": inputs.config.split,
        "seed": inputs.config.seed,
        "segments_sha1": hashlib.sha1(inputs.segments.numpy().tobytes()).hexdigest(),
    }
    return results[0], results[1], starts


def summary_payload(
    before: InjectionResult, after: InjectionResult, starts: dict[str, Any], details: dict[str, Any]
) -> dict[str, Any]:
    """``summary.json``: per mode the ``before``/``after`` summaries and ``delta = after - before``."""
    before_s, after_s = (
        {mode: summary["modes"][mode] for mode in result.modes}
        for summary, result in ((before.to_dict(), before), (after.to_dict(), after))
    )
    before_s, after_s = (
        {mode: {k: v for k, v in s.items() if k not in ("per_step", "n")} for mode, s in side.items()}
        for side in (before_s, after_s)
    )
    delta = {
        mode: {
            name: (after_s[mode][name] - value)
            if value is not None and after_s[mode][name] is not None
            else None
            for name, value in summaries.items()
        }
        for mode, summaries in before_s.items()
    }
    return {**details, "start_points": starts, "before": before_s, "after": after_s, "delta": delta}


def key_metrics(before: InjectionResult, after: InjectionResult) -> dict[str, float]:
    """``before/<mode>/<summary>`` and ``after/<mode>/<summary>`` for the key modes and summaries."""
    out: dict[str, float] = {}
    for tag, result in (("before", before), ("after", after)):
        flat = result.to_metrics()
        for mode in KEY_MODES:
            for name in KEY_SUMMARIES:
                if f"{mode}/{name}" in flat:
                    out[f"{tag}/{mode}/{name}"] = flat[f"{mode}/{name}"]
    return out


def check_same_source(checkpoint: Path, source: Path) -> None:
    """Refuse to continue a fine-tuning of another source: ``checkpoint`` (this run's periodic or final
    fine-tuning checkpoint) must record ``source`` as its source (``checkpoint=latest`` may name a newer
    Exp 1 run by the time a run resumes)."""
    from latentdyn.models.checkpoints import CONFIG_KEY

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    recorded = (state.get(CONFIG_KEY) or {}).get("source", {}).get("checkpoint")
    if recorded is None or Path(recorded).resolve() != Path(source).resolve():
        raise ValueError(
            f"cannot resume: {checkpoint} fine-tunes {recorded}, but the source checkpoint is now {source}; "
            f"resume with checkpoint={recorded}"
        )


def finetune(
    cfg: DictConfig, source: Any, source_path: Path, store: LatentStore
) -> tuple[Any, Path, dict[str, float]]:
    """Fine-tune ``source``; returns the fine-tuned model (eval mode), its final checkpoint
    ``checkpoints/<name>_rollout_final.ckpt`` and the metrics its fit last logged.

    The fit writes ``checkpoints/<name>_rollout_last.ckpt`` every ``cfg.checkpointing.every_n_steps`` steps;
    with ``cfg.resume`` it continues from there, and a fine-tuning whose final checkpoint exists is loaded
    instead of run again.
    """
    from latentdyn.models.dynamics import load_dynamics
    from latentdyn.models.training import (
        build_trainer,
        fit,
        job_logger,
        last_logged_metrics,
        logged_metrics,
        save_final_checkpoint,
        seed_everything,
    )

    final = checkpoint_dir(cfg) / f"{source.hparams.name}_rollout_final.ckpt"
    last = checkpoint_dir(cfg) / f"{source.hparams.name}_rollout_last.ckpt"
    if cfg.resume:
        for path in (p for p in (final, last) if p.is_file()):
            check_same_source(path, source_path)
        if final.is_file():
            log.info("resume: the fine-tuning is done (%s); not running it again", final)
            return load_dynamics(final), final, logged_metrics(final)
    seed_everything(cfg.seed)
    module = build_finetune_module(cfg, source, source_path)
    datamodule = rollout_datamodule(cfg, store, module)
    with job_logger(cfg) as logger:
        trainer = build_trainer(cfg, logger, last_checkpoint=last)
        log.info(
            "rollout fine-tuning: K=%d, feed=%s, p_teacher %.2f -> %.2f over %d steps, lr=%g, k=%d (%s)",
            module.k_steps,
            module.feed,
            module.teacher_prob_start,
            module.teacher_prob_end,
            module.ramp_steps,
            float(cfg.lr),
            module.horizon,
            store.root,
        )
        # Loaders, not the datamodule: Lightning refuses to log a module and a datamodule whose shared
        # hparams differ, and the datamodule's context is the whole segment's, not the model's W.
        fit(
            trainer,
            module,
            last,
            bool(cfg.resume),
            train_dataloaders=datamodule.train_dataloader(),
            val_dataloaders=datamodule.val_dataloader(),
        )
    save_final_checkpoint(trainer, final, last)
    return module.eval(), final, last_logged_metrics(trainer)


def run(cfg: DictConfig) -> dict[str, float]:
    """Fine-tune, save the checkpoint, diagnose before vs after; write ``injection_diag.json``, ``summary.json``.

    Resumable (``resume=true``): see :func:`finetune`.
    """
    from latentdyn.models.dynamics import load_dynamics

    source_path = resolve_checkpoint(
        str(cfg.checkpoint), Path(cfg.paths.manifest), SOURCE_EXPERIMENT, f"*_k{cfg.horizon_k}_final.ckpt"
    )
    log.info("source checkpoint: %s", source_path)
    source = load_dynamics(source_path)
    if source.horizon != int(cfg.horizon_k):
        log.warning(
            "horizon_k=%s but the checkpoint's horizon is %d; using the checkpoint's",
            cfg.horizon_k,
            source.horizon,
        )
    store = store_of_checkpoint(cfg, source.run_config)
    run_dir = Path(cfg.run_dir)
    module, ckpt, fit = finetune(cfg, source, source_path, store)

    before, after, starts = before_after(source.net, module.net, store, cfg.diagnostic)
    title = figure_title(cfg.name, cfg.run_id, horizon=int(module.horizon), extra="after fine-tuning")
    after.write(run_dir, frame_rate=store.frame_rate, title=title)
    details = {
        "source_checkpoint": str(source_path),
        "checkpoint": str(ckpt),
        "latent_store": str(store.root),
        "horizon_k": module.horizon,
        "rollout": {**plain(cfg.rollout), "lr": float(cfg.lr)},
        "fit": fit,
    }
    write_json(run_dir / "summary.json", summary_payload(before, after, starts, details))
    key = key_metrics(before, after)
    key["horizon_k"] = float(module.horizon)
    write_json(run_dir / METRICS_NAME, {"key_metrics": key, **details})
    log.info("summary: %s", run_dir / "summary.json")
    return key
