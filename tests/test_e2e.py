"""End-to-end runs through the CLI, as a user types them (marked slow: CI runs them in a separate step)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import manifest_lines, run_cli

pytestmark = pytest.mark.slow


def test_quickstart_smoke_end_to_end(tmp_path: Path) -> None:
    proc = run_cli(["experiment=quickstart", "debug=smoke", "run_id=qs"], tmp_path)
    run_dir = tmp_path / "outputs" / "quickstart" / "quickstart" / "qs"
    assert "Plots:" in proc.stdout and "\nexp2_injection  " in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "next:    latentdyn experiment=tier1"
    assert "## exp2_injection" in (run_dir / "results_table.md").read_text()
    for sub in ("phase0", "exp1_vmf", "exp2_injection"):
        info = json.loads((run_dir / sub / "run_info.json").read_text())
        assert info["status"] == "completed" and info["parent_run_id"] == "qs"
        assert (run_dir / sub / "config.yaml").is_file() and (run_dir / sub / "run.log").is_file()
    assert (run_dir / "exp1_vmf" / "checkpoints" / "vmf_k1_final.ckpt").is_file()
    assert (run_dir / "exp2_injection" / "injection_dnll.png").is_file()
    statuses = [(r["run_id"], r["status"]) for r in manifest_lines(tmp_path)]
    for run_id in ("qs", "qs/phase0", "qs/exp1_vmf", "qs/exp2_injection"):
        assert (run_id, "started") in statuses and (run_id, "completed") in statuses

    results = run_cli(["--latest"], tmp_path, module="latentdyn.tracking.results")
    assert "qs/exp2_injection" in results.stdout and "D_rollout/dnll" in results.stdout
    assert (tmp_path / "outputs" / "results_table.csv").is_file()


def test_exp2_checkpoint_latest_after_exp1_cli(tmp_path: Path) -> None:
    run_cli(["experiment=exp1_vmf", "debug=smoke", "horizons=[1]", "run_id=e1"], tmp_path)
    run_cli(["experiment=exp2_injection", "debug=smoke", "checkpoint=latest", "run_id=e2"], tmp_path)
    info = json.loads(
        (tmp_path / "outputs" / "tier1" / "exp2_injection" / "e2" / "run_info.json").read_text()
    )
    assert info["status"] == "completed"
    assert (
        "checkpoints/vmf_k1_final.ckpt"
        in (tmp_path / "outputs" / "tier1" / "exp2_injection" / "e2" / "run.log").read_text()
    )


def _started(root: Path, run_id: str) -> int:
    return sum(1 for r in manifest_lines(root) if r["run_id"] == run_id and r["status"] == "started")


def test_tier1_runs_three_sub_runs_and_resume_reruns_only_failed_ones(tmp_path: Path) -> None:
    common = ["experiment=tier1", "debug=smoke", "run_id=T", "horizons=[1]"]
    subs = ("T/exp1_vmf", "T/exp2_injection", "T/exp3_rep_compare")
    # exp3 fails (an unknown representation): exp1 and exp2 complete.
    failed = run_cli([*common, "representations=[no_such_rep]"], tmp_path, check=False)
    assert failed.returncode != 0
    status = {r["run_id"]: r["status"] for r in manifest_lines(tmp_path)}
    assert [status[s] for s in subs] == ["completed", "completed", "failed"]

    # resume: only the failed sub-run starts again.
    run_cli([*common, "representations=[mel]", "resume=true"], tmp_path)
    assert [_started(tmp_path, s) for s in subs] == [1, 1, 2]
    sub_dir = tmp_path / "outputs" / "tier1" / "tier1" / "T"
    for sub in ("exp1_vmf", "exp2_injection", "exp3_rep_compare"):
        info = json.loads((sub_dir / sub / "run_info.json").read_text())
        assert info["status"] == "completed" and info["parent_run_id"] == "T"
    assert (sub_dir / "exp3_rep_compare" / "summary.csv").is_file()
    # The resumed tier1 run carries the key metrics of the sub-runs it skipped.
    tier1_metrics = json.loads((sub_dir / "run_info.json").read_text())["metrics"]
    for prefix, sub in (("exp1", "exp1_vmf"), ("exp2", "exp2_injection"), ("exp3", "exp3_rep_compare")):
        sub_metrics = json.loads((sub_dir / sub / "run_info.json").read_text())["metrics"]
        carried = {k: v for k, v in sub_metrics.items() if k.endswith(("/dnll", "/state_err_at_K"))}
        assert carried, f"{sub} has no key metrics"
        assert {k: tier1_metrics[f"{prefix}/{k}"] for k in carried} == carried

    # resume again: nothing starts, and the results table has one row per run id.
    run_cli([*common, "representations=[mel]", "resume=true"], tmp_path)
    assert [_started(tmp_path, s) for s in subs] == [1, 1, 2]
    run_cli([], tmp_path, module="latentdyn.tracking.results")
    with (tmp_path / "outputs" / "results_table.csv").open() as fh:
        assert [row["run_id"] for row in csv.DictReader(fh)].count("T") == 1


@pytest.mark.parametrize(
    ("logger", "artifact"),
    [("wandb", "wandb/offline-run-*/*.wandb"), ("tensorboard", "tensorboard/events.*")],
)
def test_training_loggers_write_into_the_run_dir(
    tmp_path: Path, monkeypatch, logger: str, artifact: str
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_cli(
        ["experiment=exp1_vmf", "debug=smoke", "horizons=[1,2]", f"logger={logger}", "run_id=L"], tmp_path
    )
    run_dir = tmp_path / "outputs" / "tier1" / "exp1_vmf" / "L"
    found = list(run_dir.glob(artifact))
    # One logger per job: every training stage of the job writes into the same place.
    assert found and len({p.parent for p in found}) == 1, (
        f"expected {artifact} in one directory of {run_dir}: {found}"
    )


# Smaller settings for some experiments, for speed only: which experiments run is the glob's business.
FASTER = {
    "exp1_vmf": ["horizons=[1]"],
    "exp1b_vmf_rollout": ["rollout.k_steps=2", "trainer.max_steps=6"],
    "exp3_rep_compare": ["horizons=[1]", "representations=[mel]"],
    "exp4_linear_readout": ["pca.dims=[4]", "horizons=[1]"],
    # All four variants, each with one horizon and one scored utterance.
    "exp5_betavae": ["horizons=[1]", "recon_eval.n_utterances=1"],
    "exp7_perceptual_rollout": ["rollout_lengths=[1,2]"],
    # Four VAE-GAN steps (every loss is on from step 2 under smoke), one horizon, one scored utterance.
    "exp9_pocket_mimi_vae": ["max_steps=4", "horizons=[1]", "recon_eval.n_utterances=1"],
    "tier1": ["horizons=[1]", "representations=[mel]"],
}


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One outputs/cache root for every experiment, with an Exp 1 run that `checkpoint=latest` finds."""
    root = tmp_path_factory.mktemp("every_experiment")
    run_cli(["experiment=exp1_vmf", "debug=smoke", "run_id=source", *FASTER["exp1_vmf"]], root)
    return root


def _experiments() -> list[str]:
    from latentdyn.cli import available_experiments

    return available_experiments()


def test_the_glob_finds_the_experiments() -> None:
    assert {"exp1_vmf", "exp2_injection", "phase0", "quickstart", "tier1"} <= set(_experiments())


# In the study's order (natural sort): Exp 8 reads Exp 5's store, Exp 10 Exp 8's codebook, Exp 11 Exp 10's model.
@pytest.mark.parametrize("name", _experiments())
def test_every_experiment_config_runs_from_the_cli_under_smoke(shared_root: Path, name: str) -> None:
    run_id = f"glob-{name}"
    run_cli([f"experiment={name}", "debug=smoke", f"run_id={run_id}", *FASTER.get(name, [])], shared_root)
    status = [r["status"] for r in manifest_lines(shared_root) if r["run_id"] == run_id]
    assert status == ["started", "completed"]


def test_exp2_diagnoses_the_latest_exp1b_checkpoint(shared_root: Path) -> None:
    run_cli(
        ["experiment=exp1b_vmf_rollout", "debug=smoke", "run_id=ft", *FASTER["exp1b_vmf_rollout"]],
        shared_root,
    )
    run_cli(
        ["experiment=exp2_injection", "debug=smoke", "run_id=on_ft", "checkpoint=latest:exp1b_vmf_rollout"],
        shared_root,
    )
    exp2_log = (shared_root / "outputs" / "tier1" / "exp2_injection" / "on_ft" / "run.log").read_text()
    assert "vmf_rollout_final.ckpt" in exp2_log
