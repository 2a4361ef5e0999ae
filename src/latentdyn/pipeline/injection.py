"""Injection-diagnostic steps: checkpoint -> model and latent store, GT start segments and bank, the diagnostic."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from latentdyn import artifacts
from latentdyn.data.latent_store import LatentStore
from latentdyn.data.windows import (
    TRAIN_SPLIT,
    WindowDataset,
    WindowSpec,
    iter_batches,
    subsample_anchors,
    window_anchors,
)
from latentdyn.diagnostics.battery import fit_unconditional_baseline
from latentdyn.diagnostics.injection import (
    InjectionConfig,
    InjectionResult,
    rollout_geometry,
    run_injection,
    sample_starts,
    utterance_order,
)
from latentdyn.models.baselines import Baseline
from latentdyn.pipeline.common import bank_from_store, plain
from latentdyn.pipeline.store import latent_store_path, prepare_latent_store, store_identity
from latentdyn.pipeline.train import horizon_checkpoint_name, train_horizon
from latentdyn.tracking.lookup import resolve_checkpoint

log = logging.getLogger(__name__)

# Per-mode summaries that go to the results table; metrics.json has them all.
KEY_SUMMARIES = ("/dnll", "/cos", "/mag_ratio", "/state_err", "/state_err_at_K")


DYNAMICS_VERSION = 1
#: Trainer settings that do not change a trained model (left out of its artifact key).
COSMETIC_TRAINER_KEYS = ("enable_progress_bar", "enable_model_summary", "log_every_n_steps")
#: ``checkpoint=train``: train the run's dynamics model on its own store (a cached artifact).
TRAIN = "train"


def dynamics_spec(cfg: DictConfig, store: LatentStore, horizon_k: int) -> dict[str, Any]:
    """Everything that determines a dynamics model trained for ``checkpoint=train``: the store, the model and
    its sample, the training windows, the trainer's settings (but cosmetic ones) and the seed."""
    trainer = {k: v for k, v in plain(cfg.trainer).items() if k not in COSMETIC_TRAINER_KEYS}
    return {
        "version": DYNAMICS_VERSION,
        "store": store_identity(store),
        "horizon_k": int(horizon_k),
        "model": plain(cfg.model),
        "horizon_mode": str(cfg.horizon_mode),
        "standardize": bool(cfg.standardize),
        "datamodule": plain(cfg.datamodule),
        "trainer": trainer,
        "restore_best": bool(cfg.restore_best),
        "seed": int(cfg.seed),
    }


def trained_dynamics(cfg: DictConfig, store: LatentStore, horizon_k: int, logger: Any) -> Path:
    """The checkpoint of ``cfg.model`` trained at horizon ``horizon_k`` on ``store`` (``cfg.trainer``): a cached
    artifact (kind ``dynamics``), so every job of a sweep shares one model, trained by the first."""

    def build(tmp: Path) -> None:
        d_cfg = cfg.copy()
        with open_dict(d_cfg):
            d_cfg.run_dir = str(tmp)
            d_cfg.resume = False
        train_horizon(d_cfg, store, horizon_k, logger)

    spec = dynamics_spec(cfg, store, horizon_k)
    path = artifacts.get_or_build(Path(cfg.paths.cache_dir), "dynamics", spec, build, force=cfg.force)
    return path / "checkpoints" / horizon_checkpoint_name(cfg, horizon_k)


def dynamics_and_store(cfg: DictConfig, logger: Any) -> tuple[Any, LatentStore, Path]:
    """The dynamics model ``cfg.checkpoint`` names, the latent store it was trained on and its checkpoint.

    ``checkpoint=train`` trains ``cfg.model`` at ``horizon_k`` on the run's own store (:func:`trained_dynamics`);
    anything else is resolved by :func:`dynamics_checkpoint` and its store rebuilt from the config it embeds.
    """
    from latentdyn.models.dynamics import load_dynamics

    horizon_k = int(cfg.horizon_k)
    if str(cfg.checkpoint) == TRAIN:
        store = prepare_latent_store(cfg)
        ckpt = trained_dynamics(cfg, store, horizon_k, logger)
        return load_dynamics(ckpt), store, ckpt
    ckpt = dynamics_checkpoint(str(cfg.checkpoint), Path(cfg.paths.manifest), horizon_k)
    model = load_dynamics(ckpt)
    return model, store_of_checkpoint(cfg, model.run_config), ckpt


def dynamics_checkpoint(value: str, manifest: Path, horizon_k: int) -> Path:
    """A trained dynamics checkpoint from ``checkpoint=PATH|RUN_DIR|latest|latest:EXPERIMENT``: an Exp 1 model
    of horizon ``horizon_k`` (``latest`` is the newest exp1_vmf run) or an Exp 1B fine-tuned one."""
    return resolve_checkpoint(
        value, manifest, "exp1_vmf", [f"*_k{horizon_k}_final.ckpt", "*_rollout_final.ckpt"]
    )


def derived_store_of(run_config: dict[str, Any]) -> Path | None:
    """The derived latent store a checkpoint names (Exp 4's projections), or None; FileNotFoundError when it
    is gone."""
    variant = run_config.get("variant")  # Exp 4's variants name derived stores; Exp 5's are plain names
    derived = variant.get("latent_store") if isinstance(variant, dict) else None
    if not derived:
        return None
    if not Path(derived).is_dir():
        raise FileNotFoundError(
            f"the checkpoint was trained on the derived latent store {derived}, which no longer exists; "
            "re-run the experiment that produced it (e.g. exp4_linear_readout) to rebuild it"
        )
    return Path(derived)


def checkpoint_store_cfg(cfg: DictConfig, run_config: dict[str, Any]) -> DictConfig:
    """This run's config with the checkpoint's ``data`` and ``representation`` (its latent store's)."""
    store_cfg = cfg.copy()
    with open_dict(store_cfg):
        for key in ("data", "representation"):
            if key in run_config:
                store_cfg[key] = OmegaConf.create(run_config[key])
    return store_cfg


def store_of_checkpoint(cfg: DictConfig, run_config: dict[str, Any]) -> LatentStore:
    """The latent store a checkpoint was trained on: a derived store it names (Exp 4's projections), or this
    run's config with the checkpoint's data and representation (built or reused as a cached artifact)."""
    derived = derived_store_of(run_config)
    return LatentStore(derived) if derived else prepare_latent_store(checkpoint_store_cfg(cfg, run_config))


def store_root_of_checkpoint(cfg: DictConfig, run_config: dict[str, Any]) -> Path:
    """Where :func:`store_of_checkpoint`'s store lives, without building it (to compare two models' stores)."""
    derived = derived_store_of(run_config)
    return derived if derived else latent_store_path(checkpoint_store_cfg(cfg, run_config))


@dataclass
class InjectionInputs:
    """What the diagnostic needs besides the model: its config, GT start segments ``(N, L, D)`` in the model's
    space, the fitted unconditional baseline, the manifold bank and the number of utterances used."""

    config: InjectionConfig
    segments: torch.Tensor
    baseline: Baseline
    bank: torch.Tensor | None
    n_utterances: int
    raw_scale: torch.Tensor | None


def fit_model_baseline(model: Any, store: LatentStore, max_windows: int | None, seed: int) -> Baseline:
    """The model family's unconditional baseline (``model.baseline``), fitted on the train split's deltas of the
    model's windows (every slice), in the model's space; at most ``max_windows`` (a seeded subset)."""
    spec = WindowSpec(model.context, model.horizon, model.context_stride, model.horizon_mode)
    anchors = subsample_anchors(window_anchors(store, TRAIN_SPLIT, spec), max_windows, seed)
    windows = WindowDataset(store, anchors, spec, standardize=model.standardized)
    return fit_unconditional_baseline(model.baseline, iter_batches(windows, 4096))


def injection_inputs(model: Any, store: LatentStore, diag_cfg: DictConfig) -> InjectionInputs:
    """The diagnostic's inputs for ``model`` on ``store``. Seeded: every model with the same geometry gets the
    same start points."""
    inj = instantiate(diag_cfg)
    geometry = rollout_geometry(model)
    trajectories = store.trajectories(inj.split)
    starts = sample_starts(trajectories, geometry, inj)
    segments = store.to_model_space(starts.segments, model.standardized)
    bank = None
    if inj.bank_size > 0:
        bank = bank_from_store(store, TRAIN_SPLIT, inj.bank_size, inj.seed, model.standardized)
    baseline = fit_model_baseline(model, store, inj.baseline_max_windows, inj.seed)
    raw_scale = torch.from_numpy(store.std.astype("float32")) if model.standardized else None
    return InjectionInputs(inj, segments, baseline, bank, len(starts.utterances), raw_scale)


def injection_diagnostic(
    model: Any, store: LatentStore, diag_cfg: DictConfig, correction: Any = None
) -> InjectionResult:
    """Run the configured injection diagnostic of ``model`` on ``store`` (in the model's space)."""
    inputs = injection_inputs(model, store, diag_cfg)
    with torch.no_grad():
        return run_injection(
            model,
            inputs.segments,
            inputs.config,
            inputs.baseline,
            inputs.bank,
            correction,
            inputs.n_utterances,
            inputs.raw_scale,
        )


def rollout_gap(model: Any, store: LatentStore, diag_cfg: DictConfig, n_utterances: int) -> dict[str, float]:
    """The reference's Exp 1 rollout block: free-run ``model`` through whole utterances and compare.

    ``n_utterances`` utterances of the diagnostic's split (its seeded shuffle; each cropped to its
    ``max_frames``) are rolled out from their first valid frame ``t0 = W + k - 1`` to their end, the state
    advancing by the point prediction, next to teacher forcing on the same frames. Returns, over all rolled
    frames: ``teacher_nll`` and ``rollout_nll`` (of the true one-frame delta under GT / rollout contexts, nats
    per frame), their ``dnll`` against the baseline, ``gap_nll = rollout_nll - teacher_nll``, and the counts.
    """
    inj = instantiate(diag_cfg)
    geometry = rollout_geometry(model)
    baseline = fit_model_baseline(model, store, inj.baseline_max_windows, inj.seed)
    trajectories = store.trajectories(inj.split)
    sums = {"A_teacher": [0.0, 0.0], "D_rollout": [0.0, 0.0]}
    frames = used = 0
    for i in utterance_order(len(trajectories), inj):
        x = trajectories[i][1][:: geometry.subsample][: inj.max_frames]
        k_steps = int(x.shape[0]) - geometry.origin
        if k_steps < 1:
            continue
        cfg = dataclasses.replace(
            inj,
            modes=["A_teacher", "D_rollout"],
            k_steps=k_steps,
            inject_after_periodic=[],
            inject_after_one_shot=[],
        )
        segment = store.to_model_space(np.asarray(x, dtype=np.float32)[None], model.standardized)
        with torch.no_grad():
            result = run_injection(model, segment, cfg, baseline)
        for m, mode in enumerate(result.modes):
            sums[mode][0] += float(result.per_start["nll"][m].sum())
            sums[mode][1] += float(result.per_start["nll_baseline"][m].sum())
        frames += k_steps
        used += 1
        if used == n_utterances:
            break
    if frames == 0:
        raise ValueError(
            f"no utterance of split {inj.split!r} is long enough for a rollout ({geometry.origin + 1} frames)"
        )
    teacher, rollout = (sums[mode][0] / frames for mode in ("A_teacher", "D_rollout"))
    base = sums["A_teacher"][1] / frames
    return {
        "teacher_nll": teacher,
        "rollout_nll": rollout,
        "teacher_dnll": teacher - base,
        "rollout_dnll": rollout - base,
        "gap_nll": rollout - teacher,
        "n_frames": float(frames),
        "n_utterances": float(used),
    }
