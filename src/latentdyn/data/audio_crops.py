"""Fixed-length random audio crops of a corpus split, for models trained on audio (the β-VAE of Exp 5, the
VAE-GAN of Exp 9).

Each epoch visits every utterance of the split once, in a fresh seeded order, and takes one crop of
``crop_samples`` samples from it at a seeded random offset; an utterance shorter than that is zero-padded at
the end (the reference study's rule). A crop is a slice of an audio cache (:mod:`latentdyn.data.audio_cache`,
the utterances decoded once at the model's rate) or, without one, only the crop's span is read from disk
(plus a margin for the resampler), so loading costs the crop, not the utterance. The order and offsets come from one generator
(:class:`CropBatchSampler`), so a killed training resumes mid-epoch on exactly the crops it would have seen
(:class:`~latentdyn.data.windows.ResumableBatchLoader`). Validation crops are fixed: the middle of each
utterance.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from latentdyn.data.audio import BadAudioError, load_audio, read_frames, resample
from latentdyn.data.audio_cache import AudioCache
from latentdyn.data.corpus import Utterance
from latentdyn.data.windows import IndexBatchSampler, ResumableBatchLoader

log = logging.getLogger(__name__)

__all__ = [
    "AudioCrops",
    "CropBatchSampler",
    "crop_loader",
    "crop_offset",
    "default_crop_workers",
]  # and AudioCropDataModule (lazy)

#: Offset draws are integers in [0, 2^31); an offset is a draw modulo the number of possible offsets.
_DRAW_RANGE = 2**31
#: Source samples read on each side of a crop so the resampler's filter sees real audio, not zeros.
_RESAMPLE_MARGIN = 256
#: ``AudioCrops`` item code for a fixed (centred) crop instead of a random one.
CENTRED = -1


def crop_offset(n_samples: int, crop_samples: int, draw: int) -> int:
    """Start sample of a crop of ``crop_samples`` in a signal of ``n_samples``: ``draw`` modulo the number of
    possible starts, the centred start for ``draw == CENTRED``, 0 when the signal is not longer than the crop."""
    room = n_samples - crop_samples
    if room <= 0:
        return 0
    return room // 2 if draw == CENTRED else int(draw) % (room + 1)


class AudioCrops(Dataset):
    """Crops ``(B, 1, crop_samples)`` of ``utterances`` at ``sample_rate``; item = ``(n, 2)`` int64 rows of
    ``(utterance index, offset draw)`` (:data:`CENTRED` for the middle crop).

    With an :class:`~latentdyn.data.audio_cache.AudioCache` at ``sample_rate`` holding the utterances, a crop is
    a slice of it (decoded and resampled once, like extraction); without, the crop's span is read from the
    file and resampled. A file that cannot be read raises :class:`~latentdyn.data.audio.BadAudioError` naming
    it (the splits come from a corpus whose bad files were already left out, so this means the file changed).
    """

    def __init__(
        self,
        utterances: Sequence[Utterance],
        sample_rate: int,
        crop_samples: int,
        cache: AudioCache | None = None,
    ) -> None:
        if not utterances:
            raise ValueError("no utterances to crop")
        if crop_samples < 1 or sample_rate < 1:
            raise ValueError(
                f"crop_samples and sample_rate must be positive, got {crop_samples}, {sample_rate}"
            )
        if cache is not None:
            if cache.sample_rate != int(sample_rate):
                raise ValueError(
                    f"the audio cache is at {cache.sample_rate} Hz, the crops at {sample_rate} Hz"
                )
            missing = [u.utt_id for u in utterances if u.utt_id not in cache]
            if missing:
                raise ValueError(
                    f"{len(missing)} utterances are not in the audio cache {cache.root}: {missing[:3]}"
                )
        self.utterances = list(utterances)
        self.sample_rate = int(sample_rate)
        self.crop_samples = int(crop_samples)
        self.cache = cache

    def __len__(self) -> int:
        return len(self.utterances)

    def crop(self, utt: Utterance, draw: int) -> torch.Tensor:
        """One crop ``(crop_samples,)`` of ``utt`` at the offset ``draw`` picks (zero-padded when short)."""
        return self.crops([(utt, draw)])[0]

    def _span(self, utt: Utterance, draw: int) -> tuple[int, int, int]:
        """Where to read ``utt``'s crop: ``(first source sample, source samples, target samples to skip)``.

        Without resampling that is the crop itself. With it, the read starts on a sample where the source and
        target grids coincide (a multiple of ``orig / gcd(orig, target)``) and ``_RESAMPLE_MARGIN`` samples
        early, so the crop is the whole-file resampling's samples, not ones shifted by a fraction of a sample.
        """
        start = crop_offset(int(round(utt.duration * self.sample_rate)), self.crop_samples, draw)
        if utt.sample_rate == self.sample_rate:
            return start, self.crop_samples, 0
        common = math.gcd(utt.sample_rate, self.sample_rate)
        step_src, step_tgt = utt.sample_rate // common, self.sample_rate // common
        blocks = max(0, (start * utt.sample_rate // self.sample_rate - _RESAMPLE_MARGIN) // step_src)
        skip = start - blocks * step_tgt
        src_len = (
            math.ceil((skip + self.crop_samples) * utt.sample_rate / self.sample_rate) + _RESAMPLE_MARGIN
        )
        return blocks * step_src, src_len, skip

    def crops(self, items: Sequence[tuple[Utterance, int]]) -> torch.Tensor:
        """Crops ``(n, crop_samples)`` of ``(utterance, draw)`` pairs; those at one source rate are resampled
        together in one batched call (the costly part of loading), each zero beyond its file's end."""
        if self.cache is not None:
            cached = np.empty((len(items), self.crop_samples), dtype=np.float32)
            for i, (utt, draw) in enumerate(items):
                start = crop_offset(self.cache.n_samples(utt.utt_id), self.crop_samples, draw)
                self.cache.span(utt.utt_id, start, self.crop_samples, out=cached[i])
            return torch.from_numpy(cached)
        out = torch.zeros(len(items), self.crop_samples)
        by_rate: dict[int, list[int]] = {}
        for i, (utt, _) in enumerate(items):
            by_rate.setdefault(int(utt.sample_rate), []).append(i)
        for rate, members in by_rate.items():
            spans = [self._span(*items[i]) for i in members]
            sources = [
                self._read_frames(items[i][0], first, n)
                for i, (first, n, _) in zip(members, spans, strict=True)
            ]
            if rate == self.sample_rate:
                for i, source in zip(members, sources, strict=True):
                    out[i, : source.shape[0]] = source
                continue
            batch = torch.zeros(len(sources), max(n for _, n, _ in spans))
            for row, source in enumerate(sources):
                batch[row, : source.shape[0]] = source
            waves = resample(batch, rate, self.sample_rate, pad_to_second=False).clamp_(-1.0, 1.0)
            for row, (i, source, (_, _, skip)) in enumerate(zip(members, sources, spans, strict=True)):
                # Samples past the file's end are the filter's tail over zeros: the crop is zero there.
                valid = min(math.ceil(source.shape[0] * self.sample_rate / rate) - skip, self.crop_samples)
                if valid > 0:
                    out[i, :valid] = waves[row, skip : skip + valid]
        return out

    @staticmethod
    def _read_frames(utt: Utterance, start: int, frames: int) -> torch.Tensor:
        data, _ = read_frames(Path(utt.path), start, frames)
        if data.shape[1] == 0 or not np.isfinite(data).all():
            load_audio(utt.path, utt.sample_rate)  # raises the precise reason
            raise BadAudioError(utt.path, "non-finite samples")
        return torch.from_numpy(np.ascontiguousarray(data.mean(axis=1, dtype=np.float32)))

    def __getitem__(self, items: np.ndarray) -> torch.Tensor:
        rows = np.asarray(items, dtype=np.int64).reshape(-1, 2)
        return self.crops([(self.utterances[int(i)], int(draw)) for i, draw in rows])[:, None]


class CropBatchSampler(IndexBatchSampler):
    """Batches of ``(utterance index, offset draw)`` rows: a seeded permutation of the utterances each epoch,
    each with a random offset draw from the same generator (so :meth:`resume` replays them), or in order with
    centred crops when not shuffled."""

    def _epoch_order(self) -> np.ndarray:
        order = super()._epoch_order()
        if not self.shuffle:
            return np.stack([order, np.full_like(order, CENTRED)], axis=1)
        draws = torch.randint(0, _DRAW_RANGE, (self.n,), generator=self.generator).numpy()
        return np.stack([order, draws], axis=1)


def default_crop_workers(cached: bool, cuda: bool) -> int:
    """Loader processes for crops when the config says ``null``: none when crops are slices of an audio cache
    and training runs on the CPU (a worker's batch crosses processes as a copy, which costs more than slicing
    it here: the CPU has no idle cores to give), 2 otherwise (files to decode, or a GPU leaving cores idle)."""
    return 0 if cached and not cuda else 2


def crop_loader(
    crops: AudioCrops, batch_size: int, shuffle: bool, seed: int, num_workers: int, drop_last: bool = True
) -> ResumableBatchLoader:
    """A resumable loader of ``crops``: seeded order and offsets, ``num_workers`` loading processes."""
    generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
    n = len(crops)
    if drop_last and shuffle:
        if n < batch_size:
            raise ValueError(
                f"{n} training utterances are fewer than one batch of {batch_size}: lower the batch size"
            )
    sampler = CropBatchSampler(n, batch_size, shuffle, generator, drop_last=drop_last and shuffle)
    return ResumableBatchLoader(
        crops,
        sampler,
        # The loader's own base seed for its workers: iterating it leaves the global RNG (the VAE's noise) alone.
        generator=torch.Generator().manual_seed(int(seed)),
        num_workers=int(num_workers),
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def _build_datamodule_class() -> type:
    import lightning.pytorch as pl

    class AudioCropDataModule(pl.LightningDataModule):
        """Train crops from the ``train`` split (random, seeded) and validation crops from ``val`` (centred).

        Args:
            splits: ``{"train": [...], "val": [...], ...}`` utterances (speaker-disjoint splits).
            sample_rate: audio rate of the crops (the model's).
            crop_seconds: crop length in seconds (4 s in the reference).
            batch_size: crops per batch; training batches are full (the epoch's last partial one is dropped).
            num_workers: loading processes.
            seed: seeds the order and offsets.
            max_val_crops: validation utterances used (the first ones of the split); None: all.
            cache: an audio cache at ``sample_rate`` to crop from (utterances it left out as bad are left out
                here too); None: read and resample each crop's span from its file.
        """

        def __init__(
            self,
            splits: dict[str, Sequence[Utterance]],
            sample_rate: int,
            crop_seconds: float = 4.0,
            batch_size: int = 32,
            num_workers: int = 0,
            seed: int = 0,
            max_val_crops: int | None = None,
            cache: AudioCache | None = None,
        ) -> None:
            super().__init__()
            if crop_seconds <= 0:
                raise ValueError(f"crop_seconds must be positive, got {crop_seconds}")
            self.crop_samples = int(round(crop_seconds * sample_rate))

            def usable(name: str) -> list[Utterance]:
                return [u for u in splits.get(name) or [] if cache is None or u.utt_id in cache]

            self.train = AudioCrops(usable("train"), sample_rate, self.crop_samples, cache)
            val = usable("val")[: max_val_crops if max_val_crops is not None else None]
            self.val = AudioCrops(val, sample_rate, self.crop_samples, cache) if val else None
            self.batch_size, self.num_workers, self.seed = int(batch_size), int(num_workers), int(seed)
            self._rank, self._world_size = 0, 1

        def shard(self, rank: int, world_size: int) -> None:
            """Make the loaders built from now on hand rank ``rank`` of ``world_size`` its share of every
            batch (``batch_size`` stays the global batch)."""
            self._rank, self._world_size = int(rank), int(world_size)

        def train_dataloader(self) -> ResumableBatchLoader:
            loader = crop_loader(self.train, self.batch_size, True, self.seed, self.num_workers)
            loader.shard(self._rank, self._world_size)
            return loader

        def val_dataloader(self) -> Any:
            if self.val is None:
                return []
            loader = crop_loader(
                self.val, self.batch_size, False, self.seed, self.num_workers, drop_last=False
            )
            loader.shard(self._rank, self._world_size)
            return loader

    AudioCropDataModule.__module__ = __name__
    AudioCropDataModule.__qualname__ = "AudioCropDataModule"
    return AudioCropDataModule


def __getattr__(name: str) -> Any:
    # Built on first use so that importing this module does not import lightning (~20 s).
    if name == "AudioCropDataModule":
        cls = _build_datamodule_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
