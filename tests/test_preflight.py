"""Checks before a job starts: run ids, an existing run, bad values (the error names the key, nothing runs)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from latentdyn.tracking.preflight import (
    ConfigError,
    check_run_id,
    check_types,
    check_values,
    claim_run_dir,
    overridden_keys,
)
from tests.conftest import compose_at, run_cli

TEST_PIPELINE_ARGS = ["pipeline=tests.pipelines.ok", "name=dummy", "tier=test"]


def _cli(args: list[str], root: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(args, root, check=False, timeout=120)


def _manifest(root: Path) -> list[dict]:
    path = root / "outputs" / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize(
    "run_id", ["../../x", "/abs/path", "a/b", "", "..", ".", ".hidden", "a b", "x" * 129]
)
def test_unsafe_run_ids_are_refused(run_id: str) -> None:
    with pytest.raises(ConfigError, match="run_id"):
        check_run_id(run_id)


@pytest.mark.parametrize("override", ["name=../../x", "tier=/tmp"])
def test_the_other_run_dir_components_are_checked_too(tmp_path: Path, override: str) -> None:
    from latentdyn.tracking.preflight import validate

    cfg = compose_at(tmp_path, ["experiment=exp1_vmf", override], tmp_path / "run")
    with pytest.raises(ConfigError, match=f"{override.split('=')[0]}="):
        validate(cfg, None, [])


@pytest.mark.parametrize("run_id", ["2026-12-01_19-20-00_123456", "my_run", "sweep.v2", "7", "a-b_c.d"])
def test_safe_run_ids_pass(run_id: str) -> None:
    assert check_run_id(run_id) == run_id


def test_claim_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    assert claim_run_dir(run_dir, "r", resume=False, overwrite=False) == "new"
    run_dir.mkdir()
    assert claim_run_dir(run_dir, "r", resume=False, overwrite=False) == "new"  # empty: nothing to lose
    (run_dir / "run_info.json").write_text(json.dumps({"status": "completed", "start_time": "T0"}))
    with pytest.raises(ConfigError, match=r"run_id='r' already exists .*completed, started T0.*resume=true"):
        claim_run_dir(run_dir, "r", resume=False, overwrite=False)
    assert claim_run_dir(run_dir, "r", resume=True, overwrite=False) == "resume"
    assert (run_dir / "run_info.json").exists()
    assert claim_run_dir(run_dir, "r", resume=False, overwrite=True) == "overwrite"
    assert not run_dir.exists()


def test_overridden_keys_separates_group_choices_from_values() -> None:
    choices, keys = overridden_keys(
        ["model=gaussian_mdn", "model/backbone=gru", "seed=3", "+extra=1", "trainer.max_steps=5", "~debug"],
        groups=["model", "model/backbone", "experiment"],
    )
    assert choices == ["model=gaussian_mdn", "model/backbone=gru"]
    assert keys == ["seed", "extra", "trainer.max_steps"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=abc", r"seed='abc': expected an integer \(the default is 0\)"),
        ("trainer.max_steps=abc", r"trainer.max_steps='abc': expected an integer"),
        ("trainer.max_steps=2.5", r"trainer.max_steps=2.5: expected an integer"),
        ("standardize=maybe", r"standardize='maybe': expected true or false"),
        ("horizons=[1,x]", r"horizons\[1\]='x'"),
        ("datamodule.energy_percentile=high", r"datamodule.energy_percentile='high': expected a number"),
    ],
)
def test_wrongly_typed_values_name_their_key(tmp_path: Path, override: str, message: str) -> None:
    base = ["experiment=exp1_vmf"]
    baseline = compose_at(tmp_path, base, tmp_path / "run")
    cfg = compose_at(tmp_path, [*base, override], tmp_path / "run")
    with pytest.raises(ConfigError, match=message):
        check_types(cfg, baseline, [override.split("=")[0]])


def test_numbers_of_either_kind_where_lightning_takes_both(tmp_path: Path) -> None:
    base = ["experiment=exp1_vmf"]
    baseline = compose_at(tmp_path, base, tmp_path / "run")
    cfg = compose_at(tmp_path, [*base, "trainer.val_check_interval=0.5", "run_id=123"], tmp_path / "run")
    check_types(cfg, baseline, ["trainer.val_check_interval", "run_id"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("horizons=[]", r"horizons=\[\]: expected a non-empty list"),
        ("horizons=[0]", r"horizons\[0\]=0: expected a positive integer"),
        ("trainer.max_steps=0", r"trainer.max_steps=0: expected a positive integer"),
        ("checkpointing.every_n_steps=0", r"checkpointing.every_n_steps=0: expected a positive integer"),
        ("horizon_mode=strid", r"horizon_mode='strid': expected one of lag, stride"),
        ("predict=mode", r"predict='mode': expected one of median, mean, sample"),
        ("datamodule.medial_range=[0.9,0.1]", r"datamodule.medial_range=\[0.9, 0.1\]"),
        ("datamodule.slice=loud", r"datamodule.slice='loud'"),
    ],
)
def test_out_of_range_values_name_their_key(tmp_path: Path, override: str, message: str) -> None:
    cfg = compose_at(tmp_path, ["experiment=exp1_vmf", override], tmp_path / "run")
    with pytest.raises(ConfigError, match=message):
        check_values(cfg)


def test_a_variant_must_be_one_of_the_experiments_variants(tmp_path: Path) -> None:
    from latentdyn.tracking.preflight import check_variant

    check_variant(compose_at(tmp_path, ["experiment=exp5_betavae", "variant=betavae_pred"], tmp_path / "run"))
    cfg = compose_at(tmp_path, ["experiment=exp5_betavae", "variant=pred"], tmp_path / "run")
    with pytest.raises(ConfigError, match="variant='pred': expected one of baseline_betavae, betavae_smooth"):
        check_variant(cfg)


def test_a_mandatory_value_left_unset_is_named_without_resolving_anything(tmp_path: Path) -> None:
    from latentdyn.tracking.preflight import check_required

    # logger.save_dir interpolates ${hydra:...}, which cannot resolve outside a Hydra job: not touched.
    cfg = compose_at(tmp_path, ["experiment=exp1_vmf", "representation=betavae"], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"representation.checkpoint has no value"):
        check_required(cfg)
    given = compose_at(
        tmp_path,
        ["experiment=exp1_vmf", "representation=betavae", "representation.checkpoint=x"],
        tmp_path / "run",
    )
    check_required(given)


def test_every_shipped_experiment_passes_its_own_checks(tmp_path: Path) -> None:
    from latentdyn.cli import available_experiments

    for name in available_experiments():
        check_values(compose_at(tmp_path, [f"experiment={name}"], tmp_path / "run"))


@pytest.mark.parametrize(
    "args",
    [
        ["experiment=exp1_vmf", "seed=abc"],
        ["experiment=exp1_vmf", "horizons=[]"],
        ["experiment=exp1_vmf", "run_id=../../escaped"],
        ["experiment=exp5_betavae", "variant=betavae_smoth"],
        ["experiment=exp1_vmf", "representation=betavae"],
    ],
)
def test_cli_refuses_bad_input_before_anything_starts(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "root").mkdir()
    proc = _cli(args, tmp_path / "root")
    assert proc.returncode != 0
    key = {"representation": "representation.checkpoint"}.get(args[1].split("=")[0], args[1].split("=")[0])
    assert f"latentdyn: invalid config: {key}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "root" / "outputs").exists()  # no run dir, no manifest line
    assert not (tmp_path / "escaped").exists()


@pytest.mark.slow
def test_cli_refuses_an_existing_run_id_unless_resumed_or_overwritten(tmp_path: Path) -> None:
    first = _cli([*TEST_PIPELINE_ARGS, "run_id=same", "seed=1"], tmp_path)
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "outputs" / "test" / "dummy" / "same"
    first_info = (run_dir / "run_info.json").read_text()

    again = _cli([*TEST_PIPELINE_ARGS, "run_id=same", "seed=2"], tmp_path)
    assert again.returncode != 0
    assert "run_id='same' already exists" in again.stderr and "overwrite=true" in again.stderr
    assert (run_dir / "run_info.json").read_text() == first_info
    assert [r["status"] for r in _manifest(tmp_path)] == ["started", "completed"]

    (run_dir / "stale_output.txt").write_text("from the first run")
    replaced = _cli([*TEST_PIPELINE_ARGS, "run_id=same", "seed=2", "overwrite=true"], tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert not (run_dir / "stale_output.txt").exists()
    assert json.loads((run_dir / "run_info.json").read_text())["metrics"]["score"] == 2.5
    results = _cli([], tmp_path)  # no experiment: refuses, but must not touch the run
    assert results.returncode != 0
    subprocess.run(
        [sys.executable, "-m", "latentdyn.tracking.results"],
        cwd=tmp_path,
        env={**os.environ, "LATENTDYN_ROOT": str(tmp_path)},
        check=True,
        capture_output=True,
    )
    with (tmp_path / "outputs" / "results_table.csv").open() as fh:
        rows = [row for row in csv.DictReader(fh) if row["run_id"] == "same"]
    assert len(rows) == 1 and float(rows[0]["score"]) == 2.5


def test_cli_multirun_job_with_a_bad_value_fails_without_a_record(tmp_path: Path) -> None:
    proc = _cli(["-m", *TEST_PIPELINE_ARGS, "seed=1,abc", "run_id=sw"], tmp_path)
    assert proc.returncode != 0
    assert "invalid config: seed='abc'" in proc.stderr
    assert {r["run_id"] for r in _manifest(tmp_path)} == {"sw-0"}
