"""Lightning plumbing shared by every training pipeline: logger, trainer, seeding, resumable fits.

A resumable fit (:func:`build_trainer` with ``last_checkpoint``, then :func:`fit`) writes the whole training
state to ``last_checkpoint`` every ``cfg.checkpointing.every_n_steps`` optimiser steps: weights, optimiser and
scheduler, loop progress, the train loader's place in its epoch, the global RNG states and the callbacks'
states (:class:`RestoreBestValidation`'s best weights, :class:`LastLoggedMetrics`). ``resume=true`` continues
from there; on CPU the result is bit-identical to an uninterrupted fit. Checkpoints hold only tensors and
plain data, so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig, OmegaConf

from latentdyn.models.progress import StepProgressBar

log = logging.getLogger(__name__)


# Lightning's lines a user cannot act on: its advertising, the accelerator inventory every Trainer prints
# (the run records the device) and the stop notice (every fit stops at max_steps; we log the fit's end).
_LIGHTNING_NOISE = (
    "litlogger",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "`Trainer.fit` stopped:",
)


class _DropLightningNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(noise in record.getMessage() for noise in _LIGHTNING_NOISE)


def _route_lightning_logs_through_root() -> None:
    """Lightning prints through its own console handlers as well as the root's: keep one copy (the root's,
    which also feeds run.log) and drop the lines in :data:`_LIGHTNING_NOISE`."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLightningNoise())


_route_lightning_logs_through_root()


@contextmanager
def job_logger(cfg: DictConfig) -> Iterator[Logger | None]:
    """The job's training logger (``cfg.logger``), one per job.

    wandb: the logger writes into the tracked run's wandb run (:mod:`latentdyn.tracking.dashboard`), which the
    tracking layer finishes with the run; outside a tracked run (or on ranks > 0) the logger starts its own,
    finished here when the block ends.
    """
    if cfg.logger is None or cfg.logger.get("_target_") is None:
        yield None
        return
    from latentdyn.tracking.dashboard import active_wandb_run, is_wandb_logger

    attached = active_wandb_run() if is_wandb_logger(cfg.logger) else None
    logger = instantiate(cfg.logger) if attached is None else instantiate(cfg.logger, experiment=attached)
    if attached is not None:
        from argparse import Namespace

        # The wandb run's config is the job's resolved config: the fits' module and data hyperparameters go
        # under `hparams/` (the latest fit's), not over the job's own keys (`name`, ...).
        log_hparams = logger.log_hyperparams

        def prefixed(params: Any, *args: Any, **kwargs: Any) -> None:
            items = vars(params) if isinstance(params, Namespace) else dict(params)
            log_hparams({f"hparams/{key}": value for key, value in items.items()}, *args, **kwargs)

        logger.log_hyperparams = prefixed
    if cfg.get("resume"):
        keep_earlier_csv_log(logger)
    try:
        yield logger
    finally:
        finish = getattr(logger, "finalize", None)
        if finish is not None:
            finish("success")
        if attached is None and type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish()


def keep_earlier_csv_log(logger: Logger) -> Path | None:
    """Before a resumed run logs again: move the interrupted attempt's ``metrics.csv`` aside (to
    ``metrics.attempt<N>.csv``), which Lightning's CSV logger would otherwise delete. Returns where it went."""
    log_dir = getattr(logger, "log_dir", None) if isinstance(logger, CSVLogger) else None
    current = Path(log_dir) / "metrics.csv" if log_dir else None
    if current is None or not current.is_file():
        return None
    attempt = 1 + sum(1 for _ in current.parent.glob("metrics.attempt*.csv"))
    kept = current.with_name(f"metrics.attempt{attempt}.csv")
    current.rename(kept)
    log.info("resume: the interrupted attempt's training log is kept as %s", kept)
    # Open the logger's writer now: its warning that the directory is not empty and metrics.csv will be
    # deleted is moot (it was moved aside) and not for the user.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
        _ = logger.experiment
    return kept


class RestoreBestValidation(Callback):
    """Keep a copy of the weights at the best value of ``monitor`` and load them back when fitting ends.

    Small latent corpora are easy to overfit; evaluating and saving the best-validation weights is early
    stopping without losing the rest of the learning-rate schedule. Logs the step it restored. Its state
    (best value, step and weights) goes into checkpoints, so a resumed fit restores the same weights; once
    restored, the copy is dropped (the model holds those weights).
    """

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.best: float | None = None
        self.best_step = -1
        self._state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if self.best is None or value < self.best:
            self.best, self.best_step = value, trainer.global_step
            self._state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._state is not None:
            pl_module.load_state_dict(self._state)
            self._state = None
            log.info(
                "restored the best validation weights: %s = %.4f at step %d",
                self.monitor,
                self.best,
                self.best_step,
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "best": self.best,
            "best_step": self.best_step,
            "weights": self._state,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["monitor"] != self.monitor:
            raise ValueError(
                f"checkpoint tracks the best {state_dict['monitor']!r}, this fit monitors {self.monitor!r}"
            )
        self.best, self.best_step = state_dict["best"], int(state_dict["best_step"])
        self._state = state_dict["weights"]


class LastLoggedMetrics(Callback):
    """The latest value of every logged metric, across a resume: ``values()`` is what ``callback_metrics``
    would hold at the end of an uninterrupted fit, even for metrics last logged before the fit resumed.

    Its state is ``{name: float}``; a final checkpoint keeps the fit's metrics (:func:`logged_metrics`).
    """

    def __init__(self) -> None:
        self._restored: dict[str, float] = {}
        self._trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def values(self) -> dict[str, float]:
        """``{name: value}`` of the latest logged metrics (restored ones, then this fit's)."""
        current = {} if self._trainer is None else self._trainer.callback_metrics
        return {**self._restored, **{name: float(value) for name, value in current.items()}}

    def state_dict(self) -> dict[str, Any]:
        return self.values()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = {str(name): float(value) for name, value in state_dict.items()}


class GlobalRngState(Callback):
    """Carry the global random states (torch CPU and CUDA, numpy, Python) through checkpoints.

    Saved with each checkpoint and set back when a fit resumes from it, so random draws during training
    (dropout) continue as they would have. The loaders draw from their own generators, so nothing between
    restoring and the next training step (the sanity check, new loader iterators) moves these states.
    """

    def state_dict(self) -> dict[str, Any]:
        version, mt_state, gauss = random.getstate()
        _, keys, pos, has_gauss, cached = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {
                "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            },
            "python": {"version": int(version), "state": list(mt_state), "gauss": gauss},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        cuda = list(state_dict["cuda"])
        if cuda and torch.cuda.is_available():
            if len(cuda) != torch.cuda.device_count():
                raise ValueError(
                    f"checkpoint holds {len(cuda)} CUDA RNG states, this machine has "
                    f"{torch.cuda.device_count()} devices"
                )
            torch.cuda.set_rng_state_all(cuda)
        numpy_state = state_dict["numpy"]
        np.random.set_state(
            (
                "MT19937",
                numpy_state["keys"].numpy().astype(np.uint32),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
        python = state_dict["python"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss"]))


class SeedLikeDataParallel(Callback):
    """Start a one-process fit from the seed, as Lightning's DDP strategy starts each rank's.

    ``trainer.strategy=ddp`` re-seeds the global random state (the last :func:`seed_everything`'s seed) on
    every rank when a fit starts; without the same here, a one-process fit would draw its training noise and
    dropout from wherever the model's construction left the state, and a data-parallel run of the same config
    could not match it. A resumed fit then sets the checkpoint's random states over this
    (:class:`GlobalRngState`).
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning.fabric.utilities.seed import reset_seed

        if trainer.world_size == 1:
            reset_seed()


class PeriodicCheckpoint(Callback):
    """Write the whole training state to ``path`` every ``every_n_steps`` optimiser steps, atomically
    (:func:`save_checkpoint_atomically`), for ``trainer.fit(ckpt_path=path)`` to resume from.

    A step that is validated is saved after its validation, so the checkpoint holds what the validation
    changed (the best weights, logged metrics) and a resumed fit does not validate that step again; any
    other step right after its optimiser step.
    """

    def __init__(self, path: str | Path, every_n_steps: int) -> None:
        if isinstance(every_n_steps, bool) or int(every_n_steps) != every_n_steps or every_n_steps < 1:
            raise ValueError(f"checkpointing.every_n_steps must be a positive integer, got {every_n_steps!r}")
        self.path = Path(path)
        self.every_n_steps = int(every_n_steps)
        self._saved_step = -1

    def _due(self, trainer: pl.Trainer) -> bool:
        step = trainer.global_step
        return step > 0 and step % self.every_n_steps == 0 and step != self._saved_step

    def _save(self, trainer: pl.Trainer) -> None:
        save_checkpoint_atomically(trainer, self.path)
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if self._due(trainer) and not _validates_after_this_batch(trainer):
            self._save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and self._due(trainer):
            self._save(trainer)


def _validates_after_this_batch(trainer: pl.Trainer) -> bool:
    """Whether the fit loop validates right after the current training batch (Lightning's own test)."""
    loop = trainer.fit_loop
    return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))


def save_checkpoint_atomically(trainer: pl.Trainer, path: str | Path) -> None:
    """``trainer.save_checkpoint(path)`` through a temporary file beside ``path``, synced, then renamed.

    A kill at any moment leaves the previous complete file or the new complete one, never a partial one:
    Lightning's own save writes a system temporary file and moves it, which is a copy, not a rename, when
    the temporary directory is on another filesystem.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    # Every rank calls save_checkpoint (it synchronises them); rank 0 alone writes the file.
    try:
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    finally:
        if trainer.is_global_zero:
            tmp.unlink(missing_ok=True)
    # No rank reads the checkpoint before it is in place.
    trainer.strategy.barrier("save_checkpoint_atomically")


def build_trainer(
    cfg: DictConfig,
    logger: Logger | None,
    callbacks: Sequence[Callback] = (),
    *,
    last_checkpoint: str | Path | None = None,
    **overrides: Any,
) -> pl.Trainer:
    """``Trainer(**cfg.trainer)`` with the job's logger, a :class:`StepProgressBar` and the run dir as root.

    With ``last_checkpoint`` the fit is resumable (see the module docstring and :func:`fit`): a
    :class:`PeriodicCheckpoint` writes it every ``cfg.checkpointing.every_n_steps`` steps, after ``callbacks``
    have seen each step, with the global RNG states and the :class:`LastLoggedMetrics`.
    """
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(kwargs, dict)
    kwargs.update(overrides)
    check_data_parallel_strategy(kwargs.get("strategy", "auto"))
    # Our loaders split each global batch across ranks themselves (fit -> shard_training_data); Lightning's
    # DistributedSampler would instead give every rank whole batches of its own.
    kwargs["use_distributed_sampler"] = False
    callbacks = [SeedLikeDataParallel(), *callbacks, LastLoggedMetrics()]
    if last_checkpoint is not None:
        callbacks += [GlobalRngState(), PeriodicCheckpoint(last_checkpoint, cfg.checkpointing.every_n_steps)]
    if kwargs.get("enable_progress_bar", True):
        callbacks = [*callbacks, StepProgressBar()]
    return pl.Trainer(
        **kwargs,
        logger=logger if logger is not None else False,
        callbacks=list(callbacks),
        default_root_dir=cfg.run_dir,
    )


def fit(
    trainer: pl.Trainer, model: pl.LightningModule, last_checkpoint: str | Path, resume: bool, **data: Any
) -> None:
    """``trainer.fit(model, **data)``; with ``resume``, from ``last_checkpoint`` when it exists.

    ``data`` is ``datamodule=`` or ``train_dataloaders=``/``val_dataloaders=``, the same as the interrupted
    fit's. Without the file (the fit was killed before its first checkpoint) the fit starts over.
    """
    shard_training_data(trainer, data)
    last = Path(last_checkpoint)
    ckpt_path = None
    if resume and last.is_file():
        log.info("resuming the fit from %s", last)
        ckpt_path = last
    elif resume:
        log.info("resume: no checkpoint %s yet, training from the start", last)
    trainer.fit(model, **data, ckpt_path=ckpt_path, weights_only=True)


def check_data_parallel_strategy(strategy: Any) -> None:
    """Refuse a multi-process strategy our jobs cannot run under
    (:func:`latentdyn.tracking.ranks.spawns_inside_the_fit`)."""
    from latentdyn.tracking.ranks import spawns_inside_the_fit

    name = strategy if isinstance(strategy, str) else type(strategy).__name__.lower()
    if spawns_inside_the_fit(name):
        raise ValueError(
            f"trainer.strategy={name} is not supported: use trainer.strategy=ddp (every rank runs the whole "
            "job; rank 0 writes its files)"
        )


def data_parallel_rank(trainer: pl.Trainer) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``trainer``'s data-parallel fit; ``(0, 1)`` for one process.

    Known before the fit starts its processes: the world from the trainer's devices and nodes, the rank
    from the environment the launcher gives each process (:func:`latentdyn.tracking.ranks.global_rank`).
    """
    from lightning.pytorch.strategies import ParallelStrategy

    from latentdyn.tracking.ranks import global_rank

    if not isinstance(trainer.strategy, ParallelStrategy):
        return 0, 1
    world = int(trainer.num_devices) * int(trainer.num_nodes)
    if world <= 1:
        return 0, 1
    rank = global_rank()
    if not 0 <= rank < world:
        raise RuntimeError(f"this process's rank {rank} is outside the fit's {world} processes")
    return rank, world


def shard_training_data(trainer: pl.Trainer, data: dict[str, Any]) -> None:
    """Give this rank its share of every batch of the fit's ``data`` (``datamodule=`` or the loaders); a
    no-op for a one-process fit. Every rank draws the same batches, so the global batch is the config's."""
    rank, world = data_parallel_rank(trainer)
    if world == 1:
        return
    for name, source in data.items():
        for item in source if isinstance(source, list | tuple) else [source]:
            shard = getattr(item, "shard", None)
            if shard is None:
                raise TypeError(
                    f"{name}: {type(item).__name__} cannot split its batches across {world} ranks "
                    "(a latentdyn datamodule or ResumableBatchLoader can)"
                )
            shard(rank, world)
    log.info("data-parallel fit: rank %d of %d takes 1/%d of every batch", rank, world, world)


def save_final_checkpoint(trainer: pl.Trainer, final: str | Path, last_checkpoint: str | Path) -> None:
    """Write a finished fit's checkpoint ``final`` atomically, then delete the periodic one it supersedes
    (with ``resume``, an existing ``final`` means the fit is done)."""
    save_checkpoint_atomically(trainer, final)
    if trainer.is_global_zero:
        Path(last_checkpoint).unlink(missing_ok=True)


def last_logged_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The metrics a :func:`build_trainer` trainer's fit last logged, including those logged before it
    resumed (its :class:`LastLoggedMetrics`)."""
    (metrics,) = (cb for cb in trainer.callbacks if isinstance(cb, LastLoggedMetrics))
    return metrics.values()


def logged_metrics(checkpoint: str | Path) -> dict[str, float]:
    """The metrics a checkpoint's fit last logged (its :class:`LastLoggedMetrics` state)."""
    state = torch.load(Path(checkpoint), map_location="cpu", weights_only=True)
    metrics = state.get("callbacks", {}).get(LastLoggedMetrics.__qualname__)
    if metrics is None:
        raise ValueError(f"{checkpoint} records no logged metrics: it was not written by a resumable fit")
    return {str(name): float(value) for name, value in metrics.items()}


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (and dataloader workers) for a reproducible job; 0 is a valid seed."""
    pl.seed_everything(int(seed), workers=True, verbose=False)
