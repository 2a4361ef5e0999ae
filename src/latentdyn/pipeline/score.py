"""Exp 6's steps: the score model of a latent store as a cached artifact, and the correction built on it.

The score model is an expensive input every job of a correction sweep shares, so it is an artifact (DESIGN
§5, kind ``score``) keyed by the latent store it is trained on, the space it works in, its own config and
its training settings: the first job trains it (under the artifact's file lock; jobs started in parallel
wait and reuse it), every later job loads it. A killed training resumes from the periodic checkpoint kept
beside the artifact (``<key>.partial/score_last.ckpt``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from latentdyn import artifacts
from latentdyn.data.latent_store import LatentStore
from latentdyn.data.windows import WindowSpec
from latentdyn.jsonio import write_json_atomic
from latentdyn.pipeline.common import budgeted_trainer, plain, window_datamodule
from latentdyn.pipeline.store import store_identity

log = logging.getLogger(__name__)

SCORE_VERSION = 1
FINAL_NAME = "score_final.ckpt"
LAST_NAME = "score_last.ckpt"
TRAINING_NAME = "training.json"


def score_spec(cfg: DictConfig, store: LatentStore, dynamics: Any) -> dict[str, Any]:
    """Everything that determines the score model: the store, the dynamics model's space (raw or standardised)
    and, for a conditional model, its window; the model config, its training settings and the seed."""
    conditional = bool(cfg.score.get("conditional"))
    return {
        "version": SCORE_VERSION,
        "store": store_identity(store),
        "standardized": bool(dynamics.standardized),
        # Only a conditional model depends on the dynamics model's window: others are shared across models.
        "window": {"context": int(dynamics.context), "horizon": int(dynamics.horizon)}
        if conditional
        else None,
        "model": plain(cfg.score),
        "train": plain(cfg.score_train),
        "max_steps": int(cfg.max_steps),
        "seed": int(cfg.seed),
    }


def build_score_model(cfg: DictConfig, store: LatentStore, dynamics: Any) -> Any:
    """The :class:`~latentdyn.models.score.ScoreModule` ``cfg.score`` names, for the store's dimension in the
    dynamics model's space, conditioned (when ``conditional``) on the dynamics model's window."""
    return instantiate(
        plain(cfg.score),
        _recursive_=False,
        _convert_="all",
        dim=store.dim,
        context_frames=int(dynamics.context),
        standardized=bool(dynamics.standardized),
        run_config=plain(cfg),
    )


def score_training_windows(cfg: DictConfig, store: LatentStore, dynamics: Any) -> Any:
    """Training frames as windows over the train split, shuffled across utterances (a seeded permutation of
    every window each epoch; the reference shuffled frames only within one utterance at a time). The frame is
    the window's target ``x[t]``; the dynamics model's window (W frames ending at ``t - k``) is its condition.
    An unconditional model reads windows of one frame at lag 1, i.e. every frame but each utterance's first."""
    if cfg.score.get("conditional"):
        spec = WindowSpec(int(dynamics.context), int(dynamics.horizon))
    else:
        spec = WindowSpec(1, 1)
    dm_cfg = cfg.copy()
    with open_dict(dm_cfg):
        dm_cfg.datamodule.batch_size = int(cfg.score_train.batch_size)
        dm_cfg.datamodule.slice = "all"
        dm_cfg.datamodule.max_val_windows = cfg.score_train.max_val_frames
    return window_datamodule(dm_cfg, store, spec, bool(dynamics.standardized))


def train_score_model(
    cfg: DictConfig, store: LatentStore, dynamics: Any, out_dir: Path, partial: Path, logger: Any
) -> None:
    """Train the score model for ``cfg.max_steps`` steps into ``out_dir`` (``score_final.ckpt`` and
    ``training.json``: steps, seconds, the last logged losses); the periodic checkpoint in ``partial`` (kept
    beside the artifact, ``<key>.partial/score_last.ckpt``) lets a killed training resume where it stopped."""
    from latentdyn.models.training import fit, last_logged_metrics, save_final_checkpoint, seed_everything

    partial.mkdir(parents=True, exist_ok=True)
    last = partial / LAST_NAME
    seed_everything(cfg.seed)
    model = build_score_model(cfg, store, dynamics)
    trainer_cfg = cfg.copy()
    with open_dict(trainer_cfg):
        trainer_cfg.run_dir = str(out_dir)
    trainer = budgeted_trainer(trainer_cfg, logger, last, cfg.score_train)
    log.info(
        "training the score model (D=%d, H=%d, %s, σ in [%g, %g]) on %s for %d steps",
        store.dim,
        model.hparams.hidden_dim,
        "conditional" if model.conditional else "unconditional",
        model.hparams.sigma_min,
        model.hparams.sigma_max,
        store.root,
        int(cfg.max_steps),
    )
    t0 = time.monotonic()
    fit(trainer, model, last, True, datamodule=score_training_windows(cfg, store, dynamics))
    save_final_checkpoint(trainer, out_dir / FINAL_NAME, last)
    write_json_atomic(
        out_dir / TRAINING_NAME,
        {
            "steps": int(trainer.global_step),
            "seconds": round(time.monotonic() - t0, 3),
            "metrics": last_logged_metrics(trainer),
        },
    )
    if not any(partial.iterdir()):
        partial.rmdir()


def prepare_score_model(cfg: DictConfig, store: LatentStore, dynamics: Any, logger: Any) -> tuple[Any, Path]:
    """The score model of ``store`` in ``dynamics``' space: the cached artifact, trained first if it does not
    exist yet. Returns the model (eval mode) and the artifact directory."""
    from latentdyn.models.score import load_score_model

    spec = score_spec(cfg, store, dynamics)
    cache = Path(cfg.paths.cache_dir)
    target = artifacts.artifact_path(cache, "score", spec)
    partial = target.with_name(target.name + ".partial")
    path = artifacts.get_or_build(
        cache,
        "score",
        spec,
        lambda tmp: train_score_model(cfg, store, dynamics, tmp, partial, logger),
        force=cfg.force,
    )
    model = load_score_model(path / FINAL_NAME)
    if model.standardized != bool(dynamics.standardized) or model.net.dim != store.dim:
        raise ValueError(f"the score model in {path} does not match the store and model space it is keyed on")
    return model, path


def score_training_record(score_dir: Path) -> dict[str, Any]:
    """What the score model's training recorded (``training.json``: steps, seconds, last logged losses)."""
    path = Path(score_dir) / TRAINING_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def build_correction(cfg: DictConfig, score_model: Any) -> Any:
    """The correction ``cfg.correction`` names (``_target_``, built partially), stepping along
    ``score_model.score``; None for ``correction=none``."""
    if not cfg.correction.get("_target_"):
        return None
    make = instantiate(cfg.correction)
    return make(score=score_model.score)
