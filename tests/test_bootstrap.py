"""The percentile bootstrap CI of a mean against scipy's and closed forms, and per-seed rows -> summary rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from latentdyn.statistics import aggregate_seeds, bootstrap_ci, mean_and_ci


def _scipy_ci(x: np.ndarray, confidence: float, seed: int) -> tuple[float, float]:
    res = stats.bootstrap(
        (x,),
        np.mean,
        confidence_level=confidence,
        n_resamples=20_000,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


@pytest.mark.parametrize(("n", "confidence"), [(8, 0.95), (30, 0.95), (30, 0.8), (200, 0.9)])
def test_matches_scipy_percentile_bootstrap(n: int, confidence: float) -> None:
    x = np.random.default_rng(n).gamma(2.0, 1.5, size=n)  # skewed: the percentile interval is asymmetric
    low, high = bootstrap_ci(x, confidence=confidence, n_resamples=20_000, seed=1)
    ref_low, ref_high = _scipy_ci(x, confidence, seed=2)
    # Monte-Carlo tolerance: a few per cent of the standard error of the mean.
    sem = x.std(ddof=1) / math.sqrt(n)
    assert low == pytest.approx(ref_low, abs=0.08 * sem)
    assert high == pytest.approx(ref_high, abs=0.08 * sem)
    # And the normal-theory width as a sanity bound (bootstrap is narrower by about sqrt((n - 1) / n)).
    z = stats.norm.ppf(0.5 + confidence / 2)
    assert high - low == pytest.approx(2 * z * sem, rel=0.25)


def test_is_deterministic_for_its_seed() -> None:
    x = [1.0, 4.0, 2.5, 7.0, 3.0]
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    assert bootstrap_ci(x, n_resamples=200, seed=3) != bootstrap_ci(x, n_resamples=200, seed=4)


def test_closed_forms() -> None:
    # One value: the value; constant data: a zero-width interval at it.
    assert bootstrap_ci([2.5]) == (2.5, 2.5)
    assert bootstrap_ci([0.1] * 5) == (0.1, 0.1)
    # Two or three values: a resample of all-lowest (all-highest) values has probability 1/n^n > 2.5 %,
    # so the 95 % percentile interval is [min, max].
    assert bootstrap_ci([3.0, 1.0]) == (1.0, 3.0)
    assert bootstrap_ci([3.0, 1.0, 2.0]) == (1.0, 3.0)
    # The interval contains the mean and widens with the spread.
    rng = np.random.default_rng(0)
    base = rng.normal(size=20)
    low, high = bootstrap_ci(base)
    assert low < base.mean() < high
    wide_low, wide_high = bootstrap_ci(5.0 * base)
    assert wide_high - wide_low == pytest.approx(5.0 * (high - low), rel=1e-9)  # same resamples, scaled
    # Shifting the data shifts the interval.
    shifted = bootstrap_ci(base + 10.0)
    assert shifted[0] == pytest.approx(low + 10.0) and shifted[1] == pytest.approx(high + 10.0)


def test_non_finite_values_and_bad_arguments() -> None:
    assert all(math.isnan(v) for v in bootstrap_ci([1.0, math.nan, 2.0]))
    mean, low, high = mean_and_ci([1.0, math.nan])
    assert math.isnan(mean) and math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci([1.0, 2.0], n_resamples=0)


def test_aggregate_seeds_gives_one_row_per_variant_with_means_and_cis() -> None:
    rng = np.random.default_rng(7)
    values = {("raw", 80): rng.normal(size=3), ("pca2", 2): rng.normal(size=3)}
    rows = []
    for seed in (0, 1, 2):
        for (variant, dim), v in values.items():
            rows.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "dim": dim,
                    "representation": "mel",
                    "k1_dnll": float(v[seed]),
                    "fraction": 0.5,
                    "count": 4,
                }
            )
    out = aggregate_seeds(rows, ("variant", "dim"), n_resamples=5_000, bootstrap_seed=0)
    assert [r["variant"] for r in out] == ["raw", "pca2"]
    for row in out:
        v = values[(row["variant"], row["dim"])]
        assert row["n_seeds"] == 3 and row["representation"] == "mel" and "seed" not in row
        assert row["k1_dnll"] == pytest.approx(np.mean(v))
        # The percentile bootstrap of three values: exactly [min, max] (see test_closed_forms), computed here
        # with numpy on the same data.
        idx = np.random.default_rng(0).integers(0, 3, size=(5_000, 3))
        expected = np.quantile(v[idx].mean(axis=1), [0.025, 0.975])
        assert (row["k1_dnll_ci_low"], row["k1_dnll_ci_high"]) == pytest.approx(tuple(expected))
        assert (row["k1_dnll_ci_low"], row["k1_dnll_ci_high"]) == pytest.approx((v.min(), v.max()))
        assert row["k1_dnll_ci_low"] <= row["k1_dnll"] <= row["k1_dnll_ci_high"]
        # A seed-independent value: its mean with a zero-width interval.
        assert (row["fraction"], row["fraction_ci_low"], row["fraction_ci_high"]) == (0.5, 0.5, 0.5)
        assert row["count"] == 4
    assert list(out[0])[:3] == ["variant", "dim", "n_seeds"]


def test_aggregate_seeds_with_one_seed_and_missing_values() -> None:
    rows = [{"condition": "a", "k": 1, "seed": 0, "err": 2.0, "cos": None, "note": "x"}]
    (row,) = aggregate_seeds(rows, ("condition", "sigma", "k"))
    assert row["n_seeds"] == 1 and (row["err"], row["err_ci_low"], row["err_ci_high"]) == (2.0, 2.0, 2.0)
    assert row["cos"] is None and row["note"] == "x" and "sigma" not in row
    two = rows + [{"condition": "a", "k": 1, "seed": 1, "err": 4.0, "cos": 0.5}]
    (row,) = aggregate_seeds(two, ("condition", "sigma", "k"))
    assert row["err"] == 3.0 and math.isnan(row["cos"])  # a missing value is NaN, as in any mean


def test_aggregate_seeds_refuses_keys_that_do_not_tell_variants_apart() -> None:
    rows = [{"variant": "a", "seed": 0, "x": 1.0, "k": 1}, {"variant": "a", "seed": 0, "x": 2.0, "k": 2}]
    with pytest.raises(ValueError, match="seed repeats"):
        aggregate_seeds(rows, ("variant",))
    assert len(aggregate_seeds(rows, ("variant", "k"))) == 2
