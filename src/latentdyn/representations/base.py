"""The representation protocol: audio <-> continuous latent frames (DESIGN §7)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Representation(Protocol):
    """Encodes audio to continuous latents and decodes them back.

    Attributes:
        name: short name recorded in stores and tables (``mel``, ``mimi``, ...).
        sample_rate: audio rate in Hz that ``encode`` expects and ``decode`` returns.
        frame_rate: latent frames per second.
        dim: latent dimension D.
        weights: provenance of the weights, a JSON-able dict with at least ``source``
            (``"none"`` for weight-free, ``"random"``, an HF repo id or a local path) and ``pretrained``.
    """

    name: str
    sample_rate: int
    frame_rate: float
    dim: int
    weights: dict[str, Any]

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S)`` float32 audio at ``sample_rate`` -> ``(B, D, T)`` latents."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, D, T)`` latents -> ``(B, 1, S)`` audio at ``sample_rate``."""
        ...

    def num_frames(self, num_samples: int) -> int:
        """Frames ``encode`` yields for an unpadded signal of ``num_samples`` samples."""
        ...

    def to(self, device: torch.device | str) -> Representation:
        """Move to a device; returns self."""
        ...
