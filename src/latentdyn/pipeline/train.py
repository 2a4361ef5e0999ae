"""Train a dynamics model at one horizon and run its Phase 1 battery: the steps Exp 1, 3 and 4 share."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from latentdyn.diagnostics.battery import run_battery
from latentdyn.pipeline.common import build_datamodule, build_dynamics, checkpoint_dir

log = logging.getLogger(__name__)

# Battery metrics that go to the results table; metrics.json and tables.csv have them all.
KEY_METRICS = ("nll", "nll_baseline", "dnll", "cos", "logmag_r2", "mag_ratio", "mse")


def train_horizon(cfg: DictConfig, store: Any, k: int, logger: Any) -> tuple[Any, Path, dict[str, float]]:
    """Train one dynamics model at horizon ``k`` (with ``restore_best``: its best-validation weights);
    returns the model, its checkpoint and the last logged train/val NLL."""
    from latentdyn.models.training import RestoreBestValidation, build_trainer, seed_everything

    seed_everything(cfg.seed)
    model = build_dynamics(cfg, dim=store.dim, horizon=k)
    model.metric_prefix = f"k{k}/"
    datamodule = build_datamodule(cfg, store, model)
    callbacks = [RestoreBestValidation(f"k{k}/val/nll")] if cfg.restore_best else []
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
        model.net.spec,
        split=cfg.battery.split,
        slices=list(cfg.battery.slices),
        energy_percentile=cfg.datamodule.energy_percentile,
        medial_range=list(cfg.datamodule.medial_range),
        max_windows=cfg.battery.max_windows,
        seed=cfg.seed,
        standardize=model.standardized,
        predict=str(cfg.predict),
    )
