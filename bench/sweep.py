"""Exp 6 correction-sweep benchmark: does an N-job sweep cost one score-model training plus N evaluations?

The target (issue 11): ``T_sweep / (T_train + N * T_eval) <= 1.2`` for N = 9 on CPU, where ``T_sweep`` is
the wall time of the whole ``latentdyn -m experiment=exp6_score_correction ...`` command (process start
included), ``T_train`` the score model's in-process fit time (``training.json["seconds"]`` of the one score
artifact the sweep builds) and ``T_eval`` the median ``duration_s`` of the jobs that reused that model.

Everything runs as subprocesses of this venv's Python (``python -m latentdyn``, not ``uv run``) in a
temporary ``LATENTDYN_ROOT`` with ``OMP_NUM_THREADS=--threads``, on ``debug=smoke`` (synthetic corpus,
log-mel, CPU) with a score model trained for ``--score-steps`` steps (6000: about 2-2.5 min on 2 cores with 1
thread; the reference's 20k steps take about 8 min here) and a dynamics model trained for ``--dynamics-steps``.
A sweep also pays about 18 s once that is in neither term of the denominator (torch and lightning imports in
its first job, Hydra's start, the summary at the end), so the ratio depends on the training's share: it is
1.21-1.23 measured at 3000 steps, about 1.04 estimated for the reference's 20k.

1. warm-up (not timed): one single job with ``correction=none`` and a 20-step score model builds the
   corpus, the latent store and the dynamics artifact (``checkpoint=train``) and warms the OS file cache;
   then ``cache/score/`` is deleted so the timed sweep must train the score model itself;
2. timed: the N-job grid (N = 9: ``correction.n_steps=1,3,5 correction.step_size=0.001,0.01,0.1
   correction.sigma=0.1``) with Hydra's basic launcher, or ``--launcher joblib --n-jobs 2`` (the ratio is
   then printed for information, same formula). Checked: exit code 0, N completed jobs, exactly one score
   artifact and one job that built it (otherwise FAIL: the model was not shared).

Besides the ratio it prints the process overhead outside the jobs (launch, gaps between jobs, the sweep
summary at the end) and each job's phases from its ``run.log`` (set-up incl. imports, store + dynamics
model, score model, evaluation), which is where a missed ratio comes from. A measurement, not a test: it
exits 0 whenever it could measure (1 when the sweep itself failed). Runtime about 3-4 minutes on 2 cores.

    uv run python bench/sweep.py [--jobs 9] [--score-steps 6000] [--threads 1] [--launcher joblib --n-jobs 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

EXPERIMENT = "exp6_score_correction"
#: Steps of the throw-away score model the warm-up job trains (it is deleted before timing).
WARMUP_SCORE_STEPS = 20
#: ``[2026-12-01 23:55:02,301][logger][LEVEL] - message`` (the job log's format).
LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[^\]]*\]\[[A-Z]+\] - (.*)$")


@dataclass(frozen=True)
class JobTiming:
    """One job of the sweep, from its ``run_info.json`` and ``run.log``.

    Attributes:
        num: the job number (its directory name).
        status: ``run_info["status"]``.
        duration_s: the job's own time from start to end, inside the process, seconds.
        start_unix, end_unix: when that time started (``end_time - duration_s``: ``start_time`` is stamped
            after the git and version look-ups the duration includes) and ended, Unix seconds.
        built_score: whether this job trained the score model (its log has ``artifact score/... building``).
        phases: seconds per phase (see :func:`log_phases`); empty when the log lacks the markers.
    """

    num: int
    status: str
    duration_s: float
    start_unix: float
    end_unix: float
    built_score: bool
    phases: dict[str, float]


#: Phases of a job, in order, each ending at the first ``run.log`` line that matches its marker (from the end
#: of the previous one): ``tracking``: git state and patch, run_info (before the ``started`` line);
#: ``setup``: the pipeline's imports (torch / lightning in a fresh process) and job logger; ``store+dynamics``:
#: latent store and dynamics model looked up and loaded; ``score``: the score artifact reused (or trained).
#: ``evaluation`` is the rest, up to the job's end (run.log has no end line): score model load, injection
#: inputs (starts, bank, baseline fit), the two rollouts, figures and metrics.
PHASES = (
    ("tracking", re.compile(r"^run \S+ \(\S+\) started")),
    ("setup", re.compile(r"^artifact latents/")),
    ("store+dynamics", re.compile(r"^dynamics checkpoint:")),
    ("score", re.compile(r"^artifact score/\S+ (reused|built)")),
)
PHASE_NAMES = (*(name for name, _ in PHASES), "evaluation")


def bench_env(root: Path, threads: int) -> dict[str, str]:
    """This process's environment with every latentdyn output directed under ``root``, ``threads`` threads."""
    env = dict(os.environ)
    env["LATENTDYN_ROOT"] = str(root)
    env.pop("LATENTDYN_CACHE", None)
    env["WANDB_MODE"] = "disabled"
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    return env


def grid_overrides(n_jobs: int) -> list[str]:
    """Sweep overrides giving ``n_jobs`` Langevin settings: ``n_steps`` 1,3,5 times ``n_jobs / 3`` step sizes
    log-spaced over [1e-3, 1e-1] when 3 divides ``n_jobs`` (N = 9: the 3 x 3 grid), else ``n_steps=3`` and
    ``n_jobs`` step sizes; sigma fixed at 0.1."""
    if n_jobs < 1:
        raise ValueError(f"need at least one job, got {n_jobs}")
    n_sizes = n_jobs // 3 if n_jobs % 3 == 0 else n_jobs
    if n_sizes == 1:
        sizes = [0.01]
    else:
        sizes = [10 ** (-3 + 2 * i / (n_sizes - 1)) for i in range(n_sizes)]
    steps = "1,3,5" if n_jobs % 3 == 0 else "3"
    return [
        f"correction.n_steps={steps}",
        "correction.step_size=" + ",".join(f"{s:.3g}" for s in sizes),
        "correction.sigma=0.1",
    ]


def settings(score_steps: int, dynamics_steps: int) -> list[str]:
    """Overrides shared by the warm-up and the sweep (the score model's steps come separately)."""
    return [
        f"experiment={EXPERIMENT}",
        "debug=smoke",
        "checkpoint=train",
        f"trainer.max_steps={dynamics_steps}",
        f"max_steps={score_steps}",
    ]


def run_logged(argv: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> int:
    """Run ``argv`` to completion with stdout and stderr in ``log_path``; its exit code."""
    with log_path.open("w") as out:
        return subprocess.run(
            argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=False
        ).returncode


def tail(path: Path, n_chars: int = 3000) -> str:
    """The last ``n_chars`` characters of a text file."""
    return path.read_text(errors="replace")[-n_chars:]


def complete_artifacts(cache_dir: Path, kind: str) -> list[Path]:
    """Complete artifact directories of one kind (an ``artifact.json`` inside; no temp or lock entries)."""
    folder = cache_dir / kind
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / "artifact.json").is_file())


def parse_log_time(stamp: str) -> float:
    """Seconds (local-time epoch; only differences are used) of a ``2026-12-01 23:55:02,301`` log stamp."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def log_phases(log_text: str, start_unix: float, end_unix: float) -> dict[str, float]:
    """Seconds of each of :data:`PHASE_NAMES` in a job that ran from ``start_unix`` to ``end_unix``.

    The phase boundaries are the stamps of the marker lines in ``log_text`` (the job's ``run.log``, local
    time, millisecond resolution). A phase whose marker never appears is left out, with every later one."""
    events: list[tuple[float, str]] = []
    for line in log_text.splitlines():
        match = LOG_LINE.match(line)
        if match:
            events.append((parse_log_time(match.group(1)), match.group(2)))
    phases: dict[str, float] = {}
    last = start_unix
    for name, marker in PHASES:
        hit = next((t for t, msg in events if t >= last - 0.002 and marker.match(msg)), None)
        if hit is None:
            return phases
        phases[name] = max(0.0, hit - last)
        last = hit
    phases["evaluation"] = max(0.0, end_unix - last)
    return phases


def read_job(job_dir: Path) -> JobTiming:
    """Timing of one job directory of the sweep."""
    info = json.loads((job_dir / "run_info.json").read_text())
    log_text = (job_dir / "run.log").read_text(errors="replace") if (job_dir / "run.log").is_file() else ""
    duration = float(info.get("duration_s") or math.nan)
    end = datetime.fromisoformat(info["end_time"]).timestamp() if info.get("end_time") else math.nan
    return JobTiming(
        num=int(job_dir.name),
        status=str(info.get("status")),
        duration_s=duration,
        start_unix=end - duration,
        end_unix=end,
        built_score=re.search(r"artifact score/\S+ building", log_text) is not None,
        phases=log_phases(log_text, end - duration, end),
    )


def sweep_jobs(root: Path) -> tuple[list[Path], list[JobTiming]]:
    """The sweep directories under ``root/multirun/<experiment>`` and the jobs in them, by job number.

    A correct sweep has one directory; more mean the jobs resolved different run ids (see the warning
    :func:`main` prints), and the jobs are collected from all of them."""
    sweeps = sorted(p for p in (root / "multirun" / EXPERIMENT).iterdir() if p.is_dir())
    job_dirs = [j for sweep in sweeps for j in sweep.iterdir() if j.is_dir() and j.name.isdigit()]
    return sweeps, sorted((read_job(p) for p in job_dirs), key=lambda j: j.num)


def warm_up(root: Path, env: dict[str, str], dynamics_steps: int) -> None:
    """Build the corpus, store and dynamics artifact with one untimed job, then drop every score model."""
    argv = [
        sys.executable,
        "-m",
        "latentdyn",
        *settings(WARMUP_SCORE_STEPS, dynamics_steps),
        "correction=none",
    ]
    log_path = root / "warmup.log"
    if run_logged(argv, env, root, log_path) != 0:
        raise RuntimeError(f"warm-up job failed:\n{tail(log_path)}")
    if not complete_artifacts(root / "cache", "dynamics"):
        raise RuntimeError(f"the warm-up built no dynamics artifact under {root / 'cache'}")
    shutil.rmtree(root / "cache" / "score", ignore_errors=True)


def fmt_phases(phases: dict[str, float]) -> str:
    """``setup 9.8 | store+dynamics 0.10 | ...`` (seconds)."""
    return (
        " | ".join(f"{name} {secs:.2f}" for name, secs in phases.items()) or "(no phase markers in run.log)"
    )


def report(
    args: argparse.Namespace,
    t_sweep: float,
    t_launch: float,
    t_exit: float,
    jobs: list[JobTiming],
    t_train: float,
) -> None:
    """Print the ratio table, the overhead split and the per-job phases."""
    n = len(jobs)
    builders = [j for j in jobs if j.built_score]
    reusers = [j for j in jobs if not j.built_score] if len(builders) == 1 else jobs[1:]
    evals = [j.duration_s for j in reusers]
    t_eval = statistics.median(evals)
    ratio = t_sweep / (t_train + n * t_eval)
    sum_jobs = sum(j.duration_s for j in jobs)
    ordered = sorted(jobs, key=lambda j: j.start_unix)
    launch = ordered[0].start_unix - t_launch
    finish = t_exit - max(j.end_unix for j in jobs)
    gaps = sum(max(0.0, b.start_unix - a.end_unix) for a, b in zip(ordered, ordered[1:], strict=False))
    parallel = args.launcher != "basic"

    print(
        f"\nExp 6 correction sweep: N={n}, launcher {args.launcher}"
        + (f" (n_jobs={args.n_jobs})" if parallel else "")
        + f", OMP_NUM_THREADS={args.threads}, score model {args.score_steps} steps, "
        f"dynamics {args.dynamics_steps} steps, python {sys.version.split()[0]}"
    )
    print(
        f"{'N':>3} {'T_sweep s':>10} {'T_train s':>10} {'T_eval s (median, min, max)':>29} {'overhead s':>11}"
    )
    # With a parallel launcher the jobs overlap: the time outside them is not T_sweep - their sum.
    overhead = "n/a" if parallel else f"{t_sweep - sum_jobs:.2f}"
    print(
        f"{n:>3} {t_sweep:>10.2f} {t_train:>10.2f} "
        f"{f'{t_eval:.2f} ({min(evals):.2f}, {max(evals):.2f})':>29} {overhead:>11}"
    )
    verdict = "(for information: jobs overlap)" if parallel else ("PASS" if ratio <= args.target else "FAIL")
    print(f"ratio T_sweep / (T_train + N x T_eval) = {ratio:.3f}   target <= {args.target}   {verdict}")
    if builders:
        b = builders[0]
        print(
            f"builder job #{b.num}: {b.duration_s:.2f} s = training {t_train:.2f} s "
            f"+ {b.duration_s - t_train:.2f} s rest (setup {b.phases.get('setup', math.nan):.2f} s)"
        )
    if builders and not parallel:
        outside = t_sweep - sum_jobs
        builder_extra = builders[0].duration_s - t_train - t_eval
        spread = sum(evals) - len(evals) * t_eval
        print(
            f"T_sweep - (T_train + N x T_eval) = {t_sweep - t_train - n * t_eval:.2f} s = outside the jobs "
            f"{outside:.2f} + builder beyond training and one evaluation {builder_extra:.2f} "
            f"+ reusing jobs above the median {spread:.2f}"
        )
    between = "" if parallel else f"gaps between jobs {gaps:.2f} s, "
    print(
        f"outside the jobs: launch {launch:.2f} s (process start -> first job), {between}"
        f"end {finish:.2f} s (last job -> exit: sweep summary, shutdown); sum of job durations {sum_jobs:.2f} s"
    )
    print("\nper-job phases from run.log, seconds (setup: pipeline imports + job logger)")
    for j in jobs:
        # A parallel job that asked for the score model while another trained it waited on the lock.
        tag = " builder" if j.built_score else (" waited" if j.phases.get("score", 0.0) > 1.0 else "")
        print(f"  #{j.num}{tag:<8} {j.duration_s:>7.2f} s  {fmt_phases(j.phases)}")
    if reusers and all(len(j.phases) == len(PHASE_NAMES) for j in reusers):
        medians = {name: statistics.median(j.phases[name] for j in reusers) for name in PHASE_NAMES}
        print(f"  median of the {len(reusers)} reusing jobs: {fmt_phases(medians)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=9, help="grid size N")
    parser.add_argument(
        "--score-steps", type=int, default=6000, help="score-model training steps (max_steps)"
    )
    parser.add_argument(
        "--dynamics-steps", type=int, default=50, help="dynamics-model steps (trainer.max_steps)"
    )
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the subprocesses")
    parser.add_argument("--launcher", choices=("basic", "joblib"), default="basic", help="Hydra launcher")
    parser.add_argument("--n-jobs", type=int, default=2, help="parallel workers of the joblib launcher")
    parser.add_argument("--target", type=float, default=1.2, help="target ratio (basic launcher)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary LATENTDYN_ROOT (path printed)"
    )
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="latentdyn-sweep-bench-"))
    if args.keep:
        print(f"LATENTDYN_ROOT (kept): {root}")
    try:
        env = bench_env(root, args.threads)
        warm_up(root, env, args.dynamics_steps)
        launcher = (
            ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.n_jobs}"]
            if args.launcher == "joblib"
            else []
        )
        argv_sweep = [
            sys.executable,
            "-m",
            "latentdyn",
            "-m",
            *settings(args.score_steps, args.dynamics_steps),
            *grid_overrides(args.jobs),
            *launcher,
        ]
        print(f"load average before timing: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print("timed: " + " ".join(["latentdyn", *argv_sweep[3:]]))
        log_path = root / "sweep.log"
        t_launch = time.time()
        start = time.perf_counter()
        code = run_logged(argv_sweep, env, root, log_path)
        t_sweep = time.perf_counter() - start
        t_exit = time.time()
        if code != 0:
            print(f"FAIL: the sweep exited {code}:\n{tail(log_path)}")
            return 1
        sweeps, jobs = sweep_jobs(root)
        if len(sweeps) != 1:
            print(
                f"WARNING: the jobs landed in {len(sweeps)} sweep directories "
                f"({', '.join(p.name for p in sweeps)}), not one: each process resolved its own run_id, so "
                "the sweep summary misses jobs"
            )
        completed = [j for j in jobs if j.status == "completed"]
        scores = complete_artifacts(root / "cache", "score")
        builders = [j.num for j in jobs if j.built_score]
        problems = []
        if len(completed) != args.jobs:
            problems.append(f"{len(completed)} of {len(jobs)} jobs completed, expected {args.jobs}")
        if len(scores) != 1 or len(builders) != 1:
            problems.append(
                f"{len(scores)} score artifacts, built by jobs {builders}: the model was not shared"
            )
        if problems or not scores:
            print("FAIL: " + "; ".join(problems or ["no score artifact"]) + f" (sweep log: {log_path})")
            if not completed or not scores:
                return 1
        t_train = float(json.loads((scores[0] / "training.json").read_text())["seconds"])
        report(args, t_sweep, t_launch, t_exit, completed, t_train)
        if args.keep:
            print(f"\nkept: {root} (sweep {', '.join(p.name for p in sweeps)})")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
