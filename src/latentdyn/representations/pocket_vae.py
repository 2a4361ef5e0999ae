"""A trained Exp 9 VAE-GAN as a representation: the posterior mean of its bottleneck inside pocket-tts's Mimi,
decoded through its ``dec_proj`` and its (fine-tuned) Mimi decoder.

``representation=pocket_vae representation.checkpoint=PATH`` (a ``vae_gan_final.ckpt``, or an Exp 9 run
directory) makes Phase 0 extraction and every experiment run on VAE-GAN latents like on any store;
``checkpoint=latest:exp9_pocket_mimi_vae`` names the newest completed Exp 9 run (resolved by the pipeline
through the run manifest, see :func:`latentdyn.pipeline.store.resolve_representation_checkpoint`).

Latents are ``latent_dim``-dimensional (32 by default) at 12.5 Hz; audio is 24 kHz. Encoding is deterministic.
Every weight comes from the checkpoint: no pretrained download is needed to use one.
"""

from __future__ import annotations

from typing import Any

import torch

from latentdyn.models.vae_gan import FINAL_NAME, VAEGANModule, load_vae_gan
from latentdyn.representations.weights import cached_sha256, trained_checkpoint

__all__ = ["PocketVAERepresentation"]


class PocketVAERepresentation(torch.nn.Module):
    """The bottleneck of a trained :class:`~latentdyn.models.vae_gan.VAEGANModule`.

    Args:
        checkpoint: the VAE-GAN checkpoint file (or an Exp 9 run directory holding
            ``checkpoints/vae_gan_final.ckpt``). ``latest:...`` references are resolved by the pipeline first.
        device: where the model runs.

    Raises:
        ValueError: no checkpoint given, an unresolved ``latest`` reference, or not a VAE-GAN checkpoint.
        FileNotFoundError: the checkpoint does not exist.
    """

    def __init__(self, checkpoint: str | None = None, device: str = "cpu") -> None:
        super().__init__()
        path = trained_checkpoint(
            checkpoint,
            FINAL_NAME,
            "representation=pocket_vae needs representation.checkpoint=PATH (a vae_gan_final.ckpt or an Exp 9 "
            "run directory) or latest:exp9_pocket_mimi_vae",
        )
        self.model: VAEGANModule = load_vae_gan(path)
        self.dim = self.model.latent_dim
        self.sample_rate = self.model.sample_rate
        self.frame_rate = self.model.frame_rate
        self.name = f"pocket_vae{self.dim}-{self.model.hparams.init}"
        self.weights: dict[str, Any] = {
            "source": str(path.resolve()),
            "sha256": cached_sha256(path),
            "pretrained": bool(self.model.codec_weights.get("pretrained", False)),
            "kind": "vae_gan",
            "init": str(self.model.hparams.init),
            "latent_dim": self.dim,
            "codec": dict(self.model.codec_weights),
        }
        self.to(device)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def num_frames(self, num_samples: int) -> int:
        """``ceil(num_samples / 1920)``: the codec's encoder zero-pads a partial last frame."""
        hop = round(self.sample_rate / self.frame_rate)
        return -(-int(num_samples) // hop)

    @torch.no_grad()
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S)`` audio -> ``(B, latent_dim, T)`` float32 posterior means."""
        if wave.dim() != 3 or wave.shape[1] != 1 or wave.shape[-1] < 1:
            raise ValueError(f"expected audio of shape (B, 1, S >= 1), got {tuple(wave.shape)}")
        return self.model.encode_mean(wave)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, latent_dim, T)`` latents -> ``(B, 1, 1920 T)`` audio through ``dec_proj`` and the decoder."""
        if latents.dim() != 3 or latents.shape[1] != self.dim or latents.shape[2] < 1:
            raise ValueError(f"expected latents of shape (B, {self.dim}, T >= 1), got {tuple(latents.shape)}")
        return self.model.decode_latents(latents)

    def extra_repr(self) -> str:
        return (
            f"name={self.name}, sample_rate={self.sample_rate}, frame_rate={self.frame_rate}, dim={self.dim}"
        )
