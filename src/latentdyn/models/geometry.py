"""How a dynamics model's rollouts read trajectories (shared by the injection diagnostic and Exp 1B's loss).

A lag-k model (``horizon_mode=lag``) predicts the one-frame delta ``x[t] - x[t-1]`` from the W frames ending at
``t - k``: it rolls out on every frame with a context lag of k. A stride model (``horizon_mode=stride``, with
``context_stride == horizon == k``) predicts ``z[t+k] - z[t]`` from a stride-k context: the lag-1 model on every
k-th frame. A rollout *segment* of K steps holds ``W + k - 1 + K`` frames (on the subsampled grid), the first
rolled frame ``t0`` at index ``W + k - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from latentdyn.data.windows import WindowSpec


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int when it is an integer (not a bool) ``>= minimum``; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


@dataclass(frozen=True)
class RolloutGeometry:
    """Context ``window`` W, context ``lag`` k (in grid steps) and trajectory ``subsample`` (1 for a lag model,
    k for a stride model) of a model's rollouts."""

    window: int
    lag: int
    subsample: int

    @property
    def origin(self) -> int:
        """Index of the first rolled frame ``t0`` in a segment: ``W + k - 1``."""
        return self.window + self.lag - 1

    def segment_length(self, k_steps: int) -> int:
        """Frames in a segment of ``k_steps`` steps: ``W + k - 1 + K``."""
        return self.origin + check_int("k_steps", k_steps, 1)

    def segment_spec(self, k_steps: int) -> WindowSpec:
        """Window geometry whose context + target is one whole segment on the rollout grid."""
        return WindowSpec(
            self.segment_length(k_steps) - 1, self.subsample, self.subsample, horizon_mode="stride"
        )


def rollout_geometry(model: Any) -> RolloutGeometry:
    """The :class:`RolloutGeometry` of a model (``context``, ``horizon``, ``context_stride``, ``horizon_mode``),
    checking that it can be rolled out; a model without ``horizon_mode`` is a stride model."""
    for name in ("context", "horizon", "context_stride", "dim"):
        if not hasattr(model, name):
            raise ValueError(
                f"the model lacks `{name}`; it must satisfy latentdyn.models.protocol.DeltaModel"
            )
    w = check_int("model.context", model.context, 1)
    k = check_int("model.horizon", model.horizon, 1)
    stride = check_int("model.context_stride", model.context_stride, 1)
    if getattr(model, "horizon_mode", "stride") == "lag":
        return RolloutGeometry(w, k, 1)
    if stride != k:
        raise ValueError(
            f"rolling out a horizon_mode=stride model needs context_stride == horizon (got stride {stride}, "
            f"horizon {k}): a step advances {k} frames, so its prediction only lands on the next context grid "
            f"when the context is spaced {k} frames apart"
        )
    return RolloutGeometry(w, 1, k)
