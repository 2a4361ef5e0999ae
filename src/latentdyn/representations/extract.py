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

Memory stays bounded: at most a couple of batches in flight per loader worker, two shards in RAM, and the
merge copies one utterance at a time out of memory-mapped shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
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
from latentdyn.jsonio import write_json_atomic
from latentdyn.representations.base import Representation
from latentdyn.representations.energy import frame_log_energy

__all__ = [
    "BAD_AUDIO_POLICIES",
    "BadFile",
    "EncodedBatch",
    "PRECISIONS",
    "ShardPlan",
    "aligned_log_energy",
    "default_num_workers",
    "encode_padded",
    "extract_to_store",
    "flush_denormals",
    "launch_encode",
    "length_buckets",
    "plan_shards",
    "resolve_device",
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
    tmp = path.with_name(path.name + ".tmp")
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
    return path.name.startswith("shard-") or path.name in (_PLAN_FILE, _PLAN_FILE + ".tmp")


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
    items = [(split, utt) for split, utts in splits.items() for utt in utts]
    _validate(items, batch_seconds, shard_seconds, on_bad_audio, precision)
    device = resolve_device(device)
    if precision != "fp32" and device.type != "cuda":
        raise ValueError(f"extract.precision={precision} needs a CUDA device; on {device.type} use fp32")
    if writer.dim != rep.dim:
        raise ValueError(f"writer has dim {writer.dim}, representation {rep.name} has dim {rep.dim}")
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
    private = shard_dir is None
    shard_path = Path(writer.root) / PRIVATE_SHARD_DIR if private else Path(shard_dir)
    shard_path.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(shard_path / _LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout as err:
        raise RuntimeError(f"another extraction is writing shards to {shard_path}") from err
    try:
        bad = _extract_locked(
            rep,
            items,
            plan,
            writer,
            shard_path,
            on_bad_audio=on_bad_audio,
            device=device,
            precision=precision,
            num_workers=workers,
            resume=resume and not private,
            progress=progress,
        )
        _clear_shards(shard_path)  # the store is complete: the shards have served
    finally:
        lock.release()
    (shard_path / _LOCK_FILE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        shard_path.rmdir()
    return bad


def _extract_locked(
    rep: Representation,
    items: Sequence[Item],
    plan: ShardPlan,
    writer: LatentStoreWriter,
    shard_dir: Path,
    *,
    on_bad_audio: str,
    device: torch.device,
    precision: str,
    num_workers: int,
    resume: bool,
    progress: bool,
) -> list[BadFile]:
    """:func:`extract_to_store` once ``shard_dir`` is locked: compute missing shards, merge, close."""
    _prepare_shard_dir(shard_dir, plan.fingerprint, resume)
    done = {
        k: sc
        for k in range(len(plan.shards))
        if (sc := _load_complete_shard(shard_dir, k, plan.fingerprint, rep.dim))
    }
    todo = [k for k in range(len(plan.shards)) if k not in done]
    done_seconds = sum(plan.shard_seconds(k) for k in done)
    total_seconds = sum(u.duration for _, u in items)
    if done:
        log.info(
            "resuming extraction: %d of %d shards (%.0f s of audio) already done",
            len(done),
            len(plan.shards),
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
            "encoded %.0f s of audio in %.1f s (%.1fx real time) on %s, %s",
            computed,
            elapsed,
            computed / max(elapsed, 1e-9),
            device,
            precision,
        )
    sidecars = [
        done.get(k) or _load_complete_shard(shard_dir, k, plan.fingerprint, rep.dim)
        for k in range(len(plan.shards))
    ]
    missing = [k for k, sc in enumerate(sidecars) if sc is None]
    if missing:
        raise RuntimeError(f"shards {missing} in {shard_dir} are missing after extraction")
    bad_records = sorted((b for sc in sidecars for b in sc["bad"]), key=lambda b: (b["split"], b["utt_id"]))
    bad = [BadFile(b["path"], "extract", b["reason"], b["utt_id"]) for b in bad_records]
    if items and len(bad) == len(items):
        raise BadAudioError(
            bad[0].path,
            f"every one of the {len(items)} audio files is bad; first: {bad[0].reason}",
            "extract",
        )
    _merge_shards(shard_dir, sidecars, writer, progress)
    writer.close()
    return bad
