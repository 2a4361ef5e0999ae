"""Phase 1 battery (DESIGN §9): one-step metrics of a dynamics model and two baselines, per slice.

For each window (anchor ``t``, horizon ``k``, context stride ``s``) the ground-truth delta is
``Δ = z[t+k] - z[t]`` in the store's standardised space (``(z - mean) / std`` with train statistics), and a
predictor gives a point prediction ``Δ̂`` and, where it has one, a density. Metrics, averaged over windows:

* ``nll_per_dim``: ``-log p(Δ) / D`` in nats;
* ``direction_cosine``: ``cos(d̂, Δ)`` of the predicted direction ``d̂`` (norms floored at 1e-8, so a
  zero prediction or a zero true delta scores 0);
* ``magnitude_log_error``: ``|log max(‖Δ̂‖, 1e-8) - log max(‖Δ‖, 1e-8)|`` with ``‖Δ̂‖`` the predicted norm;
* ``mse``: mean over windows and dimensions of ``(ẑ[t+k] - z[t+k])²`` with ``ẑ[t+k] = z[t] + Δ̂``;
* ``n_windows``.

Predictors:

* ``model``: a :class:`~latentdyn.models.protocol.DeltaModel`; ``Δ̂ = predictive.mean()``,
  ``d̂ = predictive.direction()``, ``‖Δ̂‖ = predictive.magnitude()``, density ``predictive.log_prob``;
* ``persistence``: ``Δ̂ = 0``. It has no direction and no norm, so ``direction_cosine`` and
  ``magnitude_log_error`` are NaN (the floored log of a zero norm would only measure the floor);
* ``linear`` extrapolation from the last two context frames: ``Δ̂ = (k/s)(z[t] - z[t-s])``; ``d̂`` and the
  norm are those of ``Δ̂``. (With ``W = 1`` the frame ``z[t-s]`` comes from the store; at an utterance's first
  frame it does not exist and the velocity is taken as 0, see :class:`~latentdyn.data.windows.WindowDataset`.)

Baseline densities: each baseline gets the isotropic Gaussian ``N(Δ̂, σ² I)`` whose variance is the maximum
likelihood fit on the *train* split's windows of the same slice (same window spec):
``σ² = mean over windows and dimensions of (Δ - Δ̂)²``. Its NLL per dimension is therefore directly
comparable with the model's: ``½ log(2πσ²) + ‖Δ - Δ̂‖² / (2σ²D)``. Sums are accumulated in float64 over
batches, so no per-window arrays are kept.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentdyn.data.latent_store import LatentStore
from latentdyn.data.windows import (
    SLICES,
    TRAIN_SPLIT,
    WindowDataset,
    WindowSpec,
    iter_batches,
    subsample_anchors,
    window_anchors,
)
from latentdyn.models.protocol import DeltaModel

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
    "run_battery",
    "write_battery_table",
]

PREDICTORS = ("model", "persistence", "linear")
BASELINES = ("persistence", "linear")
METRICS = ("nll_per_dim", "direction_cosine", "magnitude_log_error", "mse", "n_windows")
NORM_FLOOR = 1e-8
#: Floor on a fitted baseline variance, so a constant store (zero residuals) gives a finite NLL.
VARIANCE_FLOOR = 1e-12
TABLES_FILE = "tables.csv"
_ROW_KEYS = (
    "split",
    "slice",
    "predictor",
    "horizon",
    "context",
    "context_stride",
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
        return (spec.horizon / spec.context_stride) * (batch["last"] - batch["prev"])
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


def _model_device(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _cosine(direction: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine ``(B,)`` with both norms floored at :data:`NORM_FLOOR`."""
    dots = (direction * delta).sum(-1)
    return dots / (direction.norm(dim=-1).clamp_min(NORM_FLOOR) * delta.norm(dim=-1).clamp_min(NORM_FLOOR))


def _log_norm_error(pred_norm: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (pred_norm.clamp_min(NORM_FLOOR).log() - delta.norm(dim=-1).clamp_min(NORM_FLOOR).log()).abs()


def battery_metrics(
    model: DeltaModel | None,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    baseline: str | None = None,
    spec: WindowSpec | None = None,
    baseline_variance: float | None = None,
) -> dict[str, float]:
    """The battery's metrics of one predictor over window batches (from :class:`WindowDataset`).

    Args:
        model: the dynamics model, used when ``baseline`` is None (evaluated under ``no_grad`` on its device;
            the caller sets eval mode).
        batches: dicts with at least ``context`` ``(B, W, D)``, ``target_delta``, ``last``, ``prev`` ``(B, D)``.
        baseline: ``"persistence"`` or ``"linear"`` to score a baseline instead of ``model``.
        spec: the window spec; needed by ``"linear"`` for its ``k/s`` scaling.
        baseline_variance: the baseline's isotropic Gaussian variance σ² (standardised units²), e.g. from
            :func:`fit_baseline_variance` on train windows; without it the baseline's NLL is NaN.

    Returns:
        ``{"nll_per_dim", "direction_cosine", "magnitude_log_error", "mse", "n_windows"}``; means are NaN over
        zero windows.
    """
    if baseline is None and model is None:
        raise ValueError("battery_metrics needs a model or a baseline")
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; expected one of {BASELINES}")
    if baseline == "linear" and spec is None:
        raise ValueError("the linear baseline needs the window spec (its k/s scaling)")
    device = _model_device(model) if baseline is None else torch.device("cpu")
    has_density = baseline is None or baseline_variance is not None
    has_direction = baseline != "persistence"
    sums = dict.fromkeys(("nll", "cos", "mag", "sq"), 0.0)
    n_windows = n_values = 0
    for batch in batches:
        delta = batch["target_delta"].to(device)
        if baseline is None:
            with torch.no_grad():
                pred = model.predictive(batch["context"].to(device))
                log_prob = pred.log_prob(delta).double()
                mean = pred.mean().double()
                direction = pred.direction().double()
                norm = pred.magnitude().double()
        else:
            mean = baseline_delta(batch, baseline, spec).double()
            direction, norm = mean, mean.norm(dim=-1)
            if baseline_variance is not None:
                var = float(baseline_variance)
                resid_sq = (delta.double() - mean).square().sum(-1)
                log_prob = -0.5 * delta.shape[-1] * (_LOG_2PI + math.log(var)) - 0.5 * resid_sq / var
        delta = delta.double()
        dim = delta.shape[-1]
        if has_density:
            sums["nll"] += float((-log_prob / dim).sum())
        if has_direction:
            sums["cos"] += float(_cosine(direction, delta).sum())
            sums["mag"] += float(_log_norm_error(norm, delta).sum())
        target_hat = batch["last"].to(device).double() + mean
        sums["sq"] += float((target_hat - batch["target"].to(device).double()).square().sum())
        n_windows += delta.shape[0]
        n_values += delta.numel()

    def mean_of(key: str, count: int, present: bool = True) -> float:
        return sums[key] / count if present and count > 0 else math.nan

    return {
        "nll_per_dim": mean_of("nll", n_windows, has_density),
        "direction_cosine": mean_of("cos", n_windows, has_direction),
        "magnitude_log_error": mean_of("mag", n_windows, has_direction),
        "mse": mean_of("sq", n_values),
        "n_windows": float(n_windows),
    }


def _check_model_spec(model: Any, spec: WindowSpec) -> None:
    for attr in ("context", "horizon", "context_stride"):
        value = getattr(model, attr, None)
        if value is not None and int(value) != getattr(spec, attr):
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
    edge_frames: int = 4,
    max_windows: int | None = 50000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The Phase 1 battery of ``model`` (or only the baselines when None) on ``split``, per slice.

    Each slice's windows are capped at ``max_windows`` by a seeded uniform subset; the baselines'
    variances are fitted on the train split's windows of the same slice (capped the same way).
    A model with ``context``/``horizon``/``context_stride`` attributes must match ``spec``.

    Returns:
        one row per (slice, predictor), predictors in :data:`PREDICTORS` order (``model`` only when given),
        with ``split``, ``slice``, ``predictor``, ``horizon``, ``context``, ``context_stride``, ``dim``, the
        :data:`METRICS` and ``baseline_sigma2`` (the fitted σ² of a baseline row, NaN for the model).
    """
    store = store if isinstance(store, LatentStore) else LatentStore(Path(store))
    if model is not None:
        _check_model_spec(model, spec)
    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()
    window_kwargs = dict(energy_percentile=energy_percentile, edge_frames=edge_frames)
    rows: list[dict[str, Any]] = []
    try:
        for slice_name in slices:
            anchors = window_anchors(store, split, spec, slice_name, **window_kwargs)
            windows = WindowDataset(store, subsample_anchors(anchors, max_windows, seed), spec)
            fit_anchors = window_anchors(store, TRAIN_SPLIT, spec, slice_name, **window_kwargs)
            fit_windows = WindowDataset(store, subsample_anchors(fit_anchors, max_windows, seed), spec)
            base = dict(
                split=split,
                slice=slice_name,
                horizon=spec.horizon,
                context=spec.context,
                context_stride=spec.context_stride,
                dim=store.dim,
            )
            if model is not None:
                metrics = battery_metrics(model, iter_batches(windows, batch_size))
                rows.append({**base, "predictor": "model", **metrics, "baseline_sigma2": math.nan})
            for name in BASELINES:
                var = fit_baseline_variance(iter_batches(fit_windows, batch_size), name, spec)
                metrics = battery_metrics(
                    None,
                    iter_batches(windows, batch_size),
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
    path.write_text(battery_table(rows))
    return path
