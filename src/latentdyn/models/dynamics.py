"""Latent dynamics models: the next one-frame delta from a context lagged by k (``horizon_mode=lag``, the
reference) or ``z[t+k] - z[t]`` from a stride-k context (``stride``), on raw or standardised latents.

:class:`DynamicsNet` is the plain ``nn.Module`` (backbone + head) that diagnostics use;
:class:`DynamicsModel` is the LightningModule that trains it and whose checkpoints embed the resolved
config of the run that produced them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from latentdyn.models.checkpoints import EmbedsRunConfig, load_module_checkpoint
from latentdyn.models.net import DynamicsNet
from latentdyn.models.protocol import DeltaPredictive


class DynamicsModel(EmbedsRunConfig, pl.LightningModule):
    """Trains a :class:`DynamicsNet` by maximum likelihood of the standardised delta.

    The loss and every logged NLL are per dimension (nats / D), comparable across heads and representations.

    Args:
        dim: latent dimension D.
        context, horizon, context_stride: window W, prediction horizon k (frames), context stride s.
        backbone, head: Hydra configs (``_target_``) of the context encoder and the output head.
        optimizer: ``lr``, ``weight_decay``, ``warmup_steps`` (linear warm-up, then cosine decay to 10 %).
        name: checkpoint prefix (``vmf``, ``mdn``).
        run_config: the resolved config of the producing run, embedded in checkpoints.
    """

    def __init__(
        self,
        dim: int,
        context: int,
        horizon: int,
        backbone: Mapping[str, Any],
        head: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        context_stride: int = 1,
        name: str = "model",
        run_config: Mapping[str, Any] | None = None,
        horizon_mode: str = "stride",
        standardized: bool = True,
    ) -> None:
        # horizon_mode and standardized default to what checkpoints meant before they were arguments;
        # build_dynamics always passes them.
        super().__init__()
        self.save_hyperparameters(ignore=["run_config"])
        self.run_config = dict(run_config or {})
        # Prefix of logged metric names, so one job's logger can hold several models (``k1/``, ``k2/``).
        self.metric_prefix = ""
        self.net = DynamicsNet(
            dim, context, horizon, backbone, head, context_stride, horizon_mode, standardized
        )

    # DeltaModel protocol, delegated to the net.
    @property
    def dim(self) -> int:
        return self.net.dim

    @property
    def context(self) -> int:
        return self.net.context

    @property
    def horizon(self) -> int:
        return self.net.horizon

    @property
    def context_stride(self) -> int:
        return self.net.context_stride

    @property
    def horizon_mode(self) -> str:
        return self.net.horizon_mode

    @property
    def standardized(self) -> bool:
        return self.net.standardized

    def predictive(self, context: torch.Tensor) -> DeltaPredictive:
        return self.net.predictive(context)

    def nll(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean over the batch of ``-log p(Δ)`` in nats per frame (the reference's loss)."""
        predictive = self.net.predictive(batch["context"])
        return -predictive.log_prob(batch["target_delta"]).mean()

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.nll(batch)
        self.log(f"{self.metric_prefix}train/nll", loss, prog_bar=True, batch_size=batch["context"].shape[0])
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        loss = self.nll(batch)
        self.log(
            f"{self.metric_prefix}val/nll",
            loss,
            prog_bar=True,
            batch_size=batch["context"].shape[0],
            sync_dist=True,
        )

    def configure_optimizers(self) -> dict[str, Any]:
        opt_cfg = self.hparams.optimizer
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=opt_cfg["lr"], weight_decay=opt_cfg["weight_decay"]
        )
        warmup = int(opt_cfg.get("warmup_steps", 0))
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 10_000

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def load_dynamics(path: str | Path, map_location: str | torch.device = "cpu") -> DynamicsModel:
    """Load a dynamics checkpoint (with its embedded run config) in eval mode.

    Only tensors and plain data are unpickled (``weights_only=True``): a crafted file cannot run code.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds anything else (it is not a latentdyn checkpoint, or was tampered with).
    """
    return load_module_checkpoint(DynamicsModel, path, "dynamics", map_location)
