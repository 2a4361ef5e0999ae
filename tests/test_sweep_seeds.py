"""Sweep summaries of sweeps that vary ``seed`` (``latentdyn -m ... seed=0,1,2``): one row per setting with each
metric's mean and 95 % bootstrap CI across seeds, hand-built sweep directories (tests/test_sweep_summary.py).

The main fixture: ``hydra.sweeper.params`` ``correction.n_steps: 1,3`` and ``correction.sigma: 0.05,0.1`` with
``seed=0,1,2`` on the command line, 12 jobs numbered n_steps-major (job = 6*i_n + 3*i_sigma + seed), all
completed but job 5 (n_steps=1, sigma=0.1, seed 2: failed). The per-seed errors (``ERR``) are chosen so the best
single job (job 3, 0.05) is not in the best setting by mean:

    n_steps sigma  ERR per seed          mean
    1       0.05   0.50 0.40 0.30        0.40
    1       0.1    0.05 0.95 (failed)    0.50  (2 seeds)
    3       0.05   0.35 0.36 0.37        0.36  <- best
    3       0.1    0.60 0.70 0.90        0.7333
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from latentdyn import statistics
from latentdyn.tracking import sweep as sweep_module
from latentdyn.tracking.results import main
from latentdyn.tracking.sweep import (
    format_summary,
    group_by_setting,
    has_seed_axis,
    heatmap_panels,
    load_sweep,
    setting_records,
    write_sweep_summary,
)
from tests.test_sweep_summary import _dead_pid, _metrics, write_job, write_multirun

EXPERIMENT = "exp6_score_correction"
ERR, DNLL, RATIO = "D_corrected/state_err_at_K", "D_corrected/dnll", "corrected_vs_rollout/state_err_at_K"
SPEC = {"rank_by": [ERR, DNLL], "columns": [ERR, DNLL, RATIO], "heatmap": {"metric": RATIO, "center": 1.0}}
PARAMS = {"correction.n_steps": "1,3", "correction.sigma": "0.05,0.1"}
GROUP_KEYS = ["correction.n_steps", "correction.sigma"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

#: (n_steps, sigma) -> per-seed (err, dnll, ratio); None: that seed's job failed.
VALUES: dict[tuple[int, float], list[tuple[float, float, float] | None]] = {
    (1, 0.05): [(0.50, 0.20, 0.8), (0.40, 0.30, 0.9), (0.30, 0.10, 1.1)],
    (1, 0.1): [(0.05, 0.05, 0.5), (0.95, 0.60, 1.5), None],
    (3, 0.05): [(0.35, 0.12, 0.7), (0.36, 0.11, 0.75), (0.37, 0.13, 0.72)],
    (3, 0.1): [(0.60, 0.40, 1.2), (0.70, 0.45, 1.3), (0.90, 0.50, 1.6)],
}


def _overrides(n_steps: int, sigma: float, seed: int) -> list[str]:
    return [
        f"correction.n_steps={n_steps}",
        f"correction.sigma={sigma}",
        f"experiment={EXPERIMENT}",
        f"seed={seed}",
    ]


@pytest.fixture
def seed_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "multirun" / EXPERIMENT / "ss"
    write_multirun(sweep, PARAMS, [f"experiment={EXPERIMENT}", "seed=0,1,2"])
    num = 0
    for (n_steps, sigma), per_seed in VALUES.items():
        for seed, values in enumerate(per_seed):
            overrides = _overrides(n_steps, sigma, seed)
            if values is None:
                error = {"type": "FloatingPointError", "message": "rollout diverged"}
                write_job(sweep, num, overrides, "failed", error=error, spec=SPEC)
            else:
                err, dnll, ratio = values
                write_job(sweep, num, overrides, "completed", _metrics(err, dnll, ratio), spec=SPEC)
            num += 1
    return sweep


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _bootstrap(values: list[float], n_resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """The mean and the 95 % percentile bootstrap CI of the mean, written out in numpy (the same draws as
    latentdyn.statistics: ``default_rng(seed).integers(0, n, (n_resamples, n))``)."""
    x = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_resamples, x.size))
    low, high = np.quantile(x[idx].mean(axis=1), [0.025, 0.975])
    return float(x.mean()), float(low), float(high)


def test_jobs_are_grouped_by_every_swept_key_but_seed(seed_sweep: Path) -> None:
    sweep = load_sweep(seed_sweep)
    assert sweep.swept_keys == [*GROUP_KEYS, "seed"] and has_seed_axis(sweep.jobs, sweep.swept_keys)
    keys, groups = group_by_setting(sweep.jobs, sweep.swept_keys)
    assert keys == GROUP_KEYS
    assert [g.settings for g in groups] == [
        {"correction.n_steps": 1, "correction.sigma": 0.05},
        {"correction.n_steps": 1, "correction.sigma": 0.1},
        {"correction.n_steps": 3, "correction.sigma": 0.05},
        {"correction.n_steps": 3, "correction.sigma": 0.1},
    ]
    assert [[j.job for j in g.jobs] for g in groups] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert [g.n_seeds for g in groups] == [3, 2, 3, 3] and groups[1].seeds == [0, 1]
    assert [g.status for g in groups] == ["completed", "partial", "completed", "completed"]

    summary = write_sweep_summary(seed_sweep)
    rows = _read_csv(seed_sweep / "summary.csv")
    assert len(rows) == 4 and summary.group_keys == GROUP_KEYS
    with (seed_sweep / "summary.csv").open(newline="") as fh:
        header = next(csv.reader(fh))
    bounds = [f"{m}{s}" for m in (ERR, DNLL, RATIO) for s in ("", "_ci_low", "_ci_high")]
    assert header == ["rank", *GROUP_KEYS, "status", "n_seeds", "seeds", *bounds, "jobs", "incomplete"]
    # The per-job table keeps its columns (the seed among the settings) under summary_per_seed.csv.
    per_job = _read_csv(seed_sweep / "summary_per_seed.csv")
    assert len(per_job) == 12 and list(per_job[0])[:6] == ["rank", "job", "status", *GROUP_KEYS, "seed"]
    assert summary.per_seed_csv_path == seed_sweep.resolve() / "summary_per_seed.csv"


def test_means_and_cis_equal_an_independent_computation(seed_sweep: Path) -> None:
    import scipy.stats

    write_sweep_summary(seed_sweep)
    rows = {
        (r["correction.n_steps"], r["correction.sigma"]): r for r in _read_csv(seed_sweep / "summary.csv")
    }
    for (n_steps, sigma), per_seed in VALUES.items():
        row = rows[(str(n_steps), str(sigma))]
        done = [v for v in per_seed if v is not None]
        assert int(row["n_seeds"]) == len(done)
        for col, metric in enumerate((ERR, DNLL, RATIO)):
            values = [v[col] for v in done]
            mean, low, high = _bootstrap(values)
            assert float(row[metric]) == pytest.approx(mean, rel=1e-12)
            assert float(row[f"{metric}_ci_low"]) == pytest.approx(low, rel=1e-12)
            assert float(row[f"{metric}_ci_high"]) == pytest.approx(high, rel=1e-12)
            # With 2 or 3 seeds the 95 % percentile interval is exactly [min, max] of them.
            assert (low, high) == pytest.approx((min(values), max(values)), abs=1e-12)
            # scipy's percentile bootstrap (other draws) agrees on the mean's interval.
            ci = scipy.stats.bootstrap(
                (np.asarray(values),), np.mean, method="percentile", n_resamples=10_000, random_state=1
            ).confidence_interval
            assert (ci.low, ci.high) == pytest.approx((low, high), abs=1e-12)
    doc = json.loads((seed_sweep / "sweep_results.json").read_text())
    group = next(
        g for g in doc["groups"] if g["settings"] == {"correction.n_steps": 3, "correction.sigma": 0.1}
    )
    assert group["metrics"][ERR] == pytest.approx(np.mean([0.6, 0.7, 0.9]))
    assert group["n_seeds"] == 3 and group["seeds"] == [0, 1, 2] and group["jobs"] == [9, 10, 11]


def test_many_seeds_give_a_ci_inside_the_range_matching_numpy(tmp_path: Path) -> None:
    sweep = tmp_path / "sw"
    errs = [0.31, 0.52, 0.28, 0.45, 0.39, 0.61, 0.33, 0.47]
    write_multirun(sweep, {"seed": ",".join(str(s) for s in range(len(errs)))}, [f"experiment={EXPERIMENT}"])
    for seed, err in enumerate(errs):
        overrides = [f"seed={seed}", f"experiment={EXPERIMENT}"]
        write_job(sweep, seed, overrides, "completed", {ERR: err}, spec={"rank_by": [ERR]})
    summary = write_sweep_summary(sweep)
    assert summary.group_keys == [] and summary.groups is not None and len(summary.groups) == 1
    (row,) = _read_csv(sweep / "summary.csv")
    mean, low, high = _bootstrap(errs)
    assert float(row[ERR]) == pytest.approx(mean) and row["n_seeds"] == str(len(errs))
    assert (float(row[f"{ERR}_ci_low"]), float(row[f"{ERR}_ci_high"])) == pytest.approx((low, high))
    assert min(errs) < low < mean < high < max(errs)
    assert (low, high) == statistics.bootstrap_ci(errs)
    assert "best: the only setting (8 seeds)" in format_summary(summary)


def test_settings_are_ranked_by_their_means(seed_sweep: Path) -> None:
    summary = write_sweep_summary(seed_sweep)
    assert summary.groups is not None
    order = [(g.settings["correction.n_steps"], g.settings["correction.sigma"]) for g in summary.groups]
    # Means of ERR: (3, 0.05) 0.36 < (1, 0.05) 0.40 < (1, 0.1) 0.50 < (3, 0.1) 0.733; the best single job
    # (job 3, 0.05) belongs to (1, 0.1).
    assert order == [(3, 0.05), (1, 0.05), (1, 0.1), (3, 0.1)]
    assert [g.rank for g in summary.groups] == [1, 2, 3, 4]
    assert summary.best is not None and summary.best.job == 3  # the per-job ranking is kept
    assert summary.best_group is summary.groups[0]
    rows = _read_csv(seed_sweep / "summary.csv")
    assert [(r["rank"], r["correction.n_steps"], r["correction.sigma"]) for r in rows] == [
        ("1", "3", "0.05"),
        ("2", "1", "0.05"),
        ("3", "1", "0.1"),
        ("4", "3", "0.1"),
    ]
    doc = json.loads((seed_sweep / "sweep_results.json").read_text())
    assert doc["best_group"]["settings"] == {"correction.n_steps": 3, "correction.sigma": 0.05}
    assert [g["rank"] for g in doc["groups"]] == [1, 2, 3, 4] and doc["group_keys"] == GROUP_KEYS
    assert doc["best_job"] == 3 and len(doc["jobs"]) == 12  # every job, as before


def test_a_failed_seed_is_left_out_and_listed(seed_sweep: Path) -> None:
    summary = write_sweep_summary(seed_sweep)
    row = next(
        r
        for r in _read_csv(seed_sweep / "summary.csv")
        if r["correction.sigma"] == "0.1" and r["rank"] == "3"
    )
    assert row["correction.n_steps"] == "1" and row["status"] == "partial"
    assert row["n_seeds"] == "2" and row["seeds"] == "0 1" and row["jobs"] == "3 4 5"
    assert float(row[ERR]) == pytest.approx(0.5)
    assert row["incomplete"] == "seed=2 (job 5): failed: FloatingPointError: rollout diverged"
    doc = json.loads((seed_sweep / "sweep_results.json").read_text())
    group = next(g for g in doc["groups"] if g["jobs"] == [3, 4, 5])
    assert group["incomplete"] == [
        {"job": 5, "seed": 2, "status": "failed", "error": "FloatingPointError: rollout diverged"}
    ]
    text = format_summary(summary)
    assert "| 3 | 1 | 0.1 | 2 | 0.5 [0.05, 0.95] |" in text and "seed=2 (job 5): failed |" in text
    assert "- job 5 (correction.n_steps=1, correction.sigma=0.1, seed=2): failed: FloatingPointError" in text


def test_settings_without_a_completed_seed_or_a_metric_are_unranked(tmp_path: Path) -> None:
    sweep = tmp_path / "sw"
    write_multirun(sweep, {"correction.sigma": "0.1,0.2,0.3"}, ["seed=0,1"])
    spec = {"rank_by": [ERR, DNLL]}
    write_job(sweep, 0, ["correction.sigma=0.1", "seed=0"], "completed", {ERR: 1.0, DNLL: 1.0}, spec=spec)
    write_job(sweep, 1, ["correction.sigma=0.1", "seed=1"], "completed", {ERR: 2.0, DNLL: None}, spec=spec)
    write_job(sweep, 2, ["correction.sigma=0.2", "seed=0"], "started", pid=_dead_pid(), spec=spec)
    write_job(sweep, 3, ["correction.sigma=0.2", "seed=1"], "failed", error={"type": "E", "message": "m"})
    write_job(sweep, 4, ["correction.sigma=0.3", "seed=0"], "completed", {ERR: 3.0, DNLL: 3.0}, spec=spec)
    # job 5 (sigma 0.3, seed 1): never started
    summary = write_sweep_summary(sweep)
    assert summary.groups is not None
    got = [(g.settings["correction.sigma"], g.rank, g.status, g.n_seeds) for g in summary.groups]
    # sigma 0.1: a completed seed lacks DNLL -> no DNLL mean, unranked (ERR still averaged).
    assert got == [(0.3, 1, "partial", 1), (0.1, None, "completed", 2), (0.2, None, "failed", 0)]
    assert summary.groups[1].metrics[ERR] == 1.5 and DNLL not in summary.groups[1].metrics
    assert [j.status for j in summary.groups[0].incomplete] == ["not_started"]
    rows = _read_csv(sweep / "summary.csv")
    assert rows[2]["incomplete"] == "seed=0 (job 2): crashed; seed=1 (job 3): failed: E: m"
    assert rows[2][ERR] == "" and rows[2]["n_seeds"] == "0"


def test_markdown_shows_mean_and_ci(seed_sweep: Path, capsys) -> None:
    assert main(["--sweep", str(seed_sweep)]) == 0
    out = capsys.readouterr().out
    assert "12 jobs (11 completed, 1 failed) = 4 settings × seeds {0, 1, 2}" in out
    assert (
        f"| rank | correction.n_steps | correction.sigma | n_seeds | {ERR} | {DNLL} | {RATIO} | incomplete |"
        in out
    )
    assert "| 1 | 3 | 0.05 | 3 | 0.36 [0.35, 0.37] | 0.12 [0.11, 0.13] | 0.7233 [0.7, 0.75] |  |" in out
    assert "| 2 | 1 | 0.05 | 3 | 0.4 [0.3, 0.5] | 0.2 [0.1, 0.3] | 0.9333 [0.8, 1.1] |  |" in out
    assert "mean [95 % bootstrap CI] over each setting's completed seeds" in out
    assert f"best: correction.n_steps=3, correction.sigma=0.05 (3 seeds): {ERR}=0.36 [0.35, 0.37]" in out
    assert "summary.csv, summary_per_seed.csv, heatmap.png" in out


def test_the_heat_map_plots_the_means(seed_sweep: Path) -> None:
    summary = write_sweep_summary(seed_sweep)
    assert summary.groups is not None and (seed_sweep / "heatmap.png").read_bytes()[:8] == PNG_MAGIC
    (panel,) = heatmap_panels(setting_records(summary.groups), summary.group_keys, RATIO)
    assert (panel.y_key, panel.y_values, panel.x_key, panel.x_values) == (
        "correction.n_steps",
        [1, 3],
        "correction.sigma",
        [0.05, 0.1],
    )
    expected = [
        [np.mean([0.8, 0.9, 1.1]), np.mean([0.5, 1.5])],
        [np.mean([0.7, 0.75, 0.72]), np.mean([1.2, 1.3, 1.6])],
    ]
    assert np.allclose(np.array(panel.values, dtype=float), expected)


# --- sweeps without a seed axis: exactly as before -------------------------------------------------------

#: summary.csv and the printed table of the sweep below, as the summary wrote them before seed axes existed.
NO_SEED_CSV = (
    "rank,job,status,correction.n_steps,correction.sigma,D_corrected/state_err_at_K,D_corrected/dnll,"
    "corrected_vs_rollout/state_err_at_K,duration_s,error,run_dir\r\n"
    "1,2,completed,3,0.05,0.3,0.1,0.7,62.0,,<SWEEP>/2\r\n"
    "2,0,completed,1,0.05,0.5,0.2,0.8,60.0,,<SWEEP>/0\r\n"
    ",1,failed,1,0.1,,,,61.0,ValueError: sigma too large,<SWEEP>/1\r\n"
    ",3,crashed,3,0.1,,,,,,<SWEEP>/3\r\n"
)
NO_SEED_MD = """\
## exp6_score_correction · sweep ns: 4 jobs (2 completed, 1 failed, 1 crashed)

| rank | job | status | correction.n_steps | correction.sigma | D_corrected/state_err_at_K | D_corrected/dnll | \
corrected_vs_rollout/state_err_at_K |
| --- | --- | --- | --- | --- | --- | --- | --- |
| 1 | 2 | completed | 3 | 0.05 | 0.3 | 0.1 | 0.7 |
| 2 | 0 | completed | 1 | 0.05 | 0.5 | 0.2 | 0.8 |
|  | 1 | failed | 1 | 0.1 |  |  |  |
|  | 3 | crashed | 3 | 0.1 |  |  |  |

best: job 2 (correction.n_steps=3, correction.sigma=0.05): D_corrected/state_err_at_K=0.3, D_corrected/dnll=0.1
wrote sweep_results.json, summary.csv, heatmap.png in <SWEEP>"""
NO_SEED_RESULT_KEYS = [
    "best_job",
    "columns",
    "counts",
    "experiment",
    "heatmap",
    "jobs",
    "n_jobs",
    "rank_by",
    "sweep_dir",
    "swept_keys",
]


@pytest.mark.parametrize(
    "seed", [None, "seed=0", "params"], ids=["no-seed", "one-seed-task", "one-seed-param"]
)
def test_a_sweep_without_a_seed_axis_is_summarised_as_before(tmp_path: Path, seed: str | None) -> None:
    sweep = tmp_path / "multirun" / EXPERIMENT / "ns"
    params = dict(PARAMS) if seed != "params" else {**PARAMS, "seed": "0"}
    task = [f"experiment={EXPERIMENT}", "debug=smoke", *([seed] if seed == "seed=0" else [])]
    write_multirun(sweep, params, task)

    def overrides(n: int, s: float) -> list[str]:
        extra = ["seed=0"] if seed is not None else []
        return [
            f"correction.n_steps={n}",
            f"correction.sigma={s}",
            f"experiment={EXPERIMENT}",
            "debug=smoke",
            *extra,
        ]

    write_job(sweep, 0, overrides(1, 0.05), "completed", _metrics(0.5, 0.2, 0.8), spec=SPEC)
    error = {"type": "ValueError", "message": "sigma too large"}
    write_job(sweep, 1, overrides(1, 0.1), "failed", error=error, spec=SPEC)
    write_job(sweep, 2, overrides(3, 0.05), "completed", _metrics(0.3, 0.1, 0.7), spec=SPEC)
    write_job(sweep, 3, overrides(3, 0.1), "started", pid=_dead_pid(), spec=SPEC)
    summary = write_sweep_summary(sweep)
    root = str(sweep.resolve())

    assert summary.groups is None and summary.per_seed_csv_path is None and summary.best_group is None
    assert not (sweep / "summary_per_seed.csv").exists()
    csv_text = (sweep / "summary.csv").read_bytes().decode().replace(root, "<SWEEP>")
    md = format_summary(summary).replace(root, "<SWEEP>")
    if seed == "params":  # a one-valued seed param is a swept key (a column), as before; not an axis
        assert summary.swept_keys == [*GROUP_KEYS, "seed"]
        assert csv_text.splitlines()[1] == "1,2,completed,3,0.05,0,0.3,0.1,0.7,62.0,,<SWEEP>/2"
        assert "| 1 | 2 | completed | 3 | 0.05 | 0 | 0.3 | 0.1 | 0.7 |" in md
        return
    assert csv_text == NO_SEED_CSV
    assert md == NO_SEED_MD
    doc = json.loads((sweep / "sweep_results.json").read_text())
    assert sorted(doc) == NO_SEED_RESULT_KEYS
    assert [(j["job"], j["rank"], j["status"]) for j in doc["jobs"]] == [
        (2, 1, "completed"),
        (0, 2, "completed"),
        (1, None, "failed"),
        (3, None, "crashed"),
    ]


def test_the_ci_names_are_the_statistics_modules() -> None:
    assert (sweep_module.CI_LOW, sweep_module.CI_HIGH, sweep_module.N_SEEDS) == (
        statistics.CI_LOW,
        statistics.CI_HIGH,
        statistics.N_SEEDS,
    )


# --- Exp 11's σ sweep aggregate with a seed axis -----------------------------------------------------------


def _exp11_spec() -> dict[str, Any]:
    from latentdyn.experiments.exp11_consistency_rollout import summarise_sigma_sweep

    target = f"{summarise_sigma_sweep.__module__}.summarise_sigma_sweep"
    return {"rank_by": [ERR], "aggregate": {"_target_": target, "target_k": 4, "max_nan_share": 0.5}}


def _exp11_job(
    sweep: Path, num: int, sigma: float, seed: int, err: float, plain: float, **extra: Any
) -> Path:
    overrides = [f"sigma={sigma}", "experiment=exp11_consistency_rollout", f"seed={seed}"]
    job = write_job(sweep, num, overrides, "completed", {ERR: err}, spec=_exp11_spec())
    entries = [
        {"condition": "c", "sigma": None, "k": 4, "final_state_err": plain, "nan_share": 0.0, **extra},
        {"condition": "c_tweedie", "sigma": sigma, "k": 4, "final_state_err": err, "nan_share": 0.0, **extra},
    ]
    (job / "sigma_sweep.json").write_text(json.dumps(entries))
    return job


def test_exp11_sigma_sweep_with_seeds_compares_the_means(tmp_path: Path) -> None:
    sweep = tmp_path / "sw"
    write_multirun(sweep, {"sigma": "0.1,0.5"}, ["experiment=exp11_consistency_rollout", "seed=0,1"])
    # σ 0.1 has the best single seed (0.2) but the worse mean (0.2, 1.4 -> 0.8 vs 0.6, 0.8 -> 0.7).
    _exp11_job(sweep, 0, 0.1, 0, err=0.2, plain=2.0)
    _exp11_job(sweep, 1, 0.1, 1, err=1.4, plain=3.0)
    _exp11_job(sweep, 2, 0.5, 0, err=0.6, plain=2.0)
    _exp11_job(sweep, 3, 0.5, 1, err=0.8, plain=3.0)
    summary = write_sweep_summary(sweep)
    merged = {(e["condition"], e["sigma"]): e for e in json.loads((sweep / "sigma_sweep.json").read_text())}
    assert set(merged) == {("c", None), ("c_tweedie", 0.1), ("c_tweedie", 0.5)}
    assert merged[("c_tweedie", 0.1)]["final_state_err"] == pytest.approx(0.8)
    assert merged[("c_tweedie", 0.1)]["final_state_err_ci_low"] == 0.2
    assert merged[("c_tweedie", 0.1)]["final_state_err_ci_high"] == 1.4
    assert merged[("c", None)]["final_state_err"] == 2.5 and merged[("c", None)]["n_seeds"] == 2
    best = json.loads((sweep / "best_sigmas.json").read_text())["c_tweedie"]
    assert best["best_sigma"] == 0.5 and best["state_err"] == pytest.approx(0.7)
    assert best["uncorrected_state_err"] == 2.5
    assert {p.name for p in summary.extra_paths} == {
        "sigma_sweep.json",
        "best_sigmas.json",
        "sigma_sweep.png",
    }
    assert summary.groups is not None and [g.settings for g in summary.groups] == [
        {"sigma": 0.5},
        {"sigma": 0.1},
    ]


def test_exp11_sigma_sweep_refuses_seeds_it_cannot_tell_apart(tmp_path: Path, caplog) -> None:
    sweep = tmp_path / "sw"
    write_multirun(sweep, {"sigma": "0.1"}, ["experiment=exp11_consistency_rollout", "seed=0,1"])
    # The jobs ran seeds=[0, 1, 2] themselves (the default): their entries are means already.
    for num in range(2):
        job = _exp11_job(sweep, num, 0.1, num, err=1.0, plain=2.0, n_seeds=3)
        (job / "metrics.json").write_text(json.dumps({"seeds": [0, 1, 2]}))
    with caplog.at_level(logging.ERROR, logger="latentdyn.tracking.sweep"):
        summary = write_sweep_summary(sweep)
    assert "ran seeds=[0, 1, 2] itself" in caplog.text and "seeds=null" in caplog.text
    assert summary.extra_paths == [] and not (sweep / "sigma_sweep.json").exists()
    assert (sweep / "summary.csv").exists() and (sweep / "summary_per_seed.csv").exists()


def test_exp11_sigma_sweep_refuses_a_seed_run_twice(tmp_path: Path, caplog) -> None:
    sweep = tmp_path / "sw"
    write_multirun(sweep, {"sigma": "0.1"}, ["experiment=exp11_consistency_rollout", "seed=0,1"])
    # seeds=[0]: both jobs ran seed 0, whatever their swept seed.
    for num in range(2):
        job = _exp11_job(sweep, num, 0.1, num, err=1.0 + num, plain=2.0)
        (job / "metrics.json").write_text(json.dumps({"seeds": [0]}))
    with caplog.at_level(logging.ERROR, logger="latentdyn.tracking.sweep"):
        write_sweep_summary(sweep)
    assert "jobs 0 and 1 (sigma=0.1) both ran seed 0" in caplog.text
    assert not (sweep / "best_sigmas.json").exists()
