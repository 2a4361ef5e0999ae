"""Phase 0 memory benchmark: peak RSS of ``latentdyn experiment=phase0`` must not grow with the corpus.

The latent store is written streaming and extraction works in length-bucketed batches of bounded audio
(DESIGN §5), so building the store for a 4x larger synthetic corpus should cost (almost) no more memory.
This runs ``python -m latentdyn experiment=phase0`` on the synthetic corpus at N = 12 speakers x 10
utterances of 2-5 s (split 8/2/2 speakers) and at 4N = 48 x 10 (split 32/8/8), each in a fresh temporary
``LATENTDYN_ROOT`` (so nothing is reused from a cache) as a child process, and reads the child's own peak
RSS from ``os.wait4`` (the rusage of exactly that child, so the two runs never share a maximum).

Printed: both peaks in MiB, their ratio against the target (4N peak <= 1.10 x N peak), the frames in each
store (from the run's ``metrics.json``, to show the data really grew), wall times, the import floor
(peak RSS of just importing what a phase0 run imports) for scale, and the peak summed PSS of the whole
process tree (the run and its audio loader workers, sampled), which ``ru_maxrss`` (one process's peak)
does not show. Always exits 0: it is a measurement.

    uv run python bench/phase0_memory.py [--speakers 12] [--utterances 10] [--scale 4] [--repeats 1]

With glibc's default malloc settings the peak varies from run to run by up to ~25% (heap fragmentation that
depends on thread timing), so a single run's verdict is noisy; ``--repeats 3`` compares medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

#: Modules a phase0 run on the synthetic corpus with the mel representation imports (for the import floor).
PHASE0_MODULES = (
    "latentdyn.cli",
    "latentdyn.experiments.phase0",
    "latentdyn.representations.extract",
    "latentdyn.representations.mel",
    "latentdyn.data.synthetic",
)


@dataclasses.dataclass(frozen=True)
class CorpusSize:
    """A synthetic corpus size and its speaker split (train/val/test speakers sum to ``n_speakers``)."""

    n_speakers: int
    utterances_per_speaker: int
    split: tuple[int, int, int]

    @property
    def label(self) -> str:
        return f"{self.n_speakers} spk x {self.utterances_per_speaker} utt"

    def overrides(self, min_duration: float, max_duration: float) -> list[str]:
        """Hydra overrides selecting this corpus size, utterance durations (seconds) and split."""
        train, val, test = self.split
        return [
            f"data.corpus.n_speakers={self.n_speakers}",
            f"data.corpus.utterances_per_speaker={self.utterances_per_speaker}",
            f"data.corpus.min_duration={min_duration}",
            f"data.corpus.max_duration={max_duration}",
            f"data.split.n_speakers={{train:{train},val:{val},test:{test}}}",
        ]


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One measured child process.

    Attributes:
        peak_mib: peak RSS of the child or of any one of its descendants (``ru_maxrss``), MiB.
        tree_pss_mib: peak summed PSS of the child and its descendants (loader workers), sampled every
            ``POLL_S``, MiB; shared pages are split between processes, so the sum is not inflated by
            forked workers (but a spike shorter than the poll interval can be missed).
        n_procs: processes seen in the tree (1 + loader workers and other descendants).
        wall_s: wall time, seconds.
        metrics: the phase0 run's metrics.json (empty for the import floor).
    """

    peak_mib: float
    tree_pss_mib: float
    n_procs: int
    wall_s: float
    metrics: dict[str, Any]


#: Seconds between samples of the process tree's PSS.
POLL_S = 0.05


def scaled_size(n_speakers: int, utterances: int, scale: int) -> CorpusSize:
    """``scale`` times ``n_speakers`` speakers, split 2/3 train, 1/6 val, 1/6 test (8/2/2 at 12 speakers)."""
    total = n_speakers * scale
    val = test = max(1, total // 6)
    return CorpusSize(total, utterances, (total - val - test, val, test))


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (a scan of /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4 (ppid), after the "(comm)"
                found.append(int(entry))
    return found


def _pss_mib(pid: int) -> float:
    """Proportional set size of ``pid`` in MiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


class _TreeSampler(threading.Thread):
    """Samples the summed PSS of a process and its descendants until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_mib = 0.0
        self.seen: set[int] = set()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            tree = [self.pid]
            for pid in tree:  # grows while iterating: breadth-first over descendants
                tree.extend(_children(pid))
            self.seen.update(tree)
            self.peak_mib = max(self.peak_mib, sum(_pss_mib(pid) for pid in tree))
            self._stop_event.wait(POLL_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def run_measured(argv: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> RunResult:
    """Run ``argv`` to completion and measure its memory (metrics left empty).

    ``os.wait4`` returns the rusage of exactly this child (and the descendants it waited for), so each
    measurement is independent of earlier children; ``ru_maxrss`` is the largest peak RSS of any one
    process of the tree, in KiB on Linux. Raises RuntimeError (with the log's tail) if the child fails.
    """
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        sampler = _TreeSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        sampler.stop()
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
    return RunResult(usage.ru_maxrss / 1024.0, sampler.peak_mib, len(sampler.seen), wall, {})


def read_metrics(root: Path) -> dict[str, Any]:
    """The metrics.json of the single phase0 run under ``root``."""
    found = sorted((root / "outputs" / "phase0" / "phase0").glob("*/metrics.json"))
    if len(found) != 1:
        raise RuntimeError(f"expected one phase0 metrics.json under {root}, found {len(found)}")
    return json.loads(found[0].read_text())


def run_phase0(size: CorpusSize, min_duration: float, max_duration: float) -> RunResult:
    """Run phase0 for ``size`` in a fresh temporary root (empty cache, so everything is built)."""
    with tempfile.TemporaryDirectory(prefix="latentdyn-phase0-mem-") as tmp:
        root = Path(tmp)
        env = dict(os.environ, LATENTDYN_ROOT=str(root), WANDB_MODE="disabled")
        env.pop("LATENTDYN_CACHE", None)
        argv = [
            sys.executable,
            "-m",
            "latentdyn",
            "experiment=phase0",
            *size.overrides(min_duration, max_duration),
        ]
        result = run_measured(argv, env, root, root / "child.log")
        return dataclasses.replace(result, metrics=read_metrics(root))


def import_floor() -> RunResult:
    """Peak RSS of a process that only imports what a phase0 run imports (torch, torchaudio, scipy, ...)."""
    with tempfile.TemporaryDirectory(prefix="latentdyn-phase0-mem-") as tmp:
        code = "import " + ", ".join(PHASE0_MODULES)
        return run_measured([sys.executable, "-c", code], dict(os.environ), Path(tmp), Path(tmp) / "log")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speakers", type=int, default=12, help="speakers of the smaller corpus (N)")
    parser.add_argument("--utterances", type=int, default=10, help="utterances per speaker")
    parser.add_argument(
        "--scale", type=int, default=4, help="the larger corpus has this many times the speakers"
    )
    parser.add_argument("--min-duration", type=float, default=2.0, help="shortest utterance, seconds")
    parser.add_argument("--max-duration", type=float, default=5.0, help="longest utterance, seconds")
    parser.add_argument(
        "--target", type=float, default=1.10, help="target ratio of the larger run's peak RSS"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per size (the median peak is compared); sizes alternate"
    )
    args = parser.parse_args(argv)

    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    sizes = (
        scaled_size(args.speakers, args.utterances, 1),
        scaled_size(args.speakers, args.utterances, args.scale),
    )
    floor = import_floor()
    runs: list[list[RunResult]] = [[], []]
    for _ in range(args.repeats):  # sizes alternate, so drifting load from other processes hits both alike
        for i, size in enumerate(sizes):
            runs[i].append(run_phase0(size, args.min_duration, args.max_duration))

    print(
        f"phase0 peak RSS (synthetic corpus, utterances {args.min_duration}-{args.max_duration} s, fresh cache, "
        f"median of {args.repeats} run(s) per size)"
    )
    header = f"{'corpus':<18} {'split':>8} {'frames':>7} {'hours':>6} {'peak RSS MiB':>12} {'(min-max)':>13}"
    print(f"{header} {'above floor':>11} {'tree PSS MiB':>12} {'procs':>5} {'wall s':>6}")
    peaks = []
    for size, results in zip(sizes, runs, strict=True):
        split = "/".join(str(n) for n in size.split)
        peak = statistics.median(r.peak_mib for r in results)
        spread = f"({min(r.peak_mib for r in results):.0f}-{max(r.peak_mib for r in results):.0f})"
        metrics = results[0].metrics
        peaks.append(peak)
        print(
            f"{size.label:<18} {split:>8} {int(metrics['n_frames']):>7} {metrics['hours']:>6.3f} {peak:>12.1f} "
            f"{spread:>13} {peak - floor.peak_mib:>11.1f} "
            f"{statistics.median(r.tree_pss_mib for r in results):>12.1f} "
            f"{max(r.n_procs for r in results):>5} {statistics.median(r.wall_s for r in results):>6.1f}"
        )
    print(
        f"{'import floor':<18} {'':>8} {'':>7} {'':>6} {floor.peak_mib:>12.1f} {'':>13} {'':>11} "
        f"{floor.tree_pss_mib:>12.1f} {floor.n_procs:>5} {floor.wall_s:>6.1f}"
    )
    frames_ratio = runs[1][0].metrics["n_frames"] / runs[0][0].metrics["n_frames"]
    ratio = peaks[1] / peaks[0]
    verdict = "PASS" if ratio <= args.target else "FAIL"
    print(f"frames ratio {args.scale}N/N: {frames_ratio:.2f}")
    print(f"peak RSS ratio {args.scale}N/N: {ratio:.3f} (target <= {args.target:.2f})  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
