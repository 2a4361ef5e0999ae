"""Statistics across repeated runs: the percentile bootstrap CI of a mean, and per-seed rows -> one row per variant.

DESIGN §9 (rigour): headline comparisons over several seeds with mean ± 95 % bootstrap CIs. A variant run once
per seed gives one value of each metric per seed; :func:`aggregate_seeds` turns those rows into one row per
variant with, for each numeric metric ``m``, the mean ``m`` and the bounds ``m_ci_low`` / ``m_ci_high`` of the
percentile bootstrap CI of the mean (:func:`bootstrap_ci`), plus ``n_seeds``.

With few seeds the percentile bootstrap is coarse: for 2 or 3 values its 95 % interval is exactly
``[min, max]`` of them (a resample of all-lowest values has probability 1/n^n > 2.5 %). It says how far the
seeds disagree, not a calibrated interval; more seeds narrow it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

CI_LOW = "_ci_low"
CI_HIGH = "_ci_high"
N_SEEDS = "n_seeds"
#: Resample-index elements drawn per chunk (bounds the memory of a bootstrap of many values).
_CHUNK_ELEMENTS = 4_000_000


def bootstrap_ci(
    values: Iterable[float], confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """The percentile bootstrap ``confidence`` interval ``(low, high)`` of the mean of ``values``.

    ``n_resamples`` resamples with replacement (each of ``len(values)`` draws) from ``default_rng(seed)``, so the
    result is deterministic for a seed; ``low``/``high`` are the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` quantiles of the resample means. One value, or all values equal: ``low = high`` =
    the value. A non-finite value makes both bounds NaN (no interval is meaningful).
    """
    x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if isinstance(n_resamples, bool) or int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive int, got {n_resamples!r}")
    if not np.all(np.isfinite(x)):
        return math.nan, math.nan
    if x.size == 1 or np.all(x == x[0]):
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    n = x.size
    per_chunk = max(1, _CHUNK_ELEMENTS // n)
    means = np.empty(int(n_resamples), dtype=np.float64)
    for start in range(0, int(n_resamples), per_chunk):
        stop = min(int(n_resamples), start + per_chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = x[idx].mean(axis=1)
    tail = (1.0 - float(confidence)) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def mean_and_ci(
    values: Sequence[float], confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean, low, high)`` of ``values`` (see :func:`bootstrap_ci`); the mean is exact for equal values, and
    NaN / inf propagate into it as into any mean."""
    x = np.asarray(values, dtype=np.float64)
    if x.size and np.all(x == x[0]):
        mean = float(x[0])
    else:
        with np.errstate(invalid="ignore"):
            mean = float(np.mean(x))
    low, high = bootstrap_ci(x, confidence, n_resamples, seed)
    return mean, low, high


def aggregate_seeds(
    rows: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    *,
    seed_key: str = "seed",
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    bootstrap_seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per variant from per-seed ``rows``.

    Rows are grouped by their values of ``keys`` (the columns that name a variant: a missing key counts as
    ``None``), in first-seen order. Each group's row has the keys, ``n_seeds`` (distinct ``seed_key`` values),
    and for every other column: when its values are numbers (``None`` counts as NaN), the mean under the same
    name with ``<name>_ci_low`` / ``<name>_ci_high`` beside it (:func:`bootstrap_ci` with ``confidence``,
    ``n_resamples`` and ``bootstrap_seed``); otherwise the first row's value (a label). A seed repeated within a
    group is a ValueError: ``keys`` do not tell the variants apart.
    """
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    out: list[dict[str, Any]] = []
    for ident, group in groups.items():
        seeds = [r.get(seed_key) for r in group]
        if len(set(seeds)) != len(seeds):
            raise ValueError(
                f"aggregate_seeds: {dict(zip(keys, ident, strict=True))} has seeds {seeds}: a seed repeats, "
                f"so the keys {list(keys)} do not tell the variants apart"
            )
        row: dict[str, Any] = {k: v for k, v in zip(keys, ident, strict=True) if any(k in r for r in group)}
        row[N_SEEDS] = len(group)
        columns: list[str] = []
        for r in group:
            columns.extend(c for c in r if c not in columns and c not in keys and c != seed_key)
        for column in columns:
            values = [r.get(column) for r in group if column in r]
            numeric = [v for v in values if v is not None]
            if numeric and all(_is_number(v) for v in numeric):
                floats = [math.nan if v is None else float(v) for v in values]
                mean, low, high = mean_and_ci(floats, confidence, n_resamples, bootstrap_seed)
                row[column] = mean
                row[column + CI_LOW] = low
                row[column + CI_HIGH] = high
            else:
                row[column] = values[0]
        out.append(row)
    return out
