"""The latent store: one data × representation's latent frames on disk, memory-mapped (DESIGN §5).

A store is a directory::

    latents.f16     raw float16 (N_frames, D), row-major, utterances back to back in index order
    log_energy.f32  raw float32 (N_frames,), per-frame log energy in dB, row-aligned with latents
    index.jsonl     one JSON object per utterance: utt_id, speaker, split, start (row), n_frames, gender
    stats.json      per-dimension mean/std over the "train" split, frame and utterance counts per split
    meta.json       representation, sample/frame rate, dim, dtype, sizes, weights provenance, versions, caller keys

:class:`LatentStoreWriter` appends utterance by utterance, so memory stays bounded by one utterance
whatever the corpus size; ``meta.json`` is written last, so a directory without it (an interrupted or
aborted write) is never opened as a store. :class:`LatentStore` opens the arrays as read-only memmaps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

import latentdyn
from latentdyn.jsonio import write_json_atomic

__all__ = ["STD_FLOOR", "LatentStore", "LatentStoreWriter", "StoreUtterance", "store_meta"]

LATENTS_FILE = "latents.f16"
ENERGY_FILE = "log_energy.f32"
INDEX_FILE = "index.jsonl"
STATS_FILE = "stats.json"
META_FILE = "meta.json"
FORMAT = "latentdyn.latent_store"
FORMAT_VERSION = 1
TRAIN_SPLIT = "train"

#: Floor on the per-dimension std. A dimension that is constant over the train split (a mel band above
#: the signal's bandwidth stuck at the log floor, a dead codec channel) has std 0, and standardising by
#: it would give inf/NaN; with the floor such a dimension standardises to 0 on train and stays finite
#: elsewhere. 1e-6 is far below the spacing of float16 values of any latent of order 1e-3 or more, so it
#: never changes a dimension that actually varies.
STD_FLOOR = 1e-6

_FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
_RESERVED_META = ("format", "format_version", "dim", "dtype", "n_frames", "n_utterances", "versions", "files")
_REQUIRED_META = ("representation", "sample_rate", "frame_rate", "weights")


@dataclass(frozen=True)
class StoreUtterance:
    """One utterance's rows in a store: ``latents[start : start + n_frames]``."""

    utt_id: str
    speaker: str
    split: str
    start: int
    n_frames: int
    gender: str = "U"


def store_meta(representation: Any, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The caller part of a store's meta for a :class:`~latentdyn.representations.base.Representation`.

    ``extra`` (config hash, corpus name, ...) is kept verbatim under ``"extra"``.
    """
    return {
        "representation": representation.name,
        "sample_rate": int(representation.sample_rate),
        "frame_rate": float(representation.frame_rate),
        "weights": dict(representation.weights),
        "extra": dict(extra or {}),
    }


def _versions() -> dict[str, str]:
    return {"latentdyn": latentdyn.__version__, "torch": torch.__version__, "numpy": np.__version__}


def _as_float32_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(torch.float32)
    return torch.from_numpy(np.asarray(x, dtype=np.float32))


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()  # numpy has no bfloat16
    return np.asarray(x)


class _MomentAccumulator:
    """Per-dimension count, mean and centred sum of squares in float64, merged chunk by chunk.

    Chan, Golub & LeVeque (1979) pairwise update: exact up to float64 rounding and free of the
    cancellation of ``E[x²] - E[x]²`` when the mean is large relative to the spread.
    """

    def __init__(self, dim: int) -> None:
        self.count = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros(dim, dtype=np.float64)

    def update(self, chunk: np.ndarray) -> None:
        """Merge a ``(T, D)`` chunk."""
        x = chunk.astype(np.float64)
        n_b = x.shape[0]
        mean_b = x.mean(axis=0)
        x -= mean_b  # in place: one float64 copy of the chunk at a time
        m2_b = np.square(x, out=x).sum(axis=0)
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + np.square(delta) * (self.count * n_b / n)
        self.count = n

    def std(self) -> np.ndarray:
        """Population std (ddof=0), floored at :data:`STD_FLOOR`."""
        return np.maximum(np.sqrt(self.m2 / self.count), STD_FLOOR)


class LatentStoreWriter:
    """Streams utterances into a new store under ``root``.

    Args:
        root: store directory; created if missing. Refused if it already holds a store (or the remains of
            one: any of the store's files).
        dim: latent dimension D.
        meta: JSON-able caller metadata with at least ``representation``, ``sample_rate``, ``frame_rate``
            and ``weights`` (see :func:`store_meta`); other keys (conventionally ``extra``) are kept as
            given. Keys the writer computes (``dim``, ``n_frames``, ...) may not be passed.

    Use as a context manager: a clean exit calls :meth:`close`; an exception aborts (files are closed,
    no ``meta.json`` is written, so the partial directory is not a store).
    """

    def __init__(self, root: Path, dim: int, meta: Mapping[str, Any]) -> None:
        self.root = Path(root)
        if isinstance(dim, bool) or int(dim) != dim or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        missing = [k for k in _REQUIRED_META if k not in meta]
        if missing:
            raise ValueError(f"store meta lacks {missing}")
        reserved = [k for k in _RESERVED_META if k in meta]
        if reserved:
            raise ValueError(f"store meta keys {reserved} are computed by the writer and cannot be passed")
        if not float(meta["frame_rate"]) > 0:
            raise ValueError(f"frame_rate must be positive, got {meta['frame_rate']!r}")
        self._caller_meta = json.loads(json.dumps(dict(meta)))  # fails now, not after hours, if not JSON-able
        self.root.mkdir(parents=True, exist_ok=True)
        present = [
            n
            for n in (LATENTS_FILE, ENERGY_FILE, INDEX_FILE, STATS_FILE, META_FILE)
            if (self.root / n).exists()
        ]
        if present:
            raise FileExistsError(f"{self.root} already holds a latent store (found {present})")
        self._latents = (self.root / LATENTS_FILE).open("xb")
        self._energy = (self.root / ENERGY_FILE).open("xb")
        self._index = (self.root / INDEX_FILE).open("x")
        self._n_frames = 0
        self._ids: set[str] = set()
        self._split_frames: dict[str, int] = {}
        self._split_utts: dict[str, int] = {}
        self._train = _MomentAccumulator(self.dim)
        self._closed = False
        self._meta: dict[str, Any] | None = None

    def __enter__(self) -> LatentStoreWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self._close_files()
        elif not self._closed:
            self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"latent store writer for {self.root} is closed")

    def add(
        self,
        utt_id: str,
        speaker: str,
        split: str,
        latents: np.ndarray | torch.Tensor,
        log_energy: np.ndarray | torch.Tensor,
        gender: str = "U",
    ) -> None:
        """Append one utterance: ``latents`` ``(T, D)``, ``log_energy`` ``(T,)`` in dB, ``T >= 1``.

        Raises ValueError (naming the utterance) on a wrong shape, a non-finite value or a latent beyond
        float16's range (±65504), rather than storing inf; nothing is written for a rejected utterance.
        """
        self._check_open()
        for field, value in (("utt_id", utt_id), ("speaker", speaker), ("split", split), ("gender", gender)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"utterance {utt_id!r}: {field} must be a non-empty string, got {value!r}")
        if utt_id in self._ids:
            raise ValueError(f"utterance {utt_id!r} was already added")
        z = _as_numpy(latents)
        energy = _as_numpy(log_energy)
        if z.ndim != 2 or z.shape[1] != self.dim or z.shape[0] < 1:
            raise ValueError(f"utterance {utt_id!r}: latents must be (T >= 1, {self.dim}), got {z.shape}")
        if energy.shape != (z.shape[0],):
            raise ValueError(f"utterance {utt_id!r}: log_energy must be ({z.shape[0]},), got {energy.shape}")
        if not np.issubdtype(z.dtype, np.floating) or not np.issubdtype(energy.dtype, np.floating):
            raise ValueError(f"utterance {utt_id!r}: latents and log_energy must be floating point")
        if not np.isfinite(z).all():
            raise ValueError(f"utterance {utt_id!r}: latents contain NaN or inf")
        if not np.isfinite(energy).all():
            raise ValueError(f"utterance {utt_id!r}: log_energy contains NaN or inf")
        peak = float(np.abs(z).max())
        if peak > _FLOAT16_MAX:
            raise ValueError(
                f"utterance {utt_id!r}: |latent| reaches {peak:.6g}, beyond float16's ±{_FLOAT16_MAX:g}"
            )
        z16 = np.ascontiguousarray(z, dtype=np.float16)
        self._latents.write(memoryview(z16))
        self._energy.write(memoryview(np.ascontiguousarray(energy, dtype=np.float32)))
        record = StoreUtterance(utt_id, speaker, split, self._n_frames, int(z16.shape[0]), gender)
        self._index.write(json.dumps(asdict(record), sort_keys=True) + "\n")
        if split == TRAIN_SPLIT:
            self._train.update(z16)  # the stats of what readers will see: float16-rounded values
        self._n_frames += record.n_frames
        self._ids.add(utt_id)
        self._split_frames[split] = self._split_frames.get(split, 0) + record.n_frames
        self._split_utts[split] = self._split_utts.get(split, 0) + 1

    def _close_files(self) -> None:
        for fh in (self._latents, self._energy, self._index):
            if not fh.closed:
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
        self._closed = True

    def close(self) -> dict[str, Any]:
        """Flush the arrays and index, write ``stats.json`` then ``meta.json``; return the meta dict.

        Raises ValueError if no utterance of the ``"train"`` split was added (the stats are undefined).
        """
        self._check_open()
        self._close_files()
        if self._train.count == 0:
            raise ValueError(
                f"latent store {self.root}: no frames in split {TRAIN_SPLIT!r} (splits: {sorted(self._split_frames)}); "
                "per-dimension statistics are computed on the train split only"
            )
        stats = {
            "split": TRAIN_SPLIT,
            "count": self._train.count,
            "mean": self._train.mean.tolist(),
            "std": self._train.std().tolist(),
            "std_floor": STD_FLOOR,
            "ddof": 0,
            "frames_per_split": dict(sorted(self._split_frames.items())),
            "utterances_per_split": dict(sorted(self._split_utts.items())),
        }
        write_json_atomic(self.root / STATS_FILE, stats)
        meta = dict(self._caller_meta)
        meta.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            dim=self.dim,
            dtype="float16",
            n_frames=self._n_frames,
            n_utterances=len(self._ids),
            versions=_versions(),
            files={
                "latents": LATENTS_FILE,
                "log_energy": ENERGY_FILE,
                "index": INDEX_FILE,
                "stats": STATS_FILE,
            },
        )
        write_json_atomic(self.root / META_FILE, meta)
        self._meta = meta
        return dict(meta)


class LatentStore:
    """Read-only view of a store written by :class:`LatentStoreWriter`.

    Attributes:
        root: the store directory.
        meta: ``meta.json`` as a dict.
        dim: latent dimension D.
        frame_rate: frames per second.
        n_frames: total rows N.
        latents: ``(N, D)`` float16 read-only memmap.
        log_energy: ``(N,)`` float32 read-only memmap, dB.
        mean, std: ``(D,)`` float32 train-split statistics (std floored at :data:`STD_FLOOR`).
        index: utterances in row order.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        meta_path = self.root / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.root} is not a latent store (no {META_FILE})")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT or self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: not a version-{FORMAT_VERSION} {FORMAT} ({self.meta.get('format')!r})"
            )
        if self.meta.get("dtype") != "float16":
            raise ValueError(f"{meta_path}: unsupported dtype {self.meta.get('dtype')!r}")
        self.dim = int(self.meta["dim"])
        self.frame_rate = float(self.meta["frame_rate"])
        self.n_frames = int(self.meta["n_frames"])
        self._check_size(LATENTS_FILE, self.n_frames * self.dim * 2)
        self._check_size(ENERGY_FILE, self.n_frames * 4)
        self.latents = np.memmap(
            self.root / LATENTS_FILE, dtype=np.float16, mode="r", shape=(self.n_frames, self.dim)
        )
        self.log_energy = np.memmap(
            self.root / ENERGY_FILE, dtype=np.float32, mode="r", shape=(self.n_frames,)
        )
        self.index = self._read_index()
        self._splits = sorted({u.split for u in self.index})
        stats = json.loads((self.root / STATS_FILE).read_text())
        self.stats: dict[str, Any] = stats
        self.mean = np.asarray(stats["mean"], dtype=np.float32)
        self.std = np.asarray(stats["std"], dtype=np.float32)
        if self.mean.shape != (self.dim,) or self.std.shape != (self.dim,):
            raise ValueError(f"{self.root / STATS_FILE}: mean/std are not ({self.dim},)")

    def _check_size(self, name: str, expected: int) -> None:
        size = (self.root / name).stat().st_size
        if size != expected:
            raise ValueError(f"{self.root / name}: {size} bytes, meta.json implies {expected}")

    def _read_index(self) -> list[StoreUtterance]:
        index: list[StoreUtterance] = []
        row = 0
        with (self.root / INDEX_FILE).open() as fh:
            for line_no, line in enumerate(fh, start=1):
                utt = StoreUtterance(**json.loads(line))
                if utt.start != row or utt.n_frames < 1:
                    raise ValueError(
                        f"{self.root / INDEX_FILE}:{line_no}: rows not contiguous at {utt.utt_id!r}"
                    )
                row += utt.n_frames
                index.append(utt)
        if row != self.n_frames or len(index) != int(self.meta["n_utterances"]):
            raise ValueError(
                f"{self.root / INDEX_FILE}: covers {row} rows / {len(index)} utterances, meta disagrees"
            )
        return index

    @property
    def splits(self) -> list[str]:
        """Split names present, sorted."""
        return list(self._splits)

    def _check_split(self, split: str) -> None:
        if split not in self._splits:
            raise ValueError(f"unknown split {split!r}; this store has {self.splits}")

    def utterances(self, split: str | None = None) -> list[StoreUtterance]:
        """Utterances in row order, all or one split's (an unknown split name raises ValueError)."""
        if split is None:
            return list(self.index)
        self._check_split(split)
        return [u for u in self.index if u.split == split]

    def _resolve(self, utt: StoreUtterance | int) -> StoreUtterance:
        return self.index[utt] if isinstance(utt, int) else utt

    def utterance_latents(self, utt: StoreUtterance | int) -> np.ndarray:
        """``(T, D)`` float16 read-only memmap view of one utterance (no copy); ``utt`` or its index position."""
        u = self._resolve(utt)
        return self.latents[u.start : u.start + u.n_frames]

    def trajectories(self, split: str | None = None) -> list[tuple[str, np.ndarray]]:
        """``(utt_id, (T, D) float16 memmap view)`` of every utterance of ``split`` (all when None), in row
        order: what the rollout diagnostics draw their segments from."""
        return [(u.utt_id, self.utterance_latents(u)) for u in self.utterances(split)]

    def utterance_log_energy(self, utt: StoreUtterance | int) -> np.ndarray:
        """``(T,)`` float32 read-only memmap view of one utterance's per-frame log energy (dB)."""
        u = self._resolve(utt)
        return self.log_energy[u.start : u.start + u.n_frames]

    def standardize(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(…, D)`` raw latents -> float32 ``(x - mean) / std`` with the train split's statistics (the one
        place latents are standardised; a tensor stays on its device)."""
        x = _as_float32_tensor(x)
        return (x - torch.from_numpy(self.mean).to(x.device)) / torch.from_numpy(self.std).to(x.device)

    def destandardize(self, z: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`standardize`: ``(…, D)`` standardised latents -> raw float32 ``z * std + mean``."""
        z = _as_float32_tensor(z)
        return z * torch.from_numpy(self.std).to(z.device) + torch.from_numpy(self.mean).to(z.device)

    def to_model_space(self, x: np.ndarray | torch.Tensor, standardized: bool) -> torch.Tensor:
        """``(…, D)`` raw latents -> float32 in a model's space: raw (the reference) or standardised."""
        return self.standardize(x) if standardized else _as_float32_tensor(x)

    def to_raw_space(self, x: np.ndarray | torch.Tensor, standardized: bool) -> torch.Tensor:
        """Inverse of :meth:`to_model_space`: ``(…, D)`` model-space frames -> raw float32 latents."""
        return self.destandardize(x) if standardized else _as_float32_tensor(x)

    def split_rows(self, split: str) -> np.ndarray:
        """int64 row indices of all frames of ``split``, ascending."""
        utts = self.utterances(split)
        return np.concatenate([np.arange(u.start, u.start + u.n_frames, dtype=np.int64) for u in utts])

    def summary(self) -> dict[str, float]:
        """Sizes: ``dim``, ``n_frames``, ``n_utterances``, ``hours`` and per split ``{split}_utterances``,
        ``{split}_frames``, ``{split}_hours`` (hours of latent = frames / frame_rate / 3600)."""
        out: dict[str, float] = {
            "dim": float(self.dim),
            "n_frames": float(self.n_frames),
            "n_utterances": float(len(self.index)),
            "hours": self.n_frames / self.frame_rate / 3600.0,
        }
        for split in self._splits:
            utts = [u for u in self.index if u.split == split]
            frames = sum(u.n_frames for u in utts)
            out[f"{split}_utterances"] = float(len(utts))
            out[f"{split}_frames"] = float(frames)
            out[f"{split}_hours"] = frames / self.frame_rate / 3600.0
        return out

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"LatentStore({str(self.root)!r}, {self.meta.get('representation')!r}, N={self.n_frames}, D={self.dim})"
