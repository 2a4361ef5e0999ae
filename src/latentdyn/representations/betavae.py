"""A trained β-VAE (Exp 5) as a representation: the posterior mean of its bottleneck, decoded through its
``dec_proj`` and its base's (trained, where it is a network) decoder.

``representation=betavae representation.checkpoint=PATH`` (a ``betavae_final.ckpt``, or the run directory of
an Exp 5 variant) makes Phase 0 extraction and every experiment run on β-VAE latents like on any store;
``checkpoint=latest:exp5_betavae/<variant>`` names the newest completed Exp 5 run of that variant (resolved by
the pipeline through the run manifest before anything is built, see
:func:`latentdyn.pipeline.store.resolve_representation_checkpoint`).

Latents are ``latent_dim``-dimensional (32 by default) at the base's frame rate; audio is at the base's
sample rate. Encoding is deterministic (the posterior mean ``mu``), so encoding the same audio twice gives
the same latents.
"""

from __future__ import annotations

from typing import Any

import torch

from latentdyn.models.betavae import BetaVAEModule, load_betavae
from latentdyn.representations.weights import cached_sha256, trained_checkpoint

__all__ = ["BetaVAERepresentation"]


class BetaVAERepresentation(torch.nn.Module):
    """The bottleneck of a trained :class:`~latentdyn.models.betavae.BetaVAEModule`.

    Args:
        checkpoint: the β-VAE checkpoint file (or an Exp 5 variant's run directory holding
            ``checkpoints/betavae_final.ckpt``). ``latest:...`` references are resolved by the pipeline first.
        device: where the model runs.

    Raises:
        ValueError: no checkpoint given, an unresolved ``latest`` reference, or not a β-VAE checkpoint.
        FileNotFoundError: the checkpoint does not exist.
    """

    def __init__(self, checkpoint: str | None = None, device: str = "cpu") -> None:
        super().__init__()
        path = trained_checkpoint(
            checkpoint,
            "betavae_final.ckpt",
            "representation=betavae needs representation.checkpoint=PATH (a betavae_final.ckpt or an Exp 5 "
            "variant's run directory) or latest:exp5_betavae/<variant>",
        )
        self.model: BetaVAEModule = load_betavae(path)
        base = self.model.base
        hp = self.model.hparams
        self.dim = self.model.latent_dim
        self.sample_rate = int(base.sample_rate)
        self.frame_rate = float(base.frame_rate)
        variant = str(hp.get("variant", ""))
        # The variant in the name keeps the four Exp 5 bottlenecks apart in provenance records and tables.
        self.name = f"betavae{self.dim}-{base.name}" + (f"-{variant}" if variant else "")
        self.weights: dict[str, Any] = {
            "source": str(path.resolve()),
            "sha256": cached_sha256(path),
            "pretrained": bool(base.weights.get("pretrained", False)),
            "kind": "betavae",
            "variant": variant,
            "latent_dim": self.dim,
            "reconstruction": self.model.reconstruction,
            "base": dict(base.weights),
        }
        self.to(device)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def num_frames(self, num_samples: int) -> int:
        return int(self.model.base.num_frames(num_samples))

    @torch.no_grad()
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S)`` audio -> ``(B, latent_dim, T)`` float32 posterior means."""
        if wave.dim() != 3 or wave.shape[1] != 1:
            raise ValueError(f"expected audio of shape (B, 1, S), got {tuple(wave.shape)}")
        return self.model.encode_mean(wave.to(self.device, torch.float32)).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, latent_dim, T)`` latents -> ``(B, 1, S)`` audio through ``dec_proj`` and the decoder."""
        if latents.dim() != 3 or latents.shape[1] != self.dim or latents.shape[2] < 1:
            raise ValueError(f"expected latents of shape (B, {self.dim}, T >= 1), got {tuple(latents.shape)}")
        return self.model.decode_latents(latents).float()

    def to(self, *args: Any, **kwargs: Any) -> BetaVAERepresentation:
        super().to(*args, **kwargs)
        self.model.base.to(*args, **kwargs)
        return self

    def extra_repr(self) -> str:
        return (
            f"name={self.name}, sample_rate={self.sample_rate}, frame_rate={self.frame_rate}, dim={self.dim}"
        )
