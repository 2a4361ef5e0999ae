"""What diagnostics need from a dynamics model, independent of Lightning and of the head's family.

A dynamics model maps a context window of latents ``(B, W, D)`` (raw, or standardised when ``standardized``) to
a predictive distribution over a delta. With ``horizon_mode == "lag"`` (the reference study's sample) the
context is the W frames ending at ``t - k`` and the delta is the one-frame ``x[t] - x[t-1]``; with ``"stride"``
the context is W frames ``context_stride`` apart ending at ``t`` and the delta is ``z[t+k] - z[t]`` (rolling it
out needs ``context_stride == horizon``). See :mod:`latentdyn.models.geometry`.
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

    def median(self) -> torch.Tensor:
        """The reference study's point prediction ``(B, D)``: μ·e^m for vMF × LogNormal (the mode direction
        times the median norm), the mixture mean for an MDN."""
        ...


#: Point predictions Δ̂ a diagnostic can use: ``median`` (the reference's rollout step), ``mean`` (exact E[Δ]),
#: ``sample`` (one draw).
PREDICT: tuple[str, ...] = ("median", "mean", "sample")


def point_prediction(
    dist: DeltaPredictive,
    predict: str,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The point prediction Δ̂ ``(B, D)`` of ``dist`` chosen by ``predict`` (one of :data:`PREDICT`)."""
    if predict == "median":
        return dist.median()
    if predict == "mean":
        return dist.mean()
    if predict == "sample":
        return dist.sample(temperature=temperature, generator=generator)
    raise ValueError(f"predict must be one of {PREDICT}, got {predict!r}")


@runtime_checkable
class DeltaModel(Protocol):
    """A dynamics model as diagnostics see it."""

    context: int  # W, frames in the context window
    horizon: int  # k, frames between the last context frame and the predicted frame
    context_stride: int  # frames between consecutive context frames
    dim: int  # D
    horizon_mode: str  # "lag" or "stride"
    standardized: bool  # whether contexts and deltas are in the store's standardised space

    def predictive(self, context: torch.Tensor) -> DeltaPredictive:
        """``(B, W, D)`` context -> predictive distribution of the delta (see ``horizon_mode``)."""
        ...
