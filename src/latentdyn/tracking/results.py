"""Collect completed runs from the manifest into results tables (the ``latentdyn-results`` command).

Writes ``outputs/results_table.csv`` (one row per completed run, key metrics as columns) and
``outputs/results_table.md`` (one table per experiment), and lists failed and crashed runs separately.
A metric ``m`` recorded with ``m_ci_low`` and ``m_ci_high`` (a mean over seeds with its 95 % bootstrap CI) is
one cell ``mean [low, high]`` in the markdown table; the CSV keeps the three numeric columns.
Imports nothing heavy: it must answer in well under a second.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentdyn.jsonio import write_text_atomic
from latentdyn.tracking.manifest import MANIFEST_NAME, iter_records

CI_LOW = "_ci_low"
CI_HIGH = "_ci_high"
CSV_NAME = "results_table.csv"
MD_NAME = "results_table.md"
_BASE_COLUMNS = (
    "experiment",
    "run_id",
    "tier",
    "end_time",
    "duration_s",
    "data",
    "weights",
    "git_commit",
    "run_dir",
)


@dataclass
class RunSummary:
    """A run as the manifest tells it: its last status and, when it ended, its metrics or error."""

    run_id: str
    experiment: str
    tier: str
    run_dir: str
    status: str
    start_time: str
    end_time: str | None = None
    duration_s: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    git_commit: str | None = None
    host: str | None = None
    pid: int | None = None


def summarize_runs(records: Iterable[dict[str, Any]]) -> list[RunSummary]:
    """Fold manifest lines into runs, in start order.

    Each ``started`` line opens a run; the next ``completed``/``failed`` line with the same run id closes
    it. A run never closed is ``crashed`` (or ``running`` if its process is still alive on this host). A
    run started again in the same directory (``resume=true``, ``overwrite=true``) replaces its earlier
    attempt: one run id, one row.
    """
    runs: list[RunSummary] = []
    open_runs: dict[str, RunSummary] = {}
    latest_attempt: dict[tuple[str, str], RunSummary] = {}
    for rec in records:
        status, run_id = rec.get("status"), str(rec.get("run_id"))
        if status == "started":
            run_dir = str(rec.get("run_dir") or "")
            run = RunSummary(
                run_id=run_id,
                experiment=str(rec.get("experiment")),
                tier=str(rec.get("tier") or ""),
                run_dir=run_dir,
                status="crashed",
                start_time=str(rec.get("time")),
                git_commit=rec.get("git_commit"),
                host=rec.get("host"),
                pid=rec.get("pid"),
            )
            runs.append(run)
            open_runs[run_id] = run
            latest_attempt[(run_id, run_dir)] = run
        elif status in ("completed", "failed") and run_id in open_runs:
            run = open_runs.pop(run_id)
            run.status = status
            run.end_time = rec.get("time")
            run.duration_s = rec.get("duration_s")
            run.metrics = dict(rec.get("metrics") or {})
            run.weights = dict(rec.get("weights") or {})
            run.data = dict(rec.get("data") or {})
            run.error = rec.get("error")
    for run in open_runs.values():
        if process_alive(run.host, run.pid):
            run.status = "running"
    return [run for run in runs if latest_attempt[(run.run_id, run.run_dir)] is run]


def process_alive(host: str | None, pid: int | None) -> bool:
    """Whether process ``pid`` of this host still exists (a run it started may still be running)."""
    if pid is None or host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return True


def select_runs(runs: Sequence[RunSummary], experiment: str | None, latest: bool) -> list[RunSummary]:
    """Completed runs, optionally of one experiment, optionally only the newest per experiment."""
    done = [r for r in runs if r.status == "completed" and (experiment is None or r.experiment == experiment)]
    if latest:
        newest: dict[str, RunSummary] = {}
        for run in done:
            if run.experiment not in newest or (run.end_time or "") >= (
                newest[run.experiment].end_time or ""
            ):
                newest[run.experiment] = run
        done = [r for r in done if newest[r.experiment] is r]
    return done


def weights_label(weights: dict[str, Any]) -> str:
    """Short provenance of a run's weights, e.g. ``mimi:random``; empty when nothing was recorded."""
    parts = []
    for name, prov in sorted(weights.items()):
        source = prov.get("source") if isinstance(prov, dict) else prov
        base = prov.get("base") if isinstance(prov, dict) else None
        if isinstance(base, dict) and base.get("source"):
            source = (
                f"{source} (base {base['source']})"  # a learned projection over a codec: say which weights
            )
        parts.append(f"{name}:{source}")
    return " ".join(parts)


def table_rows(runs: Sequence[RunSummary]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns (base columns, then every metric name in first-seen order) and one row dict per run."""
    metric_names: list[str] = []
    for run in runs:
        metric_names.extend(k for k in run.metrics if k not in metric_names)
    rows = []
    for run in runs:
        row: dict[str, Any] = {
            "experiment": run.experiment,
            "run_id": run.run_id,
            "tier": run.tier,
            "end_time": run.end_time,
            "duration_s": run.duration_s,
            "data": str(run.data.get("label", "")),
            "weights": weights_label(run.weights),
            "git_commit": (run.git_commit or "")[:10],
            "run_dir": run.run_dir,
        }
        row.update({k: run.metrics.get(k) for k in metric_names})
        rows.append(row)
    return [*_BASE_COLUMNS, *metric_names], rows


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def render_csv(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buf.getvalue()


def merge_ci_columns(
    columns: Sequence[str], rows: Sequence[dict[str, Any]]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows for display: each metric ``m`` with ``m_ci_low`` and ``m_ci_high`` columns becomes one
    column whose cells read ``mean [low, high]`` (just the mean where a run has no bounds); the bound columns
    are dropped."""
    present = set(columns)
    with_ci = [c for c in columns if c + CI_LOW in present and c + CI_HIGH in present]
    if not with_ci:
        return list(columns), list(rows)
    bounds = {c + suffix for c in with_ci for suffix in (CI_LOW, CI_HIGH)}
    out_rows = []
    for row in rows:
        new = dict(row)
        for c in with_ci:
            low, high = row.get(c + CI_LOW), row.get(c + CI_HIGH)
            if row.get(c) is not None and low is not None and high is not None:
                new[c] = f"{_fmt(row[c])} [{_fmt(low)}, {_fmt(high)}]"
        out_rows.append(new)
    return [c for c in columns if c not in bounds], out_rows


def _md_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines)


def render_markdown(selected: Sequence[RunSummary], all_runs: Sequence[RunSummary]) -> str:
    """One table per experiment (only that experiment's metrics as columns), then failed/crashed runs."""
    out = ["# latentdyn results", ""]
    if not selected:
        out += ["No completed runs.", ""]
    for experiment in dict.fromkeys(r.experiment for r in selected):
        runs = [r for r in selected if r.experiment == experiment]
        columns, rows = table_rows(runs)
        columns = [c for c in columns if c not in ("experiment", "tier", "run_dir")]
        columns, rows = merge_ci_columns(columns, rows)
        out += [f"## {experiment}", "", _md_table(columns, rows), ""]
    failed = [r for r in all_runs if r.status == "failed"]
    if failed:
        out += ["## Failed runs", ""]
        out += [
            f"- `{r.run_id}` ({r.experiment}): {(r.error or {}).get('type', '')}: "
            f"{(r.error or {}).get('message', '')} — {r.run_dir}"
            for r in failed
        ]
        out.append("")
    crashed = [r for r in all_runs if r.status in ("crashed", "running")]
    if crashed:
        out += ["## Crashed or unfinished runs (started, never ended)", ""]
        out += [
            f"- `{r.run_id}` ({r.experiment}, {r.status}) started {r.start_time} — {r.run_dir}"
            for r in crashed
        ]
        out.append("")
    return "\n".join(out)


def default_outputs_dir() -> Path:
    root = os.environ.get("LATENTDYN_ROOT")
    return Path(root) / "outputs" if root else Path("outputs")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="latentdyn-results",
        description="Collect completed latentdyn runs from outputs/manifest.jsonl into results tables.",
    )
    parser.add_argument(
        "--latest", action="store_true", help="only the most recent completed run per experiment"
    )
    parser.add_argument("--experiment", metavar="NAME", help="only runs of this experiment")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write the table files")
    parser.add_argument(
        "--outputs",
        type=Path,
        default=None,
        help="outputs directory holding manifest.jsonl (default: $LATENTDYN_ROOT/outputs or ./outputs)",
    )
    parser.add_argument(
        "--sweep",
        type=Path,
        default=None,
        metavar="DIR",
        help="summarise one sweep directory (multirun/<experiment>/<run_id>) instead: writes summary.csv, "
        "sweep_results.json and heatmap.png there",
    )
    args = parser.parse_args(argv)
    if args.sweep is not None:
        from latentdyn.tracking.sweep import main_sweep

        return main_sweep(args.sweep)
    outputs = args.outputs or default_outputs_dir()
    manifest = outputs / MANIFEST_NAME
    if not manifest.exists():
        print(f"latentdyn-results: no manifest at {manifest} (run an experiment first)", file=sys.stderr)
        return 1
    all_runs = summarize_runs(iter_records(manifest))
    if args.experiment:
        all_runs = [r for r in all_runs if r.experiment == args.experiment]
    selected = select_runs(all_runs, args.experiment, args.latest)
    markdown = render_markdown(selected, all_runs)
    print(markdown)
    if not args.no_save:
        columns, rows = table_rows(selected)
        write_text_atomic(outputs / CSV_NAME, render_csv(columns, rows))
        write_text_atomic(outputs / MD_NAME, markdown)
        print(f"wrote {outputs / CSV_NAME} and {outputs / MD_NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
