"""Figures of the diagnostics (matplotlib, Agg backend, imported lazily so importing latentdyn stays light)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

METRIC_LABELS: dict[str, str] = {
    "mse": "MSE to GT (standardised)",
    "cosine": "cosine to GT",
    "nll": "NLL of GT / dim (nats)",
    "manifold_dist": "NN distance to train bank",
    "norm_ratio": "||z_hat|| / ||z_gt||",
}


def plot_injection_curves(
    per_step: Sequence[Mapping[str, Any]],
    out_dir: Path,
    *,
    metrics: Sequence[str] = tuple(METRIC_LABELS),
    frame_rate: float | None = None,
    frames_per_step: int = 1,
) -> list[Path]:
    """One PNG per metric (``injection_<metric>.png``): a line per mode (mean) and its band over start points.

    ``per_step`` holds tidy rows ``{mode, step, metric, mean, lo, hi}``. x is the rollout step; with
    ``frame_rate`` (frames/s) a top axis gives the time of the predicted frame after the context,
    ``(step + 1) * frames_per_step / frame_rate`` seconds. A metric with no finite value (``manifold_dist``
    without a bank) gets no figure. Returns the written paths.
    """
    # A bare Figure renders with Agg and leaves pyplot's global backend and figure registry alone.
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for metric in metrics:
        rows = [r for r in per_step if r["metric"] == metric]
        if not any(math.isfinite(r["mean"]) for r in rows):
            continue
        fig = Figure(figsize=(6.4, 4.0))
        ax = fig.subplots()
        for mode in dict.fromkeys(r["mode"] for r in rows):
            series = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["step"])
            steps = [r["step"] for r in series]
            (line,) = ax.plot(steps, [r["mean"] for r in series], label=mode, linewidth=1.5)
            ax.fill_between(
                steps, [r["lo"] for r in series], [r["hi"] for r in series], color=line.get_color(), alpha=0.2
            )
        ax.set_xlabel(f"rollout step ({frames_per_step} frame{'s' if frames_per_step != 1 else ''} each)")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        if frame_rate:
            seconds_per_step = frames_per_step / frame_rate
            top = ax.secondary_xaxis(
                "top",
                functions=(
                    lambda s, d=seconds_per_step: (s + 1) * d,
                    lambda t, d=seconds_per_step: t / d - 1,
                ),
            )
            top.set_xlabel("time after context (s)")
        fig.tight_layout()
        path = out_dir / f"injection_{metric}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths
