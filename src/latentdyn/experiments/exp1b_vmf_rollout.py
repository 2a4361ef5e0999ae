"""Exp 1B: rollout fine-tuning of an Exp 1 dynamics checkpoint, then the injection diagnostic before vs after.

The checkpoint (``checkpoint=PATH|RUN_DIR|latest``, ``horizon_k`` picks the horizon in a run directory) is
fine-tuned on the latent store it was trained on with the unrolled R-step loss and the scheduled-sampling
ramp of :mod:`latentdyn.models.rollout`. Outputs in the run directory:

* ``checkpoints/<name>_rollout_final.ckpt`` (``vmf_rollout_final.ckpt`` for a vMF model): a dynamics
  checkpoint (``load_dynamics``) whose embedded config has the source's data, representation and model;
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
from latentdyn.diagnostics.injection import (
    InjectionResult,
    run_injection,
)
from latentdyn.experiments.common import (
    checkpoint_dir,
    plain,
)
from latentdyn.experiments.exp2_injection import injection_inputs, store_of_checkpoint
from latentdyn.tracking.lookup import resolve_checkpoint
from latentdyn.tracking.run import METRICS_NAME, write_json

log = logging.getLogger(__name__)

SOURCE_EXPERIMENT = "exp1_vmf"
# Key metrics (results table): these modes' summaries, before and after fine-tuning.
KEY_MODES = ("A_teacher", "D_rollout")
KEY_SUMMARIES = ("auc_mse", "nll_mean")
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
    ramp = rollout.ramp_steps if rollout.ramp_steps is not None else cfg.trainer.max_steps
    optimizer = {
        "lr": float(cfg.lr),
        "weight_decay": float(rollout.weight_decay),
        "warmup_steps": int(rollout.warmup_steps),
    }
    return RolloutFinetuneModule.from_dynamics(
        source,
        optimizer=optimizer,
        run_config=finetune_run_config(cfg, source.run_config, source_path),
        rollout_steps=int(rollout.steps),
        feed=str(rollout.feed),
        detach_feedback=bool(rollout.detach_feedback),
        ramp_steps=int(ramp),
        feed_seed=int(cfg.seed),
    )


def rollout_datamodule(cfg: DictConfig, store: LatentStore, module: Any) -> Any:
    """Window datamodule whose windows are ``module``'s whole ``W + R`` segments (see ``rollout_spec``)."""
    from latentdyn.data.windows import LatentWindowDataModule

    dm = cfg.datamodule
    return LatentWindowDataModule(
        store_root=store.root,
        context=module.spec.context,
        horizon=module.spec.horizon,
        context_stride=module.spec.context_stride,
        slice_name=dm.slice,
        batch_size=dm.batch_size,
        num_workers=dm.num_workers,
        energy_percentile=dm.energy_percentile,
        edge_frames=dm.edge_frames,
        seed=cfg.seed,
        max_val_windows=dm.max_val_windows,
    )


def before_after(
    before: Any, after: Any, store: LatentStore, diag_cfg: DictConfig
) -> tuple[InjectionResult, InjectionResult, dict[str, Any]]:
    """Injection diagnostics of two models with the same geometry on one set of start segments and bank.

    The segments are drawn as ``exp2_injection.injection_diagnostic`` draws them, so each result equals what
    Exp 2 reports for that checkpoint. Returns both results and a description of the start points
    (count, split, seed and a SHA-1 of the standardised segments).
    """
    if (before.context, before.horizon, before.context_stride) != (
        after.context,
        after.horizon,
        after.context_stride,
    ):
        raise ValueError("before/after models must share context, horizon and context stride")
    inj, segments, bank = injection_inputs(before, store, diag_cfg)
    with torch.no_grad():
        results = run_injection(before, segments, inj, bank), run_injection(after, segments, inj, bank)
    starts = {
        "n_starts": int(segments.shape[0]),
        "segment_frames": int(segments.shape[1]),
        "split": inj.split,
        "seed": inj.seed,
        "segments_sha1": hashlib.sha1(segments.numpy().tobytes()).hexdigest(),
    }
    return results[0], results[1], starts


def summary_payload(
    before: InjectionResult, after: InjectionResult, starts: dict[str, Any], details: dict[str, Any]
) -> dict[str, Any]:
    """``summary.json``: per mode the ``before``/``after`` summaries and ``delta = after - before``."""
    before_s, after_s = before.to_dict()["summaries"], after.to_dict()["summaries"]
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


def run(cfg: DictConfig) -> dict[str, float]:
    """Fine-tune, save the checkpoint, diagnose before vs after; write ``injection_diag.json``, ``summary.json``."""
    from latentdyn.models.dynamics import load_dynamics
    from latentdyn.models.training import build_trainer, job_logger, seed_everything

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

    seed_everything(cfg.seed)
    module = build_finetune_module(cfg, source, source_path)
    datamodule = rollout_datamodule(cfg, store, module)
    with job_logger(cfg) as logger:
        trainer = build_trainer(cfg, logger)
        log.info(
            "rollout fine-tuning: R=%d, feed=%s, ramp over %d steps, lr=%g, k=%d (%s)",
            module.rollout_steps,
            module.feed,
            module.ramp_steps,
            float(cfg.lr),
            module.horizon,
            store.root,
        )
        # Loaders, not the datamodule: Lightning refuses to log a module and a datamodule whose shared
        # hparams differ, and the datamodule's context is the whole segment's (W + R - 1), not the model's W.
        trainer.fit(
            module,
            train_dataloaders=datamodule.train_dataloader(),
            val_dataloaders=datamodule.val_dataloader(),
        )
    ckpt = checkpoint_dir(cfg) / f"{module.hparams.name}_rollout_final.ckpt"
    trainer.save_checkpoint(ckpt)
    fit = {name: float(value) for name, value in trainer.callback_metrics.items()}
    module.eval()

    before, after, starts = before_after(source.net, module.net, store, cfg.diagnostic)
    diag = after.to_dict()
    write_json(run_dir / "injection_diag.json", diag)
    details = {
        "source_checkpoint": str(source_path),
        "checkpoint": str(ckpt),
        "latent_store": str(store.root),
        "horizon_k": module.horizon,
        "rollout": {**plain(cfg.rollout), "ramp_steps": module.ramp_steps, "lr": float(cfg.lr)},
        "fit": fit,
    }
    write_json(run_dir / "summary.json", summary_payload(before, after, starts, details))
    key = key_metrics(before, after)
    key["horizon_k"] = float(module.horizon)
    write_json(run_dir / METRICS_NAME, {"key_metrics": key, **details})
    log.info("summary: %s", run_dir / "summary.json")
    return key
