"""Decoded audio of a corpus's utterances at one sample rate, in one memory-mapped 16-bit PCM file.

Models trained on audio crops (Exp 5's β-VAE, Exp 9's VAE-GAN) read hundreds of thousands of random crops;
decoding FLAC and resampling each crop again costs as much CPU as a training step of a small model. The cache
decodes and resamples every utterance once (:func:`~latentdyn.data.audio.load_audio`, the same samples latent
extraction encodes), streams them into ``audio.pcm16`` (int16, full scale 32767) with an index
(``index.jsonl``: utterance id, first sample, sample count), and a crop is then a slice of a memory map that
every loader worker shares through the page cache. It is an artifact (:mod:`latentdyn.artifacts`) built into
a temporary directory; files it could not use are recorded in its ``bad_files.json``.

Size: 2 bytes per sample, 172.8 MB per hour of audio at 24 kHz.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from latentdyn.data.audio import (
    BAD_FILES_NAME,
    BadAudioError,
    BadFile,
    load_audio,
    report_bad_file,
    write_bad_files,
)
from latentdyn.data.corpus import Utterance

log = logging.getLogger(__name__)

__all__ = ["AudioCache", "write_audio_cache"]

PCM_NAME = "audio.pcm16"
INDEX_NAME = "index.jsonl"
META_NAME = "meta.json"
#: int16 full scale.
FULL_SCALE = 32767.0


def write_audio_cache(
    utterances: Sequence[Utterance], sample_rate: int, root: Path, on_bad_audio: str
) -> None:
    """Decode ``utterances`` at ``sample_rate`` into an audio cache at ``root`` (an artifact's build directory).

    A file :func:`load_audio` rejects is skipped and recorded in ``bad_files.json`` (``on_bad_audio=skip``) or
    stops the build (``error``).
    """
    root = Path(root)
    rows: list[dict[str, Any]] = []
    bad: list[BadFile] = []
    start = 0
    with (root / PCM_NAME).open("wb") as fh:
        for utt in tqdm(utterances, desc=f"audio cache {sample_rate} Hz", unit="utt", mininterval=2.0):
            try:
                wave = load_audio(utt.path, sample_rate)
            except BadAudioError as err:
                record = BadFile(path=str(utt.path), stage="extract", reason=err.reason, utt_id=utt.utt_id)
                report_bad_file(record, on_bad_audio)
                bad.append(record)
                continue
            pcm = np.clip(np.round(wave.numpy() * FULL_SCALE), -FULL_SCALE, FULL_SCALE).astype("<i2")
            fh.write(pcm.tobytes())
            rows.append({"utt_id": utt.utt_id, "start": start, "n_samples": int(pcm.size)})
            start += int(pcm.size)
    (root / INDEX_NAME).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    (root / META_NAME).write_text(
        json.dumps({"sample_rate": int(sample_rate), "n_samples": start}, indent=2) + "\n"
    )
    write_bad_files(bad, root / BAD_FILES_NAME)
    log.info(
        "audio cache: %d utterances, %.2f h at %d Hz, %.1f MB",
        len(rows),
        start / sample_rate / 3600,
        sample_rate,
        2 * start / 1e6,
    )


class AudioCache:
    """Read side of an audio cache: ``span(utt_id, start, n)`` -> float32 samples, zero past the end.

    The memory map is opened lazily in each process (it is not pickled into loader workers).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta = json.loads((self.root / META_NAME).read_text())
        self.sample_rate = int(meta["sample_rate"])
        self.index: dict[str, tuple[int, int]] = {}
        for line in (self.root / INDEX_NAME).read_text().splitlines():
            row = json.loads(line)
            self.index[row["utt_id"]] = (int(row["start"]), int(row["n_samples"]))
        self._pcm: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pcm": None}

    @property
    def pcm(self) -> np.ndarray:
        if self._pcm is None:
            self._pcm = np.memmap(self.root / PCM_NAME, dtype="<i2", mode="r")
        return self._pcm

    def __contains__(self, utt_id: str) -> bool:
        return utt_id in self.index

    def n_samples(self, utt_id: str) -> int:
        return self.index[utt_id][1]

    def span(self, utt_id: str, start: int, n: int, out: np.ndarray | None = None) -> torch.Tensor:
        """Samples ``[start, start + n)`` of ``utt_id`` as float32 ``(n,)`` in [-1, 1], zero past its end;
        written into ``out`` (a float32 ``(n,)`` array) when given, without another copy."""
        first, total = self.index[utt_id]
        if out is None:
            out = np.empty(n, dtype=np.float32)
        take = max(0, min(n, total - start))
        np.multiply(
            self.pcm[first + start : first + start + take], np.float32(1.0 / FULL_SCALE), out=out[:take]
        )
        out[take:] = 0.0
        return torch.from_numpy(out)
