"""Output heads: a context summary ``(B, H)`` -> the predictive distribution of the next delta ``(B, D)``.

Heads evaluate their distributions in float32 even under bf16/fp16 autocast: densities at large κ and
small σ lose everything in half precision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from latentdyn.models.distributions import (
    DiagonalGaussianMixture,
    VonMisesFisher,
    delta_log_prob,
    mdn_scales,
    vmf_mean_resultant_length,
)


def _float32(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.float() for t in tensors)


class VMFLogNormalPredictive:
    """Delta = magnitude x direction with direction ~ vMF(μ, κ) and magnitude ~ LogNormal(m, s).

    Shapes: ``loc (B, D)`` unit, ``kappa``, ``log_mag_mu``, ``log_mag_sigma`` ``(B,)``.
    """

    def __init__(
        self, loc: torch.Tensor, kappa: torch.Tensor, log_mag_mu: torch.Tensor, log_mag_sigma: torch.Tensor
    ) -> None:
        self.loc, self.kappa, self.log_mag_mu, self.log_mag_sigma = _float32(
            loc, kappa, log_mag_mu, log_mag_sigma
        )

    def log_prob(self, delta: torch.Tensor) -> torch.Tensor:
        return delta_log_prob(delta.float(), self.loc, self.kappa, self.log_mag_mu, self.log_mag_sigma)

    def mean(self) -> torch.Tensor:
        """``E[r] E[u] = exp(m + s²/2) A_D(κ) μ`` (magnitude and direction are independent)."""
        mean_norm = torch.exp(self.log_mag_mu + 0.5 * self.log_mag_sigma.square())
        resultant = vmf_mean_resultant_length(self.loc.shape[-1], self.kappa)
        return (mean_norm * resultant).unsqueeze(-1) * self.loc

    def sample(self, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Direction from vMF(μ, κ/T), magnitude from LogNormal(m, T·s)."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        direction = VonMisesFisher(self.loc, self.kappa / temperature, validate_args=False).sample(
            generator=generator
        )
        eps = torch.randn(self.log_mag_mu.shape, generator=generator, device=self.loc.device)
        magnitude = torch.exp(self.log_mag_mu + temperature * self.log_mag_sigma * eps)
        return magnitude.unsqueeze(-1) * direction

    def direction(self) -> torch.Tensor:
        return self.loc

    def magnitude(self) -> torch.Tensor:
        return torch.exp(self.log_mag_mu)


class VMFLogNormalHead(nn.Module):
    """Linear map to (direction D, raw κ, log-magnitude mean, raw log-magnitude scale).

    κ = kappa_min + softplus(raw), clamped at kappa_max; s = exp(log_sigma_min) + softplus(raw).
    """

    def __init__(
        self,
        in_features: int,
        dim: int,
        kappa_min: float = 1e-3,
        kappa_max: float = 1e5,
        log_sigma_min: float = -7.0,
    ) -> None:
        super().__init__()
        if not 0 < kappa_min < kappa_max:
            raise ValueError(f"need 0 < kappa_min < kappa_max, got {kappa_min}, {kappa_max}")
        self.proj = nn.Linear(in_features, dim + 3)
        self.dim, self.kappa_min, self.kappa_max = dim, kappa_min, kappa_max
        self.sigma_min = math.exp(log_sigma_min)

    def forward(self, h: torch.Tensor) -> VMFLogNormalPredictive:
        with torch.autocast(device_type=h.device.type, enabled=False):
            out = self.proj(h.float())
            direction, raw_kappa, mag_mu, raw_sigma = out.split([self.dim, 1, 1, 1], dim=-1)
            loc = F.normalize(direction, dim=-1, eps=1e-12)
            kappa = (self.kappa_min + F.softplus(raw_kappa.squeeze(-1))).clamp_max(self.kappa_max)
            sigma = self.sigma_min + F.softplus(raw_sigma.squeeze(-1))
            return VMFLogNormalPredictive(loc, kappa, mag_mu.squeeze(-1), sigma)


class MDNPredictive:
    """A K-component diagonal Gaussian mixture over the delta."""

    def __init__(self, logits: torch.Tensor, means: torch.Tensor, scales: torch.Tensor) -> None:
        self.logits, self.means, self.scales = _float32(logits, means, scales)
        self.mixture = DiagonalGaussianMixture(self.logits, self.means, self.scales, validate_args=False)

    def log_prob(self, delta: torch.Tensor) -> torch.Tensor:
        return self.mixture.log_prob(delta.float())

    def mean(self) -> torch.Tensor:
        return self.mixture.mean

    def sample(self, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Component from softmax(logits / T), then its Gaussian with scales x T."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        tempered = DiagonalGaussianMixture(
            self.logits / temperature, self.means, self.scales * temperature, validate_args=False
        )
        return tempered.sample(generator=generator)

    def direction(self) -> torch.Tensor:
        return F.normalize(self.mean(), dim=-1, eps=1e-12)

    def magnitude(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.mean(), dim=-1)


class GaussianMDNHead(nn.Module):
    """Linear map to K mixture logits, K x D means and K x D scales (σ = sigma_min + softplus(raw))."""

    def __init__(self, in_features: int, dim: int, n_components: int = 8, sigma_min: float = 1e-3) -> None:
        super().__init__()
        if n_components < 1 or sigma_min <= 0:
            raise ValueError(f"need n_components >= 1 and sigma_min > 0, got {n_components}, {sigma_min}")
        self.proj = nn.Linear(in_features, n_components * (1 + 2 * dim))
        self.dim, self.k, self.sigma_min = dim, n_components, sigma_min

    def forward(self, h: torch.Tensor) -> MDNPredictive:
        with torch.autocast(device_type=h.device.type, enabled=False):
            out = self.proj(h.float())
            logits, means, raw_scales = out.split([self.k, self.k * self.dim, self.k * self.dim], dim=-1)
            shape = (*h.shape[:-1], self.k, self.dim)
            return MDNPredictive(
                logits, means.reshape(shape), mdn_scales(raw_scales.reshape(shape), self.sigma_min)
            )
