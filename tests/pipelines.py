"""Tiny pipelines for testing the tracking contract without any science (no torch import)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger("tests.pipelines")


def ok(cfg: DictConfig) -> dict[str, float]:
    log.info("ok pipeline ran with seed %s", cfg.seed)
    return {"score": float(cfg.seed) + 0.5, "n": 3}


def boom(cfg: DictConfig) -> dict[str, float]:
    log.info("about to fail")
    raise RuntimeError("deliberate failure for the tracking test")


def hang(cfg: DictConfig) -> dict[str, float]:
    Path(cfg.run_dir, "hanging").write_text("x")
    time.sleep(600)
    return {}


def missing_weights(cfg: DictConfig) -> dict[str, float]:
    """Builds a component whose weights cannot be found, through Hydra's instantiate like the pipelines do."""
    from hydra.utils import instantiate

    instantiate({"_target_": "tests.pipelines.needs_weights"})
    return {}


def needs_weights() -> None:
    from latentdyn.representations.weights import WeightsUnavailableError, missing_weights_message

    raise WeightsUnavailableError(missing_weights_message("org/model", "w.safetensors", "not in the cache"))


def custom_dynamics(**kwargs):
    """A dynamics model chosen by ``model._target_`` (a DynamicsModel that says it was built from here)."""
    from latentdyn.models.dynamics import DynamicsModel

    model = DynamicsModel(**kwargs)
    model.built_by = "tests.pipelines.custom_dynamics"
    return model


def rank0_fails_between_fits(cfg: DictConfig) -> dict[str, float]:
    """Two data-parallel fits (Exp 1's k = 1 and k = 2) with rank 0 failing between them."""
    from latentdyn.pipeline.store import prepare_latent_store
    from latentdyn.pipeline.train import train_horizon
    from latentdyn.tracking.ranks import is_rank_zero

    store = prepare_latent_store(cfg)
    train_horizon(cfg, store, 1, None)
    if is_rank_zero():
        raise RuntimeError("rank 0 fails between its fits")
    train_horizon(cfg, store, 2, None)
    return {}
