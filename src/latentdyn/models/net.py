"""The dynamics network (backbone + head) without Lightning, for diagnostics, benches and inference.

Importing Lightning costs ~20 s here; everything that only evaluates a model uses this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

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
    ) -> None:
        super().__init__()
        if context < 1 or horizon < 1 or context_stride < 1:
            raise ValueError(
                f"context, horizon and context_stride must be >= 1, got {context}, {horizon}, {context_stride}"
            )
        self.dim, self.context, self.horizon, self.context_stride = dim, context, horizon, context_stride
        self.backbone = instantiate(backbone, dim=dim, context=context)
        self.head = instantiate(head, in_features=self.backbone.out_features, dim=dim)

    def predictive(self, context: torch.Tensor) -> DeltaPredictive:
        """``(B, W, D)`` standardised context -> predictive distribution of the standardised delta."""
        if context.dim() != 3 or context.shape[1:] != (self.context, self.dim):
            raise ValueError(f"context must be (B, {self.context}, {self.dim}), got {tuple(context.shape)}")
        return self.head(self.backbone(context))

    forward = predictive
