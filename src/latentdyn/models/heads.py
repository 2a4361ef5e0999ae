"""Output heads: a context summary ``(B, H)`` -> the predictive distribution of the next delta ``(B, D)``.

Heads evaluate their distributions in float32 even under bf16/fp16 autocast: densities at large κ and
small σ lose everything in half precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentdyn.models.baselines import DiagonalGaussianBaseline, SphereLogNormalBaseline
from latentdyn.models.distributions import (
    DiagonalGaussianMixture,
    VonMisesFisher,
    delta_log_prob,
    soft_clamp,
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

    def median(self) -> torch.Tensor:
        """``e^m μ``: the LogNormal's median norm along the vMF mode (the reference's rollout step)."""
        return torch.exp(self.log_mag_mu).unsqueeze(-1) * self.loc

    def direction(self) -> torch.Tensor:
        return self.loc

    def magnitude(self) -> torch.Tensor:
        return torch.exp(self.log_mag_mu)


class VMFLogNormalHead(nn.Module):
    """Linear map to (direction D, log κ, log-magnitude mean m, log of the log-magnitude scale s).

    The three scalars are bounded smoothly (:func:`~latentdyn.models.distributions.soft_clamp`) to the
    reference's ranges: log κ in ``log_kappa_range``, m in ``log_mag_range``, log s in ``log_sigma_range``.
    Its unconditional baseline (ΔNLL): uniform direction × LogNormal norm.
    """

    baseline = SphereLogNormalBaseline

    def __init__(
        self,
        in_features: int,
        dim: int,
        log_kappa_range: tuple[float, float] = (-2.0, 12.0),
        log_mag_range: tuple[float, float] = (-5.0, 12.0),
        log_sigma_range: tuple[float, float] = (-5.0, 2.0),
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, dim + 3)
        self.dim = dim
        self.log_kappa_range = _range("log_kappa_range", log_kappa_range)
        self.log_mag_range = _range("log_mag_range", log_mag_range)
        self.log_sigma_range = _range("log_sigma_range", log_sigma_range)

    def forward(self, h: torch.Tensor) -> VMFLogNormalPredictive:
        with torch.autocast(device_type=h.device.type, enabled=False):
            out = self.proj(h.float())
            direction, raw_kappa, mag_mu, raw_sigma = out.split([self.dim, 1, 1, 1], dim=-1)
            loc = F.normalize(direction, dim=-1, eps=1e-12)
            kappa = torch.exp(soft_clamp(raw_kappa.squeeze(-1), *self.log_kappa_range))
            log_mag_mu = soft_clamp(mag_mu.squeeze(-1), *self.log_mag_range)
            sigma = torch.exp(soft_clamp(raw_sigma.squeeze(-1), *self.log_sigma_range))
            return VMFLogNormalPredictive(loc, kappa, log_mag_mu, sigma)


def _range(name: str, bounds: tuple[float, float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in bounds)
    if not lo < hi:
        raise ValueError(f"{name} must be [lo, hi] with lo < hi, got {list(bounds)}")
    return lo, hi


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

    def median(self) -> torch.Tensor:
        """The mixture mean (the reference's point prediction for the MDN)."""
        return self.mixture.mean

    def direction(self) -> torch.Tensor:
        return F.normalize(self.mean(), dim=-1, eps=1e-12)

    def magnitude(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.mean(), dim=-1)


class GaussianMDNHead(nn.Module):
    """Linear map to K mixture logits, K x D means and K x D log-scales, the log-scales bounded smoothly to
    ``log_sigma_range`` (the reference's [-7, 2]). Its unconditional baseline (ΔNLL): a diagonal Gaussian."""

    baseline = DiagonalGaussianBaseline

    def __init__(
        self,
        in_features: int,
        dim: int,
        n_components: int = 8,
        log_sigma_range: tuple[float, float] = (-7.0, 2.0),
    ) -> None:
        super().__init__()
        if n_components < 1:
            raise ValueError(f"need n_components >= 1, got {n_components}")
        self.proj = nn.Linear(in_features, n_components * (1 + 2 * dim))
        self.dim, self.k = dim, n_components
        self.log_sigma_range = _range("log_sigma_range", log_sigma_range)

    def forward(self, h: torch.Tensor) -> MDNPredictive:
        with torch.autocast(device_type=h.device.type, enabled=False):
            out = self.proj(h.float())
            logits, means, raw_scales = out.split([self.k, self.k * self.dim, self.k * self.dim], dim=-1)
            shape = (*h.shape[:-1], self.k, self.dim)
            scales = torch.exp(soft_clamp(raw_scales.reshape(shape), *self.log_sigma_range))
            return MDNPredictive(logits, means.reshape(shape), scales)
