"""Exp 1 and Exp 2 pipelines under debug=smoke: outputs, checkpoints with embedded config, determinism."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from latentdyn.experiments import exp1_vmf, exp2_injection
from latentdyn.models.checkpoints import CONFIG_KEY
from latentdyn.models.dynamics import load_dynamics
from latentdyn.tracking.lookup import resolve_checkpoint
from latentdyn.tracking.manifest import append_record

SMOKE = ["debug=smoke", "logger=none"]


@pytest.fixture(scope="module")
def lightning_loaded() -> None:
    import lightning.pytorch  # noqa: F401  (one ~20 s import for the module)


def _exp1(compose_cfg, *overrides: str):
    cfg = compose_cfg(["experiment=exp1_vmf", *SMOKE, "horizons=[1]", *overrides])
    return cfg, exp1_vmf.run(cfg)


@pytest.mark.parametrize("model", ["vmf_lognormal", "gaussian_mdn"])
def test_exp1_writes_checkpoints_metrics_and_tables(compose_cfg, lightning_loaded, model: str) -> None:
    cfg, metrics = _exp1(compose_cfg, f"model={model}")
    run_dir = Path(cfg.run_dir)
    prefix = "vmf" if model == "vmf_lognormal" else "mdn"
    ckpt = run_dir / "checkpoints" / f"{prefix}_k1_final.ckpt"
    assert ckpt.is_file()
    assert torch.load(ckpt, weights_only=True)[CONFIG_KEY]["name"] == "exp1_vmf"
    loaded = load_dynamics(ckpt)
    assert loaded.run_config["model"]["head"]["_target_"] == cfg.model.head._target_
    with (run_dir / "tables.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["slice"], r["predictor"]) for r in rows} == {
        (s, p) for s in ("all", "high_energy", "utterance_medial") for p in ("model", "persistence", "linear")
    }
    model_all = next(r for r in rows if r["slice"] == "all" and r["predictor"] == "model")
    assert float(model_all["nll"]) == pytest.approx(metrics["k1/nll"])
    assert metrics["k1/dnll"] == pytest.approx(metrics["k1/nll"] - metrics["k1/nll_baseline"])
    assert model_all["horizon_mode"] == "lag"
    assert metrics["k1/persistence_mse"] > 0
    gap = json.loads((run_dir / "metrics.json").read_text())["horizons"]["k1"]["rollout_gap"]
    assert metrics["k1/rollout_gap_nll"] == pytest.approx(gap["rollout_nll"] - gap["teacher_nll"])
    # The reference's defaults: lag sample on raw latents; the checkpoint says so.
    assert (loaded.horizon_mode, loaded.standardized) == ("lag", False)
    details = json.loads((run_dir / "metrics.json").read_text())
    assert details["horizons"]["k1"]["checkpoint"] == str(ckpt)


@pytest.mark.slow
def test_exp1_same_config_and_seed_give_same_metrics(compose_cfg, lightning_loaded) -> None:
    cfg, first = _exp1(compose_cfg)
    first_json = (Path(cfg.run_dir) / "metrics.json").read_text()
    _, second = _exp1(compose_cfg)
    second_json = (Path(cfg.run_dir) / "metrics.json").read_text()
    _, other_seed = _exp1(compose_cfg, "seed=1")
    assert first == second
    assert first_json == second_json  # the whole file: every battery row, every fit metric
    assert first != other_seed


@pytest.mark.slow
def test_exp2_runs_the_injection_diagnostic_of_a_checkpoint(compose_cfg, lightning_loaded) -> None:
    cfg1, _ = _exp1(compose_cfg)
    ckpt = Path(cfg1.run_dir) / "checkpoints" / "vmf_k1_final.ckpt"
    cfg2 = compose_cfg(["experiment=exp2_injection", *SMOKE, f"checkpoint={ckpt}"])
    metrics = exp2_injection.run(cfg2)
    run_dir = Path(cfg2.run_dir)
    names = ["injection_diag.json", "per_step.csv", "metrics.json"]
    names += [f"injection_{m}.png" for m in ("dnll", "cos", "mag_ratio", "state_err")]
    for name in names:
        assert (run_dir / name).is_file(), name
    modes = ("A_teacher", "B_periodic", "C_one_shot", "D_rollout")
    assert all(f"{mode}/dnll" in metrics for mode in modes)
    # Teacher forcing keeps the state on GT; free-running drifts away from it.
    assert metrics["A_teacher/state_err_at_K"] == 0.0
    assert metrics["D_rollout/state_err_at_K"] > 0.0
    diag = json.loads((run_dir / "injection_diag.json").read_text())
    assert diag["k_steps"] == cfg2.diagnostic.k_steps and diag["horizon_k"] == 1 and diag["window_size"] == 4
    assert [s["step"] for s in diag["modes"]["D_rollout"]["per_step"]] == list(range(1, diag["k_steps"] + 1))
    with (run_dir / "per_step.csv").open() as fh:
        steps = {int(r["step"]) for r in csv.DictReader(fh)}
    assert steps == set(range(1, cfg2.diagnostic.k_steps + 1))


@pytest.mark.slow
def test_exp2_rolls_out_a_lag_k_model(compose_cfg, lightning_loaded) -> None:
    """horizon_k = 2: the context lags the predicted one-frame delta by 2 frames; the reference schema says so."""
    cfg1, _ = _exp1(compose_cfg, "horizons=[2]")
    ckpt = Path(cfg1.run_dir) / "checkpoints" / "vmf_k2_final.ckpt"
    cfg2 = compose_cfg(["experiment=exp2_injection", *SMOKE, f"checkpoint={ckpt}", "horizon_k=2"])
    metrics = exp2_injection.run(cfg2)
    diag = json.loads((Path(cfg2.run_dir) / "injection_diag.json").read_text())
    assert diag["horizon_k"] == 2 and diag["frames_per_step"] == 1 and metrics["horizon_k"] == 2.0
    # With lag 2 and frame-only injection, C's state is GT before step 2, then drifts.
    per_step = diag["modes"]["C_one_shot"]["per_step"]
    assert per_step[1]["state_err"] == 0.0 and per_step[2]["state_err"] > 0.0


def test_checkpoint_latest_resolves_through_the_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    for i, (run_id, status) in enumerate((("old", "completed"), ("new", "completed"), ("newest", "failed"))):
        run_dir = tmp_path / run_id
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / "vmf_k1_final.ckpt").write_bytes(b"x")
        base = {"run_id": run_id, "experiment": "exp1_vmf", "run_dir": str(run_dir)}
        append_record(manifest, {**base, "status": "started", "time": f"2026-01-01T00:00:0{i}"})
        append_record(manifest, {**base, "status": status, "time": f"2026-01-01T00:00:0{i}"})
    path = resolve_checkpoint("latest", manifest, "exp1_vmf", "*_k1_final.ckpt")
    assert path == tmp_path / "new" / "checkpoints" / "vmf_k1_final.ckpt"
    with pytest.raises(FileNotFoundError, match="exp1b"):
        resolve_checkpoint("latest:exp1b", manifest, "exp1_vmf", "*_k1_final.ckpt")
    # A fine-tuned run directory holds only a rollout checkpoint: the second pattern finds it.
    tuned = tmp_path / "tuned" / "checkpoints"
    tuned.mkdir(parents=True)
    (tuned / "vmf_rollout_final.ckpt").write_bytes(b"x")
    patterns = ["*_k1_final.ckpt", "*_rollout_final.ckpt"]
    assert (
        resolve_checkpoint(str(tmp_path / "tuned"), manifest, "exp1_vmf", patterns)
        == tuned / "vmf_rollout_final.ckpt"
    )
    assert (
        resolve_checkpoint(str(tmp_path / "new"), manifest, "exp1_vmf", patterns).name == "vmf_k1_final.ckpt"
    )
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        resolve_checkpoint(str(tmp_path / "nothing.ckpt"), manifest, "exp1_vmf", "*")
