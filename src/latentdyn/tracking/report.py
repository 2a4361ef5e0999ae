"""What a run prints when it ends: a compact view of its key metrics, where the rest is, what to run next.

The full tables are files (``run_info.json``, ``metrics.json``, ``outputs/results_table.md``); the terminal
gets lines short enough to read. Imports nothing heavy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# Key metrics shown at the end of a run; the rest are counted and pointed to.
MAX_METRICS = 12


def format_value(value: Any) -> str:
    """A metric value in at most ~10 characters: whole numbers as they are, others to 4 significant digits,
    ``-`` for a missing one."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if float(value).is_integer() and abs(value) < 1e9:
        return str(int(value))  # counts (frames, windows) are recorded as floats
    return f"{value:.4g}"


def metric_lines(metrics: Mapping[str, Any], limit: int = MAX_METRICS, indent: str = "  ") -> list[str]:
    """``name  value`` lines for the first ``limit`` metrics (names aligned), and a count of the others."""
    items = list(metrics.items())
    shown = items[:limit]
    width = max((len(k) for k, _ in shown), default=0)
    lines = [f"{indent}{name:<{width}}  {format_value(value)}" for name, value in shown]
    if len(items) > limit:
        lines.append(f"{indent}(+{len(items) - limit} more in run_info.json and metrics.json)")
    return lines


def end_of_run(
    experiment: str, run_id: str, run_dir: str, metrics: Mapping[str, Any], next_command: str | None
) -> str:
    """The text a completed run prints last."""
    lines = [f"{experiment} · run {run_id} completed", *metric_lines(metrics), f"outputs: {run_dir}"]
    if next_command:
        lines.append(f"next:    {next_command}")
    return "\n".join(lines)


def compact_runs(runs: Sequence[Any], per_run: int = 4, width: int = 100) -> str:
    """One line per run (a :class:`~latentdyn.tracking.results.RunSummary`): experiment and its first
    ``per_run`` key metrics, cut at ``width`` characters."""
    name_width = max((len(r.experiment) for r in runs), default=0)
    lines = []
    for run in runs:
        cells = [f"{k}={format_value(v)}" for k, v in list(run.metrics.items())[:per_run]]
        line = f"{run.experiment:<{name_width}}  {'  '.join(cells)}"
        lines.append(line if len(line) <= width else line[: width - 1] + "…")
    return "\n".join(lines)
