"""Several seeds per variant: the ``seeds`` config key, per-seed configs and directories, and the summaries.

``seeds`` (top level; null: one run with ``seed``, as before) lists the seeds a comparing experiment (Exp 3, 4, 5,
11) runs each of its variants with; each run gets ``seed`` set to its seed (model init, data order, sampled
start points: whatever ``cfg.seed`` drives), while seed-independent inputs (corpus, latent stores of fixed
codecs, PCA fits) are built once and shared. Layout:

- one seed (``seeds: null`` or a one-element list): as before, ``<run_dir>/<variant>/``;
- several: ``<run_dir>/seed<s>/<variant>/`` (Exp 11: ``<run_dir>/seed<s>/``), so a sub-run reference such as
  ``latest:exp5_betavae/<variant>`` still names a variant (the newest completed seed's), and
  ``latest:exp3_rep_compare/mimi`` the first seed's folder (``latest:exp3_rep_compare/seed1/mimi`` another's).

Either way the run writes ``summary_per_seed.csv`` (the per-seed rows with a ``seed`` column) and ``summary.csv``
(one row per variant: each numeric column's mean under its own name, ``<col>_ci_low`` / ``<col>_ci_high`` the
95 % percentile bootstrap CI of the mean across seeds, and ``n_seeds``; see
:mod:`latentdyn.statistics`). With several seeds the key metrics carry ``<key>_ci_low`` /
``<key>_ci_high`` too, and ``latentdyn-results`` shows them as ``mean [low, high]``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from latentdyn.pipeline.common import write_csv_rows
from latentdyn.statistics import CI_HIGH, CI_LOW, N_SEEDS, aggregate_seeds

log = logging.getLogger(__name__)

SEED_KEY = "seed"
SUMMARY_NAME = "summary.csv"
PER_SEED_NAME = "summary_per_seed.csv"
#: Where the across-seed injection curves go (``<run_dir>/injection_ci/<variant>/``).
INJECTION_CI_DIR = "injection_ci"
CONFIDENCE = 0.95
N_RESAMPLES = 10_000


def run_seeds(cfg: DictConfig) -> list[int]:
    """The seeds this run runs each variant with: ``seeds`` when set, else ``[seed]``.

    ``seeds`` must be null or a non-empty list of distinct non-negative integers (ValueError naming ``seeds``).
    """
    raw = cfg.get("seeds")
    if raw is None:
        return [int(cfg.seed)]
    if isinstance(raw, ListConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    if not isinstance(raw, list | tuple) or not raw:
        raise ValueError(
            f"seeds must be null or a non-empty list of distinct non-negative integers, got {raw!r}"
        )
    bad = [s for s in raw if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise ValueError(f"seeds must be non-negative integers, got {bad[0]!r} in seeds={list(raw)}")
    if len(set(raw)) != len(raw):
        raise ValueError(f"seeds must be distinct, got seeds={list(raw)}")
    return [int(s) for s in raw]


def several(seeds: Sequence[int]) -> bool:
    """Whether ``seeds`` asks for per-seed directories (more than one seed)."""
    return len(seeds) > 1


def seed_label(seed: int, seeds: Sequence[int], name: str | None = None) -> str:
    """The relative path of a variant's outputs for ``seed``: ``seed<s>/<name>`` with several seeds, else
    ``<name>`` (``seed<s>`` / ``.`` without a name)."""
    if several(seeds):
        return f"seed{int(seed)}/{name}" if name else f"seed{int(seed)}"
    return name or "."


def seed_config(cfg: DictConfig, seed: int, run_dir: Path | str | None = None) -> DictConfig:
    """``cfg`` for one seed's run: ``seed`` set, ``seeds`` null (this config is one run), outputs under
    ``run_dir`` when given."""
    s_cfg = cfg.copy()
    with open_dict(s_cfg):
        s_cfg.seed = int(seed)
        s_cfg.seeds = None
        if run_dir is not None:
            s_cfg.run_dir = str(run_dir)
    return s_cfg


def write_summaries(
    per_seed: Sequence[Mapping[str, Any]], keys: Sequence[str], run_dir: Path, name: str = SUMMARY_NAME
) -> list[dict[str, Any]]:
    """Write ``summary_per_seed.csv`` (``per_seed``: rows with a ``seed`` column) and ``name`` (one row per
    variant, told apart by ``keys``: means, CI bounds and ``n_seeds``); returns the latter's rows."""
    rows = aggregate_seeds(per_seed, keys, seed_key=SEED_KEY, confidence=CONFIDENCE, n_resamples=N_RESAMPLES)
    write_csv_rows(list(per_seed), Path(run_dir) / PER_SEED_NAME)
    write_csv_rows(rows, Path(run_dir) / name)
    return rows


def add_key_metric(
    key: dict[str, float],
    name: str,
    row: Mapping[str, Any],
    column: str,
    seeds: Sequence[int],
    ci: bool = True,
) -> None:
    """``key[name]`` = the (mean) value of ``row[column]`` when finite, with ``<name>_ci_low`` /
    ``<name>_ci_high`` from the row's CI columns when there are several seeds (and ``ci``)."""
    value = row.get(column)
    if value is None or not math.isfinite(float(value)):
        return
    key[name] = float(value)
    if ci and several(seeds):
        for suffix in (CI_LOW, CI_HIGH):
            bound = row.get(column + suffix)
            if bound is not None and math.isfinite(float(bound)):
                key[name + suffix] = float(bound)


def n_seeds_metric(key: dict[str, float], seeds: Sequence[int]) -> dict[str, float]:
    """``key`` with ``n_seeds`` when there are several seeds (the results table says how many)."""
    if several(seeds):
        key[N_SEEDS] = len(seeds)
    return key


def ci_series(
    rows: Sequence[Mapping[str, Any]], column: str
) -> tuple[list[float | None], list[float | None], list[float | None]]:
    """Means and CI bounds of ``column`` along ``rows`` (aggregated rows, in plotting order)."""

    def get(row: Mapping[str, Any], name: str) -> float | None:
        value = row.get(name)
        return None if value is None else float(value)

    return (
        [get(r, column) for r in rows],
        [get(r, column + CI_LOW) for r in rows],
        [get(r, column + CI_HIGH) for r in rows],
    )


def horizon_ci_series(
    rows: Sequence[Mapping[str, Any]], horizons: Sequence[int], label: str = "variant"
) -> dict[str, tuple[list[int], tuple[list, list, list]]]:
    """Per row (a variant's aggregated row with ``k<k>_dnll`` columns): its label -> the horizons and the
    means and CI bounds of the model's ΔNLL at each, for :func:`plot_ci_curves`."""
    series = {}
    for row in rows:
        stats = [ci_series([row], f"k{k}_dnll") for k in horizons]
        series[str(row[label])] = (list(horizons), tuple([s[i][0] for s in stats] for i in range(3)))
    return series


def plot_dnll_vs_horizon(cfg: DictConfig, rows: Sequence[Mapping[str, Any]], n_seeds: int, what: str) -> None:
    """``<run_dir>/dnll_vs_horizon.png``: each variant's (aggregated row's) ΔNLL per horizon ``cfg.horizons``,
    the mean across seeds with its CI band; ``what`` names the model in the title (``model``, ``Phase 1``)."""
    from latentdyn.diagnostics.plots import figure_title

    plot_ci_curves(
        horizon_ci_series(rows, [int(h) for h in cfg.horizons]),
        Path(cfg.run_dir) / "dnll_vs_horizon.png",
        title=figure_title(cfg.name, cfg.run_id, extra=f"{what} ΔNLL on slice {cfg.datamodule.slice}"),
        xlabel="horizon k (context lag, frames)",
        ylabel="ΔNLL vs baseline (nats/frame)",
        n_seeds=n_seeds,
        logx_base=2,
    )


def plot_ci_curves(
    series: Mapping[str, tuple[Sequence[float], tuple[list, list, list]]],
    path: Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    n_seeds: int,
    logx_base: int | None = None,
    logy: bool = False,
    groups: Mapping[str, str] | None = None,
    dashed: Sequence[str] = (),
) -> Path | None:
    """One line per ``series`` ``name -> (xs, (means, lows, highs))`` with its CI band across seeds; None (no
    figure) when nothing is finite."""
    from latentdyn.diagnostics.plots import curves_figure, save_figure, seed_band_label

    finite = any(v is not None and math.isfinite(v) for _, (means, _, _) in series.values() for v in means)
    if not finite:
        return None
    band = seed_band_label(CONFIDENCE, int(n_seeds), N_RESAMPLES)
    fig = curves_figure(
        {name: (xs, stats[0]) for name, (xs, stats) in series.items()},
        title=title,
        xlabel=xlabel,
        ylabel=ylabel,
        logx_base=logx_base,
        logy=logy,
        groups=groups,
        dashed=dashed,
        bands={name: (stats[1], stats[2]) for name, (_, stats) in series.items()},
        band=band,
    )
    path = save_figure(fig, Path(path), caption=band)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def injection_seed_curves(per_step_dirs: Mapping[int, Path]) -> tuple[list[dict[str, Any]], int]:
    """The injection diagnostic's per-step curves across seeds: ``per_step_dirs`` maps each seed to the folder
    holding its ``per_step.csv`` (and ``injection_diag.json``). Returns tidy rows ``{mode, step, metric, mean,
    lo, hi, n_seeds}`` (the mean over seeds of each seed's mean over starts, and its CI) and the frames per
    step."""
    per_seed: list[dict[str, Any]] = []
    frames_per_step = 1
    for seed, folder in per_step_dirs.items():
        with (Path(folder) / "per_step.csv").open(newline="") as fh:
            for r in csv.DictReader(fh):
                mean = float(r["mean"]) if r["mean"] not in ("", None) else math.nan
                per_seed.append(
                    {
                        "seed": seed,
                        "mode": r["mode"],
                        "step": int(r["step"]),
                        "metric": r["metric"],
                        "v": mean,
                    }
                )
        diag = Path(folder) / "injection_diag.json"
        if diag.is_file():
            frames_per_step = int(json.loads(diag.read_text()).get("frames_per_step", 1) or 1)
    rows = aggregate_seeds(
        per_seed, ("mode", "step", "metric"), confidence=CONFIDENCE, n_resamples=N_RESAMPLES
    )
    tidy = [
        {
            "mode": r["mode"],
            "step": r["step"],
            "metric": r["metric"],
            "mean": r["v"],
            "lo": r["v" + CI_LOW],
            "hi": r["v" + CI_HIGH],
            N_SEEDS: r[N_SEEDS],
        }
        for r in rows
    ]
    return tidy, frames_per_step


def write_injection_bands(
    run_dir: Path, name: str, per_step_dirs: Mapping[int, Path], *, title: str, frame_rate: float | None
) -> list[Path]:
    """``<run_dir>/injection_ci/<name>/``: ``per_step.csv`` (:func:`injection_seed_curves`) and one PNG per
    metric, each mode's mean over seeds with its CI band across seeds."""
    from latentdyn.diagnostics.plots import plot_injection_curves, seed_band_label
    from latentdyn.jsonio import write_csv_atomic

    tidy, frames_per_step = injection_seed_curves(per_step_dirs)
    out_dir = Path(run_dir) / INJECTION_CI_DIR / name
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out_dir / "per_step.csv", ["mode", "step", "metric", "mean", "lo", "hi", N_SEEDS], tidy)
    return plot_injection_curves(
        tidy,
        out_dir,
        title=title,
        band=seed_band_label(CONFIDENCE, len(per_step_dirs), N_RESAMPLES),
        frame_rate=frame_rate,
        frames_per_step=frames_per_step,
        line_label=f"line: mean over {len(per_step_dirs)} seeds\n(each the mean over starts)",
    )
