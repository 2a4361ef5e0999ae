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


def horizon_checkpoint_name(cfg: DictConfig, k: int, kind: str = "final") -> str:
    """File name of the ``kind`` (``final`` or ``last``) checkpoint of ``cfg.model`` at horizon ``k``:
    ``<model>_k<k>_<kind>.ckpt``."""
    return f"{cfg.model.name}_k{k}_{kind}.ckpt"


def train_horizon(cfg: DictConfig, store: Any, k: int, logger: Any) -> tuple[Any, Path, dict[str, float]]:
    """Train one dynamics model at horizon ``k`` (with ``restore_best``: its best-validation weights);
    returns the model, its checkpoint and the last logged train/val NLL.

    The fit is resumable: it writes ``checkpoints/<model>_k<k>_last.ckpt`` every
    ``cfg.checkpointing.every_n_steps`` steps, and with ``cfg.resume`` continues from it. With ``cfg.resume``
    a horizon whose final checkpoint exists is not trained again: the model is loaded from it.
    """
    from latentdyn.models.training import (
        RestoreBestValidation,
        build_trainer,
        fit,
        last_logged_metrics,
        save_final_checkpoint,
        seed_everything,
    )

    final = checkpoint_dir(cfg) / horizon_checkpoint_name(cfg, k)
    if cfg.resume and final.is_file():
        return trained_horizon(final, k)
    last = checkpoint_dir(cfg) / horizon_checkpoint_name(cfg, k, "last")
    seed_everything(cfg.seed)
    model = build_dynamics(cfg, dim=store.dim, horizon=k)
    model.metric_prefix = f"k{k}/"
    datamodule = build_datamodule(cfg, store, model)
    callbacks = [RestoreBestValidation(f"k{k}/val/nll")] if cfg.restore_best else []
    trainer = build_trainer(cfg, logger, callbacks, last_checkpoint=last)
    log.info("training %s at k=%d on slice %s (%s)", cfg.model.name, k, cfg.datamodule.slice, store.root)
    fit(trainer, model, last, bool(cfg.resume), datamodule=datamodule)
    save_final_checkpoint(trainer, final, last)
    return model.eval(), final, _nll_metrics(last_logged_metrics(trainer))


def trained_horizon(final: Path, k: int) -> tuple[Any, Path, dict[str, float]]:
    """:func:`train_horizon`'s result for a horizon already trained: the model of its final checkpoint and
    the NLL its fit last logged."""
    from latentdyn.models.dynamics import load_dynamics
    from latentdyn.models.training import logged_metrics

    log.info("resume: k=%d is already trained (%s); not training it again", k, final)
    model = load_dynamics(final)
    model.metric_prefix = f"k{k}/"
    return model, final, _nll_metrics(logged_metrics(final))


def _nll_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {name: value for name, value in metrics.items() if "nll" in name}


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
