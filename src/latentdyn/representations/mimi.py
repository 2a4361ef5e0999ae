"""Kyutai's Mimi codec (``moshi`` package) as a continuous latent representation (DESIGN §7).

Latents are 512-d at 12.5 Hz (one frame per 1920 samples of 24 kHz audio), in one of two spaces chosen by
``latent_space``:

* ``quantizer_output`` (default, the reference study's space): the quantiser's output with the vector
  quantisation skipped. Mimi's quantiser splits into ``rvq_first`` (the semantic codebook) and
  ``rvq_rest`` (the acoustic ones), each mapping its input through ``input_proj`` (512 -> 256) then,
  after quantising, ``output_proj`` (256 -> 512), both bias-free 1x1 convolutions; the split quantiser
  returns the sum of the two. Without quantisation that is
  ``z = rvq_first.output_proj(rvq_first.input_proj(h)) + rvq_rest.output_proj(rvq_rest.input_proj(h))``
  (:func:`bypass_quantizer`) with ``h`` the pre-quantisation embedding below. ``z`` is what Mimi's decoder
  path reads: decoding is upsampling to the encoder's 25 Hz, the decoder transformer and the SEANet
  decoder, exactly what :meth:`MimiModel.decode` does after ``quantizer.decode(codes)``.
* ``pre_quantizer``: the pre-quantisation embedding ``h = encode_to_latent(x, quantize=False)`` (SEANet
  encoder, encoder transformer, downsampling to 12.5 Hz). Decoding maps ``h`` through the same quantiser
  bypass first, then the decoder path.

In both spaces ``decode(encode(x))`` is Mimi's training forward with quantisation skipped
(``no_quantization_rate = 1``), before its crop to the input length. Mimi is causal: ``encode`` zero-pads the signal at the end to a whole number
of frames, so an ``S``-sample signal gives ``ceil(S / 1920)`` frames, and frame ``t`` depends only on samples
before ``(t + 1) * 1920`` (the bypass is frame-wise). A batch of zero-padded signals therefore gives, cropped
to each signal's own frame count, the same latents as encoding each alone.

The space is recorded in :attr:`MimiRepresentation.weights` (``latent_space``), which latent stores copy into
their ``meta.json`` and extraction shards into their fingerprint.

Both directions run in float32 under ``torch.no_grad`` (not ``inference_mode``: its tensors cannot be
used by autograd later, and latents feed trainable models downstream).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.quantization import ResidualVectorQuantizer, SplitResidualVectorQuantizer

from latentdyn.representations.weights import locate_pretrained, random_provenance, seeded_init

__all__ = ["LATENT_SPACES", "MimiDecoderPath", "MimiRepresentation", "bypass_quantizer"]

#: ``latent_space`` choices, the default first.
LATENT_SPACES = ("quantizer_output", "pre_quantizer")

log = logging.getLogger(__name__)


def bypass_quantizer(quantizer: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """A moshi quantiser's no-quantisation output for a continuous input, ``(B, D, T) -> (B, D, T)``.

    What ``quantizer(z, frame_rate).x`` returns when quantisation is skipped (in training mode with
    ``no_quantization_rate = 1``): ``output_proj(input_proj(z))`` for a :class:`ResidualVectorQuantizer`,
    and the sum of that over both halves of a :class:`SplitResidualVectorQuantizer`.
    """
    if isinstance(quantizer, SplitResidualVectorQuantizer):
        return bypass_quantizer(quantizer.rvq_first, z) + bypass_quantizer(quantizer.rvq_rest, z)
    if isinstance(quantizer, ResidualVectorQuantizer):
        return quantizer.output_proj(quantizer.input_proj(z))
    raise TypeError(f"no quantiser bypass for {type(quantizer).__name__}")


class MimiDecoderPath(torch.nn.Module):
    """Mimi's decoding as one differentiable network, latents in ``latent_space`` -> audio ``(B, 1, T * 1920)``.

    Holds (references, until copied) the parts of a :class:`MimiModel` that decoding uses: the quantiser's
    projections (``pre_quantizer`` latents only), the upsampling to the encoder's frame rate, the decoder
    transformer and the SEANet decoder. ``copy.deepcopy`` of it copies those parts only, which is how the
    β-VAE gets a decoder of its own to train (:meth:`MimiRepresentation.decoder_module`).
    """

    def __init__(self, model: MimiModel, latent_space: str) -> None:
        super().__init__()
        self.quantizer = model.quantizer if latent_space == "pre_quantizer" else None
        self.needs_upsampling = model.encoder_frame_rate != model.frame_rate
        self.interpolate = model.resample_method == "interpolate"
        self.scale = model.encoder_frame_rate / model.frame_rate
        self.upsample = model.upsample if self.needs_upsampling and not self.interpolate else None
        self.decoder_transformer = model.decoder_transformer
        self.decoder = model.decoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = bypass_quantizer(self.quantizer, latents) if self.quantizer is not None else latents
        if self.needs_upsampling:
            if self.interpolate:
                z = torch.nn.functional.interpolate(z, size=int(z.shape[-1] * self.scale), mode="linear")
            else:
                z = self.upsample(z)
        if self.decoder_transformer is not None:
            (z,) = self.decoder_transformer(z)
        return self.decoder(z)


class MimiRepresentation(torch.nn.Module):
    """Mimi's continuous latents, ``(B, 512, T)`` at 12.5 Hz from 24 kHz audio (see the module docstring).

    Args:
        pretrained: load pretrained weights (from ``checkpoint``, else the HF hub); ``False`` builds the
            same architecture with random weights drawn with ``seed`` (the global RNG is left untouched).
        checkpoint: local Mimi safetensors file (``tokenizer-...safetensors``); must exist when given.
        hf_repo: HF hub repository holding the weights.
        filename: weights file inside ``hf_repo``.
        device: where the model lives (it is always built on CPU, then moved).
        seed: seed of the random weights when ``pretrained`` is false.
        latent_space: ``quantizer_output`` (the quantiser's output with quantisation skipped, which the decoder
            reads directly) or ``pre_quantizer`` (the encoder's pre-quantisation embedding ``h``). Recorded in
            :attr:`weights` as ``latent_space``.

    Raises:
        ValueError: unknown ``latent_space``.
        FileNotFoundError: ``checkpoint`` is given but does not exist.
        WeightsUnavailableError: pretrained weights asked for, no ``checkpoint``, and the hub cannot supply
            them (offline and not cached, network error); raised before anything is built.
    """

    name = "mimi"
    sample_rate = loaders.SAMPLE_RATE
    frame_rate = loaders.FRAME_RATE
    dim = 512
    weights: dict[str, Any]

    def __init__(
        self,
        pretrained: bool = True,
        checkpoint: str | None = None,
        hf_repo: str = loaders.DEFAULT_REPO,
        filename: str = loaders.MIMI_NAME,
        device: str = "cpu",
        seed: int = 0,
        latent_space: str = LATENT_SPACES[0],
    ) -> None:
        super().__init__()
        if latent_space not in LATENT_SPACES:
            raise ValueError(
                f"representation.latent_space must be one of {LATENT_SPACES}, got {latent_space!r}"
            )
        self.latent_space = latent_space
        if pretrained:
            located = locate_pretrained(checkpoint=checkpoint, hf_repo=hf_repo, filename=filename)
            weights_path: str | None = str(located.path)
            self.weights = located.provenance
        else:
            if checkpoint:
                log.warning("representation.checkpoint=%s is ignored: pretrained=false", checkpoint)
            weights_path = None
            self.weights = random_provenance(seed, init="moshi.models.loaders.get_mimi(None)")
        # Which space the latents are in: stores copy ``weights`` into their meta.json.
        self.weights = {**self.weights, "latent_space": latent_space}
        with seeded_init(seed):
            try:
                model = loaders.get_mimi(weights_path, device="cpu")
            except Exception as err:
                if weights_path is None:
                    raise
                raise RuntimeError(f"could not load Mimi weights from {weights_path}: {err}") from err
        self.model: MimiModel = model.float().eval()
        if self.model.sample_rate != self.sample_rate or self.model.frame_size != self.hop:
            raise RuntimeError(
                f"moshi's Mimi runs at {self.model.sample_rate} Hz with {self.model.frame_size}-sample frames, "
                f"expected {self.sample_rate} Hz and {self.hop}"
            )
        self.to(device)

    @property
    def hop(self) -> int:
        """Samples per latent frame (1920 = 24000 / 12.5)."""
        return round(self.sample_rate / self.frame_rate)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def num_frames(self, num_samples: int) -> int:
        """``ceil(num_samples / 1920)``: Mimi zero-pads a partial last frame."""
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        return math.ceil(int(num_samples) / self.hop)

    def _check_not_streaming(self) -> None:
        # In streaming mode moshi keeps state across calls and refuses partial frames; latents here are
        # whole-utterance, so the model must be in its stateless (non-streaming) mode.
        if self.model.is_streaming:
            raise RuntimeError("MimiRepresentation needs the Mimi model out of streaming mode")

    @torch.no_grad()
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S)`` audio -> ``(B, 512, ceil(S / 1920))`` float32 latents in :attr:`latent_space`."""
        if wave.dim() != 3 or wave.shape[1] != 1 or wave.shape[-1] < 1:
            raise ValueError(f"expected audio of shape (B, 1, S >= 1), got {tuple(wave.shape)}")
        self._check_not_streaming()
        wave = wave.to(device=self.device, dtype=torch.float32)
        h = self.model.encode_to_latent(wave, quantize=False)
        if self.latent_space == "pre_quantizer":
            return h
        return bypass_quantizer(self.model.quantizer, h)

    def synthesise(self, embedding: torch.Tensor) -> torch.Tensor:
        """Quantiser-output space ``(B, 512, T)`` -> ``(B, 1, T * 1920)`` audio: Mimi's decoder after the
        quantiser (upsampling to 25 Hz, decoder transformer, SEANet decoder), as in :meth:`MimiModel.decode`."""
        emb = self.model._to_encoder_framerate(embedding)
        if self.model.decoder_transformer is not None:
            (emb,) = self.model.decoder_transformer(emb)
        return self.model.decoder(emb)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, 512, T)`` latents in :attr:`latent_space` -> ``(B, 1, T * 1920)`` float32 audio, unquantised.

        ``quantizer_output`` latents go straight to the decoder path (:meth:`synthesise`); ``pre_quantizer``
        ones go through the quantiser bypass (:func:`bypass_quantizer`) first.
        """
        if latents.dim() != 3 or latents.shape[1] != self.dim or latents.shape[2] < 1:
            raise ValueError(f"expected latents of shape (B, {self.dim}, T >= 1), got {tuple(latents.shape)}")
        self._check_not_streaming()
        z = latents.to(device=self.device, dtype=torch.float32)
        if self.latent_space == "pre_quantizer":
            z = bypass_quantizer(self.model.quantizer, z)
        return self.synthesise(z)

    def decoder_module(self) -> MimiDecoderPath:
        """A trainable copy of the decoding network (latents in :attr:`latent_space` -> audio) with this model's
        weights; training it leaves this representation's own decoder unchanged."""
        return copy.deepcopy(MimiDecoderPath(self.model, self.latent_space)).requires_grad_(True)

    def extra_repr(self) -> str:
        return (
            f"sample_rate={self.sample_rate}, frame_rate={self.frame_rate}, dim={self.dim}, "
            f"latent_space={self.latent_space}, weights={self.weights.get('source')}"
        )
