"""Latent trajectories -> listening files: decode, resample, write WAVs, score them (DESIGN §9, "Audio").

Conventions shared by the perceptual experiments (Exp 3B, Exp 7):

* Latents are handled as ``(T, D)`` frames (the latent store's layout) and decoded in batches ``(B, T, D)``
  with the representation the store was encoded with (:func:`representation_from_store`), which returns
  ``T * hop`` samples per trajectory at ``rep.sample_rate`` (``hop = sample_rate / frame_rate``).
* Edits and rollouts happen in raw latent space (the reference study's) or in the store's
  train-standardised space (an option); :meth:`LatentStore.destandardize` and :func:`raw_from_edit` map standardised
  frames back to raw latents for decoding.
* Utterances are cropped to their first ``max_frames`` frames (:func:`crop_frames`; the reference: 200).
* Every listening file is written twice by :func:`write_listening_wav`: at the output rate (48 kHz, the
  reference's WAVs: the codec's signal resampled with :func:`resample_waves`) and at the representation's own
  rate (the samples that are scored), with one shared peak gain.
* A decoded edit or rollout is scored against ``decode(z_true)``, never against the original waveform, so
  the codec's own loss is not counted twice; ``decode(z_true)`` against the original audio is scored once
  per utterance as the codec's reconstruction ceiling (:func:`reconstruction_ceiling`).
* Distances are computed on the decoded signals as they are. WAVs are written as 32-bit float (no
  quantisation, no dither); a signal whose peak exceeds full scale (an edit far off the manifold can
  decode to a blast of e.g. 60 dB over full scale) is scaled down to peak 1 for safe listening and the
  gain is recorded, so a native-rate file holds the scored samples times ``gain`` (the 48 kHz file: resampled).
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from hydra.utils import instantiate

from latentdyn.data.audio import BadAudioError, load_audio, resample
from latentdyn.data.latent_store import LatentStore, StoreUtterance
from latentdyn.diagnostics.audio_metrics import AUDIO_METRIC_KEYS, MRSTFT_FFT_SIZES, audio_distances, si_sdr
from latentdyn.jsonio import write_bytes_atomic
from latentdyn.representations.base import Representation
from latentdyn.representations.mel import hop_length

__all__ = [
    "MIN_SPECTRAL_SAMPLES",
    "NATIVE_DIR_FORMAT",
    "WAV_SUBTYPE",
    "choose_utterances",
    "crop_frames",
    "decode_latents",
    "flat_metrics",
    "json_distances",
    "load_original",
    "mean_distances",
    "objective_distances",
    "peak_gain",
    "raw_from_edit",
    "reconstruction_ceiling",
    "relative",
    "representation_from_store",
    "resample_waves",
    "safe_name",
    "samples_per_frame",
    "write_listening_wav",
    "write_wav",
]

log = logging.getLogger(__name__)

#: soundfile subtype of every WAV written here: float32 keeps peaks above full scale instead of clipping.
WAV_SUBTYPE = "FLOAT"
#: Shortest signal (samples) the spectral distances accept: more than half the largest MR-STFT FFT size.
MIN_SPECTRAL_SAMPLES = max(MRSTFT_FFT_SIZES) // 2 + 1
#: Provenance keys that must agree between a store's encoder and the decoder built for it.
_WEIGHT_KEYS = ("source", "pretrained", "sha256", "seed")
#: Keys that must be present in the store too when the decoder reports them: a Mimi store written before
#: ``latent_space`` existed holds pre-quantiser latents, which today's default decoder would misread.
_REQUIRED_WEIGHT_KEYS = ("latent_space",)


def samples_per_frame(sample_rate: int, frame_rate: float) -> int:
    """Audio samples per latent frame (``sample_rate / frame_rate``, a whole number or ValueError)."""
    return hop_length(int(sample_rate), float(frame_rate))


def representation_from_store(store: LatentStore, device: torch.device | str = "cpu") -> Representation:
    """The representation a store was encoded with, rebuilt from ``meta.extra.representation_config``.

    Raises ValueError when the store lacks that config, when the rebuilt representation's rates or dim
    differ from the store's, or when its weights provenance (source, pretrained flag, sha256, seed)
    differs from the one recorded at encoding time: decoding with other weights would be meaningless.
    """
    config = store.meta.get("extra", {}).get("representation_config")
    if not config or "_target_" not in config:
        raise ValueError(
            f"latent store {store.root} has no extra.representation_config; it cannot be decoded "
            "(stores built by latentdyn.experiments.phase0 record it)"
        )
    rep = instantiate(config)
    mismatched = [
        (name, ours, theirs)
        for name, ours, theirs in (
            ("sample_rate", int(rep.sample_rate), int(store.meta["sample_rate"])),
            ("frame_rate", float(rep.frame_rate), float(store.meta["frame_rate"])),
            ("dim", int(rep.dim), int(store.dim)),
        )
        if ours != theirs
    ]
    stored = store.meta.get("weights", {})
    mismatched += [
        (f"weights.{key}", rep.weights[key], stored[key])
        for key in _WEIGHT_KEYS
        if key in rep.weights and key in stored and rep.weights[key] != stored[key]
    ]
    mismatched += [
        (f"weights.{key}", rep.weights[key], stored.get(key))
        for key in _REQUIRED_WEIGHT_KEYS
        if key in rep.weights and rep.weights[key] != stored.get(key)
    ]
    if mismatched:
        detail = ", ".join(
            f"{name}: decoder {ours!r} vs store {theirs!r}" for name, ours, theirs in mismatched
        )
        raise ValueError(
            f"decoder rebuilt for {store.root} does not match the store's encoder ({detail}); rebuild the "
            "store with the current code (force=true)"
        )
    return rep.to(device)


def raw_from_edit(
    store: LatentStore, raw: torch.Tensor, z: torch.Tensor, z_edit: torch.Tensor
) -> torch.Tensor:
    """Raw latents of a standardised edit ``z -> z_edit`` of the raw trajectory ``raw`` (all ``(…, D)``).

    ``raw + (z_edit - z) * std``: equal to ``store.destandardize(z_edit)`` in exact arithmetic, but bit-exact
    ``raw`` wherever the edit leaves a frame unchanged. That matters: a standardise/destandardise round
    trip moves latents by ~1e-6, and some decoders (Griffin–Lim's phase iteration) turn that into an
    audible and measurable difference (MR-STFT ~0.5 on log-mel latents), which would be charged to the edit.
    """
    std = torch.from_numpy(store.std).to(raw.device)
    return raw.to(torch.float32) + (z_edit.to(torch.float32) - z.to(torch.float32)) * std


def crop_frames(n_frames: int, max_frames: int | None) -> int:
    """Frames kept of an ``n_frames`` utterance cropped to its first ``max_frames`` (None: all of them).

    ValueError for a ``max_frames`` that is not a positive integer (or None).
    """
    if max_frames is None:
        return int(n_frames)
    if isinstance(max_frames, bool) or int(max_frames) != max_frames or max_frames < 1:
        raise ValueError(f"max_frames must be a positive integer or null, got {max_frames!r}")
    return min(int(n_frames), int(max_frames))


def choose_utterances(
    store: LatentStore, split: str, n: int, seed: int, min_frames: int = 1
) -> list[StoreUtterance]:
    """Up to ``n`` utterances of ``split`` with at least ``min_frames`` frames, a seeded choice in row order.

    Drawn without replacement with ``numpy.random.default_rng(seed)``; when fewer qualify, all of them are
    taken (with a warning). ValueError when none qualifies or ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"n_utterances must be >= 1, got {n}")
    candidates = [u for u in store.utterances(split) if u.n_frames >= min_frames]
    if not candidates:
        longest = max((u.n_frames for u in store.utterances(split)), default=0)
        raise ValueError(
            f"no utterance of split {split!r} in {store.root} has >= {min_frames} frames (longest: {longest})"
        )
    if len(candidates) < n:
        log.warning("split %r has only %d eligible utterances (asked for %d)", split, len(candidates), n)
        return candidates
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(candidates), size=n, replace=False))
    return [candidates[i] for i in chosen.tolist()]


def safe_name(name: str) -> str:
    """``name`` with every character outside ``[A-Za-z0-9._-]`` replaced by ``_`` (for file and dir names)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return cleaned if cleaned.strip(".") else "_"


@torch.no_grad()
def decode_latents(rep: Representation, latents: torch.Tensor) -> torch.Tensor:
    """Raw latents ``(B, T, D)`` -> ``(B, T * hop)`` float32 CPU audio at ``rep.sample_rate``.

    ValueError on a wrong shape, and when the decoder returns a length other than ``T * hop`` or
    non-finite samples (a trajectory far off the manifold can overflow a decoder).
    """
    if latents.dim() != 3 or latents.shape[-1] != rep.dim:
        raise ValueError(f"latents must be (B, T, {rep.dim}), got {tuple(latents.shape)}")
    hop = samples_per_frame(rep.sample_rate, rep.frame_rate)
    wave = rep.decode(latents.transpose(1, 2).contiguous().to(torch.float32))
    wave = wave.reshape(latents.shape[0], -1).to(device="cpu", dtype=torch.float32)
    expected = latents.shape[1] * hop
    if wave.shape[-1] != expected:
        raise ValueError(
            f"decoder returned {wave.shape[-1]} samples for {latents.shape[1]} frames, not {expected}"
        )
    if not torch.isfinite(wave).all():
        raise ValueError("decoder returned non-finite samples")
    return wave


def load_original(path: str | Path, sample_rate: int, n_samples: int) -> torch.Tensor | None:
    """The original audio at ``sample_rate`` cropped to its first ``n_samples`` samples ``(S,)``.

    None (with a warning) when the file cannot be used any more (moved, corrupt): the ceiling is then
    reported as missing rather than failing a listening run.
    """
    try:
        wave = load_audio(path, sample_rate)
    except BadAudioError as err:
        log.warning("original audio unavailable, no reconstruction ceiling: %s", err)
        return None
    return wave[:n_samples]


def write_wav(
    path: Path,
    wave: torch.Tensor | np.ndarray,
    sample_rate: int,
    peak_limit: float = 1.0,
    gain: float | None = None,
) -> dict[str, Any]:
    """Write mono ``(S,)`` audio as a float32 WAV, scaled down to ``peak_limit`` if its peak is above it.

    ``gain``: a given scale factor instead (e.g. one shared by several renderings of the same signal).
    Returns ``{sample_rate, n_samples, duration_s, gain}`` (``gain`` = 1 unless the signal was scaled).
    """
    data = wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim != 1:
        raise ValueError(f"expected mono audio (S,), got shape {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError(f"{path}: audio has non-finite samples")
    if gain is None:
        gain = peak_gain(data, peak_limit)
    elif not (math.isfinite(gain) and gain > 0):
        raise ValueError(f"gain must be finite and > 0, got {gain}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    scaled = data * np.float32(gain) if gain != 1.0 else data
    sf.write(buf, scaled, int(sample_rate), subtype=WAV_SUBTYPE, format="WAV")
    write_bytes_atomic(path, buf.getvalue())
    return {
        "sample_rate": int(sample_rate),
        "n_samples": int(data.size),
        "duration_s": data.size / sample_rate,
        "gain": float(gain),
    }


def peak_gain(wave: torch.Tensor | np.ndarray, peak_limit: float = 1.0) -> float:
    """The factor that brings ``wave``'s absolute peak down to ``peak_limit`` (1 when it is already below)."""
    data = wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
    peak = float(np.max(np.abs(data))) if data.size else 0.0
    return peak_limit / peak if peak > peak_limit else 1.0


#: Sub-directory (of a listening file's directory) of its copy at the representation's own rate.
NATIVE_DIR_FORMAT = "{sample_rate}Hz"


def write_listening_wav(
    out_dir: Path,
    stem: str,
    wave: torch.Tensor,
    sample_rate: int,
    output_sample_rate: int,
    run_dir: Path,
) -> dict[str, Any]:
    """Write one decoded signal ``(S,)`` at ``sample_rate`` as the listening files of Exp 3B and Exp 7.

    * ``out_dir/<stem>.wav``: resampled to ``output_sample_rate`` (48 kHz, the reference's WAVs) with
      :func:`resample_waves` (``ceil(S * output / native)`` samples);
    * ``out_dir/<sample_rate>Hz/<stem>.wav``: the signal itself at the representation's rate (what the
      objective distances score); the same file as above when the two rates are equal.

    Both carry one gain (:func:`peak_gain` of the louder of the two: the resampler's sinc can overshoot
    the native peak), so they play at the same level. Returns the manifest fields of the output-rate file
    (``path`` relative to ``run_dir``, ``sample_rate``, ``n_samples``, ``duration_s``, ``gain``) and
    ``native``: the same fields of the native-rate file.
    """
    sample_rate, output_sample_rate = int(sample_rate), int(output_sample_rate)
    wave = wave.detach().to(device="cpu", dtype=torch.float32)
    if wave.dim() != 1:
        raise ValueError(f"expected mono audio (S,), got shape {tuple(wave.shape)}")
    resampled = resample_waves(wave, sample_rate, output_sample_rate)
    gain = min(peak_gain(wave), peak_gain(resampled))
    path = Path(out_dir) / f"{stem}.wav"
    entry = {"path": relative(path, run_dir), **write_wav(path, resampled, output_sample_rate, gain=gain)}
    if sample_rate == output_sample_rate:
        return {**entry, "native": dict(entry)}
    native_path = Path(out_dir) / NATIVE_DIR_FORMAT.format(sample_rate=sample_rate) / f"{stem}.wav"
    native = {"path": relative(native_path, run_dir), **write_wav(native_path, wave, sample_rate, gain=gain)}
    return {**entry, "native": native}


def objective_distances(
    reference: torch.Tensor | np.ndarray,
    estimate: torch.Tensor | np.ndarray,
    sample_rate: int,
    *,
    with_stoi: bool = True,
    with_pesq: bool = True,
    length_atol: int = 0,
) -> dict[str, float | None]:
    """:func:`~latentdyn.diagnostics.audio_metrics.audio_distances` of a pair, defined for any length.

    Signals shorter than :data:`MIN_SPECTRAL_SAMPLES` (1025 samples, 43 ms at 24 kHz: one EnCodec frame is
    320) are too short for the spectral distances, STOI and PESQ; they get SI-SDR only and ``None`` for the
    rest. An empty span (Exp 7 at L = 0) gets ``None`` everywhere.
    """
    n = min(len(reference), len(estimate))
    if n == 0:
        return dict.fromkeys(AUDIO_METRIC_KEYS)
    if n < MIN_SPECTRAL_SAMPLES:
        out: dict[str, float | None] = dict.fromkeys(AUDIO_METRIC_KEYS)
        ref = np.asarray(reference[:n], dtype=np.float64)
        out["si_sdr"] = si_sdr(ref, np.asarray(estimate[:n], dtype=np.float64)) if np.ptp(ref) > 0 else None
        return out
    return audio_distances(
        reference, estimate, sample_rate, with_stoi=with_stoi, with_pesq=with_pesq, length_atol=length_atol
    )


def reconstruction_ceiling(
    original: torch.Tensor | None,
    decoded_gt: torch.Tensor,
    sample_rate: int,
    hop: int,
    *,
    with_stoi: bool = True,
    with_pesq: bool = True,
) -> dict[str, float | None]:
    """Distances of ``decode(z_true)`` to the original audio: the codec's own loss, the best any edit can do.

    Lengths may differ by less than one frame (``hop`` samples: a codec pads the last frame, log-mel drops a
    partial one); the common prefix is scored. All ``None`` without an original.
    """
    if original is None:
        return dict.fromkeys(AUDIO_METRIC_KEYS)
    return objective_distances(
        original, decoded_gt, sample_rate, with_stoi=with_stoi, with_pesq=with_pesq, length_atol=hop
    )


def json_distances(distances: Mapping[str, float | None]) -> dict[str, float | None]:
    """Distances as JSON-safe values: non-finite floats (SI-SDR's ±inf) become ``None``."""
    return {
        key: (float(value) if value is not None and math.isfinite(value) else None)
        for key, value in distances.items()
    }


def mean_distances(rows: Iterable[Mapping[str, float | None]]) -> dict[str, float | None]:
    """Per-metric mean over ``rows`` of the finite values (``None`` when a metric has none)."""
    collected: dict[str, list[float]] = {key: [] for key in AUDIO_METRIC_KEYS}
    for row in rows:
        for key, value in row.items():
            if value is not None and math.isfinite(value):
                collected.setdefault(key, []).append(float(value))
    return {key: (float(np.mean(values)) if values else None) for key, values in collected.items()}


def resample_waves(waves: torch.Tensor, orig_sr: int, target_sr: int) -> torch.Tensor:
    """``(…, S)`` audio from ``orig_sr`` to ``target_sr`` Hz (band-limited sinc, ``ceil(S·target/orig)`` samples)."""
    return resample(waves, int(orig_sr), int(target_sr))


def relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as a POSIX string (manifest entries)."""
    return Path(path).relative_to(root).as_posix()


def flat_metrics(prefix: str, distances: Mapping[str, float | None], keys: Sequence[str]) -> dict[str, float]:
    """``{f"{prefix}/{key}": value}`` for the finite values of ``keys`` (results-table entries)."""
    return {
        f"{prefix}/{key}": float(distances[key])
        for key in keys
        if distances.get(key) is not None and math.isfinite(distances[key])
    }


MANIFEST_NAME = "manifest.json"
# Distances that go to the results table; manifest.json and metrics.json have them all.
KEY_DISTANCES = ("mrstft", "si_sdr")


def write_listening_outputs(
    run_dir: Path,
    common: Mapping[str, Any],
    entries: Sequence[Mapping[str, Any]],
    ceilings: Any,
    groups: Mapping[str, Mapping[str, float | None]],
    group_label: str,
    ceiling_mean: Mapping[str, float | None],
    n_utterances: int,
) -> dict[str, float]:
    """Write ``manifest.json`` (every file with its distances, plus the reconstruction ceilings) and
    ``metrics.json`` (mean distances per group: edit mode or rollout length), and return the key metrics
    (``<group>/mrstft``, ``<group>/si_sdr``, ``ceiling/...``, ``n_utterances``) for the results table."""
    from latentdyn.tracking.run import METRICS_NAME, write_json

    write_json(
        run_dir / MANIFEST_NAME, {**common, "files": list(entries), "reconstruction_ceiling": ceilings}
    )
    write_json(
        run_dir / METRICS_NAME,
        {
            **common,
            "n_utterances": n_utterances,
            group_label: dict(groups),
            "reconstruction_ceiling": ceiling_mean,
        },
    )
    metrics: dict[str, float] = {"n_utterances": float(n_utterances)}
    for key, distances in groups.items():
        metrics.update(flat_metrics(key, distances, KEY_DISTANCES))
    metrics.update(flat_metrics("ceiling", ceiling_mean, KEY_DISTANCES))
    return metrics
