"""EnCodec 24 kHz continuous latents: the SEANet encoder output before the residual quantiser (DESIGN §7).

The module is named ``encodec_rep`` rather than ``encodec`` so that it can never shadow the ``encodec``
package it imports (e.g. when this file is run directly and its folder lands on ``sys.path``).

Latents. ``encode`` runs the causal SEANet encoder of ``EncodecModel.encodec_model_24khz`` on raw mono
24 kHz audio and returns its continuous output ``(B, 128, T)`` at 75 Hz (hop 8 * 5 * 4 * 2 = 320
samples); ``decode`` runs the SEANet decoder on those latents, bypassing the quantiser, and returns
``(B, 1, 320 * T)``. The package's own pipeline around these two networks is a no-op for this model, which
is why calling them directly is exact: the 24 kHz model is built with ``audio_normalize=False`` (only the
48 kHz model rescales each segment to unit RMS and returns the scale) and ``segment=None`` (no chunking
and overlap-add), so ``EncodecModel.forward`` is ``decoder(quantizer(encoder(x)))[..., :S]``.

Frames. Every convolution is causal (all padding on the left), and each downsampling convolution
(kernel ``2 r``, stride ``r``) pads on the right just enough to make its last window full, so a layer
maps ``L`` steps to ``ceil(L / r)`` and the encoder maps ``S`` samples to ``ceil(S / 320)`` frames. The
left padding is a reflection, though, which mirrors a few steps of the future into the start (6 frames
at the last, 75 Hz, layer), so frame ``t`` depends on samples ``[0, max(320 (t + 1), 2240))``; the LSTM
is unidirectional. Consequently, when a batch is zero-padded to its longest member, an utterance of at
least 2240 samples (93 ms) keeps its first ``S // 320`` frames exactly (to float rounding); a trailing
partial frame (``S % 320 != 0``) does not, because alone it sees each layer's right reflect padding and
in a batch the encoding of the zeros that follow it.

Weights. ``pretrained=True`` loads the release state dict ``encodec_24khz-d7cc33bc.th`` from, in order:
``checkpoint`` (a local file of the same format), the torch.hub cache
(``torch.hub.get_dir()/checkpoints``, i.e. ``$TORCH_HOME/hub/checkpoints``) or a download through the
package's own call, ``torch.hub.load_state_dict_from_url(url, check_hash=True)`` from
``dl.fbaipublicfiles.com``, which fills that cache. A local file (checkpoint or cache) is read directly
with ``torch.load(weights_only=True)`` rather than through torch.hub: its sha256 is recorded in
``weights`` and compared with the 8-hex-digit prefix in the release file name (a mismatch is logged, not
fatal, so a fine-tuned or re-saved state dict can be used). If no weights can be had, construction fails
before anything is built, with a message naming both ways to provide them and
``representation.pretrained=false``. ``pretrained=False`` gives the same architecture with random
weights drawn from a local seed (the global RNG is left untouched).
"""

from __future__ import annotations

import logging
import math
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from encodec import EncodecModel
from encodec.model import ROOT_URL

from latentdyn.representations.weights import (
    WeightsUnavailableError,
    cached_sha256,
    random_provenance,
    resolve_checkpoint,
    seeded_init,
)

__all__ = [
    "CHECKPOINT_NAME",
    "CHECKPOINT_URL",
    "EncodecRepresentation",
    "EncodecWeightsUnavailableError",
    "build_encodec_24khz",
    "hub_checkpoint_path",
    "resolve_pretrained",
]

log = logging.getLogger(__name__)

#: Release file of the 24 kHz model; the part after the dash is the start of its sha256.
CHECKPOINT_NAME = "encodec_24khz-d7cc33bc.th"
CHECKPOINT_URL = ROOT_URL + CHECKPOINT_NAME
RELEASE_SHA256_PREFIX = CHECKPOINT_NAME.rsplit("-", 1)[1].split(".", 1)[0]
#: Seconds a connect or read of the weights download may block (torch.hub sets no timeout of its own).
DOWNLOAD_TIMEOUT_S = 60.0

SAMPLE_RATE = 24_000
HOP = 320
FRAME_RATE = SAMPLE_RATE / HOP
DIM = 128


class EncodecWeightsUnavailableError(WeightsUnavailableError):
    """The pretrained EnCodec weights are neither given, nor cached, nor downloadable."""


def hub_checkpoint_path() -> Path:
    """Where torch.hub keeps the release file: ``torch.hub.get_dir()/checkpoints/<name>`` (honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / CHECKPOINT_NAME


def build_encodec_24khz(seed: int = 0) -> EncodecModel:
    """The 24 kHz EnCodec architecture (causal, weight norm, 128-d latents) with weights drawn from ``seed``.

    The initialisation runs under a forked RNG so the caller's global torch RNG state is unchanged. The
    package's deprecation warning for ``torch.nn.utils.weight_norm`` is silenced: the old-style weight
    norm is what gives the release state dict its ``weight_g``/``weight_v`` keys.
    """
    with seeded_init(seed), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.nn\.utils\.weight_norm", category=FutureWarning)
        model = EncodecModel.encodec_model_24khz(pretrained=False)
    if model.normalize or model.segment is not None:
        raise RuntimeError("encodec's 24 kHz model is expected to use normalize=False and segment=None")
    if model.sample_rate != SAMPLE_RATE or int(model.encoder.hop_length) != HOP:
        raise RuntimeError(
            f"unexpected encodec 24 kHz model: {model.sample_rate} Hz, hop {model.encoder.hop_length}"
        )
    return model.float().eval()


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only (``weights_only=True``): a state dict file cannot run code when loaded."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Give sockets opened without a timeout (as torch.hub's ``urlopen``) this one, for the block only."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _download_state_dict(url: str) -> dict[str, torch.Tensor]:
    """The package's download: torch.hub fetches ``url`` into its cache, checking the file name's hash prefix."""
    with _socket_timeout(DOWNLOAD_TIMEOUT_S):
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)


def _unavailable_message(cached: Path, reason: str) -> str:
    return (
        f"EnCodec 24 kHz weights are not available: {reason}. Provide them in one of two ways: "
        f"(1) representation.checkpoint=PATH, a local copy of {CHECKPOINT_NAME} (its state dict); or "
        f"(2) put {CHECKPOINT_NAME} in $TORCH_HOME/hub/checkpoints/ (here {cached.parent}), or make "
        f"dl.fbaipublicfiles.com reachable so that {CHECKPOINT_URL} is downloaded there. "
        "Set representation.pretrained=false to run with random weights instead (no meaningful latents)."
    )


def _file_provenance(path: Path, source: str) -> dict[str, Any]:
    sha = cached_sha256(path)
    matches = sha.startswith(RELEASE_SHA256_PREFIX)
    if not matches:
        log.warning(
            "%s: sha256 %s does not start with the release prefix %s of %s; using it as given",
            path,
            sha,
            RELEASE_SHA256_PREFIX,
            CHECKPOINT_NAME,
        )
    return {
        "source": source,
        "pretrained": True,
        "path": str(path),
        "sha256": sha,
        "matches_release": matches,
        "model": "encodec_24khz",
    }


def resolve_pretrained(
    checkpoint: str | Path | None, download: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The release state dict and its provenance: ``checkpoint``, else the hub cache, else a download.

    The cache file's presence is checked before the network is touched, so a populated cache works
    offline.

    Raises:
        FileNotFoundError: ``checkpoint`` is given but is not a file.
        EncodecWeightsUnavailableError: no checkpoint, nothing cached, and the download is disabled or fails.
    """
    if checkpoint is not None and str(checkpoint) != "":
        path = resolve_checkpoint(checkpoint).resolve()
        log.info("loading EnCodec weights from %s", path)
        return _load_state_file(path), _file_provenance(path, str(path))
    cached = hub_checkpoint_path()
    if cached.is_file():
        log.info("loading EnCodec weights from the torch.hub cache %s", cached)
        return _load_state_file(cached), _file_provenance(cached, CHECKPOINT_URL)
    if not download:
        raise EncodecWeightsUnavailableError(
            _unavailable_message(cached, f"{cached} does not exist and downloads are off (download=false)")
        )
    try:
        state = _download_state_dict(CHECKPOINT_URL)
    # URLError, HTTPError and timeouts are OSErrors; torch.hub reports a hash mismatch as a RuntimeError.
    except (OSError, RuntimeError) as exc:
        raise EncodecWeightsUnavailableError(
            _unavailable_message(cached, f"{cached} does not exist and downloading it failed ({exc})")
        ) from exc
    provenance = (
        _file_provenance(cached, CHECKPOINT_URL)
        if cached.is_file()
        else {"source": CHECKPOINT_URL, "pretrained": True, "model": "encodec_24khz"}
    )
    return state, provenance


class EncodecRepresentation(torch.nn.Module):
    """EnCodec 24 kHz continuous latents ``(B, 128, T)`` at 75 Hz, decoded by the SEANet decoder.

    Args:
        pretrained: load the release weights (see the module docstring for where from); otherwise
            random weights drawn from ``seed``.
        checkpoint: a local state dict file in the release format; used instead of the cache/download
            (``~`` and ``$VARS`` expanded); ignored, with a warning, when ``pretrained`` is false.
        download: allow the torch.hub download when the cache is empty; ``False`` fails at once instead.
        seed: seed of the random weights when ``pretrained`` is false.
        device: where the model lives.

    Raises:
        FileNotFoundError, EncodecWeightsUnavailableError: see :func:`resolve_pretrained`.
    """

    name = "encodec"
    sample_rate = SAMPLE_RATE
    frame_rate = FRAME_RATE
    dim = DIM
    hop = HOP
    weights: dict[str, Any]

    def __init__(
        self,
        pretrained: bool = True,
        checkpoint: str | None = None,
        download: bool = True,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        super().__init__()
        if pretrained:
            state, self.weights = resolve_pretrained(checkpoint, download)
            self.model = build_encodec_24khz(seed)
            try:
                self.model.load_state_dict(state)
            except RuntimeError as exc:
                raise RuntimeError(
                    f"the EnCodec weights from {self.weights['source']} do not fit the 24 kHz model: {exc}"
                ) from exc
        else:
            if checkpoint:
                log.warning("representation.checkpoint=%s is ignored: pretrained=false", checkpoint)
            self.model = build_encodec_24khz(seed)
            self.weights = random_provenance(seed, model="encodec_24khz")
        self.model.requires_grad_(False)
        self.to(device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def num_frames(self, num_samples: int) -> int:
        """``ceil(S / 320)``: every causal downsampling layer keeps a trailing partial window."""
        return math.ceil(int(num_samples) / HOP)

    @torch.inference_mode()
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S)`` 24 kHz audio -> ``(B, 128, ceil(S / 320))`` float32 encoder output (not normalised).

        Runs under ``inference_mode``: clone the result before using it in autograd.
        """
        if wave.dim() != 3 or wave.shape[1] != 1 or wave.shape[2] < 1:
            raise ValueError(f"expected audio of shape (B, 1, S >= 1), got {tuple(wave.shape)}")
        return self.model.encoder(wave.to(device=self.device, dtype=torch.float32))

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, 128, T)`` latents -> ``(B, 1, 320 T)`` float32 24 kHz audio from the SEANet decoder."""
        if latents.dim() != 3 or latents.shape[1] != DIM or latents.shape[2] < 1:
            raise ValueError(f"expected latents of shape (B, {DIM}, T >= 1), got {tuple(latents.shape)}")
        return self.model.decoder(latents.to(device=self.device, dtype=torch.float32))

    def decoder_module(self) -> torch.nn.Module:
        """A trainable copy of the SEANet decoder (latents ``(B, 128, T)`` -> audio ``(B, 1, 320 T)``) with this
        model's weights. Built anew and loaded from the state dict: the old-style weight norm's derived
        ``weight`` tensors cannot be deep-copied."""
        decoder = build_encodec_24khz(0).decoder
        decoder.load_state_dict(self.model.decoder.state_dict())
        return decoder.to(self.device).requires_grad_(True)

    def extra_repr(self) -> str:
        return (
            f"sample_rate={SAMPLE_RATE}, frame_rate={FRAME_RATE}, hop={HOP}, dim={DIM}, "
            f"weights={self.weights['source']}"
        )
