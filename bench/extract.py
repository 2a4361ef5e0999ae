"""Extraction throughput: the Phase 0 pipeline against a pure forward pass and a naive per-utterance loop.

On a synthetic corpus (``latentdyn.data.synthetic.SyntheticCorpus``, written to a temporary directory) and
for each representation asked for (random-weight Mimi, log-mel), measures in audio seconds per wall second
(= the real-time factor, RTF):

* **pipeline**: :func:`latentdyn.representations.extract.extract_to_store` end to end: loader workers reading
  and resampling audio, length-bucketed padded batches, shards written and merged into a latent store;
* **forward**: the encoder alone on the very same padded batches, pre-loaded (on the device) before timing;
* **naive**: one utterance at a time (batch 1, no bucketing, no loader workers, no shards), loading, encoding
  and writing to a store — on a subset of ``--naive-seconds`` of audio when that is slow.

and prints pipeline/forward (target >= 0.8: loading and writing hidden behind compute) and pipeline/naive
(target >= 5x). The model is warmed up once before timing; the three are timed in ``--trials`` interleaved
rounds and each keeps its best, so load from other processes disturbs them alike. CPU runs flush subnormal
floats (as the pipeline does) in all three measurements, so the ratios compare like with like.

    python3 bench/extract.py                                   # CPU: mimi + mel, small corpus (< 3 min, 2 cores)
    python3 bench/extract.py --device cuda --precision bf16 --rep mimi --repeat 20 --batch-seconds 600

Needs torch, numpy, soundfile, scipy, tqdm, filelock (and moshi for Mimi); ``src/`` is put on ``sys.path``, so
the package need not be installed. Always exits 0 when it could measure: it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from latentdyn.data.audio import load_audio  # noqa: E402
from latentdyn.data.corpus import Utterance  # noqa: E402
from latentdyn.data.latent_store import LatentStoreWriter, store_meta  # noqa: E402
from latentdyn.data.synthetic import SyntheticCorpus  # noqa: E402
from latentdyn.representations.energy import frame_log_energy  # noqa: E402
from latentdyn.representations.extract import (  # noqa: E402
    PRECISIONS,
    aligned_log_energy,
    default_num_workers,
    extract_to_store,
    flush_denormals,
    length_buckets,
    resolve_device,
)

Splits = dict[str, list[Utterance]]
Runner = Callable[[int], None]


@dataclass(frozen=True)
class Figures:
    """Throughputs of one representation, audio seconds per wall second."""

    name: str
    audio_seconds: float
    pipeline: float
    forward: float
    naive: float
    naive_seconds: float


class _MimiFallback(torch.nn.Module):
    """Random-weight Mimi from ``moshi`` directly, for when ``latentdyn.representations.mimi`` is absent."""

    name = "mimi"
    sample_rate = 24000
    frame_rate = 12.5
    dim = 512

    def __init__(self) -> None:
        super().__init__()
        from moshi.models.loaders import get_mimi

        torch.manual_seed(0)
        self.model = get_mimi(None, device="cpu").float().eval()
        self.weights = {"source": "random", "pretrained": False, "seed": 0}

    def num_frames(self, num_samples: int) -> int:
        return -(-int(num_samples) // 1920)

    @torch.no_grad()
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        return self.model.encode_to_latent(wave.float(), quantize=False)


def make_rep(name: str) -> torch.nn.Module:
    """The representation to bench: random-weight Mimi, or 80-band log-mel at 12.5 Hz (24 kHz audio)."""
    if name == "mel":
        from latentdyn.representations.mel import MelRepresentation

        return MelRepresentation(sample_rate=24000, frame_rate=12.5, n_mels=80)
    try:
        from latentdyn.representations.mimi import MimiRepresentation
    except ImportError as err:
        print(f"[latentdyn.representations.mimi unavailable ({err}); using moshi's get_mimi(None) directly]")
        return _MimiFallback()
    return MimiRepresentation(pretrained=False)


def make_corpus(root: Path, args: argparse.Namespace) -> Splits:
    """Materialise the synthetic corpus; speakers split 70/15/15 (train gets at least one); ``--repeat``
    lists every file that many times under distinct ids (more audio without generating more)."""
    corpus = SyntheticCorpus(
        n_speakers=args.speakers,
        utterances_per_speaker=args.utterances,
        min_duration=args.min_duration,
        max_duration=args.max_duration,
    )
    utts = corpus.materialize(root)
    n_train = max(1, round(0.7 * args.speakers))
    n_val = (args.speakers - n_train) // 2
    speakers = sorted({u.speaker for u in utts})
    split_of = {
        s: "train" if i < n_train else "val" if i < n_train + n_val else "test"
        for i, s in enumerate(speakers)
    }
    splits: Splits = {"train": [], "val": [], "test": []}
    for r in range(args.repeat):
        for u in utts:
            utt_id = u.utt_id if args.repeat == 1 else f"{u.utt_id}-r{r}"
            splits[split_of[u.speaker]].append(replace(u, utt_id=utt_id))
    return splits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


@contextlib.contextmanager
def _encoding(device: torch.device, precision: str) -> Iterator[None]:
    with torch.inference_mode(), _autocast(device, precision), flush_denormals(device):
        yield


def _timed(fn: Callable[[int], object], device: torch.device, trial: int) -> float:
    """Wall seconds of ``fn(trial)``, the device synchronised before and after."""
    _sync(device)
    t0 = time.perf_counter()
    fn(trial)
    _sync(device)
    return time.perf_counter() - t0


def warm_up(rep: torch.nn.Module, device: torch.device, precision: str) -> None:
    """One small forward pass, so first-call costs (allocator, kernel selection) are not timed."""
    with _encoding(device, precision):
        rep.encode(torch.randn(2, 1, 2 * rep.sample_rate, device=device) * 0.1)
    _sync(device)


def pipeline_runner(
    rep, splits: Splits, root: Path, device: torch.device, args: argparse.Namespace
) -> Runner:
    """:func:`extract_to_store` into a fresh store (loading, encoding, shards, merge)."""

    def run(trial: int) -> None:
        with LatentStoreWriter(root / f"pipeline-store-{trial}", dim=rep.dim, meta=store_meta(rep)) as writer:
            extract_to_store(
                rep,
                splits,
                writer,
                batch_seconds=args.batch_seconds,
                device=device,
                precision=args.precision,
                num_workers=args.num_workers,
                shard_dir=root / f"pipeline-shards-{trial}",
                shard_seconds=args.shard_seconds,
                progress=args.progress,
            )

    return run


def forward_runner(rep, splits: Splits, device: torch.device, args: argparse.Namespace) -> Runner:
    """The encoder alone over the pipeline's padded batches, loaded (onto the device) here, untimed."""
    items = [(s, u) for s, us in splits.items() for u in us]
    cache: dict[str, torch.Tensor] = {}
    batches: list[torch.Tensor] = []
    for batch in length_buckets(items, args.batch_seconds):
        for _, u in batch:
            if u.path not in cache:
                cache[u.path] = load_audio(u.path, rep.sample_rate)
        waves = [cache[u.path] for _, u in batch]
        padded = torch.zeros(len(waves), 1, max(w.shape[-1] for w in waves))
        for i, w in enumerate(waves):
            padded[i, 0, : w.shape[-1]] = w
        batches.append(padded.to(device))

    def run(trial: int) -> None:
        with _encoding(device, args.precision):
            for x in batches:
                rep.encode(x)

    return run


def naive_subset(splits: Splits, max_seconds: float | None) -> Splits:
    """Utterances in split then id order until ``max_seconds`` of audio (train first, so a store closes)."""
    out: Splits = {}
    total = 0.0
    for split in ("train", "val", "test"):
        for u in sorted(splits[split], key=lambda u: u.utt_id):
            if max_seconds is not None and total >= max_seconds:
                return out
            out.setdefault(split, []).append(u)
            total += u.duration
    return out


def naive_runner(rep, splits: Splits, root: Path, device: torch.device, args: argparse.Namespace) -> Runner:
    """A per-utterance load -> encode (batch 1) -> crop -> write loop into a fresh store."""
    hop = round(rep.sample_rate / rep.frame_rate)

    def run(trial: int) -> None:
        with (
            LatentStoreWriter(root / f"naive-store-{trial}", dim=rep.dim, meta=store_meta(rep)) as writer,
            _encoding(device, args.precision),
        ):
            for split, utts in splits.items():
                for u in utts:
                    wave = load_audio(u.path, rep.sample_rate)
                    n = rep.num_frames(wave.shape[-1])
                    z = rep.encode(wave.view(1, 1, -1).to(device)).float().cpu()[0, :, :n].T.numpy()
                    energy = aligned_log_energy(frame_log_energy(wave, hop).numpy(), n)
                    writer.add(u.utt_id, u.speaker, split, z, energy, gender=u.gender)

    return run


def seconds_of(splits: Splits) -> float:
    return sum(u.duration for us in splits.values() for u in us)


def bench_rep(
    name: str, splits: Splits, root: Path, device: torch.device, args: argparse.Namespace
) -> Figures:
    """Time pipeline, forward and naive in ``--trials`` interleaved rounds and keep each one's best, so that
    load from other processes, which drifts over time, disturbs the three alike."""
    if name == "mel" and args.mel_repeat > 1:  # mel is so cheap that fixed costs would dominate otherwise
        splits = {
            s: [replace(u, utt_id=f"{u.utt_id}-m{r}") for r in range(args.mel_repeat) for u in us]
            for s, us in splits.items()
        }
    rep = make_rep(name).to(device)
    warm_up(rep, device, args.precision)
    limit = args.naive_seconds if args.naive_seconds > 0 else None
    if name == "mel" or device.type == "cuda":
        limit = None  # cheap enough to run on everything
    subset = naive_subset(splits, limit)
    runners = {
        "pipeline": pipeline_runner(rep, splits, root / name, device, args),
        "forward": forward_runner(rep, splits, device, args),
        "naive": naive_runner(rep, subset, root / name, device, args),
    }
    best = dict.fromkeys(runners, float("inf"))
    for trial in range(args.trials):
        for kind, run in runners.items():
            best[kind] = min(best[kind], _timed(run, device, trial))
    audio, naive_audio = seconds_of(splits), seconds_of(subset)
    return Figures(
        name,
        audio,
        audio / best["pipeline"],
        audio / best["forward"],
        naive_audio / best["naive"],
        naive_audio,
    )


def print_figures(
    rows: Sequence[Figures], device: torch.device, args: argparse.Namespace, workers: int
) -> None:
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU x{torch.get_num_threads()} threads"
    )
    print(
        f"\ndevice {where}, precision {args.precision}, batch_seconds {args.batch_seconds:g}, "
        f"loader workers {workers}, torch {torch.__version__}"
    )
    print("throughput in audio-s per wall-s (= real-time factor)")
    header = f"{'rep':6} {'audio s':>8} {'pipeline':>10} {'forward':>10} {'naive':>10} {'pipe/fwd':>9} {'pipe/naive':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.name:6} {r.audio_seconds:8.1f} {r.pipeline:9.1f}x {r.forward:9.1f}x {r.naive:9.1f}x "
            f"{r.pipeline / r.forward:9.2f} {r.pipeline / r.naive:9.2f}x"
            + (f"   (naive on {r.naive_seconds:.0f} s)" if r.naive_seconds < r.audio_seconds - 1e-6 else "")
        )
    print("targets: pipeline/forward >= 0.8; pipeline/naive >= 5x; Mimi on one H100 >= 1000x real time")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rep", choices=("mimi", "mel", "both"), default="both")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="bf16/fp16 need CUDA")
    p.add_argument("--speakers", type=int, default=8)
    p.add_argument("--utterances", type=int, default=3, help="utterances per speaker")
    p.add_argument("--min-duration", type=float, default=2.0)
    p.add_argument("--max-duration", type=float, default=4.0)
    p.add_argument("--repeat", type=int, default=1, help="list every file this many times (more audio)")
    p.add_argument("--batch-seconds", type=float, default=None, help="default: 32 on CPU, 600 on CUDA")
    p.add_argument("--shard-seconds", type=float, default=1800.0)
    p.add_argument("--num-workers", type=int, default=None, help="loader processes (default: automatic)")
    p.add_argument("--naive-seconds", type=float, default=24.0, help="audio for the slow naive loop (0: all)")
    p.add_argument("--trials", type=int, default=2, help="runs per measurement; the fastest is kept")
    p.add_argument("--mel-repeat", type=int, default=10, help="mel benches the corpus listed this many times")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--progress", action="store_true", help="show the pipeline's progress bars")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.precision != "fp32" and device.type != "cuda":
        raise SystemExit(f"--precision {args.precision} needs a CUDA device")
    if args.batch_seconds is None:
        args.batch_seconds = 600.0 if device.type == "cuda" else 32.0
    workers = default_num_workers(device) if args.num_workers is None else args.num_workers
    names = ("mimi", "mel") if args.rep == "both" else (args.rep,)
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        splits = make_corpus(root / "corpus", args)
        print(
            f"corpus: {sum(map(len, splits.values()))} utterances, {seconds_of(splits):.1f} s of audio "
            f"(generated in {time.perf_counter() - t0:.1f} s)"
        )
        rows = []
        for name in names:
            (root / name).mkdir()
            rows.append(bench_rep(name, splits, root, device, args))
            r = rows[-1]
            print(
                f"{name}: pipeline {r.pipeline:.1f}x, forward {r.forward:.1f}x, naive {r.naive:.1f}x real time"
            )
    print_figures(rows, device, args, workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
