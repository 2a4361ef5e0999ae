"""Lightning plumbing shared by every training pipeline: logger, trainer, seeding."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class _DropAdvertising(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _route_lightning_logs_through_root() -> None:
    """Lightning prints through its own console handlers as well as the root's: keep one copy (the root's,
    which also feeds run.log) and drop its advertising line."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdvertising())


_route_lightning_logs_through_root()


@contextmanager
def job_logger(cfg: DictConfig) -> Iterator[Logger | None]:
    """The job's training logger (``cfg.logger``), one per job, always finished (wandb) when the job ends."""
    if cfg.logger is None or cfg.logger.get("_target_") is None:
        yield None
        return
    logger = instantiate(cfg.logger)
    try:
        yield logger
    finally:
        finish = getattr(logger, "finalize", None)
        if finish is not None:
            finish("success")
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish()


def build_trainer(
    cfg: DictConfig, logger: Logger | None, callbacks: Sequence[Callback] = (), **overrides: Any
) -> pl.Trainer:
    """``Trainer(**cfg.trainer)`` with the job's logger, a rich progress bar and the run dir as root."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(kwargs, dict)
    kwargs.update(overrides)
    if kwargs.get("enable_progress_bar", True):
        callbacks = [*callbacks, RichProgressBar(leave=True)]
    return pl.Trainer(
        **kwargs,
        logger=logger if logger is not None else False,
        callbacks=list(callbacks),
        default_root_dir=cfg.run_dir,
    )


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (and dataloader workers) for a reproducible job; 0 is a valid seed."""
    pl.seed_everything(int(seed), workers=True, verbose=False)
