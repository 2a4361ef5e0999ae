"""A σ-conditioned score model of latent frames, trained by denoising score matching (Exp 6, DESIGN §8).

The network estimates ``∇_z log p_σ(z)``, the score of the latent frames' distribution smoothed by Gaussian
noise of standard deviation σ (or, with ``conditional=True``, of ``p_σ(z | context)``, the frame given the
dynamics model's context window)::

    z (B, D)          -> Linear(D, H) ─┐
    σ (B, 1)          -> sinusoidal embedding of log σ -> Linear(E, H) ─┤ sum -> 4 x [Linear(H, H), GELU] -> Linear(H, D)
    context (B, W, D) -> flatten -> Linear(W·D, H)          (conditional only) ─┘

Training (denoising score matching, the reference's σ²-weighted form): σ ~ log-uniform[σ_min, σ_max] per frame,
``z̃ = z + σ ε`` with ``ε ~ N(0, I)``, loss ``‖σ · s(z̃, σ) + ε‖²`` summed over dimensions and averaged over
the batch. Its minimiser is ``s(z̃, σ) = (E[z | z̃] - z̃) / σ²`` (Tweedie), the exact score of the smoothed
distribution, which is what the corrections in :mod:`latentdyn.diagnostics.corrections` step along.

The σ embedding is of ``log σ`` (scaled to about [-1, 1] over the training range), so the two decades of
noise levels spread over the embedding's frequencies; the reference embedded σ itself, which with frequencies
≤ 1 is almost linear in σ over [0.01, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from latentdyn.models.checkpoints import EmbedsRunConfig, load_module_checkpoint
from latentdyn.models.data_parallel import global_batch_draw

#: Hidden width by latent dimension when ``hidden_dim`` is not set: the reference's 1024 for Mimi's 512-d
#: latents and 512 for the 32-d β-VAE's; the switch is at this dimension.
WIDE_FROM_DIM = 128


def default_hidden_dim(dim: int) -> int:
    """The reference's hidden width for a ``dim``-d store: 1024 from :data:`WIDE_FROM_DIM` dimensions up, else 512."""
    return 1024 if dim >= WIDE_FROM_DIM else 512


class SigmaEmbedding(nn.Module):
    """Sinusoidal embedding ``(B, 1) -> (B, dim)`` of the noise level's log, rescaled to about [-1, 1] on
    ``[sigma_min, sigma_max]``, at ``dim / 2`` geometric frequencies from 1 to 1000 (sin and cos of each)."""

    def __init__(self, dim: int, sigma_min: float, sigma_max: float) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"the σ embedding's dim must be an even number >= 2, got {dim}")
        self.dim = int(dim)
        self.log_center = 0.5 * (math.log(sigma_min) + math.log(sigma_max))
        self.log_half_range = max(0.5 * (math.log(sigma_max) - math.log(sigma_min)), 1e-6)
        half = self.dim // 2
        freqs = torch.exp(math.log(1000.0) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        u = (sigma.clamp_min(1e-12).log() - self.log_center) / self.log_half_range  # (B, 1)
        args = u * self.freqs.to(u.dtype)  # (B, half)
        return torch.cat([args.sin(), args.cos()], dim=-1)


class ScoreNetwork(nn.Module):
    """``s(z, σ[, context])``: the score estimate ``(B, D)`` (see the module docstring).

    Args:
        dim: latent dimension D.
        hidden_dim: width H.
        n_layers: hidden ``Linear(H, H)`` + GELU blocks.
        sigma_embed_dim: width E of the σ embedding.
        sigma_min, sigma_max: the training range of σ (the embedding is scaled to it).
        context_frames: W for a conditional model (the context window is flattened to W·D), 0 for none.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        n_layers: int = 4,
        sigma_embed_dim: int = 128,
        sigma_min: float = 0.01,
        sigma_max: float = 1.0,
        context_frames: int = 0,
    ) -> None:
        super().__init__()
        self.dim = int(dim)
        self.context_frames = int(context_frames)
        self.sigma_embed = SigmaEmbedding(sigma_embed_dim, sigma_min, sigma_max)
        self.sigma_proj = nn.Linear(sigma_embed_dim, hidden_dim)
        self.input_proj = nn.Linear(self.dim, hidden_dim)
        self.context_proj = (
            nn.Linear(self.context_frames * self.dim, hidden_dim) if self.context_frames > 0 else None
        )
        blocks: list[nn.Module] = []
        for _ in range(int(n_layers)):
            blocks += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        self.backbone = nn.Sequential(*blocks)
        self.output_proj = nn.Linear(hidden_dim, self.dim)

    @property
    def conditional(self) -> bool:
        return self.context_proj is not None

    def forward(
        self, z: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``z`` ``(B, D)``, ``sigma`` ``(B, 1)`` (or a scalar), ``context`` ``(B, W, D)`` for a conditional
        model (ignored otherwise) -> score ``(B, D)``."""
        sigma = torch.as_tensor(sigma, dtype=z.dtype, device=z.device)
        sigma = sigma.expand(z.shape[0], 1) if sigma.numel() == 1 else sigma.reshape(z.shape[0], 1)
        h = self.input_proj(z) + self.sigma_proj(self.sigma_embed(sigma))
        if self.context_proj is not None:
            if context is None:
                raise ValueError("this score model is conditional: pass the context window (B, W, D)")
            if tuple(context.shape[1:]) != (self.context_frames, self.dim):
                raise ValueError(
                    f"context must be (B, {self.context_frames}, {self.dim}), got {tuple(context.shape)}"
                )
            h = h + self.context_proj(context.reshape(z.shape[0], -1))
        return self.output_proj(self.backbone(h))


def sample_sigma(
    n: int,
    sigma_min: float,
    sigma_max: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``(n, 1)`` noise levels drawn log-uniformly on ``[sigma_min, sigma_max]``."""
    u = torch.rand(n, 1, generator=generator, device=device)
    return torch.exp(math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min)))


def dsm_loss(
    net: ScoreNetwork,
    z: torch.Tensor,
    sigma: torch.Tensor,
    eps: torch.Tensor,
    context: torch.Tensor | None = None,
) -> torch.Tensor:
    """σ²-weighted denoising score matching: mean over the batch of ``‖σ s(z + σε, σ) + ε‖²`` (summed over D).

    ``z``, ``eps``: ``(B, D)``; ``sigma``: ``(B, 1)``; ``context``: ``(B, W, D)`` for a conditional model.
    """
    score = net(z + sigma * eps, sigma, context)
    return (sigma * score + eps).square().sum(dim=-1).mean()


class ScoreModule(EmbedsRunConfig, pl.LightningModule):
    """Trains a :class:`ScoreNetwork` on latent frames (batches of :mod:`latentdyn.data.windows`: the frame is
    the window's ``target``, the condition its ``context``) in the dynamics model's space.

    Args:
        dim: latent dimension D.
        hidden_dim: width H; None: :func:`default_hidden_dim`.
        n_layers, sigma_embed_dim, sigma_min, sigma_max: see :class:`ScoreNetwork`.
        conditional: condition on the window of ``context_frames`` frames the dynamics model predicts from.
        context_frames: W of the dynamics model whose rollouts are corrected (used when conditional).
        optimizer: AdamW ``lr`` and ``weight_decay`` (constant learning rate, as the reference).
        standardized: the frames are standardised latents (recorded: a correction must work in that space).
        run_config: the producing run's resolved config, embedded in checkpoints.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int | None = None,
        n_layers: int = 4,
        sigma_embed_dim: int = 128,
        sigma_min: float = 0.01,
        sigma_max: float = 1.0,
        conditional: bool = False,
        context_frames: int = 8,
        optimizer: Mapping[str, Any] | None = None,
        standardized: bool = False,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if hidden_dim is None:
            hidden_dim = default_hidden_dim(dim)
        self.save_hyperparameters(ignore=["run_config"])
        self.run_config = dict(run_config or {})
        self.net = ScoreNetwork(
            dim,
            int(hidden_dim),
            n_layers,
            sigma_embed_dim,
            sigma_min,
            sigma_max,
            context_frames=int(context_frames) if conditional else 0,
        )

    @property
    def conditional(self) -> bool:
        return self.net.conditional

    @property
    def standardized(self) -> bool:
        return bool(self.hparams.standardized)

    def score(
        self, z: torch.Tensor, sigma: float | torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The score ``(B, D)`` at ``z`` ``(B, D)`` and noise level ``sigma`` (given the window ``context``
        ``(B, W, D)`` when conditional), in float32."""
        out = self.net(z.to(torch.float32), sigma, None if context is None else context.to(torch.float32))
        return out.to(torch.float32)

    def _loss(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None) -> torch.Tensor:
        z = batch["target"]
        hp = self.hparams

        def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            sigma = sample_sigma(n, hp.sigma_min, hp.sigma_max, generator, z.device).to(z.dtype)
            return sigma, torch.randn((n, *z.shape[1:]), generator=generator, device=z.device, dtype=z.dtype)

        # Under DDP each rank takes its rows of the global batch's draws (one process's noise per window).
        sigma, eps = global_batch_draw(self, z.shape[0], draw)
        return dsm_loss(self.net, z, sigma, eps, batch["context"] if self.conditional else None)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch, None)
        self.log("score/train/dsm", loss, prog_bar=True, batch_size=batch["target"].shape[0])
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        # The same noise draws at every validation, so the curve measures the model, not the draws.
        generator = torch.Generator(device=batch["target"].device).manual_seed(batch_idx)
        loss = self._loss(batch, generator)
        self.log("score/val/dsm", loss, prog_bar=True, batch_size=batch["target"].shape[0], sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        opt = dict(self.hparams.optimizer or {})
        return torch.optim.AdamW(
            self.parameters(),
            lr=float(opt.get("lr", 1e-3)),
            weight_decay=float(opt.get("weight_decay", 1e-4)),
        )


def load_score_model(path: str | Path, map_location: str | torch.device = "cpu") -> ScoreModule:
    """A trained :class:`ScoreModule` from its checkpoint, in eval mode (``weights_only`` loading).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds Python objects other than tensors and plain data.
    """
    return load_module_checkpoint(ScoreModule, path, "score-model", map_location)
