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


class RestoreBestValidation(Callback):
    """Keep a copy of the weights at the best value of ``monitor`` and load them back when fitting ends.

    Small latent corpora are easy to overfit; evaluating and saving the best-validation weights is early
    stopping without losing the rest of the learning-rate schedule. Logs the step it restored.
    """

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.best: float | None = None
        self.best_step = -1
        self._state: dict[str, Any] | None = None

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
            log.info(
                "restored the best validation weights: %s = %.4f at step %d",
                self.monitor,
                self.best,
                self.best_step,
            )


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
