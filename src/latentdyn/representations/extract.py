"""Audio -> latent store extraction, batched by length.

Utterances are sorted by duration and grouped into batches of about ``batch_seconds`` of padded audio
(length bucketing keeps padding small), encoded together, and each output is cropped to the utterance's
own frame count. Bad audio files are named and skipped (or raise, as the config says): one broken file
never ends an extraction of thousands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from latentdyn.data.audio import BadAudioError, load_audio
from latentdyn.data.corpus import Utterance
from latentdyn.data.latent_store import LatentStoreWriter
from latentdyn.representations.base import Representation
from latentdyn.representations.energy import frame_log_energy

log = logging.getLogger(__name__)

BAD_AUDIO_POLICIES = ("skip", "error")


@dataclass(frozen=True)
class BadFile:
    """An audio file that could not be used, and why."""

    path: str
    utt_id: str
    reason: str


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def length_buckets(
    items: Sequence[tuple[str, Utterance]], batch_seconds: float
) -> Iterator[list[tuple[str, Utterance]]]:
    """Group (split, utterance) pairs, sorted by duration, into batches of at most ``batch_seconds`` padded audio.

    A batch's padded length is its longest utterance times its size; an utterance longer than
    ``batch_seconds`` gets a batch of its own.
    """
    ordered = sorted(items, key=lambda su: (su[1].duration, su[1].utt_id))
    batch: list[tuple[str, Utterance]] = []
    for item in ordered:
        if batch and item[1].duration * (len(batch) + 1) > batch_seconds:
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def aligned_log_energy(wave: torch.Tensor, rep: Representation, n_frames: int) -> torch.Tensor:
    """Per-frame log-energy (dB) of ``wave`` ``(S,)`` on the representation's frame grid, ``(n_frames,)``.

    Energy frames are hop-length windows; when a codec yields one frame more or fewer than ``S // hop``
    (its own padding convention), the last energy value is repeated or the tail dropped.
    """
    hop = int(round(rep.sample_rate / rep.frame_rate))
    energy = frame_log_energy(wave, hop)
    if energy.shape[-1] >= n_frames:
        return energy[..., :n_frames]
    pad = (
        energy[..., -1:].expand(n_frames - energy.shape[-1])
        if energy.numel()
        else torch.full((n_frames,), -100.0)
    )
    return torch.cat([energy, pad], dim=-1)


def extract_to_store(
    rep: Representation,
    splits: Mapping[str, Sequence[Utterance]],
    writer: LatentStoreWriter,
    *,
    batch_seconds: float,
    on_bad_audio: str = "skip",
    device: torch.device | str = "cpu",
) -> list[BadFile]:
    """Encode every utterance of every split into ``writer``; returns the bad files that were skipped.

    Raises:
        BadAudioError: for the first bad file when ``on_bad_audio == "error"``.
    """
    if on_bad_audio not in BAD_AUDIO_POLICIES:
        raise ValueError(f"data.on_bad_audio must be one of {BAD_AUDIO_POLICIES}, got {on_bad_audio!r}")
    if batch_seconds <= 0:
        raise ValueError(f"extract.batch_seconds must be positive, got {batch_seconds}")
    device = torch.device(device)
    rep.to(device)
    items = [(split, utt) for split, utts in splits.items() for utt in utts]
    total_seconds = sum(u.duration for _, u in items)
    bad: list[BadFile] = []
    t0 = time.monotonic()
    with tqdm(
        total=round(total_seconds, 1), unit="audio-s", desc=f"extract {rep.name}", unit_scale=True
    ) as bar:
        for batch in length_buckets(items, batch_seconds):
            waves: list[tuple[str, Utterance, torch.Tensor]] = []
            for split, utt in batch:
                try:
                    waves.append((split, utt, load_audio(utt.path, rep.sample_rate)))
                except BadAudioError as err:
                    if on_bad_audio == "error":
                        raise
                    log.warning("skipping bad audio file %s (%s)", err.path, err.reason)
                    bad.append(BadFile(path=str(utt.path), utt_id=utt.utt_id, reason=err.reason))
            if waves:
                _encode_batch(rep, waves, writer, device)
            bar.update(round(sum(u.duration for _, u in batch), 1))
            bar.set_postfix(rtf=f"{bar.n / max(time.monotonic() - t0, 1e-9):.0f}x")
    if items and len(bad) == len(items):
        raise BadAudioError(
            bad[0].path, f"every one of the {len(items)} audio files is bad; first: {bad[0].reason}"
        )
    return bad


@torch.inference_mode()
def _encode_batch(
    rep: Representation,
    waves: Sequence[tuple[str, Utterance, torch.Tensor]],
    writer: LatentStoreWriter,
    device: torch.device,
) -> None:
    longest = max(w.shape[-1] for _, _, w in waves)
    batch = torch.zeros(len(waves), 1, longest)
    for i, (_, _, wave) in enumerate(waves):
        batch[i, 0, : wave.shape[-1]] = wave
    latents = rep.encode(batch.to(device)).float().cpu()  # (B, D, T_max)
    for i, (split, utt, wave) in enumerate(waves):
        n_frames = rep.num_frames(wave.shape[-1])
        if n_frames < 1:
            log.warning("skipping %s: %.3f s is shorter than one frame", utt.utt_id, utt.duration)
            continue
        z = latents[i, :, :n_frames].T.contiguous().numpy()  # (T, D)
        energy = aligned_log_energy(wave, rep, n_frames).numpy().astype(np.float32)
        writer.add(utt.utt_id, utt.speaker, split, z, energy, gender=utt.gender)
