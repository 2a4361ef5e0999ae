"""Phase 1 battery (DESIGN §9, the reference's metrics): one-step metrics of a dynamics model and two baselines.

For each window the ground-truth delta ``Δ`` is the window's ``target_delta`` (the one-frame delta
``x[t] - x[t-1]`` for ``horizon_mode=lag``, ``z[t+k] - z[t]`` for ``stride``), in the model's space (raw, or
standardised with the store's train statistics). A predictor gives a point prediction ``Δ̂`` and, where it has
one, a density. Metrics, averaged over windows (the reference's names and meanings):

* ``nll``: ``-log p(Δ)`` in nats per frame (a density in R^D);
* ``nll_baseline``: the same for the *unconditional* baseline of the model's family, fitted on the train
  split's windows of the same (W, k, slice): a diagonal Gaussian for the MDN, uniform direction × LogNormal
  ‖Δ‖ for vMF × LogNormal (:mod:`latentdyn.models.baselines`); ``dnll = nll - nll_baseline`` (< 0: the
  context helps);
* ``cos``: ``cos(Δ̂, Δ)`` (norms floored at 1e-8);
* ``logmag_r2``: R² of ``log ‖Δ̂‖`` against ``log ‖Δ‖``, ``1 - Σ(log‖Δ̂‖ - log‖Δ‖)² / Σ(log‖Δ‖ - mean)²``;
* ``mag_ratio``: mean ``‖Δ̂‖ / ‖Δ‖`` (norms floored at 1e-8);
* extra keys: ``mse`` (mean over windows and dims of ``(ẑ - z)²`` with ``ẑ = state + Δ̂``), ``n_windows``.

``Δ̂`` is the model's point prediction chosen by ``predict`` (``median``: μ·e^m for vMF, the mixture mean for
the MDN; ``mean``: exact E[Δ]; ``sample``: one seeded draw).

Extra predictors, as rows next to the model's: ``persistence`` (``Δ̂ = 0``; no direction, so ``cos`` and
``logmag_r2`` are NaN) and ``linear`` extrapolation ``Δ̂ = velocity_scale · (z[a] - z[a-s])`` from the last two
context frames. Their density is the isotropic Gaussian ``N(Δ̂, σ² I)`` with σ² fitted by maximum likelihood
on the train windows. Sums are accumulated in float64 over batches, so no per-window arrays are kept.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentdyn.data.latent_store import LatentStore
from latentdyn.data.windows import (
    MEDIAL_RANGE,
    SLICES,
    TRAIN_SPLIT,
    WindowDataset,
    WindowSpec,
    iter_batches,
    subsample_anchors,
    window_anchors,
)
from latentdyn.jsonio import write_text_atomic
from latentdyn.models.baselines import Baseline, DiagonalGaussianBaseline
from latentdyn.models.protocol import DeltaModel, point_prediction

__all__ = [
    "BASELINES",
    "METRICS",
    "NORM_FLOOR",
    "PREDICTORS",
    "TABLES_FILE",
    "baseline_delta",
    "battery_metrics",
    "battery_table",
    "fit_baseline_variance",
    "fit_unconditional_baseline",
    "run_battery",
    "write_battery_table",
]

PREDICTORS = ("model", "persistence", "linear")
BASELINES = ("persistence", "linear")
METRICS = ("nll", "nll_baseline", "dnll", "cos", "logmag_r2", "mag_ratio", "mse", "n_windows")
NORM_FLOOR = 1e-8
#: Floor on a fitted isotropic variance, so a constant store (zero residuals) gives a finite NLL.
VARIANCE_FLOOR = 1e-12
TABLES_FILE = "tables.csv"
_ROW_KEYS = (
    "split",
    "slice",
    "predictor",
    "horizon",
    "context",
    "context_stride",
    "horizon_mode",
    "dim",
    *METRICS,
    "baseline_sigma2",
)
_LOG_2PI = math.log(2.0 * math.pi)


def baseline_delta(batch: dict[str, torch.Tensor], baseline: str, spec: WindowSpec) -> torch.Tensor:
    """A baseline's predicted delta ``(B, D)`` for a window batch (see the module docstring)."""
    if baseline == "persistence":
        return torch.zeros_like(batch["last"])
    if baseline == "linear":
        return spec.velocity_scale * (batch["context"][:, -1] - batch["prev"])
    raise ValueError(f"unknown baseline {baseline!r}; expected one of {BASELINES}")


def fit_baseline_variance(
    batches: Iterable[dict[str, torch.Tensor]], baseline: str, spec: WindowSpec
) -> float:
    """Maximum-likelihood isotropic variance of a baseline's residuals ``Δ - Δ̂`` over ``batches``.

    Returns ``max(mean over windows and dims of (Δ - Δ̂)², 1e-12)``; NaN when ``batches`` is empty.
    """
    total, count = 0.0, 0
    for batch in batches:
        resid = batch["target_delta"].double() - baseline_delta(batch, baseline, spec).double()
        total += float(resid.square().sum())
        count += resid.numel()
    if count == 0:
        return math.nan
    return max(total / count, VARIANCE_FLOOR)


def fit_unconditional_baseline(family: type, batches: Iterable[dict[str, torch.Tensor]]) -> Baseline:
    """Fit ``family`` (a class with ``fit(deltas)``, e.g. a head's ``baseline``) on the batches' deltas."""
    return family.fit(batch["target_delta"] for batch in batches)


def _model_device(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


class _Sums:
    """Float64 running sums of the battery's per-window quantities."""

    def __init__(self) -> None:
        self.n = self.n_values = 0
        self.totals = dict.fromkeys(
            ("nll", "nll_b", "cos", "ratio", "logmag_sq", "logy", "logy_sq", "sq"), 0.0
        )

    def add(self, key: str, values: torch.Tensor) -> None:
        self.totals[key] += float(values.double().sum())

    def mean(self, key: str, present: bool = True) -> float:
        return self.totals[key] / self.n if present and self.n > 0 else math.nan

    def logmag_r2(self) -> float:
        if self.n == 0:
            return math.nan
        ss_tot = self.totals["logy_sq"] - self.totals["logy"] ** 2 / self.n
        return 1.0 - self.totals["logmag_sq"] / ss_tot if ss_tot > 1e-12 else math.nan


def battery_metrics(
    model: DeltaModel | None,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    unconditional: Baseline | None = None,
    baseline: str | None = None,
    spec: WindowSpec | None = None,
    baseline_variance: float | None = None,
    predict: str = "median",
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """The battery's metrics of one predictor over window batches (from :class:`WindowDataset`).

    Args:
        model: the dynamics model, used when ``baseline`` is None (evaluated under ``no_grad`` on its device;
            the caller sets eval mode).
        batches: dicts with ``context`` ``(B, W, D)``, ``target_delta``, ``last``, ``target``, ``prev`` ``(B, D)``.
        unconditional: the fitted unconditional baseline for ``nll_baseline`` / ``dnll`` (NaN without it).
        baseline: ``"persistence"`` or ``"linear"`` to score that predictor instead of ``model``.
        spec: the window spec; needed by ``"linear"`` (its velocity scale).
        baseline_variance: the predictor baseline's isotropic variance σ² (e.g. :func:`fit_baseline_variance` on
            train windows); without it that predictor's ``nll`` is NaN.
        predict, generator: the model's point prediction (``median | mean | sample``), see the module docstring.

    Returns:
        the :data:`METRICS`; means are NaN over zero windows.
    """
    if baseline is None and model is None:
        raise ValueError("battery_metrics needs a model or a baseline")
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; expected one of {BASELINES}")
    if baseline == "linear" and spec is None:
        raise ValueError("the linear baseline needs the window spec (its velocity scale)")
    device = _model_device(model) if baseline is None else torch.device("cpu")
    has_density = baseline is None or baseline_variance is not None
    has_direction = baseline != "persistence"
    sums = _Sums()
    for batch in batches:
        delta = batch["target_delta"].to(device)
        if baseline is None:
            with torch.no_grad():
                pred = model.predictive(batch["context"].to(device))
                log_prob = pred.log_prob(delta).double()
                point = point_prediction(pred, predict, generator=generator).double()
        else:
            point = baseline_delta(batch, baseline, spec).to(device).double()
            if baseline_variance is not None:
                var = float(baseline_variance)
                resid_sq = (delta.double() - point).square().sum(-1)
                log_prob = -0.5 * delta.shape[-1] * (_LOG_2PI + math.log(var)) - 0.5 * resid_sq / var
        delta = delta.double()
        if has_density:
            sums.add("nll", -log_prob)
        if unconditional is not None:
            sums.add("nll_b", -unconditional.log_prob(delta).double())
        pred_norm = point.norm(dim=-1).clamp_min(NORM_FLOOR)
        true_norm = delta.norm(dim=-1).clamp_min(NORM_FLOOR)
        sums.add("cos", (point * delta).sum(-1) / (pred_norm * true_norm))
        sums.add("ratio", pred_norm / true_norm)
        sums.add("logmag_sq", (pred_norm.log() - true_norm.log()).square())
        sums.add("logy", true_norm.log())
        sums.add("logy_sq", true_norm.log().square())
        target_hat = batch["last"].to(device).double() + point
        sums.add("sq", (target_hat - batch["target"].to(device).double()).square())
        sums.n += delta.shape[0]
        sums.n_values += delta.numel()

    nll = sums.mean("nll", has_density)
    nll_baseline = sums.mean("nll_b", unconditional is not None)
    return {
        "nll": nll,
        "nll_baseline": nll_baseline,
        "dnll": nll - nll_baseline,
        "cos": sums.mean("cos", has_direction),
        "logmag_r2": sums.logmag_r2() if has_direction else math.nan,
        "mag_ratio": sums.mean("ratio"),
        "mse": sums.totals["sq"] / sums.n_values if sums.n_values else math.nan,
        "n_windows": float(sums.n),
    }


def _check_model_spec(model: Any, spec: WindowSpec) -> None:
    for attr in ("context", "horizon", "context_stride", "horizon_mode"):
        value = getattr(model, attr, None)
        if value is not None and value != getattr(spec, attr):
            raise ValueError(
                f"model.{attr} = {value} but the battery's window spec has {getattr(spec, attr)}"
            )


def run_battery(
    model: DeltaModel | None,
    store: LatentStore | str | Path,
    spec: WindowSpec,
    split: str = "test",
    slices: Sequence[str] = SLICES,
    batch_size: int = 1024,
    energy_percentile: float = 50.0,
    medial_range: Sequence[float] = MEDIAL_RANGE,
    max_windows: int | None = 50000,
    seed: int = 0,
    standardize: bool = False,
    predict: str = "median",
) -> list[dict[str, Any]]:
    """The Phase 1 battery of ``model`` (or only the baselines when None) on ``split``, per slice.

    Each slice's windows are capped at ``max_windows`` by a seeded uniform subset; the unconditional baseline
    (the model head's ``baseline`` family; a diagonal Gaussian without a model) and the predictor baselines'
    variances are fitted on the train split's windows of the same slice (capped the same way). Windows are in
    the model's space (``standardize``). A model's geometry must match ``spec``.

    Returns:
        one row per (slice, predictor), predictors in :data:`PREDICTORS` order (``model`` only when given),
        with ``split``, ``slice``, ``predictor``, the window geometry, ``dim``, the :data:`METRICS` and
        ``baseline_sigma2`` (the fitted σ² of a predictor baseline's row, NaN for the model).
    """
    store = store if isinstance(store, LatentStore) else LatentStore(Path(store))
    if model is not None:
        _check_model_spec(model, spec)
    family = getattr(model, "baseline", DiagonalGaussianBaseline)
    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()
    window_kwargs = dict(energy_percentile=energy_percentile, medial_range=medial_range)
    generator = (
        torch.Generator(device=_model_device(model)).manual_seed(seed) if predict == "sample" else None
    )

    def windows_of(which: str, slice_name: str) -> WindowDataset:
        anchors = window_anchors(store, which, spec, slice_name, **window_kwargs)
        return WindowDataset(store, subsample_anchors(anchors, max_windows, seed), spec, standardize)

    def batches(windows: WindowDataset) -> Iterator[dict[str, torch.Tensor]]:
        return iter_batches(windows, batch_size)

    rows: list[dict[str, Any]] = []
    try:
        for slice_name in slices:
            windows, fit_windows = windows_of(split, slice_name), windows_of(TRAIN_SPLIT, slice_name)
            unconditional = (
                fit_unconditional_baseline(family, batches(fit_windows)) if len(fit_windows) > 0 else None
            )
            base = dict(
                split=split,
                slice=slice_name,
                horizon=spec.horizon,
                context=spec.context,
                context_stride=spec.context_stride,
                horizon_mode=spec.horizon_mode,
                dim=store.dim,
            )
            if model is not None:
                metrics = battery_metrics(
                    model, batches(windows), unconditional=unconditional, predict=predict, generator=generator
                )
                rows.append({**base, "predictor": "model", **metrics, "baseline_sigma2": math.nan})
            for name in BASELINES:
                var = fit_baseline_variance(batches(fit_windows), name, spec)
                metrics = battery_metrics(
                    None,
                    batches(windows),
                    unconditional=unconditional,
                    baseline=name,
                    spec=spec,
                    baseline_variance=None if math.isnan(var) else var,
                )
                rows.append({**base, "predictor": name, **metrics, "baseline_sigma2": var})
    finally:
        if was_training:
            model.train()
    return [{k: row[k] for k in _ROW_KEYS} for row in rows]


def _format(value: Any) -> str:
    if isinstance(value, float | np.floating):
        value = float(value)
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    return str(value)


def battery_table(rows: Sequence[dict[str, Any]]) -> str:
    """CSV text (header + one line per row) of battery rows; columns in the rows' key order, floats exact
    (``repr``, integral values without ``.0``, NaN as ``nan``)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_format(row.get(c, "")) for c in columns])
    return buf.getvalue()


def write_battery_table(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> Path:
    """Write :func:`battery_table` to ``out_dir/tables.csv`` (directory created if needed); return the path."""
    path = Path(out_dir) / TABLES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, battery_table(rows))
    return path
