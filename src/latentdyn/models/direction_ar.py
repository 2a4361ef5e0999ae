"""The direction AR model (Exp 10): the next delta as a discrete direction from a fixed codebook times a
continuous magnitude,

    a ~ Categorical(softmax(logits(ctx)))            over the K unit codewords c_1..c_K (Exp 8)
    m ~ LogNormal(μ_m(ctx), σ_m(ctx))                 the delta's norm
    Δ = m · c_a

on raw latents (the codebook's space). Training targets: ``a`` the codeword with the largest cosine to the true
delta, ``m = ‖Δ‖``; loss ``CE(a) + NLL_LogNormal(m)`` (nats per frame, the magnitude's density on (0, ∞) with
its ``log m`` Jacobian term). μ_m and log σ_m are bounded smoothly (soft clamp) to [−5, 12] and [−5, 0.7].

A rollout step (:meth:`DirectionPredictive.step`) draws the direction by ``argmax``, ``categorical`` or
``top_p`` (nucleus) sampling; the magnitude is the LogNormal median ``e^μ_m`` for ``argmax`` (a deterministic
rollout; the reference sampled it there, which blew its state error up at k = 16) and a draw otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from latentdyn.models.checkpoints import EmbedsRunConfig, load_module_checkpoint
from latentdyn.models.codebook import nearest_codeword
from latentdyn.models.distributions import soft_clamp

STRATEGIES: tuple[str, ...] = ("argmax", "categorical", "top_p")
#: Magnitudes of a rollout step: the LogNormal's median, or a draw.
MAGNITUDES: tuple[str, ...] = ("median", "sample")
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
NORM_FLOOR = 1e-8


def lognormal_nll(magnitude: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``-log p(m)`` of LogNormal(μ, σ) on (0, ∞): ``log m + log σ + ½ log 2π + ½ ((log m − μ)/σ)²`` (nats)."""
    log_m = torch.log(magnitude.float().clamp_min(NORM_FLOOR))
    z = (log_m - mu) / sigma
    return log_m + torch.log(sigma) + HALF_LOG_2PI + 0.5 * z.square()


def top_p_sample(
    logits: torch.Tensor, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Nucleus sampling ``(B,)``: draw from the smallest set of most probable classes whose probability reaches
    ``top_p`` (the most probable class is always kept), renormalised."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the classes ranked above each one
    kept = torch.where(before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    pick = torch.multinomial(kept / kept.sum(dim=-1, keepdim=True), 1, generator=generator)
    return order.gather(1, pick).squeeze(1)


@dataclass
class DirectionPredictive:
    """The direction AR's output for a batch: direction ``logits`` ``(B, K)``, the magnitude's LogNormal
    ``log_mag_mu`` and ``log_mag_sigma`` ``(B,)`` (σ itself, > 0), and the ``codebook`` ``(K, D)``."""

    logits: torch.Tensor
    log_mag_mu: torch.Tensor
    log_mag_sigma: torch.Tensor
    codebook: torch.Tensor

    def cross_entropy(self, index: torch.Tensor) -> torch.Tensor:
        """``-log P(a = index)`` ``(B,)``."""
        return F.cross_entropy(self.logits.float(), index, reduction="none")

    def magnitude_nll(self, magnitude: torch.Tensor) -> torch.Tensor:
        """``-log p(‖Δ‖)`` ``(B,)`` under the magnitude's LogNormal."""
        return lognormal_nll(magnitude, self.log_mag_mu, self.log_mag_sigma)

    def median_magnitude(self) -> torch.Tensor:
        """``e^μ_m`` ``(B,)``."""
        return torch.exp(self.log_mag_mu)

    def choose(
        self, strategy: str, top_p: float = 0.9, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Codeword index per row ``(B,)``: ``argmax``, ``categorical`` (softmax draw) or ``top_p``."""
        if strategy == "argmax":
            return self.logits.argmax(dim=-1)
        if strategy == "categorical":
            probs = torch.softmax(self.logits.float(), dim=-1)
            return torch.multinomial(probs, 1, generator=generator).squeeze(1)
        if strategy == "top_p":
            return top_p_sample(self.logits, top_p, generator)
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")

    def draw_magnitude(self, how: str, generator: torch.Generator | None = None) -> torch.Tensor:
        """The step's magnitude ``(B,)``: the ``median`` ``e^μ_m`` or a ``sample`` ``e^(μ_m + σ_m ε)``."""
        if how == "median":
            return self.median_magnitude()
        if how == "sample":
            eps = torch.randn(self.log_mag_mu.shape, generator=generator, device=self.log_mag_mu.device)
            return torch.exp(self.log_mag_mu + self.log_mag_sigma * eps)
        raise ValueError(f"magnitude must be one of {MAGNITUDES}, got {how!r}")

    def step(
        self,
        strategy: str,
        top_p: float = 0.9,
        generator: torch.Generator | None = None,
        magnitude: str | None = None,
    ) -> torch.Tensor:
        """The rollout's delta ``m · c_a`` ``(B, D)``. ``magnitude`` None: the median for ``argmax``, a draw for
        the sampling strategies."""
        index = self.choose(strategy, top_p, generator)
        how = magnitude or ("median" if strategy == "argmax" else "sample")
        return self.draw_magnitude(how, generator).unsqueeze(-1) * self.codebook[index]


class DirectionARNet(nn.Module):
    """Backbone over the context window ``(B, W, D)`` -> :class:`DirectionPredictive` (raw latents).

    Args:
        dim: latent dimension D.
        context: window W.
        n_codes: codebook size K (the codebook is a buffer: set it, or load it with the weights).
        backbone: Hydra config (``_target_``) of the context encoder (the reference: 2 × [Linear 1024, GELU]).
        log_mag_range, log_sigma_range: smooth bounds of μ_m and log σ_m.
        codebook: ``(K, D)`` unit codewords (None: zeros, to be filled by ``load_state_dict``).
    """

    def __init__(
        self,
        dim: int,
        context: int,
        n_codes: int,
        backbone: Mapping[str, Any],
        log_mag_range: tuple[float, float] = (-5.0, 12.0),
        log_sigma_range: tuple[float, float] = (-5.0, 0.7),
        codebook: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.dim, self.context, self.n_codes = int(dim), int(context), int(n_codes)
        self.log_mag_range = (float(log_mag_range[0]), float(log_mag_range[1]))
        self.log_sigma_range = (float(log_sigma_range[0]), float(log_sigma_range[1]))
        self.backbone = instantiate(backbone, dim=dim, context=context)
        self.proj = nn.Linear(self.backbone.out_features, self.n_codes + 2)
        # A conservative initial spread of the log-magnitude (the reference's bias −0.5).
        with torch.no_grad():
            self.proj.bias[-1] = -0.5
        buffer = torch.zeros(self.n_codes, self.dim) if codebook is None else torch.as_tensor(codebook)
        if tuple(buffer.shape) != (self.n_codes, self.dim):
            raise ValueError(f"codebook must be ({self.n_codes}, {self.dim}), got {tuple(buffer.shape)}")
        self.register_buffer("codebook", buffer.to(torch.float32).clone())

    def forward(self, context: torch.Tensor) -> DirectionPredictive:
        if context.dim() != 3 or context.shape[1:] != (self.context, self.dim):
            raise ValueError(f"context must be (B, {self.context}, {self.dim}), got {tuple(context.shape)}")
        with torch.autocast(device_type=context.device.type, enabled=False):
            out = self.proj(self.backbone(context.float()).float())
            logits, mu, raw_sigma = out.split([self.n_codes, 1, 1], dim=-1)
            log_mag_mu = soft_clamp(mu.squeeze(-1), *self.log_mag_range)
            sigma = torch.exp(soft_clamp(raw_sigma.squeeze(-1), *self.log_sigma_range))
        return DirectionPredictive(logits, log_mag_mu, sigma, self.codebook)

    predictive = forward


class DirectionARModule(EmbedsRunConfig, pl.LightningModule):
    """Trains a :class:`DirectionARNet` on window batches (``context`` ``(B, W, D)``, ``target_delta``
    ``(B, D)``, raw latents): loss = mean CE + mean magnitude NLL (nats per frame).

    Args: those of :class:`DirectionARNet`, plus ``optimizer`` (AdamW ``lr``, ``weight_decay``; constant
    rate, the reference's), ``horizon`` (the context lag k, 1), ``name`` (checkpoint prefix),
    ``codebook_source`` and ``latent_store`` (where the codebook came from and the store the model is trained
    on, recorded) and ``run_config`` (embedded).
    """

    def __init__(
        self,
        dim: int,
        context: int,
        n_codes: int,
        backbone: Mapping[str, Any],
        optimizer: Mapping[str, Any] | None = None,
        log_mag_range: tuple[float, float] = (-5.0, 12.0),
        log_sigma_range: tuple[float, float] = (-5.0, 0.7),
        horizon: int = 1,
        name: str = "direction_ar",
        codebook_source: str | None = None,
        latent_store: str | None = None,
        codebook: Any = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["run_config", "codebook"])
        self.run_config = dict(run_config or {})
        self.net = DirectionARNet(
            dim, context, n_codes, backbone, tuple(log_mag_range), tuple(log_sigma_range), codebook
        )

    @property
    def context(self) -> int:
        return self.net.context

    @property
    def horizon(self) -> int:
        return int(self.hparams.horizon)

    @property
    def dim(self) -> int:
        return self.net.dim

    def losses(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-batch means: ``ce``, ``mag_nll``, ``loss`` (their sum), ``top1``, ``top5`` accuracies."""
        out = self.net(batch["context"])
        delta = batch["target_delta"]
        index = nearest_codeword(delta, self.net.codebook)
        ce = out.cross_entropy(index)
        mag = out.magnitude_nll(torch.linalg.vector_norm(delta.float(), dim=-1))
        k = min(5, self.net.n_codes)
        top = out.logits.topk(k, dim=-1).indices
        return {
            "ce": ce.mean(),
            "mag_nll": mag.mean(),
            "loss": ce.mean() + mag.mean(),
            "top1": (top[:, 0] == index).float().mean(),
            "top5": (top == index[:, None]).any(dim=-1).float().mean(),
        }

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        parts = self.losses(batch)
        n = batch["context"].shape[0]
        self.log("dir_ar/train/loss", parts["loss"], prog_bar=True, batch_size=n)
        self.log("dir_ar/train/ce", parts["ce"], batch_size=n)
        self.log("dir_ar/train/mag_nll", parts["mag_nll"], batch_size=n)
        return parts["loss"]

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        parts = self.losses(batch)
        n = batch["context"].shape[0]
        for key, value in parts.items():
            self.log(f"dir_ar/val/{key}", value, prog_bar=key == "loss", batch_size=n, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        opt = dict(self.hparams.optimizer or {})
        return torch.optim.AdamW(
            self.parameters(),
            lr=float(opt.get("lr", 3e-4)),
            weight_decay=float(opt.get("weight_decay", 1e-4)),
        )


def load_direction_ar(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """A trained direction AR (its Lightning module, eval mode; ``weights_only`` loading: tensors and plain
    data only). FileNotFoundError without the file; ValueError for a file holding anything else."""
    return load_module_checkpoint(DirectionARModule, path, "direction AR", map_location)
