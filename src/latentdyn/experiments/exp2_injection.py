"""Exp 2: the injection diagnostic of a trained dynamics model.

From many GT context windows of the evaluation split, the model is rolled forward H steps in each mode
(A_teacher, B_periodic, C_one_shot, D_rollout) as one batch; per step we record MSE and cosine to GT, NLL
of the GT frame, distance to the data manifold (nearest train frame) and norm ratio. The latent store is
the one the checkpoint was trained on (its embedded data and representation config).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from latentdyn.data.latent_store import LatentStore
from latentdyn.diagnostics.injection import (
    InjectionConfig,
    InjectionResult,
    run_injection,
    sample_start_segments,
    segment_frames,
)
from latentdyn.experiments.common import bank_from_store, split_trajectories, standardize
from latentdyn.experiments.phase0 import prepare_latent_store
from latentdyn.tracking.lookup import resolve_checkpoint

log = logging.getLogger(__name__)

# Per-mode summaries that go to the results table; metrics.json has them all.
KEY_SUMMARIES = ("auc_mse", "mse_at_H", "nll_mean", "divergence_step", "manifold_dist_mean")


def dynamics_checkpoint(value: str, manifest: Path, horizon_k: int) -> Path:
    """A trained dynamics checkpoint from ``checkpoint=PATH|RUN_DIR|latest|latest:EXPERIMENT``: an Exp 1 model
    of horizon ``horizon_k`` (``latest`` is the newest exp1_vmf run) or an Exp 1B fine-tuned one."""
    return resolve_checkpoint(
        value, manifest, "exp1_vmf", [f"*_k{horizon_k}_final.ckpt", "*_rollout_final.ckpt"]
    )


def store_of_checkpoint(cfg: DictConfig, run_config: dict[str, Any]) -> LatentStore:
    """The latent store a checkpoint was trained on: a derived store it names (Exp 4's projections), or this
    run's config with the checkpoint's data and representation (built or reused as a cached artifact)."""
    derived = (run_config.get("variant") or {}).get("latent_store")
    if derived:
        if not Path(derived).is_dir():
            raise FileNotFoundError(
                f"the checkpoint was trained on the derived latent store {derived}, which no longer exists; "
                "re-run the experiment that produced it (e.g. exp4_linear_readout) to rebuild it"
            )
        return LatentStore(Path(derived))
    store_cfg = cfg.copy()
    with open_dict(store_cfg):
        for key in ("data", "representation"):
            if key in run_config:
                store_cfg[key] = OmegaConf.create(run_config[key])
    return prepare_latent_store(store_cfg)


def injection_inputs(
    model: Any, store: LatentStore, diag_cfg: DictConfig
) -> tuple[InjectionConfig, torch.Tensor, torch.Tensor]:
    """The diagnostic's config, its standardised GT segments ``(N, L, D)`` from ``diag_cfg.split`` and the
    train-frame manifold bank, for ``model``'s geometry. Seeded: every model with the same geometry gets
    the same start points."""
    inj = instantiate(diag_cfg)
    window, horizon_frames = segment_frames(model, inj.horizon)
    segments = sample_start_segments(
        split_trajectories(store, inj.split), window, horizon_frames, inj.n_starts, inj.seed
    )
    return inj, standardize(store, segments), bank_from_store(store, "train", inj.bank_size, inj.seed)


def injection_diagnostic(
    model: Any, store: LatentStore, diag_cfg: DictConfig, correction: Any = None
) -> InjectionResult:
    """Run the configured injection diagnostic of ``model`` on ``store`` (standardised space)."""
    inj, segments, bank = injection_inputs(model, store, diag_cfg)
    with torch.no_grad():
        return run_injection(model, segments, inj, bank, correction)


def run(cfg: DictConfig) -> dict[str, float]:
    from latentdyn.models.dynamics import load_dynamics

    ckpt = dynamics_checkpoint(str(cfg.checkpoint), Path(cfg.paths.manifest), int(cfg.horizon_k))
    log.info("checkpoint: %s", ckpt)
    model = load_dynamics(ckpt)
    store = store_of_checkpoint(cfg, model.run_config)
    correction = instantiate(cfg.correction) if cfg.correction.get("_target_") else None
    result = injection_diagnostic(model.net, store, cfg.diagnostic, correction)
    paths = result.write(Path(cfg.run_dir), frame_rate=store.frame_rate)
    for path in paths:
        log.info("wrote %s", path)
    metrics = {key: value for key, value in result.to_metrics().items() if key.endswith(KEY_SUMMARIES)}
    metrics["horizon_k"] = float(model.horizon)
    return metrics
