"""Sweep summaries (`latentdyn-results --sweep DIR`) of hand-built Hydra multirun directories.

The main fixture is the sweep ``latentdyn -m experiment=exp6_score_correction debug=smoke seed=0,1`` with
``hydra.sweeper.params`` ``correction.n_steps: 1,3`` and ``correction.sigma: 0.05,0.1``: Hydra's basic sweeper
numbers its 8 jobs n_steps-major, then sigma, then seed (job = 4*i_n + 2*i_sigma + seed). The jobs:

    job  n_steps sigma seed  status                err   dnll  ratio
    0    1       0.05  0     completed             0.5   0.2   0.8
    1    1       0.05  1     completed             0.3   0.4   1.2
    2    1       0.1   0     failed
    3    1       0.1   1     completed (no dnll)   0.9   -     0.95
    4    3       0.05  0     completed             0.3   0.1   0.7
    5    3       0.05  1     started, process dead -> crashed
    6    3       0.1   0     no run_info (Hydra's .hydra/overrides.yaml only) -> unknown
    7    3       0.1   1     no directory -> not_started

Ranked by (err, dnll) ascending: 4 (0.3, 0.1), 1 (0.3, 0.4), 0 (0.5, 0.2); then 3 (completed, no dnll),
2 (failed), 5 (crashed), 6 (unknown), 7 (not started).

The sweep varies ``seed``, so its per-job table is ``summary_per_seed.csv`` and ``summary.csv`` holds one row per
setting (tests/test_sweep_seeds.py); the job-level results here are the same either way.
"""

from __future__ import annotations

import csv
import json
import logging
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from latentdyn.tracking.results import main
from latentdyn.tracking.sweep import (
    collect_sweep,
    format_summary,
    heatmap_panels,
    load_sweep,
    planned_jobs,
    write_sweep_summary,
)

EXPERIMENT = "exp6_score_correction"
ERR, DNLL, RATIO = "D_corrected/state_err_at_K", "D_corrected/dnll", "corrected_vs_rollout/state_err_at_K"
SPEC = {
    "rank_by": [ERR, DNLL],
    "columns": [ERR, DNLL, RATIO],
    "heatmap": {"metric": RATIO, "center": 1.0},
}
SWEPT = ["correction.n_steps", "correction.sigma", "seed"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _dead_pid() -> int:
    """The pid of a process that has exited (reaped), so it is not alive."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _overrides(n_steps: int, sigma: float, seed: int) -> list[str]:
    # As Hydra records a job's task overrides: sweeper params first, then the command line's keys.
    return [
        f"correction.n_steps={n_steps}",
        f"correction.sigma={sigma}",
        f"experiment={EXPERIMENT}",
        "debug=smoke",
        f"seed={seed}",
    ]


def write_job(
    sweep: Path,
    num: int,
    overrides: list[str],
    status: str | None,
    metrics: dict[str, Any] | None = None,
    error: dict[str, str] | None = None,
    pid: int | None = None,
    spec: dict[str, Any] | None = None,
) -> Path:
    """A job directory as the run tracking leaves it; ``status=None``: Hydra's record only, no run_info."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if status is None:
        return job
    config: dict[str, Any] = {"name": EXPERIMENT, "seed": 0}
    if spec is not None:
        config["sweep_summary"] = spec
    (job / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    info = {
        "run_id": f"sw1-{num}",
        "experiment": EXPERIMENT,
        "status": status,
        "run_dir": str(job),
        "overrides": overrides,
        "start_time": "2026-01-01T00:00:00+00:00",
        "end_time": None if status == "started" else "2026-01-01T00:01:00+00:00",
        "duration_s": None if status == "started" else 60.0 + num,
        "metrics": metrics or {},
        "error": None if error is None else {**error, "traceback": "Traceback ..."},
        "host": socket.gethostname(),
        "pid": pid if pid is not None else 12345,
    }
    (job / "run_info.json").write_text(json.dumps(info))
    return job


def write_multirun(sweep: Path, params: dict[str, str], task: list[str], spec: Any = None) -> None:
    doc: dict[str, Any] = {
        "name": EXPERIMENT,
        "hydra": {
            "sweep": {"dir": str(sweep), "subdir": "${hydra.job.num}"},
            "sweeper": {
                "_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                "max_batch_size": None,
                "params": params,
            },
            "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": task},
            "job": {"num": "???"},
        },
    }
    if spec is not None:
        doc["sweep_summary"] = spec
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def _metrics(err: float, dnll: float | None, ratio: float) -> dict[str, Any]:
    return {"D_rollout/state_err_at_K": err / ratio, ERR: err, DNLL: dnll, RATIO: ratio, "extra": 7.0}


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    sweep = tmp_path / "multirun" / EXPERIMENT / "sw1"
    write_multirun(
        sweep,
        {"correction.n_steps": "1,3", "correction.sigma": "0.05,0.1"},
        [f"experiment={EXPERIMENT}", "debug=smoke", "seed=0,1"],
    )
    # Job 0's config has no sweep_summary: the spec comes from the first job config that has it.
    write_job(sweep, 0, _overrides(1, 0.05, 0), "completed", _metrics(0.5, 0.2, 0.8))
    write_job(sweep, 1, _overrides(1, 0.05, 1), "completed", _metrics(0.3, 0.4, 1.2), spec=SPEC)
    error = {"type": "ValueError", "message": "sigma too large"}
    write_job(sweep, 2, _overrides(1, 0.1, 0), "failed", error=error, spec=SPEC)
    write_job(sweep, 3, _overrides(1, 0.1, 1), "completed", _metrics(0.9, None, 0.95), spec=SPEC)
    write_job(sweep, 4, _overrides(3, 0.05, 0), "completed", _metrics(0.3, 0.1, 0.7), spec=SPEC)
    write_job(sweep, 5, _overrides(3, 0.05, 1), "started", pid=_dead_pid(), spec=SPEC)
    write_job(sweep, 6, _overrides(3, 0.1, 0), None)
    (sweep / "notes").mkdir()  # not a job
    (sweep / "9").write_text("a file, not a job directory")
    return sweep


EXPECTED_ORDER = [4, 1, 0, 3, 2, 5, 6, 7]
EXPECTED_STATUS = {
    0: "completed",
    1: "completed",
    2: "failed",
    3: "completed",
    4: "completed",
    5: "crashed",
    6: "unknown",
    7: "not_started",
}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_jobs_are_ranked_by_rank_by_metrics_then_grouped_by_status(sweep_dir: Path) -> None:
    summary = write_sweep_summary(sweep_dir)
    assert [j.job for j in summary.jobs] == EXPECTED_ORDER
    assert [j.rank for j in summary.jobs] == [1, 2, 3, None, None, None, None, None]
    assert summary.best is not None and summary.best.job == 4
    assert summary.rank_by == [ERR, DNLL]
    assert summary.counts == {"completed": 4, "failed": 1, "crashed": 1, "unknown": 1, "not_started": 1}


def test_every_job_is_listed_with_its_status_settings_and_error(sweep_dir: Path) -> None:
    jobs = {j.job: j for j in collect_sweep(sweep_dir)}
    assert [j.job for j in collect_sweep(sweep_dir)] == list(range(8))
    assert {n: j.status for n, j in jobs.items()} == EXPECTED_STATUS
    assert jobs[2].error == "ValueError: sigma too large" and jobs[2].metrics == {}
    assert jobs[5].error is None and jobs[5].run_id == "sw1-5"
    # settings: exactly the swept keys, numbers parsed; the unknown job's from Hydra's own record
    assert jobs[4].settings == {"correction.n_steps": 3, "correction.sigma": 0.05, "seed": 0}
    assert jobs[6].settings == {"correction.n_steps": 3, "correction.sigma": 0.1, "seed": 0}
    assert jobs[7].settings == {"correction.n_steps": 3, "correction.sigma": 0.1, "seed": 1}
    assert jobs[7].run_dir is None and jobs[6].run_dir == str(sweep_dir.resolve() / "6")
    assert load_sweep(sweep_dir).swept_keys == SWEPT


def test_a_started_job_is_running_only_while_another_live_process_runs_it(tmp_path: Path) -> None:
    import os

    sweep = tmp_path / "sw"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_job(sweep, 0, ["seed=0"], "started", pid=live.pid)
        write_job(sweep, 1, ["seed=1"], "started", pid=_dead_pid())
        # This process's own unended job (a Ctrl-C'd job seen from the sweep's exit hook) was interrupted.
        write_job(sweep, 2, ["seed=2"], "started", pid=os.getpid())
        assert [j.status for j in collect_sweep(sweep)] == ["running", "crashed", "crashed"]
    finally:
        live.kill()
        live.wait()


def test_csv_rows_columns_and_values(sweep_dir: Path) -> None:
    summary = write_sweep_summary(sweep_dir)
    # A seed axis: the per-job table is summary_per_seed.csv (summary.csv: one row per setting).
    assert summary.per_seed_csv_path == sweep_dir.resolve() / "summary_per_seed.csv"
    with summary.per_seed_csv_path.open(newline="") as fh:
        header = next(csv.reader(fh))
    assert header == ["rank", "job", "status", *SWEPT, ERR, DNLL, RATIO, "duration_s", "error", "run_dir"]
    rows = _read_csv(sweep_dir / "summary_per_seed.csv")
    assert [int(r["job"]) for r in rows] == EXPECTED_ORDER
    assert [r["rank"] for r in rows] == ["1", "2", "3", "", "", "", "", ""]
    assert [r["status"] for r in rows] == [EXPECTED_STATUS[n] for n in EXPECTED_ORDER]
    top = rows[0]
    assert (top["correction.n_steps"], top["correction.sigma"], top["seed"]) == ("3", "0.05", "0")
    assert float(top[ERR]) == 0.3 and float(top[DNLL]) == 0.1 and float(top[RATIO]) == 0.7
    assert float(top["duration_s"]) == 64.0
    by_job = {int(r["job"]): r for r in rows}
    assert by_job[3][DNLL] == ""
    assert by_job[2]["error"] == "ValueError: sigma too large" and by_job[2][ERR] == ""
    assert by_job[7]["run_dir"] == "" and by_job[7]["seed"] == "1"


def test_results_json_has_every_job(sweep_dir: Path) -> None:
    write_sweep_summary(sweep_dir)
    doc = json.loads((sweep_dir / "sweep_results.json").read_text())
    assert doc["experiment"] == EXPERIMENT and doc["n_jobs"] == 8
    assert doc["swept_keys"] == SWEPT and doc["rank_by"] == [ERR, DNLL]
    assert doc["counts"] == {"completed": 4, "failed": 1, "crashed": 1, "unknown": 1, "not_started": 1}
    assert sorted(j["job"] for j in doc["jobs"]) == list(range(8))
    for job in doc["jobs"]:
        assert job["status"] == EXPECTED_STATUS[job["job"]]
        assert {"job", "run_id", "status", "settings", "metrics", "run_dir", "duration_s", "error"} <= set(
            job
        )
    job4 = next(j for j in doc["jobs"] if j["job"] == 4)
    assert job4["metrics"]["extra"] == 7.0 and job4["settings"]["correction.sigma"] == 0.05


def test_heatmap_panels_hold_each_cells_value_or_status(sweep_dir: Path) -> None:
    sweep = load_sweep(sweep_dir)
    panels = heatmap_panels(sweep.jobs, sweep.swept_keys, RATIO)
    assert [p.title for p in panels] == ["correction.n_steps=1", "correction.n_steps=3"]
    for panel in panels:
        assert (panel.y_key, panel.y_values) == ("correction.sigma", [0.05, 0.1])
        assert (panel.x_key, panel.x_values) == ("seed", [0, 1])
    # rows: sigma 0.05, 0.1; columns: seed 0, 1
    assert panels[0].values == [[0.8, 1.2], [None, 0.95]]
    assert panels[0].labels == [["0.8", "1.2"], ["failed", "0.95"]]
    assert panels[1].values == [[0.7, None], [None, None]]
    assert panels[1].labels == [["0.7", "crashed"], ["—", "—"]]


def test_heatmap_png_is_written(sweep_dir: Path) -> None:
    summary = write_sweep_summary(sweep_dir)
    assert summary.heatmap_path == sweep_dir.resolve() / "heatmap.png" and summary.heatmap_note is None
    assert (sweep_dir / "heatmap.png").read_bytes()[:8] == PNG_MAGIC


def test_heatmap_skipped_when_no_completed_job_has_the_metric(tmp_path: Path, caplog) -> None:
    sweep = tmp_path / "sw"
    spec = {"rank_by": [ERR], "heatmap": {"metric": "absent/metric", "center": None}}
    write_job(sweep, 0, ["seed=0"], "completed", {ERR: 1.0}, spec=spec)
    write_job(sweep, 1, ["seed=1"], "failed", error={"type": "RuntimeError", "message": "x"}, spec=spec)
    with caplog.at_level(logging.INFO, logger="latentdyn.tracking.sweep"):
        summary = write_sweep_summary(sweep)
    assert summary.heatmap_path is None and "absent/metric" in (summary.heatmap_note or "")
    assert not (sweep / "heatmap.png").exists()
    assert "heat map skipped" in caplog.text and "heat map skipped" in format_summary(summary)
    assert (sweep / "summary.csv").exists() and (sweep / "sweep_results.json").exists()


@pytest.mark.parametrize(
    "values, center",
    [([1.5, 2.0], 1.0), ([0.5, 0.5], 1.0), ([1.0, 1.0], 1.0), ([3.0, 4.0], None)],
    ids=["all-above-centre", "all-below-equal", "all-at-centre", "sequential"],
)
def test_heatmap_one_sided_and_sequential_colour_maps(tmp_path: Path, values, center) -> None:
    sweep = tmp_path / "sw"
    spec = {"rank_by": [RATIO], "heatmap": {"metric": RATIO, "center": center}}
    for num, value in enumerate(values):
        write_job(
            sweep, num, [f"correction.sigma={0.1 * (num + 1):g}"], "completed", {RATIO: value}, spec=spec
        )
    summary = write_sweep_summary(sweep)
    assert summary.swept_keys == ["correction.sigma"]
    assert summary.heatmap_note is None and (sweep / "heatmap.png").read_bytes()[:8] == PNG_MAGIC


def test_no_multirun_yaml_single_job_has_no_settings_and_no_planned_jobs(tmp_path: Path) -> None:
    sweep = tmp_path / "sw"
    write_job(sweep, 0, ["seed=0"], "completed", {ERR: 2.0}, spec={"rank_by": [ERR]})
    summary = write_sweep_summary(sweep)
    assert summary.swept_keys == [] and [j.status for j in summary.jobs] == ["completed"]
    assert summary.columns == [ERR] and (sweep / "heatmap.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_sweep_prints_the_table(sweep_dir: Path, capsys) -> None:
    assert main(["--sweep", str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    # A seed axis: one row per (n_steps, sigma), the means over the completed seeds with their CIs.
    assert f"| rank | correction.n_steps | correction.sigma | n_seeds | {ERR} | {DNLL} | {RATIO} |" in out
    assert "| 1 | 3 | 0.05 | 1 | 0.3 [0.3, 0.3] | 0.1 [0.1, 0.1] | 0.7 [0.7, 0.7] |" in out
    assert "| 2 | 1 | 0.05 | 2 | 0.4 [0.3, 0.5] | 0.3 [0.2, 0.4] | 1 [0.8, 1.2] |" in out
    assert "seed=0 (job 2): failed" in out and "ValueError: sigma too large" in out
    assert "best: correction.n_steps=3, correction.sigma=0.05 (1 seed)" in out and "heatmap.png" in out
    assert (sweep_dir / "summary.csv").exists() and (sweep_dir / "summary_per_seed.csv").exists()


def test_cli_sweep_rejects_a_bad_dir(tmp_path: Path, capsys) -> None:
    assert main(["--sweep", str(tmp_path / "missing")]) == 1
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    assert main(["--sweep", str(tmp_path / "empty")]) == 1
    assert "no job directories" in capsys.readouterr().err


def test_command_line_value_narrows_the_planned_grid() -> None:
    multirun = {
        "hydra": {
            "sweeper": {"params": {"correction.sigma": "0.05,0.1,0.25", "correction.n_steps": "1,3"}},
            "overrides": {"task": [f"experiment={EXPERIMENT}", "correction.sigma=0.1"]},
        }
    }
    # The key keeps its params position; a command-line value replaces the params' values.
    assert planned_jobs(multirun) == [
        ["correction.sigma=0.1", "correction.n_steps=1", f"experiment={EXPERIMENT}"],
        ["correction.sigma=0.1", "correction.n_steps=3", f"experiment={EXPERIMENT}"],
    ]
    multirun["hydra"]["overrides"]["task"] = ["correction.sigma=0.1,0.25"]
    assert planned_jobs(multirun) == [
        ["correction.sigma=0.1", "correction.n_steps=1"],
        ["correction.sigma=0.1", "correction.n_steps=3"],
        ["correction.sigma=0.25", "correction.n_steps=1"],
        ["correction.sigma=0.25", "correction.n_steps=3"],
    ]


def test_narrowed_sweep_lists_no_other_sigmas(tmp_path: Path) -> None:
    sweep = tmp_path / "sw"
    write_multirun(
        sweep, {"correction.sigma": "0.05,0.1,0.25", "correction.n_steps": "1,3"}, ["correction.sigma=0.1"]
    )
    write_job(sweep, 0, ["correction.sigma=0.1", "correction.n_steps=1"], "completed", {ERR: 1.0})
    jobs = collect_sweep(sweep)
    assert [(j.job, j.status, j.settings) for j in jobs] == [
        (0, "completed", {"correction.sigma": 0.1, "correction.n_steps": 1}),
        (1, "not_started", {"correction.sigma": 0.1, "correction.n_steps": 3}),
    ]


def test_one_job_sweep_shows_its_param_setting(tmp_path: Path) -> None:
    sweep = tmp_path / "sw"
    write_multirun(sweep, {"correction.sigma": "0.1"}, ["seed=0"])
    write_job(sweep, 0, ["correction.sigma=0.1", "seed=0"], "completed", {ERR: 1.0})
    summary = write_sweep_summary(sweep)
    assert summary.swept_keys == ["correction.sigma"] and summary.jobs[0].settings == {
        "correction.sigma": 0.1
    }


@pytest.mark.parametrize(
    "text",
    [
        "hydra: {sweeper: {params: {correction.sigma: '1,(('}}}",
        "hydra: [unclosed",
        "just a string",
        "hydra: [1, 2]",
    ],
    ids=["bad-override", "bad-yaml", "not-a-mapping", "hydra-not-a-mapping"],
)
def test_unparseable_multirun_yaml_skips_the_planned_jobs(tmp_path: Path, text: str, caplog) -> None:
    sweep = tmp_path / "sw"
    write_job(sweep, 0, ["seed=0"], "completed", {ERR: 1.0})
    write_job(sweep, 1, ["seed=1"], "completed", {ERR: 2.0})
    (sweep / "multirun.yaml").write_text(text)
    with caplog.at_level(logging.WARNING, logger="latentdyn.tracking.sweep"):
        summary = write_sweep_summary(sweep)
    if text.startswith("hydra: {") or "unclosed" in text:
        assert "multirun.yaml" in caplog.text or "cannot plan" in caplog.text
    assert [j.job for j in summary.jobs] == [0, 1] and "not_started" not in summary.counts
    assert "seed" in summary.swept_keys


def test_sweep_summary_and_help_import_nothing_heavy() -> None:
    code = (
        "import sys; from latentdyn.tracking.results import main; import latentdyn.tracking.sweep\n"
        "heavy = [m for m in ('torch', 'lightning', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'matplotlib' not in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--sweep DIR" in proc.stdout


def test_simple_comma_grid_matches_hydras_for_plain_values() -> None:
    from latentdyn.tracking.sweep import _simple_grid

    arguments = ["correction.sigma=0.05,0.1,0.25", "correction.n_steps=1,3", "seed=0", "correction.sigma=0.1"]
    expected = [
        ["correction.sigma=0.1", "correction.n_steps=1", "seed=0"],
        ["correction.sigma=0.1", "correction.n_steps=3", "seed=0"],
    ]
    assert _simple_grid(arguments) == expected


def record_aggregate(sweep_dir: Path, jobs: list, settings: dict) -> list[Path]:
    """An experiment aggregate for the tests: records what it was given."""
    out = Path(sweep_dir) / "aggregate.json"
    out.write_text(
        json.dumps({"jobs": [j.job for j in jobs], "statuses": [j.status for j in jobs], **settings})
    )
    return [out]


def failing_aggregate(sweep_dir: Path, jobs: list, settings: dict) -> list[Path]:
    raise RuntimeError("aggregate broke")


def test_the_experiments_own_aggregate_runs_after_the_tables(tmp_path: Path) -> None:
    sweep = tmp_path / "sw"
    spec = {"rank_by": [ERR], "aggregate": {"_target_": f"{__name__}.record_aggregate", "target_k": 4}}
    write_job(sweep, 0, ["seed=0"], "completed", {ERR: 2.0}, spec=spec)
    write_job(sweep, 1, ["seed=1"], "completed", {ERR: 1.0}, spec=spec)
    summary = write_sweep_summary(sweep)
    recorded = json.loads((sweep / "aggregate.json").read_text())
    assert recorded == {"jobs": [1, 0], "statuses": ["completed", "completed"], "target_k": 4}
    assert summary.extra_paths == [sweep.resolve() / "aggregate.json"]
    assert "aggregate.json" in format_summary(summary)


def test_a_failing_aggregate_is_logged_and_the_tables_are_kept(tmp_path: Path, caplog) -> None:
    sweep = tmp_path / "sw"
    spec = {"rank_by": [ERR], "aggregate": {"_target_": f"{__name__}.failing_aggregate"}}
    write_job(sweep, 0, ["seed=0"], "completed", {ERR: 2.0}, spec=spec)
    with caplog.at_level(logging.ERROR, logger="latentdyn.tracking.sweep"):
        summary = write_sweep_summary(sweep)
    assert "aggregate broke" in caplog.text and summary.extra_paths == []
    assert (sweep / "summary.csv").exists() and (sweep / "sweep_results.json").exists()


def test_exp11_aggregate_merges_the_sigma_jobs_and_picks_the_best_sigma(tmp_path: Path) -> None:
    from latentdyn.experiments.exp11_consistency_rollout import summarise_sigma_sweep

    sweep = tmp_path / "sw"
    spec = {"aggregate": {"_target_": f"{summarise_sigma_sweep.__module__}.summarise_sigma_sweep",
                          "target_k": 4, "max_nan_share": 0.5}}  # fmt: skip
    errors = {0.1: (1.5, 0.0), 0.5: (0.8, 0.7), 1.0: (1.1, 0.2)}  # σ: (error at k=4, NaN share)
    for num, (sigma, (err, nan)) in enumerate(errors.items()):
        job = write_job(sweep, num, [f"sigma={sigma}"], "completed", {ERR: err}, spec=spec)
        entries = [
            {"condition": "c", "sigma": None, "k": 4, "final_state_err": 2.0, "nan_share": 0.0},
            {"condition": "c_tweedie", "sigma": sigma, "k": 4, "final_state_err": err, "nan_share": nan},
        ]
        (job / "sigma_sweep.json").write_text(json.dumps(entries))
    write_job(sweep, 3, ["sigma=2.0"], "failed", error={"type": "ValueError", "message": "x"}, spec=spec)
    summary = write_sweep_summary(sweep)
    merged = json.loads((sweep / "sigma_sweep.json").read_text())
    assert sorted((e["condition"], e["sigma"]) for e in merged if e["sigma"] is not None) == [
        ("c_tweedie", 0.1),
        ("c_tweedie", 0.5),
        ("c_tweedie", 1.0),
    ]
    assert [e["condition"] for e in merged].count("c") == 1  # the uncorrected condition once
    best = json.loads((sweep / "best_sigmas.json").read_text())["c_tweedie"]
    assert best["best_sigma"] == 1.0 and best["state_err"] == 1.1 and best["uncorrected_state_err"] == 2.0
    assert (sweep / "sigma_sweep.png").read_bytes()[:8] == PNG_MAGIC
    assert {p.name for p in summary.extra_paths} == {
        "sigma_sweep.json",
        "best_sigmas.json",
        "sigma_sweep.png",
    }
