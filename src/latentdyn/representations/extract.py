"""Audio -> latent store extraction: length-bucketed batches, overlapped loading, resumable shards.

Pipeline (DESIGN §5, §7):

1. **Plan.** Utterances are sorted by duration and grouped into batches of at most ``batch_seconds`` of
   padded audio (length bucketing keeps padding small); consecutive batches are grouped into shards of
   about ``shard_seconds`` of audio. The plan is a deterministic function of the utterances and the
   settings, and its fingerprint (a hash of both) names the shards it produces.
2. **Load.** A :class:`torch.utils.data.DataLoader` with ``num_workers`` processes reads and resamples
   each batch's audio (and its per-frame log energy) while the encoder works on the previous batch. A bad
   file is returned as a marker, never raised in a worker, and the main process applies the policy.
3. **Encode.** Each zero-padded batch ``(B, 1, S_max)`` is encoded on the device (optionally under bf16/fp16
   autocast on CUDA) and each output is cropped to its utterance's own ``rep.num_frames(S)`` frames.
4. **Shard.** Every finished shard is written (by a background thread) as two ``.npy`` arrays and a JSON
   sidecar, each fsynced and atomically renamed, the sidecar last: a shard is complete iff its sidecar is.
   A killed extraction restarted with the same plan skips complete shards and recomputes only the rest,
   with exactly the same batches, so the result is identical.
5. **Merge.** The shards are streamed into the :class:`LatentStoreWriter` in a fixed order, sorted by split
   name then utterance id, whatever the bucketing; the writer is closed (the store is complete) and only
   then are the shards deleted.
6. **Distribute (optional).** Several processes can share one extraction: worker ``rank`` of ``world_size``
   (:func:`resolve_worker`: config, else torchrun / SLURM environment) encodes the shards ``k`` with
   ``k % world_size == rank`` (:func:`encode_worker_shards`) into one shared, stable shard directory. Workers
   of the same plan keep each other's shards (``plan.json`` is written once, under ``.plan.lock``; each
   worker holds a shared ``flock`` on ``.lock`` while it writes, and wiping needs it exclusively). Once
   :func:`missing_shards` is empty, one of them merges with :func:`assemble_store` (the caller serialises
   that with the artifact's lock); the merge order depends on the plan alone, so the store is the same
   byte for byte for any number of workers. :func:`wait_for_shards` polls for the others' shards.

Memory stays bounded: at most a couple of batches in flight per loader worker, two shards in RAM, and the
merge copies one utterance at a time out of memory-mapped shards.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import latentdyn
from latentdyn.data.audio import (
    BAD_AUDIO_POLICIES,
    BadAudioError,
    BadFile,
    check_bad_audio_policy,
    load_audio,
    report_bad_file,
)
from latentdyn.data.corpus import Utterance
from latentdyn.data.latent_store import LatentStoreWriter
from latentdyn.data.workers import worker_context
from latentdyn.errors import UserFacingError
from latentdyn.jsonio import write_json_atomic
from latentdyn.representations.base import Representation
from latentdyn.representations.energy import frame_log_energy

__all__ = [
    "BAD_AUDIO_POLICIES",
    "BadFile",
    "ASSEMBLE_MODES",
    "EncodedBatch",
    "PRECISIONS",
    "ShardPlan",
    "ShardsPending",
    "Worker",
    "aligned_log_energy",
    "assemble_store",
    "default_num_workers",
    "encode_padded",
    "encode_worker_shards",
    "extract_to_store",
    "flush_denormals",
    "launch_encode",
    "length_buckets",
    "missing_shards",
    "plan_shards",
    "release_shard_dir",
    "resolve_device",
    "resolve_worker",
    "wait_for_shards",
]

log = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Bump when the shard layout or content changes: older shards are then discarded, never reused.
SHARD_FORMAT_VERSION = 1
#: Default audio seconds per shard: at most this much work is lost when an extraction is killed.
DEFAULT_SHARD_SECONDS = 1800.0
#: Name of the shard directory inside the writer's root when the caller gives none (no resume then).
PRIVATE_SHARD_DIR = ".extract-shards"

_PLAN_FILE = "plan.json"
_LOCK_FILE = ".lock"
#: Serialises distributed workers' checks of (and writes to) ``plan.json``.
_PLAN_LOCK_FILE = ".plan.lock"
#: What a distributed worker does when its own shards are done but others' are not (``extract.assemble``).
ASSEMBLE_MODES = ("wait", "leave")
_FLOAT16_MAX = float(np.finfo(np.float16).max)
#: Shards kept memory-mapped at once while merging (each holds two open maps).
_OPEN_SHARDS = 16

Item = tuple[str, Utterance]


def resolve_device(device: torch.device | str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_num_workers(device: torch.device) -> int:
    """Loader processes when the caller gives none.

    On CPU the encoder already uses every core and reading + resampling costs a few percent of a codec's
    forward pass, so one worker (enough to hide file I/O) is best; a CUDA encoder is fed by up to 8
    workers, leaving a core for the main process.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    return 1 if cores > 1 else 0


# ---------------------------------------------------------------------------------------------- planning


def length_buckets(items: Sequence[Item], batch_seconds: float) -> Iterator[list[Item]]:
    """Group (split, utterance) pairs, sorted by (duration, utt_id), into batches of padded audio.

    A batch's padded length is its longest utterance's duration times its size and stays at most
    ``batch_seconds``; an utterance longer than ``batch_seconds`` gets a batch of its own.
    """
    ordered = sorted(items, key=lambda su: (su[1].duration, su[1].utt_id))
    batch: list[Item] = []
    for item in ordered:
        if batch and item[1].duration * (len(batch) + 1) > batch_seconds:
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


@dataclass(frozen=True)
class ShardPlan:
    """Batches and shards of one extraction, fixed before any audio is read.

    Attributes:
        batches: length-bucketed batches of (split, utterance), in processing order.
        shards: ``(first_batch, end_batch)`` per shard; shard ``k`` holds ``batches[first:end]``.
        fingerprint: 16 hex digits hashing the batches and the settings; a shard written under another
            fingerprint is never reused.
    """

    batches: tuple[tuple[Item, ...], ...]
    shards: tuple[tuple[int, int], ...]
    fingerprint: str

    def shard_items(self, k: int) -> list[Item]:
        first, end = self.shards[k]
        return [item for batch in self.batches[first:end] for item in batch]

    def shard_seconds(self, k: int) -> float:
        return sum(u.duration for _, u in self.shard_items(k))


def plan_shards(
    items: Sequence[Item], *, batch_seconds: float, shard_seconds: float, settings: Mapping[str, Any]
) -> ShardPlan:
    """Bucket ``items`` into batches and group consecutive batches into shards of ``shard_seconds`` audio.

    A shard closes at the first batch that brings its (unpadded) audio to ``shard_seconds`` or more.
    ``settings`` (JSON-able: representation, precision, ...) enter the fingerprint with the batches.
    """
    batches = tuple(tuple(b) for b in length_buckets(items, batch_seconds))
    shards: list[tuple[int, int]] = []
    first, seconds = 0, 0.0
    for i, batch in enumerate(batches):
        seconds += sum(u.duration for _, u in batch)
        if seconds >= shard_seconds:
            shards.append((first, i + 1))
            first, seconds = i + 1, 0.0
    if first < len(batches):
        shards.append((first, len(batches)))
    described = [[[s, u.utt_id, u.path, u.duration, u.speaker, u.gender] for s, u in b] for b in batches]
    blob = json.dumps(
        {"format": SHARD_FORMAT_VERSION, "settings": settings, "batches": described, "shards": shards},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return ShardPlan(batches=batches, shards=tuple(shards), fingerprint=fingerprint)


# ------------------------------------------------------------------------------------------------ loading


@dataclass
class LoadedBatch:
    """One batch as a loader worker returns it.

    Attributes:
        index: the batch's position in the plan.
        wave: ``(B_ok, 1, S_max)`` float32 zero-padded audio of the utterances that loaded.
        positions: for each row of ``wave``, the utterance's position in the planned batch.
        lengths: samples of each loaded utterance (before padding).
        energies: per loaded utterance, ``(lengths[i] // hop,)`` float32 log energy in dB.
        bad: ``(position, reason)`` of each utterance whose audio is unusable.
    """

    index: int
    wave: torch.Tensor
    positions: list[int]
    lengths: list[int]
    energies: list[np.ndarray]
    bad: list[tuple[int, str]] = field(default_factory=list)

    def pin_memory(self) -> LoadedBatch:
        """Called by the DataLoader's pinning thread (CUDA): page-locks the audio for async copies."""
        self.wave = self.wave.pin_memory()
        return self


class _BatchAudio(Dataset):
    """Map-style dataset whose item ``i`` is the ``i``-th planned batch, loaded and padded.

    Holds only paths (not the representation), so it is cheap to send to worker processes.
    """

    def __init__(self, batches: Sequence[tuple[int, Sequence[str]]], sample_rate: int, hop: int) -> None:
        self.batches = list(batches)
        self.sample_rate = sample_rate
        self.hop = hop

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> LoadedBatch:
        index, paths = self.batches[i]
        waves: list[torch.Tensor] = []
        positions: list[int] = []
        bad: list[tuple[int, str]] = []
        for pos, path in enumerate(paths):
            try:
                waves.append(load_audio(path, self.sample_rate))
                positions.append(pos)
            except BadAudioError as err:
                bad.append((pos, err.reason))
        longest = max((w.shape[-1] for w in waves), default=0)
        padded = torch.zeros(len(waves), 1, longest)
        for row, w in enumerate(waves):
            padded[row, 0, : w.shape[-1]] = w
        energies = [frame_log_energy(w, self.hop).numpy() for w in waves]
        return LoadedBatch(index, padded, positions, [int(w.shape[-1]) for w in waves], energies, bad)


def _unbatched(x: LoadedBatch) -> LoadedBatch:
    return x


# ----------------------------------------------------------------------------------------------- encoding


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


@dataclass
class EncodedBatch:
    """A batch whose encoding has been launched: ``latents`` ``(B, D, T_max)`` float32 on the host, valid
    once ``ready`` (a CUDA event, None on CPU) has completed; rows are cropped by :meth:`crop`."""

    latents: torch.Tensor
    lengths: list[int]
    ready: torch.cuda.Event | None

    def crop(self, rep: Representation) -> list[np.ndarray]:
        """Wait for the device, then per row ``(T_i, D)`` float32 with ``T_i = rep.num_frames(lengths[i])``.

        Raises RuntimeError when the representation returned fewer frames than ``num_frames`` promises.
        """
        if self.ready is not None:
            self.ready.synchronize()
        out: list[np.ndarray] = []
        for i, n in enumerate(self.lengths):
            n_frames = rep.num_frames(n)
            if self.latents.shape[-1] < n_frames:
                raise RuntimeError(
                    f"{rep.name}.encode gave {self.latents.shape[-1]} frames for a batch padded to "
                    f"{max(self.lengths)} samples, fewer than num_frames({n}) = {n_frames}"
                )
            out.append(self.latents[i, :, :n_frames].T.contiguous().numpy())
        return out


@torch.inference_mode()
def launch_encode(
    rep: Representation, wave: torch.Tensor, lengths: Sequence[int], *, device: torch.device, precision: str
) -> EncodedBatch:
    """Start encoding a zero-padded ``(B, 1, S_max)`` batch; returns without waiting on a CUDA device.

    On CUDA the latents are copied into pinned host memory asynchronously, so the caller can prepare (and
    launch) the next batch while this one computes. On CPU everything is done on return.
    """
    with _autocast(device, precision):
        latents = rep.encode(wave.to(device, non_blocking=True))
    latents = latents.float()
    if device.type != "cuda":
        return EncodedBatch(latents.cpu(), list(lengths), None)
    host = torch.empty(latents.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(latents, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(device))
    return EncodedBatch(host, list(lengths), ready)


def encode_padded(
    rep: Representation,
    wave: torch.Tensor,
    lengths: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> list[np.ndarray]:
    """Encode a zero-padded batch and crop each output to its utterance's own frame count.

    Args:
        rep: the representation (already on ``device``).
        wave: ``(B, 1, S_max)`` audio, row ``i`` zero beyond ``lengths[i]`` samples.
        lengths: true samples per row, each giving ``rep.num_frames(lengths[i]) >= 1`` frames.
        device: where to run the encoder.
        precision: ``fp32``, or ``bf16`` / ``fp16`` autocast (CUDA only).

    Returns:
        per row, ``(T_i, D)`` float32 latents with ``T_i = rep.num_frames(lengths[i])``.

    Raises:
        RuntimeError: the representation returned fewer frames than ``num_frames`` promises.
    """
    return launch_encode(rep, wave, lengths, device=torch.device(device), precision=precision).crop(rep)


def aligned_log_energy(energy: np.ndarray | torch.Tensor, n_frames: int) -> np.ndarray:
    """Hop-chunk log energies ``(S // hop,)`` (dB) matched to a representation's ``n_frames`` frames.

    When a codec yields more frames than ``S // hop`` (it pads a trailing partial hop into a frame), the
    last energy value is repeated; when fewer, the tail is dropped. A signal shorter than one hop gets
    -100 dB (digital silence). Returns ``(n_frames,)`` float32.
    """
    energy = np.asarray(energy, dtype=np.float32)
    if energy.shape[0] >= n_frames:
        return energy[:n_frames].copy()
    fill = energy[-1] if energy.size else np.float32(-100.0)
    return np.concatenate([energy, np.full(n_frames - energy.shape[0], fill, dtype=np.float32)])


def _check_latents(utt_id: str, z: np.ndarray) -> None:
    """The store's float16 contract, checked before a shard is written (hours before the merge)."""
    if not np.isfinite(z).all():
        raise ValueError(f"utterance {utt_id!r}: latents contain NaN or inf")
    peak = float(np.abs(z).max()) if z.size else 0.0
    if peak > _FLOAT16_MAX:
        raise ValueError(
            f"utterance {utt_id!r}: |latent| reaches {peak:.6g}, beyond float16's ±{_FLOAT16_MAX:g}"
        )


# ------------------------------------------------------------------------------------------------- shards


@dataclass
class _ShardBuffer:
    """What one shard has accumulated so far: float16 latents, float32 energies, utterance records."""

    latents: list[np.ndarray] = field(default_factory=list)
    energies: list[np.ndarray] = field(default_factory=list)
    utterances: list[dict[str, Any]] = field(default_factory=list)
    bad: list[dict[str, str]] = field(default_factory=list)
    rows: int = 0

    def add(self, split: str, utt: Utterance, z: np.ndarray, energy: np.ndarray) -> None:
        record = {"utt_id": utt.utt_id, "speaker": utt.speaker, "split": split, "gender": utt.gender}
        self.utterances.append({**record, "row": self.rows, "n_frames": int(z.shape[0])})
        self.latents.append(z.astype(np.float16))
        self.energies.append(energy)
        self.rows += int(z.shape[0])


def _shard_paths(shard_dir: Path, k: int) -> tuple[Path, Path, Path]:
    stem = shard_dir / f"shard-{k:06d}"
    return Path(f"{stem}.latents.npy"), Path(f"{stem}.energy.npy"), Path(f"{stem}.json")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    # Per process: two workers that both compute a shard (a rerun rank) never write into one temporary file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        np.save(fh, array, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def _write_shard(shard_dir: Path, k: int, fingerprint: str, dim: int, buf: _ShardBuffer) -> None:
    """Write shard ``k``: both arrays, then the sidecar that marks it complete (each fsynced + renamed)."""
    lat_path, energy_path, meta_path = _shard_paths(shard_dir, k)
    latents = np.concatenate(buf.latents) if buf.latents else np.zeros((0, dim), np.float16)
    energies = np.concatenate(buf.energies) if buf.energies else np.zeros(0, np.float32)
    _save_npy_atomic(lat_path, latents)
    _save_npy_atomic(energy_path, energies)
    sidecar = {
        "format": SHARD_FORMAT_VERSION,
        "fingerprint": fingerprint,
        "shard": k,
        "rows": buf.rows,
        "dim": dim,
        "utterances": buf.utterances,
        "bad": buf.bad,
    }
    write_json_atomic(meta_path, sidecar)
    _fsync_dir(shard_dir)


def _npy_shape(path: Path, dtype: np.dtype) -> tuple[int, ...] | None:
    """Shape of a complete ``.npy`` file of ``dtype`` (header and data size agree), else None."""
    try:
        with path.open("rb") as fh:
            readers = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }
            reader = readers.get(np.lib.format.read_magic(fh))
            if reader is None:
                return None
            shape, fortran, stored = reader(fh)
            data_start = fh.tell()
        expected = data_start + math.prod(shape) * np.dtype(stored).itemsize
        if fortran or np.dtype(stored) != dtype or path.stat().st_size != expected:
            return None
        return tuple(shape)
    except (OSError, ValueError):
        return None


def _load_complete_shard(shard_dir: Path, k: int, fingerprint: str, dim: int) -> dict[str, Any] | None:
    """Shard ``k``'s sidecar if the shard is complete and belongs to this plan, else None."""
    lat_path, energy_path, meta_path = _shard_paths(shard_dir, k)
    try:
        sidecar = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if sidecar.get("fingerprint") != fingerprint or sidecar.get("shard") != k:
        return None
    rows = sidecar["rows"]
    if _npy_shape(lat_path, np.dtype(np.float16)) != (rows, dim):
        return None
    if _npy_shape(energy_path, np.dtype(np.float32)) != (rows,):
        return None
    return sidecar


def _is_shard_file(path: Path) -> bool:
    # Also the temporary names of write_json_atomic (``.shard-000001.json.<pid>.tmp``, ``.plan.json.<pid>.tmp``).
    return path.name.startswith(("shard-", ".shard-", f".{_PLAN_FILE}.")) or path.name in (
        _PLAN_FILE,
        _PLAN_FILE + ".tmp",
    )


def _clear_shards(shard_dir: Path) -> None:
    """Delete this module's files in ``shard_dir`` (only those: a mistaken path loses nothing else)."""
    for path in shard_dir.iterdir():
        if path.is_file() and _is_shard_file(path):
            path.unlink()


def _prepare_shard_dir(shard_dir: Path, fingerprint: str, resume: bool) -> None:
    """Make ``shard_dir`` hold only shards of this plan: wipe it unless resuming the same plan."""
    plan_path = shard_dir / _PLAN_FILE
    try:
        previous = json.loads(plan_path.read_text()).get("fingerprint")
    except (OSError, ValueError):
        previous = None
    if previous == fingerprint and resume:
        return
    if previous is not None:
        why = "resume disabled" if previous == fingerprint else "the extraction plan or settings changed"
        log.warning("discarding the shards in %s (%s)", shard_dir, why)
    _clear_shards(shard_dir)
    write_json_atomic(plan_path, {"format": SHARD_FORMAT_VERSION, "fingerprint": fingerprint})


class _ShardSink:
    """Writes shards on one background thread, so fsyncs overlap with encoding; at most one is pending."""

    def __init__(self, shard_dir: Path, fingerprint: str, dim: int) -> None:
        self.shard_dir, self.fingerprint, self.dim = shard_dir, fingerprint, dim
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: Future[None] | None = None

    def submit(self, k: int, buf: _ShardBuffer) -> None:
        self.wait()
        self._pending = self._pool.submit(_write_shard, self.shard_dir, k, self.fingerprint, self.dim, buf)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


# -------------------------------------------------------------------------------------------------- merge


def _final_order(sidecars: Sequence[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(shard, utterance record) pairs sorted by split name then utterance id."""
    records = [(k, rec) for k, sc in enumerate(sidecars) for rec in sc["utterances"]]
    return sorted(records, key=lambda kr: (kr[1]["split"], kr[1]["utt_id"]))


def _merge_shards(
    shard_dir: Path, sidecars: Sequence[dict[str, Any]], writer: LatentStoreWriter, progress: bool
) -> None:
    """Stream every shard's utterances into ``writer`` in :func:`_final_order`, one utterance at a time."""
    open_maps: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
    order = _final_order(sidecars)
    for k, rec in tqdm(order, desc="write store", unit="utt", disable=not progress):
        if k in open_maps:
            open_maps.move_to_end(k)
        else:
            lat_path, energy_path, _ = _shard_paths(shard_dir, k)
            open_maps[k] = (np.load(lat_path, mmap_mode="r"), np.load(energy_path, mmap_mode="r"))
            if len(open_maps) > _OPEN_SHARDS:
                open_maps.popitem(last=False)
        latents, energies = open_maps[k]
        rows = slice(rec["row"], rec["row"] + rec["n_frames"])
        writer.add(
            rec["utt_id"],
            rec["speaker"],
            rec["split"],
            np.asarray(latents[rows]),
            np.asarray(energies[rows]),
            rec["gender"],
        )
    open_maps.clear()


# --------------------------------------------------------------------------------------------- extraction


def _validate(
    items: Sequence[Item], batch_seconds: float, shard_seconds: float, on_bad_audio: str, precision: str
) -> None:
    check_bad_audio_policy(on_bad_audio)
    if not batch_seconds > 0:
        raise ValueError(f"extract.batch_seconds must be positive, got {batch_seconds}")
    if not shard_seconds > 0:
        raise ValueError(f"extract.shard_seconds must be positive, got {shard_seconds}")
    if precision not in PRECISIONS:
        raise ValueError(f"extract.precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    seen: set[str] = set()
    for split, utt in items:
        if utt.utt_id in seen:
            raise ValueError(f"utterance {utt.utt_id!r} appears twice (split {split!r} and an earlier one)")
        seen.add(utt.utt_id)


def _settings(
    rep: Representation, device: torch.device, precision: str, batch_seconds: float
) -> dict[str, Any]:
    """What besides the batches determines the shards' bytes (the plan's fingerprint covers it)."""
    return {
        "representation": rep.name,
        "dim": int(rep.dim),
        "sample_rate": int(rep.sample_rate),
        "frame_rate": float(rep.frame_rate),
        "weights": dict(rep.weights),
        "device_type": device.type,
        "precision": precision,
        "batch_seconds": float(batch_seconds),
        "latentdyn": latentdyn.__version__,
        "torch": torch.__version__,
    }


@contextlib.contextmanager
def flush_denormals(device: torch.device) -> Iterator[None]:
    """On CPU, flush subnormal floats to zero while encoding.

    Subnormal intermediates (values below 1.2e-38) make CPU arithmetic many times slower (measured on 2
    cores: a random-weight Mimi's transformer ran 3.4x faster with them flushed) and lie far below
    anything a float16 latent resolves (its smallest subnormal is 6e-8). torch has no getter for the
    flag, so it is reset to torch's default (off) afterwards.
    """
    if device.type != "cpu":
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@dataclass
class _Progress:
    """Audio seconds done, for the bar's real-time factor (audio seconds per wall second)."""

    bar: Any
    t0: float = field(default_factory=time.monotonic)
    computed: float = 0.0

    def update(self, seconds: float) -> None:
        self.computed += seconds
        self.bar.update(seconds)
        rtf = self.computed / max(time.monotonic() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"RTF {rtf:,.1f}x", refresh=False)


@dataclass
class _InFlight:
    """A launched batch awaiting its latents: the planned batch, the loaded audio's rows, the encoding."""

    index: int
    loaded: LoadedBatch
    rows: list[int]
    encoded: EncodedBatch | None


class _ShardEncoder:
    """Turns loaded batches into shards: bad-file policy, encoding, cropping, energies, shard hand-off.

    Keeps one batch in flight: batch ``i + 1`` is launched on the device before batch ``i``'s latents are
    cropped and buffered, so on CUDA the host work of one batch overlaps the device work of the next.
    """

    def __init__(
        self,
        rep: Representation,
        plan: ShardPlan,
        sink: _ShardSink,
        *,
        on_bad_audio: str,
        device: torch.device,
        precision: str,
        progress: _Progress,
    ) -> None:
        self.rep, self.plan, self.sink, self.progress = rep, plan, sink, progress
        self.on_bad_audio, self.device, self.precision = on_bad_audio, device, precision
        self.shard_of = {b: k for k, (first, end) in enumerate(plan.shards) for b in range(first, end)}
        self.buf = _ShardBuffer()

    def run(self, loader: DataLoader) -> None:
        """Process every batch of ``loader`` in order. If one fails, the batch before it is still finished
        (and its shard written when it was the shard's last), then the error propagates."""
        pending: _InFlight | None = None  # launched, not yet finished; everything before it is finished
        try:
            for loaded in loader:
                launched = self.launch(loaded)
                job, pending = pending, None
                if job is not None:
                    self.finish(job)
                pending = launched
            job, pending = pending, None
            if job is not None:
                self.finish(job)
        except BaseException:
            if pending is not None:
                with contextlib.suppress(Exception):
                    self.finish(pending)
            raise

    def launch(self, loaded: LoadedBatch) -> _InFlight:
        """Apply the bad-audio policy to a loaded batch and launch the encoding of its usable rows."""
        batch = self.plan.batches[loaded.index]
        bad = dict(loaded.bad)
        rows: list[int] = []  # rows of loaded.wave long enough for one frame
        for row, (pos, n) in enumerate(zip(loaded.positions, loaded.lengths, strict=True)):
            if self.rep.num_frames(n) < 1:
                bad[pos] = f"shorter than one latent frame ({n} samples at {self.rep.sample_rate} Hz)"
            else:
                rows.append(row)
        for pos in sorted(bad):
            split, utt = batch[pos]
            report_bad_file(BadFile(str(utt.path), "extract", bad[pos], utt.utt_id), self.on_bad_audio)
            self.buf.bad.append(
                {"path": str(utt.path), "utt_id": utt.utt_id, "reason": bad[pos], "split": split}
            )
        encoded = None
        if rows:
            wave = loaded.wave if len(rows) == loaded.wave.shape[0] else loaded.wave[rows]
            lengths = [loaded.lengths[r] for r in rows]
            encoded = launch_encode(
                self.rep, wave[..., : max(lengths)], lengths, device=self.device, precision=self.precision
            )
        return _InFlight(loaded.index, loaded, rows, encoded)

    def finish(self, job: _InFlight) -> None:
        """Crop and buffer a launched batch's latents; hand the shard to the sink after its last batch."""
        batch = self.plan.batches[job.index]
        if job.encoded is not None:
            for r, z in zip(job.rows, job.encoded.crop(self.rep), strict=True):
                split, utt = batch[job.loaded.positions[r]]
                _check_latents(utt.utt_id, z)
                self.buf.add(split, utt, z, aligned_log_energy(job.loaded.energies[r], z.shape[0]))
        self.progress.update(sum(u.duration for _, u in batch))
        k = self.shard_of[job.index]
        if job.index == self.plan.shards[k][1] - 1:
            self.sink.submit(k, self.buf)
            self.buf = _ShardBuffer()


def _run_shards(
    rep: Representation,
    plan: ShardPlan,
    todo: Sequence[int],
    sink: _ShardSink,
    *,
    on_bad_audio: str,
    device: torch.device,
    precision: str,
    num_workers: int,
    progress: _Progress,
) -> None:
    """Encode the shards ``todo`` (ascending) batch by batch and hand each finished one to ``sink``."""
    batch_ids = [b for k in todo for b in range(*plan.shards[k])]
    if not batch_ids:
        return
    hop = max(1, int(round(rep.sample_rate / rep.frame_rate)))
    dataset = _BatchAudio(
        [(b, [u.path for _, u in plan.batches[b]]) for b in batch_ids], int(rep.sample_rate), hop
    )
    loader = DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_unbatched,
        pin_memory=device.type == "cuda",
        multiprocessing_context=worker_context(num_workers),
    )
    encoder = _ShardEncoder(
        rep, plan, sink, on_bad_audio=on_bad_audio, device=device, precision=precision, progress=progress
    )
    encoder.run(loader)


def extract_to_store(
    rep: Representation,
    splits: Mapping[str, Sequence[Utterance]],
    writer: LatentStoreWriter,
    *,
    batch_seconds: float,
    on_bad_audio: str = "skip",
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    num_workers: int | None = None,
    shard_dir: Path | str | None = None,
    shard_seconds: float = DEFAULT_SHARD_SECONDS,
    resume: bool = True,
    progress: bool = True,
) -> list[BadFile]:
    """Encode every utterance of every split into ``writer``, close it, and return the skipped bad files.

    Args:
        rep: the representation; moved to ``device``.
        splits: split name -> utterances. Utterance ids must be unique across splits.
        writer: an open store writer of dimension ``rep.dim``; it is closed here (the store is complete
            when this returns), so a caller's ``with`` block exits without writing anything more.
        batch_seconds: padded audio seconds per encoder batch (see :func:`length_buckets`).
        on_bad_audio: ``skip`` (log, return and leave out) or ``error`` (raise) for an unusable file,
            including one too short for a single latent frame (see :func:`report_bad_file`).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...
        precision: ``fp32``; on CUDA also ``bf16`` or ``fp16`` autocast (the store stays float16 either way).
        num_workers: audio loader processes; None picks :func:`default_num_workers`; 0 loads in-process.
        shard_dir: where finished shards are kept until the store is complete. Give a directory that
            outlives a killed build (e.g. ``<cache>/latents/<key>.shards``) to make extraction resumable;
            None uses a directory inside ``writer.root`` (no resume). Reused only by the same plan.
        shard_seconds: audio seconds per shard: the most work a kill can lose.
        resume: reuse complete shards of the same plan found in ``shard_dir``; False discards them.
        progress: show progress bars (audio seconds, real-time factor).

    Returns:
        the skipped files (stage ``extract``), in store order (split name, then utterance id).

    Raises:
        BadAudioError: for the first bad file when ``on_bad_audio == "error"``, or when every file is bad.
        ValueError: a bad setting (policy, precision, half precision on CPU, sizes), a duplicate utterance
            id, or latents the float16 store cannot hold (non-finite, beyond ±65504).
        RuntimeError: another process is extracting into ``shard_dir``.
    """
    items, device, workers, plan = _setup(
        rep, splits, batch_seconds, shard_seconds, on_bad_audio, precision, device, num_workers, writer.dim
    )
    private = shard_dir is None
    shard_path = Path(writer.root) / PRIVATE_SHARD_DIR if private else Path(shard_dir)
    shard_path.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(shard_path / _LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout as err:
        raise RuntimeError(f"another extraction is writing shards to {shard_path}") from err
    try:
        _prepare_shard_dir(shard_path, plan.fingerprint, resume and not private)
        _encode_shards(
            rep,
            plan,
            range(len(plan.shards)),
            shard_path,
            on_bad_audio=on_bad_audio,
            device=device,
            precision=precision,
            num_workers=workers,
            progress=progress,
        )
        bad = assemble_store(plan, shard_path, writer, progress=progress)
        _clear_shards(shard_path)  # the store is complete: the shards have served
    finally:
        lock.release()
    (shard_path / _LOCK_FILE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        shard_path.rmdir()
    return bad


def _setup(
    rep: Representation,
    splits: Mapping[str, Sequence[Utterance]],
    batch_seconds: float,
    shard_seconds: float,
    on_bad_audio: str,
    precision: str,
    device: torch.device | str,
    num_workers: int | None,
    writer_dim: int | None = None,
) -> tuple[list[Item], torch.device, int, ShardPlan]:
    """Validate the settings, move ``rep`` to the device and plan the shards: (items, device, workers, plan)."""
    items = [(split, utt) for split, utts in splits.items() for utt in utts]
    _validate(items, batch_seconds, shard_seconds, on_bad_audio, precision)
    device = resolve_device(device)
    if precision != "fp32" and device.type != "cuda":
        raise ValueError(f"extract.precision={precision} needs a CUDA device; on {device.type} use fp32")
    if writer_dim is not None and writer_dim != rep.dim:
        raise ValueError(f"writer has dim {writer_dim}, representation {rep.name} has dim {rep.dim}")
    workers = default_num_workers(device) if num_workers is None else int(num_workers)
    if workers < 0:
        raise ValueError(f"extract.num_workers must be >= 0, got {num_workers}")
    rep.to(device)
    plan = plan_shards(
        items,
        batch_seconds=batch_seconds,
        shard_seconds=shard_seconds,
        settings=_settings(rep, device, precision, batch_seconds),
    )
    return items, device, workers, plan


def _encode_shards(
    rep: Representation,
    plan: ShardPlan,
    mine: Sequence[int],
    shard_dir: Path,
    *,
    on_bad_audio: str,
    device: torch.device,
    precision: str,
    num_workers: int,
    progress: bool,
    who: str = "",
) -> None:
    """Compute the shards ``mine`` (ascending) that ``shard_dir`` lacks, once the directory is locked and holds
    this plan (``who`` prefixes the log lines of a distributed worker: ``"rank 1 of 4: "``)."""
    done = {k: sc for k in mine if (sc := _load_complete_shard(shard_dir, k, plan.fingerprint, rep.dim))}
    todo = [k for k in mine if k not in done]
    done_seconds = sum(plan.shard_seconds(k) for k in done)
    total_seconds = sum(plan.shard_seconds(k) for k in mine)
    if done:
        log.info(
            "%sresuming extraction: %d of %d shards (%.0f s of audio) already done",
            who,
            len(done),
            len(mine),
            done_seconds,
        )
        for sc in done.values():
            for b in sc["bad"]:
                log.warning(
                    "skipping bad audio file %s (%s) [found before the restart]", b["path"], b["reason"]
                )
    t0 = time.monotonic()
    bar = tqdm(
        total=total_seconds,
        initial=done_seconds,
        unit="audio-s",
        unit_scale=True,
        desc=f"extract {rep.name}",
        disable=not progress,
    )
    sink = _ShardSink(shard_dir, plan.fingerprint, rep.dim)
    try:
        with bar, flush_denormals(device):
            _run_shards(
                rep,
                plan,
                todo,
                sink,
                on_bad_audio=on_bad_audio,
                device=device,
                precision=precision,
                num_workers=num_workers,
                progress=_Progress(bar),
            )
            bar.n = bar.total  # the per-batch sums can miss the total by rounding
    finally:
        sink.close()
    computed = total_seconds - done_seconds
    elapsed = time.monotonic() - t0
    if todo:
        log.info(
            "%sencoded %.0f s of audio in %.1f s (%.1fx real time) on %s, %s",
            who,
            computed,
            elapsed,
            computed / max(elapsed, 1e-9),
            device,
            precision,
        )


def missing_shards(shard_dir: Path | str, plan: ShardPlan, dim: int) -> list[int]:
    """The shards of ``plan`` that ``shard_dir`` does not hold complete (ascending)."""
    return [
        k
        for k in range(len(plan.shards))
        if _load_complete_shard(Path(shard_dir), k, plan.fingerprint, dim) is None
    ]


def assemble_store(
    plan: ShardPlan, shard_dir: Path | str, writer: LatentStoreWriter, *, progress: bool = True
) -> list[BadFile]:
    """Merge the complete shards of ``plan`` into ``writer`` in the fixed store order and close it.

    The order (split name, then utterance id) depends on the plan alone, never on which process wrote which
    shard, so the store is the same byte for byte however many workers encoded it. The shards are kept (the
    caller deletes them once the store is in place).

    Returns:
        the skipped bad files (stage ``extract``), in store order.

    Raises:
        RuntimeError: a shard is missing or incomplete.
        BadAudioError: every audio file is bad.
    """
    shard_dir = Path(shard_dir)
    sidecars = [
        _load_complete_shard(shard_dir, k, plan.fingerprint, writer.dim) for k in range(len(plan.shards))
    ]
    missing = [k for k, sc in enumerate(sidecars) if sc is None]
    if missing:
        raise RuntimeError(f"shards {missing} in {shard_dir} are missing after extraction")
    n_items = sum(len(batch) for batch in plan.batches)
    bad_records = sorted((b for sc in sidecars for b in sc["bad"]), key=lambda b: (b["split"], b["utt_id"]))
    bad = [BadFile(b["path"], "extract", b["reason"], b["utt_id"]) for b in bad_records]
    if n_items and len(bad) == n_items:
        raise BadAudioError(
            bad[0].path,
            f"every one of the {n_items} audio files is bad; first: {bad[0].reason}",
            "extract",
        )
    _merge_shards(shard_dir, sidecars, writer, progress)
    writer.close()
    return bad


# ------------------------------------------------------------------------------- distributed extraction


class ShardsPending(UserFacingError):
    """A distributed worker (``extract.assemble=leave``) wrote its shards and left before the others finished.

    Attributes:
        missing: the shards still missing when it left.
    """

    def __init__(self, message: str, missing: Sequence[int]) -> None:
        super().__init__(message)
        self.missing = list(missing)


@dataclass(frozen=True)
class Worker:
    """One of ``world_size`` processes that split an extraction by shard; rank ``r`` encodes shards
    ``k`` with ``k % world_size == r``.

    Attributes:
        rank: this worker's index, ``0 <= rank < world_size``.
        world_size: how many workers share the extraction (1: a single process does everything).
        source: where the identity came from (``config``, ``torchrun``, ``slurm-array``, ``slurm-tasks``,
            ``default``; ``+``-joined when rank and world size came from different places).
    """

    rank: int = 0
    world_size: int = 1
    source: str = "default"

    def shards(self, n_shards: int) -> list[int]:
        """The shards of an ``n_shards``-shard plan this worker encodes."""
        return list(range(self.rank, n_shards, self.world_size))

    def owner(self, k: int) -> int:
        """The rank that encodes shard ``k``."""
        return k % self.world_size

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError as err:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from err


def _worker_from_env(env: Mapping[str, str]) -> tuple[int, int, str] | None:
    """(rank, world_size, source) from a launcher's environment, or None outside one."""
    if env.get("RANK") and env.get("WORLD_SIZE"):  # torchrun, Lightning's DDP processes
        return _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE"), "torchrun"
    if env.get("SLURM_ARRAY_TASK_ID") and env.get("SLURM_ARRAY_TASK_COUNT"):
        first = _env_int(env, "SLURM_ARRAY_TASK_MIN") if env.get("SLURM_ARRAY_TASK_MIN") else 0
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP") if env.get("SLURM_ARRAY_TASK_STEP") else 1
        rank = (_env_int(env, "SLURM_ARRAY_TASK_ID") - first) // max(step, 1)
        return rank, _env_int(env, "SLURM_ARRAY_TASK_COUNT"), "slurm-array"
    if env.get("SLURM_PROCID") and env.get("SLURM_NTASKS"):
        return _env_int(env, "SLURM_PROCID"), _env_int(env, "SLURM_NTASKS"), "slurm-tasks"
    return None


def resolve_worker(
    rank: int | None = None, world_size: int | None = None, env: Mapping[str, str] | None = None
) -> Worker:
    """This process's share of a distributed extraction.

    ``rank`` / ``world_size`` (``extract.rank`` / ``extract.world_size``) win when given; each one left None
    comes from the launcher's environment: torchrun or Lightning (``RANK``, ``WORLD_SIZE``), else a SLURM
    array (``SLURM_ARRAY_TASK_ID`` minus ``SLURM_ARRAY_TASK_MIN``, divided by ``SLURM_ARRAY_TASK_STEP``;
    ``SLURM_ARRAY_TASK_COUNT``), else SLURM tasks (``SLURM_PROCID``, ``SLURM_NTASKS``); outside all of
    them rank 0 of 1.

    Raises:
        ValueError: not ``0 <= rank < world_size`` (the message names the config keys and the variables).
    """
    env = os.environ if env is None else env
    detected = _worker_from_env(env)
    env_rank, env_world, env_source = detected if detected else (0, 1, "default")
    sources = []
    if rank is None:
        rank = env_rank
        sources.append(env_source)
    else:
        sources.append("config")
    if world_size is None:
        world_size = env_world
        sources.append(env_source)
    else:
        sources.append("config")
    source = sources[0] if sources[0] == sources[1] else "+".join(sources)
    try:
        rank, world_size = int(rank), int(world_size)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"extract.rank and extract.world_size must be integers (or null), got {rank!r} and {world_size!r}"
        ) from err
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"extract.rank={rank} and extract.world_size={world_size} (from {source}) need "
            "0 <= extract.rank < extract.world_size; set both keys, or leave them null to read RANK/WORLD_SIZE, "
            "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT or SLURM_PROCID/SLURM_NTASKS from the environment"
        )
    return Worker(rank, world_size, source)


class _SharedDirLock:
    """An ``flock`` on ``shard_dir/.lock``: shared by the workers of a distributed extraction, exclusive for a
    single-process one (whose :class:`filelock.FileLock` on the same file conflicts with it) and for wiping.

    A lock file deleted and recreated by a finishing extraction is detected and the lock taken again on the
    new file, so two processes never hold locks on different files of the same name.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def try_lock(self, *, shared: bool) -> bool:
        """Take (or convert to) a shared or exclusive lock without blocking; False when held by others."""
        for _ in range(10):
            if self.fd is None:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    return False
                raise
            try:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    return True
            except FileNotFoundError:
                pass
            self.close()  # the file was replaced while we opened it: lock the new one
        raise RuntimeError(f"could not lock {self.path}: it keeps being replaced")

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _join_shard_dir(shard_dir: Path, fingerprint: str, worker: Worker) -> _SharedDirLock:
    """Enter ``shard_dir`` as one of several workers of the plan ``fingerprint``; returns the held shared lock.

    ``plan.json`` is checked and written under ``.plan.lock``, one worker at a time. The same plan: everything
    there (others' shards included) is kept. No plan or another one: the directory is wiped and the plan
    written, but only when no other extraction holds it (an exclusive lock is needed to wipe).

    Raises:
        RuntimeError: workers of another plan, or a single-process extraction, are using ``shard_dir``.
    """
    shard_dir.mkdir(parents=True, exist_ok=True)
    dir_lock = _SharedDirLock(shard_dir / _LOCK_FILE)
    try:
        with FileLock(str(shard_dir / _PLAN_LOCK_FILE), timeout=-1):
            plan_path = shard_dir / _PLAN_FILE
            try:
                previous = json.loads(plan_path.read_text()).get("fingerprint")
            except (OSError, ValueError):
                previous = None
            if previous != fingerprint:
                if not dir_lock.try_lock(shared=False):
                    raise RuntimeError(
                        f"{worker}: {shard_dir} is in use by an extraction of another plan "
                        f"(fingerprint {previous}, this worker's {fingerprint}): every worker must extract the "
                        "same corpus with the same representation and extract.* settings on the same device "
                        "type; wait for the other extraction to end or stop it"
                    )
                if previous is not None:
                    log.warning(
                        "%s: discarding the shards in %s (the extraction plan changed)", worker, shard_dir
                    )
                _clear_shards(shard_dir)
                write_json_atomic(plan_path, {"format": SHARD_FORMAT_VERSION, "fingerprint": fingerprint})
            if not dir_lock.try_lock(shared=True):
                raise RuntimeError(f"another extraction is writing shards to {shard_dir}")
    except BaseException:
        dir_lock.close()
        raise
    return dir_lock


def encode_worker_shards(
    rep: Representation,
    splits: Mapping[str, Sequence[Utterance]],
    shard_dir: Path | str,
    worker: Worker,
    *,
    batch_seconds: float,
    on_bad_audio: str = "skip",
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    num_workers: int | None = None,
    shard_seconds: float = DEFAULT_SHARD_SECONDS,
    progress: bool = True,
) -> ShardPlan:
    """Encode ``worker``'s shards of the extraction of ``splits`` into the shared ``shard_dir``.

    Every worker plans the same shards (the plan is a deterministic function of the utterances and the
    settings) and computes those that :meth:`Worker.shards` assigns to it and the directory lacks, keeping
    every other worker's shards. Call :func:`missing_shards` then :func:`assemble_store` (under the
    artifact's lock) to build the store once every shard is there. Arguments as :func:`extract_to_store`;
    ``shard_dir`` must be the same stable directory for every worker (e.g. ``<cache>/latents/<key>.shards``).

    Returns:
        the plan (for :func:`missing_shards`, :func:`wait_for_shards` and :func:`assemble_store`).
    """
    shard_dir = Path(shard_dir)
    _, device, workers, plan = _setup(
        rep, splits, batch_seconds, shard_seconds, on_bad_audio, precision, device, num_workers
    )
    mine = worker.shards(len(plan.shards))
    log.info(
        "%s (from %s): encoding %d of the %d shards (plan %s) into %s",
        worker,
        worker.source,
        len(mine),
        len(plan.shards),
        plan.fingerprint,
        shard_dir,
    )
    dir_lock = _join_shard_dir(shard_dir, plan.fingerprint, worker)
    try:
        _encode_shards(
            rep,
            plan,
            mine,
            shard_dir,
            on_bad_audio=on_bad_audio,
            device=device,
            precision=precision,
            num_workers=workers,
            progress=progress,
            who=f"{worker}: ",
        )
    finally:
        dir_lock.close()
    return plan


def wait_for_shards(
    shard_dir: Path | str,
    plan: ShardPlan,
    dim: int,
    worker: Worker,
    *,
    timeout_s: float,
    poll_s: float = 30.0,
    done: Callable[[], bool] = lambda: False,
    log_every_s: float = 60.0,
) -> bool:
    """Poll until every shard of ``plan`` is complete (True) or ``done()`` (the store exists: False).

    Polls after 0.5 s, doubling up to ``poll_s``; logs which shards (and whose) it waits for when that
    changes and every ``log_every_s``.

    Raises:
        TimeoutError: ``timeout_s`` passed first; the message lists the missing shards and their ranks.
    """
    shard_dir = Path(shard_dir)
    deadline = time.monotonic() + timeout_s
    delay = min(0.5, poll_s)
    complete: set[int] = set()  # a complete shard stays complete until the store is assembled
    reported: tuple[list[int], float] | None = None
    while True:
        if done():
            return False
        missing = [
            k
            for k in range(len(plan.shards))
            if k not in complete and _load_complete_shard(shard_dir, k, plan.fingerprint, dim) is None
        ]
        complete.update(set(range(len(plan.shards))) - set(missing))
        if not missing:
            return True
        now = time.monotonic()
        owners = sorted({worker.owner(k) for k in missing})
        if now >= deadline:
            raise TimeoutError(
                f"{worker}: gave up after {timeout_s:g} s (extract.wait_timeout_s) waiting for shards "
                f"{_short(missing)} of {len(plan.shards)} in {shard_dir}, encoded by rank(s) {_short(owners)}: "
                "rerun those ranks (finished shards are kept), then any rank assembles the store"
            )
        if reported is None or reported[0] != missing or now - reported[1] >= log_every_s:
            log.info(
                "%s: waiting for %d of %d shards in %s: %s (rank(s) %s); giving up in %.0f s",
                worker,
                len(missing),
                len(plan.shards),
                shard_dir,
                _short(missing),
                _short(owners),
                deadline - now,
            )
            reported = (missing, now)
        time.sleep(max(0.0, min(delay, deadline - now)))
        delay = min(2 * delay, poll_s)


def _short(values: Sequence[int], limit: int = 20) -> str:
    """``[0, 2, 4]``, or the first ``limit`` values and a count of the rest."""
    if len(values) <= limit:
        return str(list(values))
    return "[" + ", ".join(map(str, values[:limit])) + f", ... and {len(values) - limit} more]"


def release_shard_dir(shard_dir: Path | str) -> None:
    """Delete the shards of a store that is now complete; the directory too once no worker holds it."""
    shard_dir = Path(shard_dir)
    dir_lock = _SharedDirLock(shard_dir / _LOCK_FILE)
    try:
        # Best effort: another worker may be cleaning up at the same time (whoever locks the directory
        # exclusively removes it all; the rest remove only shards, which a complete store no longer needs).
        idle = dir_lock.try_lock(shared=False)
        for path in shard_dir.iterdir():
            if path.name.startswith("shard-"):
                path.unlink(missing_ok=True)
        if idle:
            _clear_shards(shard_dir)
            (shard_dir / _PLAN_LOCK_FILE).unlink(missing_ok=True)
            (shard_dir / _LOCK_FILE).unlink(missing_ok=True)
            shard_dir.rmdir()
    except OSError as err:
        log.debug("could not (fully) remove %s: %s", shard_dir, err)
    finally:
        dir_lock.close()
