"""A progress bar that counts optimizer steps, not epochs, with short metric names.

Our fits are step-budgeted (``trainer.max_steps``, ``max_epochs: -1``): Lightning's own bars count batches
per epoch and print ``Epoch 0/-2``, and their metric names (``k1/train/nll``) are cut off.
"""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from tqdm.auto import tqdm


def short_metric_name(name: str, prefix: str = "") -> str:
    """``k1/train/nll`` -> ``nll``, ``k1/val/nll`` -> ``val_nll``, ``train/rollout_nll`` -> ``rollout_nll``:
    the model's ``prefix`` and the ``train/`` stage dropped, other stages kept as a ``stage_`` prefix."""
    if prefix and name.startswith(prefix):
        name = name[len(prefix) :]
    stage, _, metric = name.partition("/")
    if not metric:
        return name
    return metric if stage == "train" else f"{stage}_{metric.replace('/', '_')}"


def format_metric(value: Any) -> str:
    """A metric for the bar: 4 significant digits."""
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


class StepProgressBar(ProgressBar):
    """One bar per fit over ``global_step / max_steps``, described as ``train <model> <prefix>``, showing the
    metrics logged with ``prog_bar=True`` under short names (:func:`short_metric_name`)."""

    def __init__(self, refresh_steps: int = 10) -> None:
        super().__init__()
        self.refresh_steps = max(1, int(refresh_steps))
        self._enabled = True
        self._bar: tqdm | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def short_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, str]:
        prefix = str(getattr(pl_module, "metric_prefix", ""))
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        return {short_metric_name(k, prefix): format_metric(v) for k, v in metrics.items()}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled:
            return
        name = str(getattr(pl_module.hparams, "name", "") or type(pl_module).__name__)
        prefix = str(getattr(pl_module, "metric_prefix", "")).strip("/")
        self._bar = tqdm(
            total=trainer.max_steps if trainer.max_steps > 0 else None,
            initial=trainer.global_step,
            desc=" ".join(p for p in ("train", name, prefix) if p),
            unit="step",
            dynamic_ncols=True,
            leave=True,
            file=sys.stderr,
        )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._bar is None:
            return
        step = trainer.global_step
        if step - self._bar.n >= self.refresh_steps or step == trainer.max_steps:
            self._bar.set_postfix(self.short_metrics(trainer, pl_module), refresh=False)
            self._bar.update(step - self._bar.n)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None and not trainer.sanity_checking:
            self._bar.set_postfix(self.short_metrics(trainer, pl_module))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None:
            self._bar.set_postfix(self.short_metrics(trainer, pl_module), refresh=False)
            self._bar.update(trainer.global_step - self._bar.n)
            self._bar.close()
            self._bar = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
