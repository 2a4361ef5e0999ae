"""The dynamics network (backbone + head) without Lightning, for diagnostics, benches and inference.

Importing Lightning costs ~20 s here; everything that only evaluates a model uses this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from latentdyn.data.windows import WindowSpec
from latentdyn.models.protocol import DeltaPredictive


class DynamicsNet(nn.Module):
    """Backbone over the context window, head to the delta's predictive distribution (satisfies ``DeltaModel``)."""

    def __init__(
        self,
        dim: int,
        context: int,
        horizon: int,
        backbone: Mapping[str, Any],
        head: Mapping[str, Any],
        context_stride: int = 1,
        horizon_mode: str = "lag",
        standardized: bool = False,
    ) -> None:
        super().__init__()
        # Validates the geometry (positive sizes; a lag model reads a contiguous context).
        self.spec = WindowSpec(context, horizon, context_stride, horizon_mode)
        self.dim, self.context, self.horizon, self.context_stride = dim, context, horizon, context_stride
        self.horizon_mode = horizon_mode
        # Whether the model works on standardised latents (``standardize=true``) or raw ones (the reference).
        self.standardized = bool(standardized)
        self.backbone = instantiate(backbone, dim=dim, context=context)
        self.head = instantiate(head, in_features=self.backbone.out_features, dim=dim)

    @property
    def baseline(self) -> type:
        """The unconditional baseline family of this model's head (``fit(deltas)``, ``log_prob``), for ΔNLL."""
        return self.head.baseline

    def predictive(self, context: torch.Tensor) -> DeltaPredictive:
        """``(B, W, D)`` context -> predictive distribution of the delta (see ``horizon_mode``)."""
        if context.dim() != 3 or context.shape[1:] != (self.context, self.dim):
            raise ValueError(f"context must be (B, {self.context}, {self.dim}), got {tuple(context.shape)}")
        return self.head(self.backbone(context))

    forward = predictive
