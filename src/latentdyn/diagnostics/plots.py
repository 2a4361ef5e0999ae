"""Figures of the diagnostics (matplotlib, Agg backend, imported lazily so importing latentdyn stays light).

Every figure carries a title that names the experiment, the run and (where a model is involved) its horizon k
(:func:`figure_title`); shaded bands are said in words in the legend (:func:`band_label`); legends sit to the
right of the axes, never on the data; :func:`save_figure` writes the title (and a caption) into the PNG's text
chunks too, so a file found alone still says what it shows.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentdyn.jsonio import write_bytes_atomic

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

METRIC_LABELS: dict[str, str] = {
    "dnll": "ΔNLL of the true delta vs baseline (nats/frame)",
    "cos": "cos(Δ̂, Δ)",
    "mag_ratio": "‖Δ̂‖ / ‖Δ‖",
    "state_err": "state error ‖x̂[t-1] − x[t-1]‖ (model latent units)",
    "nll": "NLL of the true delta (nats/frame)",
    "mse": "MSE of the state to GT (model latent units²)",
    "manifold_dist": "NN distance to train bank (model latent units)",
}
BAND_KINDS: tuple[str, ...] = ("percentile", "bootstrap")
TITLE_SEP = " · "
# A legend's upper-left corner, in axes coordinates: just right of the data area.
LEGEND_OUTSIDE: dict[str, Any] = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0}


def figure_title(experiment: str, run_id: Any, horizon: int | None = None, extra: str | None = None) -> str:
    """``"<experiment> · run <run_id>[ · k=<horizon>][ · <extra>]"``: which run made a figure, and of what.

    ``experiment`` and ``run_id`` are a run's ``cfg.name`` and ``cfg.run_id``; ``horizon`` is the model's k
    (frames, a positive int) where a model is involved; ``extra`` says what else tells the figure apart (a
    representation, a variant).
    """
    experiment, run = str(experiment).strip(), str(run_id).strip()
    if not experiment:
        raise ValueError("figure_title needs an experiment name")
    if not run:
        raise ValueError("figure_title needs a run id")
    parts = [experiment, f"run {run}"]
    if horizon is not None:
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon must be a positive int (frames), got {horizon!r}")
        parts.append(f"k={horizon}")
    if extra:
        parts.append(extra)
    return TITLE_SEP.join(parts)


def band_label(kind: str, level: float, n_starts: int, n_bootstrap: int | None = None) -> str:
    """What a shaded band over ``n_starts`` start points is, in words (a legend entry; lines break it up).

    ``percentile``: the central ``level`` range of the per-start values (e.g. 0.9: the 5–95 % percentiles);
    ``bootstrap``: a ``level`` CI of the mean over starts from ``n_bootstrap`` resamples.
    """
    if kind not in BAND_KINDS:
        raise ValueError(f"band kind must be one of {BAND_KINDS}, got {kind!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"band level must lie in (0, 1), got {level}")
    if isinstance(n_starts, bool) or not isinstance(n_starts, int) or n_starts < 1:
        raise ValueError(f"n_starts must be a positive int, got {n_starts!r}")
    if kind == "percentile":
        tail = 100.0 * (1.0 - level) / 2.0
        return f"band: {tail:.3g}–{100.0 - tail:.3g} % percentiles\nover {n_starts} starts"
    if n_bootstrap is None or n_bootstrap < 1:
        raise ValueError(f"a bootstrap band needs n_bootstrap >= 1 resamples, got {n_bootstrap!r}")
    return f"band: {100.0 * level:.3g} % bootstrap CI of the mean\nover {n_starts} starts ({n_bootstrap} resamples)"


def seed_band_label(level: float, n_seeds: int, n_resamples: int) -> str:
    """A shaded band across seeds in words: the ``level`` percentile bootstrap CI of the mean over ``n_seeds``
    seeds from ``n_resamples`` resamples (:func:`latentdyn.statistics.bootstrap_ci`)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"band level must lie in (0, 1), got {level}")
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
        raise ValueError(f"n_seeds must be a positive int, got {n_seeds!r}")
    return (
        f"band: {100.0 * level:.3g} % bootstrap CI of the mean\nover {n_seeds} seed{'s' if n_seeds != 1 else ''}"
        f" ({n_resamples} resamples)"
    )


def save_figure(fig: Figure, path: Path, *, dpi: int = 110, caption: str | None = None) -> Path:
    """Write ``fig`` to ``path`` (PNG) cropped to its artists, so legends outside the axes are kept.

    The PNG's ``Title`` text chunk holds the figure's suptitle, ``Description`` the ``caption`` if any.
    """
    metadata = {"Title": fig.get_suptitle()}
    if caption:
        metadata["Description"] = caption
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata=metadata)
    write_bytes_atomic(Path(path), buf.getvalue())
    return Path(path)


def _require_title(title: str) -> str:
    if not title or not title.strip():
        raise ValueError("a figure needs a title (see figure_title): experiment, run id and horizon")
    return title


def _has_finite(rows: Sequence[Mapping[str, Any]]) -> bool:
    return any(math.isfinite(r["mean"]) for r in rows)


def injection_figure(
    per_step: Sequence[Mapping[str, Any]],
    metric: str,
    *,
    title: str,
    band: str,
    frame_rate: float | None = None,
    frames_per_step: int = 1,
    line_label: str = "line: mean over starts",
) -> Figure:
    """The curves of one ``metric``: a line per mode (the mean over starts) and its shaded band.

    ``per_step`` holds tidy rows ``{mode, step, metric, mean, lo, hi}`` (steps 1-based); ``title`` (from
    :func:`figure_title`) gets `` · <metric>``; ``band`` (from :func:`band_label`) is the band's legend entry,
    ``line_label`` the legend's title (what a line is: the mean over starts, or over seeds).
    With ``frame_rate`` (frames/s) a top axis gives the time of the predicted frame after the context,
    ``step * frames_per_step / frame_rate`` seconds.
    """
    # A bare Figure renders with Agg and leaves pyplot's global backend and figure registry alone.
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    _require_title(title)
    rows = [r for r in per_step if r["metric"] == metric]
    if not _has_finite(rows):
        raise ValueError(f"metric {metric!r} has no finite value to plot")
    fig = Figure(figsize=(8.0, 4.0), layout="constrained")
    ax = fig.subplots()
    handles = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        series = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["step"])
        steps = [r["step"] for r in series]
        (line,) = ax.plot(steps, [r["mean"] for r in series], label=mode, linewidth=1.5)
        ax.fill_between(
            steps, [r["lo"] for r in series], [r["hi"] for r in series], color=line.get_color(), alpha=0.2
        )
        handles.append(line)
    handles.append(Patch(facecolor="0.5", alpha=0.3, label=band))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"rollout step ({frames_per_step} frame{'s' if frames_per_step != 1 else ''} each)")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    fig.suptitle(f"{title}{TITLE_SEP}{metric}", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(
        handles=handles,
        fontsize="small",
        title=line_label,
        title_fontsize="x-small",
        **LEGEND_OUTSIDE,
    )
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
    return fig


def plot_injection_curves(
    per_step: Sequence[Mapping[str, Any]],
    out_dir: Path,
    *,
    title: str,
    band: str,
    metrics: Sequence[str] = tuple(METRIC_LABELS),
    frame_rate: float | None = None,
    frames_per_step: int = 1,
    line_label: str = "line: mean over starts",
) -> list[Path]:
    """One PNG per metric (``injection_<metric>.png``, see :func:`injection_figure`); returns the written paths.

    A metric with no finite value (``manifold_dist`` without a bank) gets no figure.
    """
    _require_title(title)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for metric in metrics:
        if not _has_finite([r for r in per_step if r["metric"] == metric]):
            continue
        fig = injection_figure(
            per_step,
            metric,
            title=title,
            band=band,
            frame_rate=frame_rate,
            frames_per_step=frames_per_step,
            line_label=line_label,
        )
        paths.append(save_figure(fig, out_dir / f"injection_{metric}.png", caption=band))
    return paths


def explained_variance_figure(
    ratio: np.ndarray, dims: Sequence[int], *, title: str, input_dim: int, space: str
) -> Figure:
    """Bars of the explained variance ratio ``(K,)`` per principal component, its cumulative curve, and the
    chosen ``dims`` marked with their cumulative fraction; ``space`` names the fit's space (``raw``, ...)."""
    from matplotlib.figure import Figure

    _require_title(title)
    cumulative = ratio.cumsum()
    fig = Figure(figsize=(7.5, 4.0), layout="constrained")
    ax = fig.subplots()
    components = range(1, len(ratio) + 1)
    ax.bar(components, ratio, color="0.7", label="per component")
    ax.plot(components, cumulative, marker=".", label="cumulative")
    for i, k in enumerate(dims):
        ax.axvline(k, color="C3", linestyle=":", linewidth=1, label="chosen dims" if i == 0 else None)
        ax.annotate(f"{cumulative[k - 1]:.3f}", (k, cumulative[k - 1]), fontsize="small")
    ax.set_xlabel(f"principal component (of {input_dim} dims)")
    ax.set_ylabel(f"fraction of train variance ({space.replace('_', ' ')})")
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", **LEGEND_OUTSIDE)
    fig.suptitle(title, fontsize="medium")
    return fig


def curves_figure(
    series: Mapping[str, tuple[Sequence[float], Sequence[float | None]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx_base: int | None = None,
    logy: bool = False,
    reference: tuple[float, str] | None = None,
    groups: Mapping[str, str] | None = None,
    dashed: Sequence[str] = (),
    bands: Mapping[str, tuple[Sequence[float | None], Sequence[float | None]]] | None = None,
    band: str | None = None,
) -> Figure:
    """One line with markers per named series ``name -> (xs, ys)`` (``None`` or non-finite ys are gaps), legend
    outside the axes. ``logx_base``: a log x axis of that base, ticked at the data's x values; ``reference``
    ``(y, label)``: a dashed grey horizontal line (a threshold, a criterion); ``groups``: series name -> group,
    series of one group share a colour; ``dashed``: series drawn dashed (e.g. a corrected variant); ``bands``:
    series name -> ``(lows, highs)`` at its xs, shaded in the series' colour (a CI across seeds), with ``band``
    (e.g. :func:`seed_band_label`) as its legend entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _require_title(title)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    group_of = {name: (groups or {}).get(name, name) for name in series}
    colour = {g: palette[i % len(palette)] for i, g in enumerate(dict.fromkeys(group_of.values()))}
    ticks: set[float] = set()
    for name, (xs, ys) in series.items():
        values = [math.nan if y is None or not math.isfinite(float(y)) else float(y) for y in ys]
        ticks.update(float(x) for x in xs)
        ax.plot(
            [float(x) for x in xs],
            values,
            marker="o",
            label=name,
            color=colour[group_of[name]],
            linestyle="--" if name in dashed else "-",
        )
        if bands and name in bands:
            lows, highs = ([math.nan if v is None else float(v) for v in side] for side in bands[name])
            ax.fill_between([float(x) for x in xs], lows, highs, color=colour[group_of[name]], alpha=0.2)
    if reference is not None:
        ax.axhline(reference[0], color="0.4", linestyle="--", linewidth=1.0, label=reference[1])
    if logx_base is not None:
        ax.set_xscale("log", base=logx_base)
        ax.set_xticks(sorted(ticks), [f"{x:g}" for x in sorted(ticks)])
        ax.minorticks_off()
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if bands and band:
        from matplotlib.patches import Patch

        handles, _ = ax.get_legend_handles_labels()
        handles.append(Patch(facecolor="0.5", alpha=0.3, label=band))
        ax.legend(handles=handles, **LEGEND_OUTSIDE, fontsize="small")
    else:
        ax.legend(**LEGEND_OUTSIDE, fontsize="small")
    fig.suptitle(title, fontsize="medium")
    return fig
