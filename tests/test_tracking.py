"""The run-record contract (DESIGN §4): files, manifest lines, failures, crashes, concurrency, multiruns."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from latentdyn.tracking.manifest import append_record, iter_records
from latentdyn.tracking.results import summarize_runs
from latentdyn.tracking.run import record_weights, tracked_run
from tests.conftest import REPO_ROOT, manifest_lines, run_cli

TEST_PIPELINE_ARGS = ["name=dummy", "tier=test"]

RUN_INFO_FIELDS = {
    "run_id",
    "experiment",
    "status",
    "overrides",
    "git_commit",
    "git_dirty",
    "python",
    "torch",
    "cuda",
    "device",
    "host",
    "start_time",
    "end_time",
    "duration_s",
    "metrics",
    "error",
    "weights",
}


def _env_args(root: Path) -> dict[str, str]:
    return {**os.environ, "LATENTDYN_ROOT": str(root), "PYTHONPATH": str(REPO_ROOT)}


def _cli(args: list[str], root: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "latentdyn", *args],
        cwd=root,
        env=_env_args(root),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


def test_good_run_writes_four_files_and_two_lines(tmp_path: Path) -> None:
    _cli(["pipeline=tests.pipelines.ok", "run_id=good", "seed=0", *TEST_PIPELINE_ARGS], tmp_path)
    run_dir = tmp_path / "outputs" / "test" / "dummy" / "good"
    for name in ("config.yaml", "run_info.json", "run.log"):
        assert (run_dir / name).is_file(), name
    info = json.loads((run_dir / "run_info.json").read_text())
    assert RUN_INFO_FIELDS <= set(info)
    assert info["status"] == "completed"
    assert info["metrics"] == {"score": 0.5, "n": 3.0}
    assert info["overrides"][0] == "pipeline=tests.pipelines.ok"
    assert info["duration_s"] >= 0 and info["end_time"] >= info["start_time"]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["seed"] == 0 and cfg["run_id"] == "good" and "hydra" not in cfg
    assert "ok pipeline ran with seed 0" in (run_dir / "run.log").read_text()
    lines = manifest_lines(tmp_path)
    assert [line["status"] for line in lines] == ["started", "completed"]
    assert lines[1]["metrics"] == {"score": 0.5, "n": 3.0}
    assert {line["run_id"] for line in lines} == {"good"}


def test_failed_run_records_the_error(tmp_path: Path) -> None:
    proc = _cli(["pipeline=tests.pipelines.boom", "run_id=bad", *TEST_PIPELINE_ARGS], tmp_path, check=False)
    assert proc.returncode != 0
    run_dir = tmp_path / "outputs" / "test" / "dummy" / "bad"
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["status"] == "failed"
    assert info["error"]["type"] == "RuntimeError"
    assert "deliberate failure" in info["error"]["message"]
    lines = manifest_lines(tmp_path)
    assert [line["status"] for line in lines] == ["started", "failed"]
    assert lines[1]["error"]["type"] == "RuntimeError"
    assert "deliberate failure" in (run_dir / "run.log").read_text()


def test_sigkill_leaves_only_started_and_results_lists_it_as_crashed(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "latentdyn",
            "pipeline=tests.pipelines.hang",
            "run_id=killed",
            *TEST_PIPELINE_ARGS,
        ],
        cwd=tmp_path,
        env=_env_args(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = tmp_path / "outputs" / "test" / "dummy" / "killed" / "hanging"
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline, "the hanging pipeline never started"
        assert proc.poll() is None, "the process died early"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    lines = manifest_lines(tmp_path)
    assert [line["status"] for line in lines] == ["started"]
    out = run_cli(["--no-save"], tmp_path, module="latentdyn.tracking.results")
    crashed_section = out.stdout.split("## Crashed")[1]
    assert "`killed`" in crashed_section


def test_multirun_writes_one_pair_per_job(tmp_path: Path) -> None:
    _cli(["-m", "pipeline=tests.pipelines.ok", "seed=0,1,2", "run_id=sweep", *TEST_PIPELINE_ARGS], tmp_path)
    lines = manifest_lines(tmp_path)
    by_run: dict[str, list[str]] = {}
    for line in lines:
        by_run.setdefault(line["run_id"], []).append(line["status"])
    assert by_run == {f"sweep-{i}": ["started", "completed"] for i in range(3)}
    for i in range(3):
        job_dir = tmp_path / "multirun" / "dummy" / "sweep" / str(i)
        info = json.loads((job_dir / "run_info.json").read_text())
        assert info["metrics"]["score"] == i + 0.5
        assert (job_dir / "config.yaml").is_file() and (job_dir / "run.log").is_file()


def _append_many(path: str, writer: int, n: int) -> None:
    for i in range(n):
        append_record(Path(path), {"writer": writer, "i": i, "payload": "x" * 2000})


@pytest.mark.slow
def test_concurrent_appends_lose_nothing(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(manifest), w, 100)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    raw = manifest.read_text().splitlines()
    records = [json.loads(line) for line in raw]  # every line is valid JSON
    assert len(records) == 800
    assert {(r["writer"], r["i"]) for r in records} == {(w, i) for w in range(8) for i in range(100)}


def test_sub_runs_are_tracked_in_process(tmp_path: Path) -> None:
    manifest = tmp_path / "outputs" / "manifest.jsonl"
    with tracked_run(
        run_dir=tmp_path / "sub",
        manifest_path=manifest,
        run_id="parent/exp1",
        experiment="exp1",
        config={"seed": 1},
    ) as run:
        run.record_weights("mel", {"source": "none", "pretrained": False})
        run.result = {"loss": 1.25}
    try:
        with tracked_run(
            run_dir=tmp_path / "sub2",
            manifest_path=manifest,
            run_id="parent/exp2",
            experiment="exp2",
            config={},
        ):
            raise ValueError("sub-run failure")
    except ValueError:
        pass
    runs = {r.run_id: r for r in summarize_runs(iter_records(manifest))}
    assert runs["parent/exp1"].status == "completed" and runs["parent/exp1"].metrics == {"loss": 1.25}
    assert runs["parent/exp1"].weights == {"mel": {"source": "none", "pretrained": False}}
    assert runs["parent/exp2"].status == "failed"
    assert runs["parent/exp2"].error["type"] == "ValueError"
    assert json.loads((tmp_path / "sub" / "run_info.json").read_text())["status"] == "completed"


def test_no_experiment_is_a_clear_error_and_records_nothing(tmp_path: Path) -> None:
    proc = _cli([], tmp_path, check=False)
    assert proc.returncode != 0
    assert "no experiment chosen" in proc.stderr and "quickstart" in proc.stderr
    assert not (tmp_path / "outputs" / "manifest.jsonl").exists()


def test_weights_recorded_in_a_sub_run_also_land_on_its_composite_run(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    with tracked_run(
        run_dir=tmp_path / "p", manifest_path=manifest, run_id="p", experiment="tier1", config={}
    ) as p:
        with tracked_run(
            run_dir=tmp_path / "p" / "s", manifest_path=manifest, run_id="p/s", experiment="exp1", config={}
        ) as s:
            record_weights("mimi", {"source": "random", "pretrained": False})
            s.result = {}
        p.result = {}
    runs = {r.run_id: r for r in summarize_runs(iter_records(manifest))}
    assert runs["p/s"].weights == runs["p"].weights == {"mimi": {"source": "random", "pretrained": False}}


def test_manifest_keeps_the_bad_file_count_and_run_info_the_list(tmp_path: Path) -> None:
    from latentdyn.tracking.run import record_data

    bad = [{"path": f"/d/{i}.flac", "stage": "index", "reason": "empty"} for i in range(3)]
    with tracked_run(
        run_dir=tmp_path / "r", manifest_path=tmp_path / "m.jsonl", run_id="r", experiment="e", config={}
    ) as run:
        record_data({"label": "librispeech/reference", "n_bad_files": 3, "bad_files": bad})
        run.result = {}
    info = json.loads((tmp_path / "r" / "run_info.json").read_text())
    assert info["data"]["bad_files"] == bad
    lines = list(iter_records(tmp_path / "m.jsonl"))
    assert all(line["data"].get("n_bad_files", 3) == 3 and "bad_files" not in line["data"] for line in lines)
