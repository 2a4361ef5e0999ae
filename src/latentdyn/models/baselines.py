"""Unconditional baselines p(Δ) of the reference study, fitted on train deltas; ΔNLL = NLL(model) − NLL(baseline).

Each dynamics head names the baseline of its family (``head.baseline``): a diagonal Gaussian for the MDN and a
uniform direction on S^{D-1} × LogNormal magnitude for vMF × LogNormal. Both are densities in R^D (nats per
frame), like the heads' ``log_prob``, so a model that ignores its context and outputs the baseline's parameters
scores ΔNLL = 0. Fitting streams over batches of deltas ``(B, D)`` and keeps float64 sums only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

import torch

from latentdyn.models.distributions import log_sphere_area

__all__ = ["MIN_VARIANCE", "Baseline", "DiagonalGaussianBaseline", "SphereLogNormalBaseline"]

#: Variance floor of a fitted baseline (the reference's).
MIN_VARIANCE = 1e-6
_LOG_2PI = math.log(2.0 * math.pi)
_NORM_FLOOR = 1e-8


class Baseline(Protocol):
    """A fitted unconditional density of deltas."""

    def log_prob(self, delta: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` -> ``(B,)`` log-density in R^D (nats)."""
        ...


class _MomentAccumulator:
    """Mean and unbiased variance of a stream of ``(B, F)`` rows, merged batch by batch (Chan et al.), float64."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64).cpu()
        b = x.shape[0]
        if b == 0:
            return
        mean_b = x.mean(0)
        m2_b = (x - mean_b).square().sum(0)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = b, mean_b, m2_b
            return
        n = self.n + b
        diff = mean_b - self.mean
        self.mean = self.mean + diff * (b / n)
        self.m2 = self.m2 + m2_b + diff.square() * (self.n * b / n)
        self.n = n

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mean is None or self.m2 is None or self.n == 0:
            raise ValueError("cannot fit a baseline on zero deltas")
        var = self.m2 / (self.n - 1) if self.n > 1 else torch.full_like(self.mean, MIN_VARIANCE)
        return self.mean, var.clamp_min(MIN_VARIANCE)


class DiagonalGaussianBaseline:
    """``N(μ, diag σ²)`` with the per-dimension mean and unbiased variance (floored at 1e-6) of train deltas."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.var = torch.as_tensor(var, dtype=torch.float64)

    @classmethod
    def fit(cls, deltas: Iterable[torch.Tensor]) -> DiagonalGaussianBaseline:
        acc = _MomentAccumulator()
        for delta in deltas:
            acc.update(delta)
        return cls(*acc.finalize())

    def log_prob(self, delta: torch.Tensor) -> torch.Tensor:
        x = delta.to(torch.float64)
        mean, var = self.mean.to(x.device), self.var.to(x.device)
        return (-0.5 * ((x - mean).square() / var + var.log() + _LOG_2PI).sum(-1)).to(delta.dtype)

    def params(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "var": self.var.tolist()}


class SphereLogNormalBaseline:
    """Direction uniform on S^{D-1}, norm ~ LogNormal(m, s²) with m, s² the mean and unbiased variance (floored at
    1e-6) of ``log ‖Δ‖`` over train deltas. In R^D: ``log p(Δ) = −log|S^{D-1}| + log LogNormal(‖Δ‖) − (D−1) log ‖Δ‖``.
    """

    def __init__(self, dim: int, log_mag_mean: float, log_mag_var: float) -> None:
        self.dim = int(dim)
        self.log_mag_mean = float(log_mag_mean)
        self.log_mag_var = float(log_mag_var)

    @classmethod
    def fit(cls, deltas: Iterable[torch.Tensor]) -> SphereLogNormalBaseline:
        acc, dim = _MomentAccumulator(), None
        for delta in deltas:
            dim = delta.shape[-1]
            acc.update(_log_norm(delta.to(torch.float64))[:, None])
        if dim is None:
            raise ValueError("cannot fit a baseline on zero deltas")
        mean, var = acc.finalize()
        return cls(dim, float(mean[0]), float(var[0]))

    def log_prob(self, delta: torch.Tensor) -> torch.Tensor:
        x = delta.to(torch.float64)
        if x.shape[-1] != self.dim:
            raise ValueError(f"deltas have D={x.shape[-1]}, the baseline was fitted on D={self.dim}")
        log_r = _log_norm(x)
        log_sigma = 0.5 * math.log(self.log_mag_var)
        log_mag = (
            -log_r
            - log_sigma
            - 0.5 * _LOG_2PI
            - (log_r - self.log_mag_mean).square() / (2 * self.log_mag_var)
        )
        return (-log_sphere_area(self.dim) + log_mag - (self.dim - 1) * log_r).to(delta.dtype)

    def params(self) -> dict[str, float]:
        return {"dim": self.dim, "log_mag_mean": self.log_mag_mean, "log_mag_var": self.log_mag_var}


def _log_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=-1).clamp_min(_NORM_FLOOR).log()
