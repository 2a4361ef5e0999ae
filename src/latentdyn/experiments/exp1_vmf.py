"""Exp 1: a direction/magnitude (vMF x LogNormal) dynamics model per horizon k, and the Phase 1 battery.

For each k in ``horizons``: train on the configured window slice of the train split, save
``checkpoints/<model>_k{k}_final.ckpt``, then evaluate the battery (NLL per dimension, direction cosine,
magnitude log-error, MSE) on every slice of the evaluation split, next to the persistence (Δ = 0) and
linear-extrapolation baselines. ``model=gaussian_mdn`` gives the mixture-density baseline, same outputs.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from latentdyn.data.windows import WindowSpec
from latentdyn.diagnostics.battery import run_battery, write_battery_table
from latentdyn.experiments.common import build_datamodule, build_dynamics, checkpoint_dir
from latentdyn.experiments.phase0 import prepare_latent_store
from latentdyn.tracking.run import METRICS_NAME, write_json

log = logging.getLogger(__name__)

KEY_METRICS = ("nll_per_dim", "direction_cosine", "magnitude_log_error", "mse")


def train_horizon(cfg: DictConfig, store: Any, k: int, logger: Any) -> tuple[Any, Path, dict[str, float]]:
    """Train one dynamics model at horizon ``k`` (with ``restore_best``: its best-validation weights);
    returns the model, its checkpoint and the last logged train/val NLL."""
    from latentdyn.models.training import RestoreBestValidation, build_trainer, seed_everything

    seed_everything(cfg.seed)
    model = build_dynamics(cfg, dim=store.dim, horizon=k)
    model.metric_prefix = f"k{k}/"
    datamodule = build_datamodule(cfg, store, model)
    callbacks = [RestoreBestValidation(f"k{k}/val/nll_per_dim")] if cfg.restore_best else []
    trainer = build_trainer(cfg, logger, callbacks)
    log.info("training %s at k=%d on slice %s (%s)", cfg.model.name, k, cfg.datamodule.slice, store.root)
    trainer.fit(model, datamodule=datamodule)
    path = checkpoint_dir(cfg) / f"{cfg.model.name}_k{k}_final.ckpt"
    trainer.save_checkpoint(path)
    fit = {name: float(value) for name, value in trainer.callback_metrics.items() if "nll" in name}
    return model.eval(), path, fit


def model_battery(cfg: DictConfig, model: Any, store: Any) -> list[dict[str, Any]]:
    """The Phase 1 battery (``cfg.battery``) of a trained model and the baselines, on the model's windows,
    with the slice definitions the model was trained with (``cfg.datamodule``)."""
    return run_battery(
        model.net,
        store,
        WindowSpec(model.context, model.horizon, model.context_stride),
        split=cfg.battery.split,
        slices=list(cfg.battery.slices),
        energy_percentile=cfg.datamodule.energy_percentile,
        edge_frames=cfg.datamodule.edge_frames,
        max_windows=cfg.battery.max_windows,
        seed=cfg.seed,
    )


def run(cfg: DictConfig) -> dict[str, float]:
    """Train per horizon, run the battery, write checkpoints, ``metrics.json`` and ``tables.csv``."""
    from latentdyn.models.training import job_logger

    store = prepare_latent_store(cfg)
    run_dir = Path(cfg.run_dir)
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {"latent_store": str(store.root), "slice": cfg.datamodule.slice, "horizons": {}}
    key: dict[str, float] = {}
    with job_logger(cfg) as logger:
        for k in cfg.horizons:
            model, ckpt, fit = train_horizon(cfg, store, int(k), logger)
            k_rows = model_battery(cfg, model, store)
            rows += k_rows
            details["horizons"][f"k{k}"] = {"checkpoint": str(ckpt), "fit": fit, "battery": k_rows}
            for row in k_rows:
                if row["slice"] != cfg.datamodule.slice:
                    continue
                prefix = f"k{k}/" if row["predictor"] == "model" else f"k{k}/{row['predictor']}_"
                key.update({prefix + m: float(row[m]) for m in KEY_METRICS if math.isfinite(row[m])})
        if logger is not None:
            logger.log_metrics({f"battery/{name}": value for name, value in key.items()})
    write_battery_table(rows, run_dir)
    write_json(run_dir / METRICS_NAME, {"key_metrics": key, **details})
    log.info("battery table: %s", run_dir / "tables.csv")
    return key
