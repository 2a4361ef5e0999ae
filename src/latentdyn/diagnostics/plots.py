"""Figures of the diagnostics (matplotlib, Agg backend, imported lazily so importing latentdyn stays light)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

METRIC_LABELS: dict[str, str] = {
    "dnll": "ΔNLL of the true delta vs baseline (nats/frame)",
    "cos": "cos(Δ̂, Δ)",
    "mag_ratio": "‖Δ̂‖ / ‖Δ‖",
    "state_err": "state error ‖x̂[t-1] − x[t-1]‖",
    "nll": "NLL of the true delta (nats/frame)",
    "mse": "MSE of the state to GT",
    "manifold_dist": "NN distance to train bank",
}


def plot_injection_curves(
    per_step: Sequence[Mapping[str, Any]],
    out_dir: Path,
    *,
    metrics: Sequence[str] = tuple(METRIC_LABELS),
    frame_rate: float | None = None,
    frames_per_step: int = 1,
    title: str | None = None,
) -> list[Path]:
    """One PNG per metric (``injection_<metric>.png``): a line per mode (mean) and its band over start points.

    ``per_step`` holds tidy rows ``{mode, step, metric, mean, lo, hi}``. x is the rollout step; with
    ``frame_rate`` (frames/s) a top axis gives the time of the predicted frame after the context,
    ``step * frames_per_step / frame_rate`` seconds (steps are 1-based). A metric with no finite value (``manifold_dist``
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
        if title:
            # A figure title, above the secondary time axis and its label.
            fig.suptitle(f"{title} · {metric}", fontsize="medium")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", title="line: mean; band: over starts", title_fontsize="x-small")
        if frame_rate:
            seconds_per_step = frames_per_step / frame_rate
            top = ax.secondary_xaxis(
                "top",
                functions=(
                    lambda s, d=seconds_per_step: s * d,
                    lambda t, d=seconds_per_step: t / d,
                ),
            )
            top.set_xlabel("time after context (s)")
        fig.tight_layout()
        path = out_dir / f"injection_{metric}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths
