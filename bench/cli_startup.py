"""CLI start-up benchmark: wall time of the commands a user types most, and whether they pull in torch.

Times three commands as subprocesses of this venv's Python (``sys.executable -m ...``, not ``uv run``, so
uv's own start-up is not counted): ``latentdyn --help``, ``latentdyn experiment=phase0 --cfg job`` and
``latentdyn-results --no-save``. Each gets one warm-up run, then the median of 5 timed runs is compared
with the target (<= 1.5 s). A separate ``-X importtime`` run of each command tells whether torch or
lightning got imported (none of these commands needs them) and which dependencies cost most.

Everything runs in a temporary ``LATENTDYN_ROOT`` that holds one small completed run (``experiment=phase0
debug=smoke``, built once before timing) so ``latentdyn-results`` has a manifest to read. The script is a
measurement: it always exits 0 and prints PASS/FAIL per command.

    uv run python bench/cli_startup.py [--runs 5] [--target 1.5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: Modules that none of the timed commands should import (each costs seconds of start-up).
HEAVY_MODULES = ("torch", "lightning")


@dataclass(frozen=True)
class Command:
    """A command line as the user types it, and the ``python -m`` form that runs the same code."""

    label: str
    module: str
    args: tuple[str, ...]

    def argv(self, *python_flags: str) -> list[str]:
        return [sys.executable, *python_flags, "-m", self.module, *self.args]


COMMANDS = (
    Command("latentdyn --help", "latentdyn", ("--help",)),
    Command("latentdyn experiment=phase0 --cfg job", "latentdyn", ("experiment=phase0", "--cfg", "job")),
    Command("latentdyn-results --no-save", "latentdyn.tracking.results", ("--no-save",)),
)


@dataclass(frozen=True)
class ImportReport:
    """What one ``-X importtime`` run of a command imported.

    Attributes:
        modules: every module name imported by the process.
        total_s: summed cumulative time of the top-level imports, seconds (importtime's own overhead
            inflates it a little).
        top: the costliest dependencies as (top-level package, cumulative seconds of its direct imports),
            most expensive first (see :func:`parse_importtime`).
    """

    modules: frozenset[str]
    total_s: float
    top: tuple[tuple[str, float], ...]


def bench_env(root: Path) -> dict[str, str]:
    """This process's environment with every latentdyn output directed under ``root``."""
    env = dict(os.environ)
    env["LATENTDYN_ROOT"] = str(root)
    env.pop("LATENTDYN_CACHE", None)
    env["WANDB_MODE"] = "disabled"
    return env


def run_checked(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion (output captured); RuntimeError with its stderr tail if it fails."""
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def prepare_root(root: Path, env: dict[str, str]) -> None:
    """Create one small completed phase0 run under ``root`` so the results command has a manifest to read."""
    run_checked([sys.executable, "-m", "latentdyn", "experiment=phase0", "debug=smoke"], env, root)
    if not (root / "outputs" / "manifest.jsonl").is_file():
        raise RuntimeError(f"the smoke run wrote no manifest under {root}")


def time_command(cmd: Command, env: dict[str, str], cwd: Path, runs: int, warmup: int) -> list[float]:
    """Wall-clock seconds of ``runs`` runs of ``cmd`` (after ``warmup`` untimed runs that warm the OS caches)."""
    for _ in range(warmup):
        run_checked(cmd.argv(), env, cwd)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run_checked(cmd.argv(), env, cwd)
        times.append(time.perf_counter() - start)
    return times


def parse_importtime(stderr: str, n_top: int = 4) -> ImportReport:
    """Parse ``python -X importtime`` lines (``import time: self_us | cumulative_us | <indent>name``).

    Lines come in post-order (a module after everything it imported, indented two spaces per nesting
    level), so reading them backwards gives each module after its importer. A *direct* external import is
    a module outside latentdyn whose importers are all latentdyn modules (or none): its cumulative time is
    what latentdyn pays for that dependency. Those times are summed per top-level package for ``top``.
    """
    entries: list[tuple[int, str, float]] = []  # (nesting level, module, cumulative seconds)
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        fields = line[len("import time:") :].split("|")
        if len(fields) != 3 or not fields[1].strip().isdigit():
            continue  # the header line
        raw_name = fields[2][1:]  # one space after the bar, then two per nesting level
        name = raw_name.strip()
        entries.append(((len(raw_name) - len(raw_name.lstrip(" "))) // 2, name, int(fields[1]) / 1e6))
    per_package: dict[str, float] = {}
    ancestors: list[str] = []
    for level, name, cumulative in reversed(entries):
        del ancestors[level:]
        own = name.split(".")[0] == "latentdyn"
        if not own and all(a.split(".")[0] == "latentdyn" for a in ancestors):
            package = name.split(".")[0]
            per_package[package] = per_package.get(package, 0.0) + cumulative
        ancestors.append(name)
    total = sum(t for level, _, t in entries if level == 0)
    top = tuple(sorted(per_package.items(), key=lambda nt: nt[1], reverse=True)[:n_top])
    return ImportReport(frozenset(name for _, name, _ in entries), total, top)


def import_report(cmd: Command, env: dict[str, str], cwd: Path) -> ImportReport:
    """Run ``cmd`` once under ``-X importtime`` and parse what it imported."""
    return parse_importtime(run_checked(cmd.argv("-X", "importtime"), env, cwd).stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per command (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--target", type=float, default=1.5, help="target median wall time, seconds")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="latentdyn-cli-bench-") as tmp:
        root = Path(tmp)
        env = bench_env(root)
        prepare_root(root, env)
        rows = []
        for cmd in COMMANDS:
            times = time_command(cmd, env, root, args.runs, args.warmup)
            rows.append((cmd, times, import_report(cmd, env, root)))

    print(
        f"CLI start-up: median of {args.runs} runs after {args.warmup} warm-up, python {sys.version.split()[0]}"
    )
    print(
        f"{'command':<40} {'median s':>9} {'min s':>7} {'max s':>7} {'target':>8} {'torch':>6} {'lightning':>9}  verdict"
    )
    for cmd, times, imports in rows:
        median = statistics.median(times)
        heavy = [m for m in HEAVY_MODULES if m in imports.modules]
        ok = median <= args.target and not heavy
        flags = ["yes" if m in imports.modules else "no" for m in HEAVY_MODULES]
        why = (
            ""
            if ok
            else " ("
            + ", ".join(
                ([f"median {median:.2f} s > {args.target} s"] if median > args.target else [])
                + [f"imports {m}" for m in heavy]
            )
            + ")"
        )
        print(
            f"{cmd.label:<40} {median:>9.3f} {min(times):>7.3f} {max(times):>7.3f} {'<= ' + str(args.target):>8} "
            f"{flags[0]:>6} {flags[1]:>9}  {'PASS' if ok else 'FAIL'}{why}"
        )
    print("\nimport time (-X importtime, one run each): total, and the costliest packages imported directly")
    for cmd, _, imports in rows:
        top = ", ".join(f"{name} {t:.3f}" for name, t in imports.top)
        print(f"{cmd.label:<40} {imports.total_s:>6.3f} s  [{top}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
