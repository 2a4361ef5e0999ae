"""Exp 6 end to end: the correction grid as a Hydra multirun (basic and joblib launchers), the shared score-model
artifact, the sweep's aggregate, failed jobs, and ``correction=none``."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import manifest_lines, run_cli

SMOKE = ["experiment=exp6_score_correction", "debug=smoke"]
#: One point of the Langevin grid: a command-line value narrows the grid in the experiment config.
ONE_POINT = ["correction.n_steps=3", "correction.step_size=0.1", "correction.sigma=0.25"]


def _sweep_dir(root: Path, run_id: str) -> Path:
    return root / "multirun" / "exp6_score_correction" / run_id


def _artifacts(root: Path, kind: str) -> list[Path]:
    """Complete artifacts of ``kind`` in the cache (no temporary, partial or lock entries)."""
    return sorted(p for p in (root / "cache" / kind).glob("*") if (p / "artifact.json").is_file())


def _built_score_model(run_log: str) -> bool:
    """Whether a job's log says it trained the score model (not the store or the dynamics model)."""
    return re.search(r"artifact score/\S+ building", run_log) is not None


def _summary_rows(sweep: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((sweep / "summary.csv").open()))


@pytest.mark.slow
def test_a_2x2_grid_writes_four_tracked_runs_sharing_one_score_model_and_one_summary(tmp_path: Path) -> None:
    grid = ["correction.n_steps=1,3", "correction.step_size=0.01,0.1", "correction.sigma=0.25"]
    proc = run_cli(["-m", *SMOKE, *grid, "run_id=g"], tmp_path)
    sweep = _sweep_dir(tmp_path, "g")
    settings = set()
    artifacts_used = set()
    for job in range(4):
        job_dir = sweep / str(job)
        info = json.loads((job_dir / "run_info.json").read_text())
        assert info["status"] == "completed" and info["run_id"] == f"g-{job}"
        correction = OmegaConf.load(job_dir / "config.yaml").correction
        assert correction.sigma == 0.25 and correction._target_.endswith("LangevinCorrection")
        settings.add((correction.n_steps, correction.step_size))
        diag = json.loads((job_dir / "injection_diag.json").read_text())
        assert set(diag["modes"]) == {"D_rollout", "D_corrected"}
        metrics = json.loads((job_dir / "metrics.json").read_text())
        artifacts_used.add(metrics["score_model"]["artifact"])
        # Same start points and seeds: the uncorrected rollout is the same in every job.
        assert (
            diag["modes"]["D_rollout"]["per_step"]
            == json.loads((sweep / "0" / "injection_diag.json").read_text())["modes"]["D_rollout"]["per_step"]
        )
    assert settings == {(1, 0.01), (1, 0.1), (3, 0.01), (3, 0.1)}
    # One score model (and one dynamics model, checkpoint=train), trained by the first job, reused by the others.
    (score,) = _artifacts(tmp_path, "score")
    assert artifacts_used == {str(score)}
    assert len(_artifacts(tmp_path, "dynamics")) == 1
    built = [j for j in range(4) if _built_score_model((sweep / str(j) / "run.log").read_text())]
    assert built == [0]

    records = [(r["run_id"], r["status"]) for r in manifest_lines(tmp_path)]
    for job in range(4):
        assert records.count((f"g-{job}", "started")) == 1 and records.count((f"g-{job}", "completed")) == 1

    # The aggregate: every job, ranked by the corrected rollout's final state error, then its ΔNLL.
    rows = _summary_rows(sweep)
    assert [r["status"] for r in rows] == ["completed"] * 4
    keys = [(float(r["D_corrected/state_err_at_K"]), float(r["D_corrected/dnll"])) for r in rows]
    assert keys == sorted(keys) and [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    assert {"correction.n_steps", "correction.step_size"} <= set(rows[0])
    results = json.loads((sweep / "sweep_results.json").read_text())
    assert len(results["jobs"]) == 4 and results["counts"] == {"completed": 4}
    assert (sweep / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The strongest correction moves the state: corrected and uncorrected rollouts differ.
    strongest = next(r for r in rows if (r["correction.n_steps"], r["correction.step_size"]) == ("3", "0.1"))
    assert strongest["D_corrected/state_err_at_K"] != strongest["D_rollout/state_err_at_K"]
    assert "sweep g: 4 jobs" in proc.stdout


@pytest.mark.slow
def test_joblib_jobs_started_together_build_the_score_model_once(tmp_path: Path) -> None:
    run_cli(
        [
            "-m",
            *SMOKE,
            *ONE_POINT,
            "correction.n_steps=1,3",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
        ],
        tmp_path,
    )
    # The default run id (a timestamp) is the sweep's in every worker process: one sweep directory.
    (sweep,) = (tmp_path / "multirun" / "exp6_score_correction").iterdir()
    run_id = sweep.name
    logs = [(sweep / str(job) / "run.log").read_text() for job in range(2)]
    builders = [text for text in logs if _built_score_model(text)]
    assert len(builders) == 1, "exactly one job trains the shared score model"
    assert len(_artifacts(tmp_path, "score")) == 1
    assert not list((tmp_path / "cache" / "score").glob(".tmp-*"))
    records = manifest_lines(tmp_path)
    assert sorted((r["run_id"], r["status"]) for r in records) == [
        (f"{run_id}-0", "completed"),
        (f"{run_id}-0", "started"),
        (f"{run_id}-1", "completed"),
        (f"{run_id}-1", "started"),
    ]
    # Separate processes: each job has its own run dir and record.
    pids = {json.loads((sweep / str(job) / "run_info.json").read_text())["pid"] for job in range(2)}
    assert len(pids) == 2
    assert [r["status"] for r in _summary_rows(sweep)] == ["completed", "completed"]


@pytest.mark.slow
def test_a_failing_job_is_listed_as_failed_in_the_summary(tmp_path: Path) -> None:
    proc = run_cli(
        ["-m", *SMOKE, *ONE_POINT, "correction.sigma=0.25,-1.0", "run_id=f"], tmp_path, check=False
    )
    assert proc.returncode != 0  # the multirun reports the failure
    sweep = _sweep_dir(tmp_path, "f")
    rows = {r["job"]: r for r in _summary_rows(sweep)}
    assert rows["0"]["status"] == "completed" and rows["0"]["rank"] == "1"
    assert rows["1"]["status"] == "failed" and "sigma" in rows["1"]["error"]
    results = json.loads((sweep / "sweep_results.json").read_text())
    assert results["counts"] == {"completed": 1, "failed": 1}


@pytest.mark.slow
def test_correction_none_reproduces_the_uncorrected_rollout_bit_for_bit(tmp_path: Path) -> None:
    run_cli([*SMOKE, "correction=none", "run_id=n"], tmp_path)
    run_dir = tmp_path / "outputs" / "tier2" / "exp6_score_correction" / "n"
    diag = json.loads((run_dir / "injection_diag.json").read_text())
    rollout, corrected = diag["modes"]["D_rollout"], diag["modes"]["D_corrected"]
    assert [dict(s) for s in corrected["per_step"]] == [dict(s) for s in rollout["per_step"]]
    metrics = json.loads((run_dir / "run_info.json").read_text())["metrics"]
    assert metrics["corrected_vs_rollout/state_err_at_K_pct"] == 0.0
    # Nothing to correct with: no score model is trained.
    assert json.loads((run_dir / "metrics.json").read_text())["score_model"] is None
    assert _artifacts(tmp_path, "score") == []
    assert metrics["corrected_vs_rollout/dnll"] == 0.0


@pytest.mark.slow
def test_a_sweep_over_seeds_summarises_each_setting_with_its_mean_and_ci(tmp_path: Path) -> None:
    # 2 σ × 2 seeds = 4 jobs (~25 s): summary.csv has one row per σ, the jobs are in summary_per_seed.csv.
    point = ["correction.n_steps=3", "correction.step_size=0.1"]
    proc = run_cli(["-m", *SMOKE, *point, "correction.sigma=0.1,0.25", "seed=0,1", "run_id=s"], tmp_path)
    sweep = _sweep_dir(tmp_path, "s")
    per_job = list(csv.DictReader((sweep / "summary_per_seed.csv").open()))
    assert sorted((r["correction.sigma"], r["seed"]) for r in per_job) == [
        ("0.1", "0"),
        ("0.1", "1"),
        ("0.25", "0"),
        ("0.25", "1"),
    ]
    assert [r["status"] for r in per_job] == ["completed"] * 4
    rows = _summary_rows(sweep)
    assert len(rows) == 2 and sorted(r["correction.sigma"] for r in rows) == ["0.1", "0.25"]
    assert [r["rank"] for r in rows] == ["1", "2"]
    for row in rows:
        assert row["n_seeds"] == "2" and row["seeds"] == "0 1" and row["status"] == "completed"
        assert row["incomplete"] == ""
        jobs = [r for r in per_job if r["correction.sigma"] == row["correction.sigma"]]
        for metric in ("D_corrected/state_err_at_K", "D_corrected/dnll", "D_rollout/state_err_at_K"):
            values = [float(r[metric]) for r in jobs]
            mean, low, high = (float(row[metric + s]) for s in ("", "_ci_low", "_ci_high"))
            assert mean == pytest.approx(sum(values) / 2)
            # Two seeds: the 95 % percentile bootstrap interval is [min, max] of them, around the mean.
            assert (low, high) == pytest.approx((min(values), max(values)))
            assert low <= mean <= high
        # The seeds differ (start points, score model): the interval has width.
        assert float(row["D_rollout/state_err_at_K_ci_low"]) < float(row["D_rollout/state_err_at_K_ci_high"])
    means = [float(r["D_corrected/state_err_at_K"]) for r in rows]
    assert means == sorted(means)
    results = json.loads((sweep / "sweep_results.json").read_text())
    assert results["counts"] == {"completed": 4} and results["n_groups"] == 2
    assert [g["n_seeds"] for g in results["groups"]] == [2, 2]
    assert (sweep / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "4 jobs (4 completed) = 2 settings × seeds {0, 1}" in proc.stdout
    assert re.search(r"\| 1 \| 3 \| 0\.1 \| 0\.\d+ \| 2 \| [-\d.e]+ \[[-\d.e]+, [-\d.e]+\] \|", proc.stdout)
