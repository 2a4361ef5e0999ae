"""Training windows over a latent store: anchors, slices, a batched memmap dataset and a Lightning datamodule.

A *window* is identified by its *anchor* ``a``, the global store row of its last context frame. With context
``W``, horizon ``k`` and context stride ``s`` it reads W context frames ``a-(W-1)s, ..., a-s, a`` (oldest first)
and predicts a delta that depends on the *horizon mode* (``WindowSpec.horizon_mode``):

* ``lag`` (the reference study's sample, the default): the target is the **one-frame** delta
  ``x[t] - x[t-1]`` of the frame ``t = a + k``; the context is the W frames ending at ``t - k`` (k is a context
  *lag*), contiguous (``s = 1``). The delta starts from the *state* frame ``t - 1``. An utterance's first valid
  target is ``t = max(1, W-1+k)`` (relative to its start).
* ``stride``: the target is the k-frame delta ``z[a+k] - z[a]`` from a context spaced ``s`` frames apart; the
  state frame is the anchor itself.

Either way the window spans rows ``a-(W-1)s .. a+k`` and is valid only when they lie inside one utterance, so an
utterance of ``T`` frames holds ``max(T - (W-1)s - k, 0)`` windows. Slices (DESIGN §9) restrict the targets:

* ``all``: every valid window;
* ``high_energy``: windows whose target frame's log energy is strictly above the ``energy_percentile``-th
  percentile (50: the median) of the *train* split's frame energies (the threshold comes from train for every
  split, so val/test slices are not re-normalised to their own loudness);
* ``utterance_medial``: windows whose target frame ``t`` (0-based within an utterance of ``T`` frames) has
  ``medial_range[0] <= t/T <= medial_range[1]`` (default ``[0.17, 0.83]``, the reference's).

Data stay on disk: :class:`WindowDataset` keeps the store's read-only memmap and gathers each batch's rows
with one fancy index, in the raw latent space (the reference) or standardised with the store's train
statistics ``(z - mean) / std`` (``standardize=True``).

``LatentWindowDataModule`` is a ``lightning.pytorch.LightningDataModule``. Importing lightning takes
seconds, so the class is built on first access (module ``__getattr__``): ``from latentdyn.data.windows
import WindowDataset`` stays cheap, and ``latentdyn.data.windows.LatentWindowDataModule`` (a Hydra
``_target_`` too) imports lightning once, when it is first used.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from latentdyn.data.latent_store import LatentStore
from latentdyn.data.workers import worker_context

# LatentWindowDataModule is public too, but left out of __all__ so that `import *` does not import lightning.
__all__ = [
    "HORIZON_MODES",
    "MEDIAL_RANGE",
    "SLICES",
    "TRAIN_SPLIT",
    "IndexBatchSampler",
    "ResumableBatchLoader",
    "WindowBatches",
    "WindowDataset",
    "WindowSpec",
    "iter_batches",
    "subsample_anchors",
    "train_energy_threshold",
    "window_anchors",
]

SLICES = ("all", "high_energy", "utterance_medial")
HORIZON_MODES = ("lag", "stride")
#: The reference's utterance-medial band of target positions t/T.
MEDIAL_RANGE = (0.17, 0.83)
TRAIN_SPLIT = "train"
#: Batch fields, each a float32 tensor in the (optionally) standardised space except ``anchor`` (int64).
FIELDS = ("context", "target_delta", "last", "target", "prev", "anchor")


@dataclass(frozen=True)
class WindowSpec:
    """Window geometry in frames: ``context`` W frames ``context_stride`` apart, target ``horizon`` k frames
    after the last context frame; ``horizon_mode`` says which delta is predicted (see the module docstring)."""

    context: int
    horizon: int
    context_stride: int = 1
    horizon_mode: str = "lag"

    def __post_init__(self) -> None:
        for name in ("context", "horizon", "context_stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"WindowSpec.{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.horizon_mode not in HORIZON_MODES:
            raise ValueError(f"horizon_mode must be one of {HORIZON_MODES}, got {self.horizon_mode!r}")
        if self.horizon_mode == "lag" and self.context_stride != 1:
            raise ValueError(
                f"horizon_mode=lag reads a contiguous context (context_stride 1), got {self.context_stride}"
            )

    @property
    def state_offset(self) -> int:
        """Row of the state frame (the delta's origin) relative to the anchor: ``k - 1`` (lag) or 0 (stride)."""
        return self.horizon - 1 if self.horizon_mode == "lag" else 0

    @property
    def velocity_scale(self) -> float:
        """Linear extrapolation's factor on the last context velocity ``z[a] - z[a-s]``: the predicted delta
        spans one frame (lag) or ``k`` frames, i.e. ``k/s`` context steps (stride)."""
        return 1.0 if self.horizon_mode == "lag" else self.horizon / self.context_stride

    @property
    def span(self) -> int:
        """Frames from the first context frame to the target frame, inclusive: ``(W-1)s + k + 1``."""
        return (self.context - 1) * self.context_stride + self.horizon + 1

    @property
    def context_offsets(self) -> np.ndarray:
        """Row offsets of the context frames relative to the anchor, oldest first: ``(W,)`` int64, last is 0."""
        return -self.context_stride * np.arange(self.context - 1, -1, -1, dtype=np.int64)


def _open(store: LatentStore | str | Path) -> LatentStore:
    return store if isinstance(store, LatentStore) else LatentStore(Path(store))


def _utterance_table(store: LatentStore, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Start rows and lengths ``(U,)`` int64 of the split's utterances, in row order."""
    utts = store.utterances(split)
    starts = np.fromiter((u.start for u in utts), dtype=np.int64, count=len(utts))
    lengths = np.fromiter((u.n_frames for u in utts), dtype=np.int64, count=len(utts))
    return starts, lengths


def _concatenated_ranges(firsts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concat(arange(f, f + c) for f, c in zip(firsts, counts))`` without a Python loop; int64."""
    counts = np.maximum(counts, 0)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    before = np.cumsum(counts) - counts
    return np.repeat(firsts - before, counts) + np.arange(total, dtype=np.int64)


def train_energy_threshold(store: LatentStore, percentile: float) -> float:
    """The ``percentile``-th percentile (numpy's linear interpolation) of the train split's frame energies, dB.

    Reads the train frames' energies (4 bytes a frame), never the latents.
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"energy_percentile must be in [0, 100], got {percentile}")
    energies = np.concatenate([store.utterance_log_energy(u) for u in store.utterances(TRAIN_SPLIT)])
    return float(np.percentile(energies, percentile))


def window_anchors(
    store: LatentStore,
    split: str,
    spec: WindowSpec,
    slice_name: str = "all",
    *,
    energy_percentile: float = 50.0,
    medial_range: Sequence[float] = MEDIAL_RANGE,
) -> np.ndarray:
    """Anchors (global rows of the last context frame) of every valid window of ``split`` in ``slice_name``.

    See the module docstring for validity and the slices. Returns ascending ``(N_windows,)`` int64.
    """
    if slice_name not in SLICES:
        raise ValueError(f"unknown slice {slice_name!r}; expected one of {SLICES}")
    lo, hi = _check_medial_range(medial_range)
    starts, lengths = _utterance_table(store, split)
    lookback = (spec.context - 1) * spec.context_stride
    # Within an utterance the anchor position p satisfies p - lookback >= 0 and p + k <= T - 1.
    counts = np.maximum(lengths - lookback - spec.horizon, 0)
    anchors = _concatenated_ranges(starts + lookback, counts)
    if slice_name == "utterance_medial":
        utt = np.repeat(np.arange(len(starts)), counts)
        position = (anchors + spec.horizon - starts[utt]) / lengths[utt]
        anchors = anchors[(position >= lo) & (position <= hi)]
    if slice_name == "high_energy":
        threshold = train_energy_threshold(store, energy_percentile)
        anchors = anchors[np.asarray(store.log_energy[anchors + spec.horizon]) > threshold]
    return anchors


def _check_medial_range(medial_range: Sequence[float]) -> tuple[float, float]:
    values = [float(v) for v in medial_range]
    if len(values) != 2 or not 0.0 <= values[0] <= values[1] <= 1.0:
        raise ValueError(f"medial_range must be [lo, hi] with 0 <= lo <= hi <= 1, got {list(medial_range)}")
    return values[0], values[1]


def subsample_anchors(anchors: np.ndarray, max_windows: int | None, seed: int) -> np.ndarray:
    """A uniform, seeded subset of at most ``max_windows`` anchors without replacement, ascending.

    Sorting keeps the memmap reads roughly sequential; ``None`` (or enough room) returns ``anchors`` as is.
    """
    if max_windows is None or len(anchors) <= max_windows:
        return anchors
    if max_windows < 0:
        raise ValueError(f"max_windows must be >= 0 or None, got {max_windows}")
    chosen = np.random.default_rng(seed).choice(len(anchors), size=int(max_windows), replace=False)
    return anchors[np.sort(chosen)]


class WindowDataset(Dataset):
    """Map-style dataset of windows over a store's memmap, one window per anchor ``a``.

    Items (``__getitem__``) and batches (:meth:`get_batch`) hold, raw or standardised ``(z - mean) / std``
    (``standardize``), as float32:

    * ``context`` ``(W, D)``: frames ``a-(W-1)s .. a``, oldest first;
    * ``target`` ``(D,)``: ``z[a+k]``; ``last`` ``(D,)``: the state frame the delta starts from,
      ``z[a+k-1]`` (lag) or ``z[a]`` (stride);
    * ``target_delta`` ``(D,)``: ``target - last``;
    * ``prev`` ``(D,)``: ``z[a-s]``, the frame one context step before the anchor, for linear extrapolation
      ``velocity_scale · (z[a] - z[a-s])``. For ``W >= 2`` it is ``context[-2]``; for ``W = 1`` it is read from
      the store, and at an utterance's first frame (no earlier frame) it is ``z[a]`` itself, i.e. zero velocity;
    * ``anchor``: the anchor row (int; an int64 ``(B,)`` tensor in a batch).

    Batches are stacked along a leading ``B`` axis. Pickling keeps the store's path, not its arrays, so
    DataLoader workers reopen the memmap instead of receiving a copy of the store.
    """

    def __init__(
        self,
        store: LatentStore | str | Path,
        anchors: np.ndarray,
        spec: WindowSpec,
        standardize: bool = False,
    ) -> None:
        self.store = _open(store)
        self.spec = spec
        self.standardize = bool(standardize)
        self.anchors = np.ascontiguousarray(anchors, dtype=np.int64)
        if self.anchors.ndim != 1:
            raise ValueError(f"anchors must be 1-D, got shape {self.anchors.shape}")
        self._setup()
        self._check_windows()

    def _setup(self) -> None:
        self._offsets = self.spec.context_offsets
        self._utt_starts = np.fromiter(
            (u.start for u in self.store.index), dtype=np.int64, count=len(self.store.index)
        )

    def _utterance_start_of(self, rows: np.ndarray) -> np.ndarray:
        """Start row of the utterance holding each row."""
        return self._utt_starts[np.searchsorted(self._utt_starts, rows, side="right") - 1]

    def _check_windows(self) -> None:
        if len(self.anchors) == 0:
            return
        a = self.anchors
        lo, hi = a + self._offsets[0], a + self.spec.horizon
        if lo.min() < 0 or hi.max() >= self.store.n_frames:
            raise ValueError("anchors give windows outside the store's rows")
        crossing = self._utterance_start_of(lo) != self._utterance_start_of(hi)
        if crossing.any():
            raise ValueError(f"{int(crossing.sum())} anchors give windows that cross an utterance boundary")

    def __len__(self) -> int:
        return len(self.anchors)

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("store", "_utt_starts")}
        state["store_root"] = str(self.store.root)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.store = LatentStore(Path(state.pop("store_root")))
        self.__dict__.update(state)
        self._setup()

    def _rows(self, rows: np.ndarray) -> torch.Tensor:
        """Rows of the store as float32 ``(len(rows), D)``, standardised if configured.

        One numpy fancy index gathers the float16 rows; torch converts and standardises them (numpy's
        float16 -> float32 conversion is several times slower).
        """
        x = torch.from_numpy(np.asarray(self.store.latents[rows])).float()
        return self.store.standardize(x) if self.standardize else x

    def get_batch(self, indices: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        """Windows ``indices`` (positions into :attr:`anchors`) stacked into a batch, with one store gather."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        a = self.anchors[idx]
        n, w, dim = len(a), self.spec.context, self.store.dim
        separate_state = self.spec.state_offset > 0
        parts = [(a[:, None] + self._offsets).reshape(-1), a + self.spec.horizon]
        if separate_state:
            parts.append(a + self.spec.state_offset)
        if w == 1:
            prev_rows = a - self.spec.context_stride
            parts.append(np.where(prev_rows >= self._utterance_start_of(a), prev_rows, a))
        x = self._rows(np.concatenate(parts))
        context = x[: n * w].view(n, w, dim)
        target, rest = x[n * w : n * w + n], x[n * w + n :]
        if separate_state:
            last, rest = rest[:n], rest[n:]
        else:
            last = context[:, -1].contiguous()
        prev = rest if w == 1 else context[:, -2].contiguous()
        return {
            "context": context,
            "target_delta": target - last,
            "last": last,
            "target": target,
            "prev": prev,
            "anchor": torch.from_numpy(a),
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        batch = self.get_batch(np.array([i], dtype=np.int64))
        item: dict[str, Any] = {k: v[0] for k, v in batch.items() if k != "anchor"}
        item["anchor"] = int(batch["anchor"][0])
        return item


class WindowBatches(Dataset):
    """Batch view of a :class:`WindowDataset` for ``DataLoader(batch_size=None, sampler=IndexBatchSampler(...))``.

    ``__getitem__(indices)`` returns :meth:`WindowDataset.get_batch`, so each loader step is one gather.
    """

    def __init__(self, windows: WindowDataset) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, indices: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        return self.windows.get_batch(np.asarray(indices, dtype=np.int64))


class IndexBatchSampler(Sampler[np.ndarray]):
    """Batches of positions over ``range(n)`` as int64 arrays: a fresh permutation each epoch or in order.

    Equivalent to ``BatchSampler(RandomSampler(...) | SequentialSampler(...), batch_size, drop_last=False)``
    but yields numpy slices instead of lists of Python ints (no per-window Python work). Shuffling draws
    ``torch.randperm(n, generator=generator)``, so a seeded generator makes the epoch sequence reproducible;
    :attr:`epoch_state` keeps the generator state the current epoch's permutation was drawn from, and
    :meth:`resume` replays an interrupted epoch from there (see :class:`ResumableBatchLoader`).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.shuffle, self.generator = (
            int(n),
            int(batch_size),
            bool(shuffle),
            generator,
        )
        #: Leave out the epoch's last batch when it is smaller than ``batch_size``.
        self.drop_last = bool(drop_last)
        #: Generator state the latest permutation was drawn from (None: none drawn yet, or no generator).
        self.epoch_state: torch.Tensor | None = None
        self._resume: tuple[torch.Tensor | None, int] | None = None
        self.rank, self.world_size = 0, 1

    def shard(self, rank: int, world_size: int) -> None:
        """Hand this process (data-parallel rank ``rank`` of ``world_size``) its share of every batch.

        Every rank draws the same permutation (the same seeded generator), so step ``b``'s global batch is
        the single-process batch ``b``; rank ``r`` takes its positions ``r, r + world_size, ...``. With
        gradients averaged across ranks a step then trains on the same ``batch_size`` windows as one
        process would. With several ranks an epoch's last batch is left out when it holds fewer than
        ``world_size`` positions (a rank would get none).
        """
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if self.batch_size < int(world_size):
            raise ValueError(
                f"the batch size {self.batch_size} is the global batch, split across {world_size} ranks: "
                f"it must be at least {world_size}"
            )
        self.rank, self.world_size = int(rank), int(world_size)

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        full, rest = divmod(self.n, self.batch_size)
        return full + (0 < rest and rest >= self.world_size)

    def resume(self, epoch_state: torch.Tensor | None, start: int) -> None:
        """Make the next epoch replay an interrupted one: its permutation drawn from generator state
        ``epoch_state`` (None for an unshuffled sampler), its batches from number ``start`` (0-based) on.

        The generator ends the epoch's draw in the state it had in the interrupted run, so later epochs
        follow as they would have.
        """
        if not 0 <= int(start) <= len(self):
            raise ValueError(f"start must be a batch number in [0, {len(self)}], got {start}")
        if self.shuffle and (self.generator is None or epoch_state is None):
            raise ValueError("resuming a shuffled epoch needs the sampler's generator and its epoch_state")
        if not self.shuffle and epoch_state is not None:
            raise ValueError("an unshuffled sampler has no permutation to restore: epoch_state must be None")
        self._resume = (epoch_state, int(start))

    def __iter__(self) -> Iterator[np.ndarray]:
        epoch_state, start = self._resume if self._resume is not None else (None, 0)
        self._resume = None
        if self.shuffle and self.generator is not None:
            if epoch_state is not None:
                self.generator.set_state(epoch_state)
            self.epoch_state = self.generator.get_state()
        order = self._epoch_order()
        for batch in range(start, len(self)):
            yield order[batch * self.batch_size : (batch + 1) * self.batch_size][self.rank :: self.world_size]

    def _epoch_order(self) -> np.ndarray:
        """The epoch's positions in visiting order (drawn from the generator when shuffled); a subclass may
        draw more per position from the same generator (rows of an ``(n, ...)`` array)."""
        if self.shuffle:
            return torch.randperm(self.n, generator=self.generator).numpy()
        return np.arange(self.n, dtype=np.int64)


class ResumableBatchLoader(DataLoader):
    """``DataLoader`` of :class:`IndexBatchSampler` batches that a killed training resumes mid-epoch.

    ``state_dict()`` says where the loader is: ``epoch_state``, the generator state the current epoch's
    permutation was drawn from (None when unshuffled), and ``batch``, how many of that epoch's batches it has
    handed out (between epochs: the generator's current state and 0). ``load_state_dict`` makes the next
    epoch replay that permutation from that batch on, without reading the skipped windows. Lightning saves
    and restores the state with its checkpoints; it takes a sized loader's batches one at a time, so at a
    checkpoint "handed out" means "trained on". Counting happens here, after any worker processes, which
    read ahead of the training loop.

    Args:
        dataset: indexed by a sampler batch, e.g. :class:`WindowBatches`.
        sampler: the batches; a shuffled one needs a generator.
        **kwargs: further ``DataLoader`` arguments (``num_workers``, ``generator`` ...), not batching ones.
    """

    def __init__(self, dataset: Dataset, sampler: IndexBatchSampler, **kwargs: Any) -> None:
        if sampler.shuffle and sampler.generator is None:
            raise ValueError("a resumable loader's shuffled sampler needs a generator")
        kwargs.setdefault("multiprocessing_context", worker_context(kwargs.get("num_workers", 0)))
        super().__init__(dataset, batch_size=None, sampler=sampler, **kwargs)
        self._position: int | None = None
        self._pending: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        pending, self._pending = self._pending, None
        self._position = 0 if pending is None else int(pending["batch"])
        for batch in super().__iter__():
            self._position += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch_state": uint8 tensor | None, "batch": int}`` (see the class docstring)."""
        if self._pending is not None:
            return dict(self._pending)
        sampler = self.sampler
        assert isinstance(sampler, IndexBatchSampler)
        if self._position is None or self._position >= len(self):
            current = sampler.generator.get_state() if sampler.shuffle else None
            return {"epoch_state": current, "batch": 0}
        return {"epoch_state": sampler.epoch_state if sampler.shuffle else None, "batch": self._position}

    def shard(self, rank: int, world_size: int) -> None:
        """Take data-parallel rank ``rank``'s share of every batch (:meth:`IndexBatchSampler.shard`)."""
        sampler = self.sampler
        assert isinstance(sampler, IndexBatchSampler)
        sampler.shard(rank, world_size)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state`` (a :meth:`state_dict`) when the loader is next iterated."""
        if set(state) != {"epoch_state", "batch"}:
            raise ValueError(f"not a ResumableBatchLoader state: keys {sorted(state)}")
        sampler = self.sampler
        assert isinstance(sampler, IndexBatchSampler)
        sampler.resume(state["epoch_state"], int(state["batch"]))
        self._pending = {"epoch_state": state["epoch_state"], "batch": int(state["batch"])}


def iter_batches(windows: WindowDataset, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """The dataset's windows in order, ``batch_size`` at a time (the last batch may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for lo in range(0, len(windows), batch_size):
        yield windows.get_batch(np.arange(lo, min(lo + batch_size, len(windows)), dtype=np.int64))


def _stage_splits(stage: str | None) -> tuple[str, ...]:
    return {
        "fit": ("train", "val"),
        "validate": ("val",),
        "test": ("test",),
        "predict": ("test",),
    }.get(stage or "", ("train", "val", "test"))


def _build_datamodule_class() -> type:
    import lightning.pytorch as pl

    class LatentWindowDataModule(pl.LightningDataModule):
        """Train/val/test window loaders over one latent store (see the module docstring).

        Training batches come in a seeded random order (a ``torch.Generator`` seeded with ``seed``; each
        epoch a new permutation, every window once per epoch, the last batch possibly smaller); val and
        test are in anchor order, val capped at ``max_val_windows`` by a seeded subset. The slice applies
        to every split. Each loader step is one memmap gather of a whole batch. The loaders are
        :class:`ResumableBatchLoader` objects: a checkpoint records the train loader's place in its
        epoch, and a resumed fit continues that epoch with the batches it had not yet trained on.

        Under data-parallel training (``trainer.strategy=ddp``) every rank builds the same loaders and
        takes its share of each batch (:meth:`IndexBatchSampler.shard`, set by the trainer's
        :class:`~latentdyn.models.training.ShardLoadersAcrossRanks`): ``batch_size`` is the global batch.
        """

        def __init__(
            self,
            store_root: str | Path,
            context: int,
            horizon: int,
            context_stride: int = 1,
            slice_name: str = "all",
            batch_size: int = 256,
            num_workers: int = 0,
            energy_percentile: float = 50.0,
            medial_range: Sequence[float] = MEDIAL_RANGE,
            seed: int = 0,
            max_val_windows: int | None = 20000,
            pin_memory: bool = False,
            horizon_mode: str = "lag",
            standardize: bool = False,
        ) -> None:
            super().__init__()
            if slice_name not in SLICES:
                raise ValueError(f"unknown slice {slice_name!r}; expected one of {SLICES}")
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            store_root = str(store_root)  # hyperparameters go into checkpoints as plain data
            self.save_hyperparameters()
            self.store_root = Path(store_root)
            self.spec = WindowSpec(context, horizon, context_stride, horizon_mode)
            self.standardize = bool(standardize)
            self.slice_name = slice_name
            self.batch_size = int(batch_size)
            self.num_workers = int(num_workers)
            self.energy_percentile = float(energy_percentile)
            self.medial_range = _check_medial_range(medial_range)
            self.seed = int(seed)
            self.max_val_windows = max_val_windows
            self.pin_memory = bool(pin_memory)
            self.store: LatentStore | None = None
            self.datasets: dict[str, WindowDataset] = {}
            self._generator = torch.Generator().manual_seed(self.seed)
            self._rank, self._world_size = 0, 1

        def shard(self, rank: int, world_size: int) -> None:
            """Make the loaders built from now on hand rank ``rank`` of ``world_size`` its share of every
            batch (:meth:`IndexBatchSampler.shard`; ``batch_size`` stays the global batch)."""
            self._rank, self._world_size = int(rank), int(world_size)

        @property
        def dim(self) -> int:
            """Latent dimension D (opens the store if needed)."""
            return self._store().dim

        def _store(self) -> LatentStore:
            if self.store is None:
                self.store = LatentStore(self.store_root)
            return self.store

        def dataset(self, split: str) -> WindowDataset:
            """The split's windows (built on first use)."""
            if split not in self.datasets:
                store = self._store()
                anchors = window_anchors(
                    store,
                    split,
                    self.spec,
                    self.slice_name,
                    energy_percentile=self.energy_percentile,
                    medial_range=self.medial_range,
                )
                if split == "val":
                    anchors = subsample_anchors(anchors, self.max_val_windows, self.seed)
                self.datasets[split] = WindowDataset(store, anchors, self.spec, self.standardize)
            return self.datasets[split]

        def setup(self, stage: str | None = None) -> None:
            for split in _stage_splits(stage):
                if split in self._store().splits:
                    self.dataset(split)

        def _loader(self, windows: WindowDataset, shuffle: bool) -> ResumableBatchLoader:
            # The loader's own generator seeds its workers: iterating never draws from the global RNG, so
            # a resumed fit's extra iterations (sanity check) leave the training's random stream as it was.
            loader = ResumableBatchLoader(
                WindowBatches(windows),
                IndexBatchSampler(
                    len(windows), self.batch_size, shuffle, self._generator if shuffle else None
                ),
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                pin_memory=self.pin_memory,
                generator=torch.Generator().manual_seed(self.seed),
            )
            loader.shard(self._rank, self._world_size)
            return loader

        def train_dataloader(self) -> ResumableBatchLoader:
            return self._loader(self.dataset("train"), shuffle=True)

        def val_dataloader(self) -> ResumableBatchLoader:
            return self._loader(self.dataset("val"), shuffle=False)

        def test_dataloader(self) -> ResumableBatchLoader:
            return self._loader(self.dataset("test"), shuffle=False)

    LatentWindowDataModule.__module__ = __name__
    LatentWindowDataModule.__qualname__ = "LatentWindowDataModule"
    return LatentWindowDataModule


def __getattr__(name: str) -> Any:
    if name == "LatentWindowDataModule":
        cls = _build_datamodule_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
