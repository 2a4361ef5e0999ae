"""What diagnostics need from a dynamics model, independent of Lightning and of the head's family.

A dynamics model maps a context window of standardised latents ``(B, W, D)`` (frames ``t-W+1 .. t`` at a
stride of ``context_stride`` frames) to a predictive distribution over the delta ``z[t+k] - z[t]`` with
``k = horizon``. Rollouts therefore advance ``horizon`` frames per step and need ``context_stride ==
horizon`` (true for every k = 1 model).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class DeltaPredictive(Protocol):
    """Predictive distribution of a batch of deltas, ``(B, D)`` each."""

    def log_prob(self, delta: torch.Tensor) -> torch.Tensor:
        """Log-density in R^D of ``delta`` ``(B, D)`` -> ``(B,)`` (nats)."""
        ...

    def mean(self) -> torch.Tensor:
        """Expected delta ``(B, D)``: the point prediction used by mean rollouts and MSE metrics."""
        ...

    def sample(self, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw per row ``(B, D)``; ``temperature`` scales the spread (1 = the model's distribution)."""
        ...

    def direction(self) -> torch.Tensor:
        """Predicted unit direction of the delta ``(B, D)`` (vMF: its mode μ; a mixture: the mean's direction)."""
        ...

    def magnitude(self) -> torch.Tensor:
        """Predicted delta norm ``(B,)`` (LogNormal: its median e^m; a mixture: the mean's norm)."""
        ...


@runtime_checkable
class DeltaModel(Protocol):
    """A dynamics model as diagnostics see it."""

    context: int  # W, frames in the context window
    horizon: int  # k, frames between the last context frame and the predicted frame
    context_stride: int  # frames between consecutive context frames
    dim: int  # D

    def predictive(self, context: torch.Tensor) -> DeltaPredictive:
        """``(B, W, D)`` standardised context -> predictive distribution of ``z[t+k] - z[t]``."""
        ...
