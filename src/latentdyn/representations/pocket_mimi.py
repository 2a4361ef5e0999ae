"""pocket-tts's Mimi codec (``pocket_tts`` package) as a continuous latent representation (DESIGN §7), and the
streaming-state plumbing its decoder needs.

pocket-tts ships Mimi variants whose encoder ends in a ``inner_dim``-wide bottleneck: the SEANet encoder
(200 Hz at 24 kHz), the encoder transformer, and a strided convolution down to 12.5 Hz that maps 512 -> 32
channels. :meth:`MimiModel.encode_to_latent` returns those ``(B, T, 32)`` latents (one frame per 1920 samples);
:meth:`MimiModel.decode_from_latent` maps them back through the "quantiser" output projection (32 -> 512), a
transposed convolution up to 200 Hz, the decoder transformer and the SEANet decoder. Those 32-d latents are
the representation here (``english_2026-04`` by default; any bundled config whose ``mimi.inner_dim`` is set).

Decoding is stateful in pocket-tts: every streaming module reads its state from a dict keyed by the module's
absolute name, which must be stamped on the modules (:func:`stamp_state_names`), and the decoder transformer's
key/value cache must hold every step it attends to. The transformer runs at the encoder rate, 16 steps per
latent frame, so a clip of ``T`` frames needs a cache of at least ``16 * T`` steps (:func:`decoder_state`); the
reference study sized it ``T + 8`` and lost attention on all but the last few hundred milliseconds.

Weights come from a local ``checkpoint`` (a pocket-tts safetensors file: a TTS bundle with ``mimi.*`` tensors
or a Mimi-only file) or from the HF hub location the bundled config names (its ``weights_path``), through the
HF cache; when neither is available the run stops with how to provide them. ``pretrained=false`` builds the
architecture with seeded random weights (recorded as ``source: random``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentdyn.representations.weights import locate_pretrained, random_provenance, seeded_init

__all__ = [
    "PocketMimiRepresentation",
    "build_pocket_mimi",
    "decode_from_latent",
    "decoder_state",
    "hub_location",
    "pocket_config",
    "stamp_state_names",
    "steps_per_frame",
]

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "english_2026-04"


def import_pocket_tts() -> None:
    """Import pocket-tts, undoing the ``torch.set_num_threads(1)`` its package runs at import (it would make
    every later CPU op of the process single-threaded). Run when this module is imported, before any other
    ``pocket_tts`` import of ours."""
    threads = torch.get_num_threads()
    import pocket_tts  # noqa: F401

    torch.set_num_threads(threads)


import_pocket_tts()


def pocket_config(name: str) -> Any:
    """The ``Config`` of a pocket-tts bundled config (``english_2026-04``) or a YAML file path.

    Raises:
        ValueError: unknown name, or a config whose Mimi has no ``inner_dim`` bottleneck.
    """
    from pocket_tts.utils.config import CONFIGS_DIR, load_config

    path = Path(name).expanduser()
    if not path.is_file():
        path = CONFIGS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
        raise ValueError(f"no pocket-tts config {name!r}: give a YAML file or one of {known}")
    config = load_config(path)
    if not config.mimi.inner_dim:
        raise ValueError(
            f"pocket-tts config {name!r} has no mimi.inner_dim: its Mimi has no latent bottleneck"
        )
    return config


def hub_location(weights_path: str) -> tuple[str, str, str | None]:
    """``hf://owner/repo/path/file@revision`` -> ``(owner/repo, path/file, revision or None)``."""
    if not weights_path.startswith("hf://"):
        raise ValueError(f"not an hf:// location: {weights_path!r}")
    body, _, revision = weights_path.removeprefix("hf://").partition("@")
    parts = body.split("/")
    if len(parts) < 3:
        raise ValueError(f"expected hf://owner/repo/file, got {weights_path!r}")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision or None


def stamp_state_names(mimi: nn.Module) -> list[str]:
    """Give every streaming module of ``mimi`` its name in ``mimi.named_modules()`` (the key of its slice of the
    state dict, as :func:`pocket_tts.modules.stateful_module.init_states` builds it); returns the names.

    pocket-tts stamps them on a whole ``TTSModel`` only; a Mimi built on its own has none and cannot decode.
    """
    from pocket_tts.modules.stateful_module import StatefulModule

    names = []
    for name, module in mimi.named_modules():
        if isinstance(module, StatefulModule):
            module._module_absolute_name = name
            names.append(name)
    return names


def steps_per_frame(mimi: nn.Module) -> int:
    """Decoder-transformer steps per latent frame: the encoder rate over the latent rate (16 = 200 / 12.5)."""
    return round(float(mimi.encoder_frame_rate) / float(mimi.frame_rate))


def decoder_state(mimi: nn.Module, batch_size: int, frames: int) -> dict[str, dict[str, torch.Tensor]]:
    """A fresh (cold-start) streaming state for decoding ``frames`` latent frames in one call, its attention
    caches sized for every decoder-transformer step of the clip (``steps_per_frame * frames``)."""
    from pocket_tts.modules.stateful_module import init_states

    return init_states(
        mimi, batch_size=batch_size, sequence_length=steps_per_frame(mimi) * max(int(frames), 1)
    )


def decode_from_latent(mimi: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """``(B, D, T)`` latents -> ``(B, 1, T * 1920)`` audio through ``mimi``'s decoder, differentiably, with a
    fresh state sized for the clip (:func:`decoder_state`)."""
    state = decoder_state(mimi, latents.shape[0], latents.shape[-1])
    return mimi.decode_from_latent(latents.transpose(1, 2), state)


def build_pocket_mimi(config: Any) -> nn.Module:
    """The Mimi of a pocket-tts ``Config`` with fresh weights, its streaming modules stamped, in float32."""
    from pocket_tts.models.mimi import build_mimi

    mimi = build_mimi(config.mimi).float()
    stamp_state_names(mimi)
    return mimi


def _encoder_is_zero(mimi: nn.Module) -> bool:
    return all(not bool(p.detach().any()) for p in mimi.encoder.parameters())


class PocketMimiRepresentation(nn.Module):
    """pocket-tts Mimi latents, ``(B, inner_dim, T)`` at 12.5 Hz from 24 kHz audio (see the module docstring).

    Args:
        config: a bundled pocket-tts config name or a YAML path; its Mimi must have ``inner_dim``.
        pretrained: load pretrained weights (``checkpoint``, else the HF hub); ``False`` builds random weights
            drawn with ``seed`` (the global RNG is left untouched).
        checkpoint: local safetensors file with the Mimi weights (``mimi.*`` tensors of a TTS bundle, or a
            Mimi-only file); must exist when given.
        hf_repo, filename, revision: the hub location; null: the config's ``weights_path``.
        device: where the model lives (built on CPU, then moved).
        seed: seed of the random weights when ``pretrained`` is false.

    Raises:
        FileNotFoundError: ``checkpoint`` is given but does not exist.
        WeightsUnavailableError: pretrained weights asked for and neither ``checkpoint`` nor the hub supplies
            them; raised before anything is built.
        ValueError: the loaded weights have an all-zero encoder (a bundle without voice cloning ships none).
    """

    sample_rate: int
    frame_rate: float
    dim: int
    weights: dict[str, Any]

    def __init__(
        self,
        config: str = DEFAULT_CONFIG,
        pretrained: bool = True,
        checkpoint: str | None = None,
        hf_repo: str | None = None,
        filename: str | None = None,
        revision: str | None = None,
        device: str = "cpu",
        seed: int = 0,
    ) -> None:
        super().__init__()
        pocket = pocket_config(config)
        self.config_name = str(config)
        self.name = f"pocket_mimi-{Path(str(config)).stem}"
        if pretrained:
            repo, file, rev = self._hub_default(pocket)
            located = locate_pretrained(
                checkpoint=checkpoint,
                hf_repo=hf_repo or repo,
                filename=filename or file,
                revision=revision if hf_repo else (revision or rev),
            )
            self.weights = {**located.provenance, "config": self.config_name}
        else:
            if checkpoint:
                log.warning("representation.checkpoint=%s is ignored: pretrained=false", checkpoint)
            located = None
            self.weights = random_provenance(seed, init="pocket_tts build_mimi", config=self.config_name)
        with seeded_init(seed):
            self.model = build_pocket_mimi(pocket)
        if located is not None:
            self._load(located.path)
        self.model.eval()
        self.sample_rate = int(self.model.sample_rate)
        self.frame_rate = float(self.model.frame_rate)
        self.dim = int(pocket.mimi.inner_dim)
        self.to(device)

    @staticmethod
    def _hub_default(pocket: Any) -> tuple[str, str, str | None]:
        if not pocket.weights_path:
            raise ValueError("this pocket-tts config names no weights_path: give representation.checkpoint")
        return hub_location(pocket.weights_path)

    def _load(self, path: Path) -> None:
        from pocket_tts.utils.weights_loading import get_mimi_state_dict

        try:
            self.model.load_state_dict(get_mimi_state_dict(path), strict=True)
        except (RuntimeError, KeyError, OSError) as err:
            raise RuntimeError(f"could not load pocket-tts Mimi weights from {path}: {err}") from err
        if _encoder_is_zero(self.model):
            raise ValueError(
                f"the Mimi encoder weights in {path} are all zero: this bundle cannot encode audio (pocket-tts "
                "bundles without voice cloning ship no encoder). Use the voice-cloning bundle: accept its terms "
                "at https://huggingface.co/kyutai/pocket-tts and log in (`huggingface-cli login`), or pass "
                "representation.checkpoint=PATH to a file with the encoder"
            )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hop(self) -> int:
        """Samples per latent frame (1920 = 24000 / 12.5)."""
        return round(self.sample_rate / self.frame_rate)

    def num_frames(self, num_samples: int) -> int:
        """``ceil(num_samples / 1920)``: the encoder zero-pads a partial last frame."""
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        return math.ceil(int(num_samples) / self.hop)

    @torch.no_grad()
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S)`` audio -> ``(B, inner_dim, ceil(S / 1920))`` float32 latents."""
        if wave.dim() != 3 or wave.shape[1] != 1 or wave.shape[-1] < 1:
            raise ValueError(f"expected audio of shape (B, 1, S >= 1), got {tuple(wave.shape)}")
        latents = self.model.encode_to_latent(wave.to(self.device, torch.float32))
        return latents.transpose(1, 2).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, inner_dim, T)`` latents -> ``(B, 1, T * 1920)`` float32 audio."""
        if latents.dim() != 3 or latents.shape[1] != self.dim or latents.shape[2] < 1:
            raise ValueError(f"expected latents of shape (B, {self.dim}, T >= 1), got {tuple(latents.shape)}")
        return decode_from_latent(self.model, latents.to(self.device, torch.float32)).float()

    def extra_repr(self) -> str:
        return (
            f"config={self.config_name}, sample_rate={self.sample_rate}, frame_rate={self.frame_rate}, "
            f"dim={self.dim}, weights={self.weights.get('source')}"
        )
