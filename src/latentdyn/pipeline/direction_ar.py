"""Exp 10's steps: train the direction AR model on a store's raw latents with an Exp 8 codebook, and score it
teacher-forced on held-out speakers."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from latentdyn.data.latent_store import LatentStore
from latentdyn.data.windows import WindowDataset, WindowSpec, iter_batches, subsample_anchors, window_anchors
from latentdyn.pipeline.common import budgeted_trainer, checkpoint_dir, plain, window_datamodule
from latentdyn.pipeline.stage3 import Codebook

log = logging.getLogger(__name__)

FINAL_NAME = "direction_ar_final.ckpt"
LAST_NAME = "direction_ar_last.ckpt"
#: Teacher-forced metrics, as the module's ``losses`` names them.
TEACHER_FORCED = ("top1", "top5", "ce", "mag_nll", "loss")


def build_direction_ar(cfg: DictConfig, codebook: Codebook) -> Any:
    """The :class:`~latentdyn.models.direction_ar.DirectionARModule` ``cfg.direction_ar`` names, over the
    codebook's store dimension, with the codebook as a buffer and the run's config embedded."""
    return instantiate(
        plain(cfg.direction_ar),
        _recursive_=False,
        _convert_="all",
        dim=codebook.store.dim,
        n_codes=codebook.size,
        codebook=torch.from_numpy(codebook.vectors),
        codebook_source=str(codebook.source),
        latent_store=str(codebook.store.root),
        run_config=plain(cfg),
    )


def direction_windows(cfg: DictConfig, store: LatentStore, context: int) -> Any:
    """Training windows: W frames ending at ``t - 1`` and the delta ``x[t] - x[t-1]``, raw latents (the
    codebook's space), train split shuffled across utterances; validation on the val split."""
    dm_cfg = cfg.copy()
    with open_dict(dm_cfg):
        dm_cfg.datamodule.batch_size = int(cfg.dir_ar_train.batch_size)
        dm_cfg.datamodule.slice = "all"
        dm_cfg.datamodule.max_val_windows = cfg.dir_ar_train.max_val_windows
    return window_datamodule(dm_cfg, store, WindowSpec(int(context), 1), standardize=False)


def train_direction_ar(cfg: DictConfig, codebook: Codebook, logger: Any) -> tuple[Any, Path, dict[str, Any]]:
    """Train for ``cfg.max_steps`` steps into ``checkpoints/direction_ar_final.ckpt`` (resumable from
    ``direction_ar_last.ckpt``; with ``resume`` and a final checkpoint, loaded instead). Returns the model (eval
    mode), its checkpoint and a training record (steps, seconds, last logged losses)."""
    from latentdyn.models.direction_ar import load_direction_ar
    from latentdyn.models.training import fit, last_logged_metrics, save_final_checkpoint, seed_everything

    final = checkpoint_dir(cfg) / FINAL_NAME
    if cfg.resume and final.is_file():
        log.info("resume: the direction AR is already trained (%s)", final)
        return load_direction_ar(final), final, {"resumed": True}
    last = checkpoint_dir(cfg) / LAST_NAME
    seed_everything(cfg.seed)
    model = build_direction_ar(cfg, codebook)
    trainer = budgeted_trainer(cfg, logger, last, cfg.dir_ar_train)
    log.info(
        "training the direction AR (W=%d, K=%d, D=%d) on %s for %d steps",
        model.context, codebook.size, codebook.store.dim, codebook.store.root, int(cfg.max_steps),
    )  # fmt: skip
    t0 = time.monotonic()
    datamodule = direction_windows(cfg, codebook.store, model.context)
    fit(trainer, model, last, bool(cfg.resume), datamodule=datamodule)
    save_final_checkpoint(trainer, final, last)
    record = {
        "steps": int(trainer.global_step),
        "seconds": round(time.monotonic() - t0, 3),
        "metrics": last_logged_metrics(trainer),
    }
    # Evaluated on CPU (teacher-forced batches and rollouts), wherever it was trained.
    return model.cpu().eval(), final, record


@torch.no_grad()
def teacher_forced(
    model: Any, store: LatentStore, split: str, max_windows: int | None, seed: int, batch_size: int = 4096
) -> dict[str, float]:
    """Teacher-forced scores on ``split`` (GT contexts; a seeded subset of at most ``max_windows`` windows):
    ``top1`` / ``top5`` (the nearest codeword of the true delta among the most probable directions), ``ce``
    (nats), ``mag_nll`` (nats, the LogNormal density of ‖Δ‖), ``loss`` (their sum) and ``n`` windows."""
    spec = WindowSpec(int(model.context), 1)
    anchors = subsample_anchors(window_anchors(store, split, spec), max_windows, seed)
    if len(anchors) == 0:
        raise ValueError(f"split {split!r} of {store.root} has no window of {spec.span} frames")
    sums = dict.fromkeys(TEACHER_FORCED, 0.0)
    for batch in iter_batches(WindowDataset(store, anchors, spec, standardize=False), batch_size):
        parts = model.losses(batch)
        n = batch["context"].shape[0]
        for key in TEACHER_FORCED:
            sums[key] += float(parts[key]) * n
    out = {key: value / len(anchors) for key, value in sums.items()}
    out["n"] = float(len(anchors))
    out["chance_top1"] = 1.0 / float(model.net.n_codes)
    out["uniform_ce"] = float(np.log(model.net.n_codes))
    return out
