"""Score-based corrections of a free-running rollout's state (Exp 6), the ``correction`` config group.

After each free-running step of the injection diagnostic, the predicted state ``z`` ``(R, D)`` is moved
toward the data manifold along a learned score ``s(z, σ[, context])`` (:mod:`latentdyn.models.score`):

* :class:`LangevinCorrection` (``correction=langevin``): ``n_steps`` updates
  ``z <- z + η σ² s(z, σ)``, plus ``sqrt(2 η σ²) ξ`` with ``ξ ~ N(0, I)`` when ``noise`` is set (unadjusted
  Langevin dynamics with step ``η σ²``; the reference ran without the noise, i.e. gradient ascent on
  ``log p_σ``). Scaling the step by σ² makes η comparable across σ.
* :class:`TweedieCorrection` (``correction=tweedie``): one step ``z <- z + c σ² s(z, σ)``; with ``c = 1`` and
  the exact score this is Tweedie's posterior mean ``E[z_clean | z]`` for ``z = z_clean + σ ε``.
* ``correction=none``: no correction.

A correction is called as ``correction(z, context)``, ``context`` ``(R, W, D)`` being the window the step
was predicted from (a conditional score model reads it; others ignore it). Configs build these with
``_partial_: true``; the experiment supplies the score model (``make(score=...)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

#: ``score(z (R, D), sigma, context (R, W, D) | None) -> (R, D)``.
ScoreFn = Callable[[torch.Tensor, float, torch.Tensor | None], torch.Tensor]


def _check(name: str, value: float, low: float, strict: bool) -> float:
    value = float(value)
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value}")
    return value


@dataclass
class LangevinCorrection:
    """``n_steps`` Langevin updates at noise level ``sigma`` with step ``step_size · sigma²`` (see the module
    docstring). ``seed`` seeds the noise ``ξ`` (drawn on the state's device) when ``noise`` is set."""

    score: ScoreFn
    n_steps: int = 3
    step_size: float = 0.01
    sigma: float = 0.1
    noise: bool = False
    seed: int = 0
    _generator: torch.Generator | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.n_steps, bool) or int(self.n_steps) != self.n_steps or self.n_steps < 0:
            raise ValueError(f"n_steps must be an integer >= 0, got {self.n_steps!r}")
        self.n_steps = int(self.n_steps)
        self.step_size = _check("step_size", self.step_size, 0.0, strict=False)
        self.sigma = _check("sigma", self.sigma, 0.0, strict=True)

    def __call__(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        step = self.step_size * self.sigma**2
        noise_scale = math.sqrt(2.0 * step)
        for _ in range(self.n_steps):
            z = z + step * self.score(z, self.sigma, context)
            if self.noise and noise_scale > 0:
                z = z + noise_scale * torch.randn(
                    z.shape, generator=self._noise_generator(z.device), device=z.device, dtype=z.dtype
                )
        return z

    def _noise_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(int(self.seed))
        return self._generator


@dataclass
class TweedieCorrection:
    """One denoising step ``z + scale · sigma² · s(z, sigma)`` (see the module docstring)."""

    score: ScoreFn
    sigma: float = 0.1
    scale: float = 1.0

    def __post_init__(self) -> None:
        self.sigma = _check("sigma", self.sigma, 0.0, strict=True)
        self.scale = _check("scale", self.scale, 0.0, strict=False)

    def __call__(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return z + self.scale * self.sigma**2 * self.score(z, self.sigma, context)
