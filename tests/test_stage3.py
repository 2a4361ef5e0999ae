"""Stage 3 end to end: Exp 5 -> Exp 8 -> Exp 10 -> Exp 11 (a σ multirun) under debug=smoke, and each
experiment's message when what it builds on has not been run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import compose_at, run_cli

SMOKE = ["debug=smoke"]


@pytest.mark.parametrize(
    "experiment, needs, key",
    [
        ("exp8_direction_codebook", "exp5_betavae", "store"),
        ("exp10_direction_ar", "exp8_direction_codebook", "codebook"),
        ("exp11_consistency_rollout", "exp10_direction_ar", "direction_ar"),
    ],
)
def test_each_experiment_names_the_one_to_run_first(
    tmp_path: Path, experiment: str, needs: str, key: str
) -> None:
    from hydra.utils import get_method

    cfg = compose_at(tmp_path, [f"experiment={experiment}", *SMOKE], tmp_path / "run")
    with pytest.raises(
        FileNotFoundError, match=f"run `latentdyn experiment={needs}` first or pass {key}=PATH"
    ):
        get_method(cfg.pipeline)(cfg)


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


@pytest.mark.slow
def test_smoke_chain_exp5_exp8_exp10_exp11(tmp_path: Path) -> None:
    run_cli(["experiment=exp5_betavae", "variant=baseline_betavae", "run_id=e5", *SMOKE], tmp_path)

    run_cli(["experiment=exp8_direction_codebook", "run_id=e8", *SMOKE], tmp_path)
    e8 = tmp_path / "outputs" / "tier3" / "exp8_direction_codebook" / "e8"
    store = json.loads((tmp_path / "outputs/tier2/exp5_betavae/e5/baseline_betavae/metrics.json").read_text())
    metrics8 = json.loads((e8 / "metrics.json").read_text())
    assert metrics8["latent_store"] == store["latent_store"] and metrics8["dim"] == 32
    for k in (4, 16):
        book = np.load(e8 / f"codebook_K{k}.npy")
        assert book.shape == (k, 32)
        np.testing.assert_allclose(np.linalg.norm(book, axis=1), 1.0, atol=1e-5)
        assert np.load(e8 / f"codebook_state_K{k}.npy").shape == (k, 32)
    rows8 = _rows(e8 / "summary.csv")
    assert {(r["kind"], r["K"]) for r in rows8} == {
        (kind, k) for kind in ("direction", "raw_delta", "state") for k in ("4", "16")
    }
    direction = {r["K"]: float(r["angle_mean_deg"]) for r in rows8 if r["kind"] == "direction"}
    assert 0 < direction["16"] < direction["4"] < 90  # a larger codebook quantises directions better
    assert all(float(r["recon_log_mel"]) >= 0 for r in rows8)
    assert isinstance(metrics8["go"]["go"], bool) and (e8 / "angle_error_vs_K.png").is_file()
    assert len(list((e8 / "recon_audio").glob("*/direction_K16.wav"))) == 2

    run_cli(["experiment=exp10_direction_ar", "run_id=e10", *SMOKE], tmp_path)
    e10 = tmp_path / "outputs" / "tier3" / "exp10_direction_ar" / "e10"
    metrics10 = json.loads((e10 / "metrics.json").read_text())
    assert metrics10["codebook"] == str(e8 / "codebook_K16.npy") and metrics10["codebook_size"] == 16
    assert (e10 / "checkpoints" / "direction_ar_final.ckpt").is_file()
    tf = json.loads((e10 / "teacher_forced_metrics.json").read_text())
    assert 0 <= tf["top1"] <= tf["top5"] <= 1 and tf["n"] > 0
    rollouts = json.loads((e10 / "rollout_metrics.json").read_text())["strategies"]
    assert set(rollouts) == {"argmax", "categorical", "top_p"}
    assert sorted(int(k) for k in rollouts["argmax"]["horizons"]) == [1, 2, 4, 8, 16]
    assert rollouts["argmax"]["per_step"][0]["state_err"] == 0.0  # before the first step: the GT state
    assert len(list((e10 / "rollout_audio").glob("*/argmax_k8.wav"))) == 2

    sweep = ["-m", "experiment=exp11_consistency_rollout", "sigma=0.1,0.5", "run_id=e11", *SMOKE]
    proc = run_cli(sweep, tmp_path)
    assert "best_sigmas.json" in proc.stdout
    e11 = tmp_path / "multirun" / "exp11_consistency_rollout" / "e11"
    conditions = {f"{c}{t}" for c in ("dir_ar_argmax", "dir_ar_categorical", "mdn") for t in ("", "_tweedie")}
    for job in ("0", "1"):
        results = json.loads((e11 / job / "rollout_metrics.json").read_text())["conditions"]
        assert set(results) == conditions
        assert (e11 / job / "state_err_vs_k.png").is_file() and (e11 / job / "best_sigmas.json").is_file()
        assert len(list((e11 / job / "rollout_audio").glob("*/mdn_tweedie_k4.wav"))) == 2
    job0 = json.loads((e11 / "0" / "rollout_metrics.json").read_text())["conditions"]
    job1 = json.loads((e11 / "1" / "rollout_metrics.json").read_text())["conditions"]
    # Same segments and seeds: the uncorrected argmax rollout does not depend on σ; the corrected one does.
    assert job0["dir_ar_argmax"]["per_step"] == job1["dir_ar_argmax"]["per_step"]
    assert job0["dir_ar_argmax_tweedie"]["per_step"] != job1["dir_ar_argmax_tweedie"]["per_step"]
    merged = json.loads((e11 / "sigma_sweep.json").read_text())
    assert {e["sigma"] for e in merged} == {None, 0.1, 0.5}
    best = json.loads((e11 / "best_sigmas.json").read_text())
    assert set(best) == {"dir_ar_argmax_tweedie", "dir_ar_categorical_tweedie", "mdn_tweedie"}
    for condition, record in best.items():
        at_k4 = {
            e["sigma"]: e["final_state_err"]
            for e in merged
            if e["condition"] == condition and e["k"] == 4 and e["nan_share"] < 0.5
        }
        assert record["best_sigma"] == min(at_k4, key=at_k4.get)
    assert (e11 / "sigma_sweep.png").is_file() and (e11 / "summary.csv").is_file()

    # The default protocol runs Exp 11 over several seeds: per-seed outputs, means with CIs.
    run_cli(
        ["experiment=exp11_consistency_rollout", "sigma=0.1", "seeds=[0,1]", "run_id=s11", *SMOKE], tmp_path
    )
    s11 = tmp_path / "outputs" / "tier3" / "exp11_consistency_rollout" / "s11"
    per_seed = list(csv.DictReader((s11 / "summary_per_seed.csv").open()))
    summary = list(csv.DictReader((s11 / "summary.csv").open()))
    assert {r["seed"] for r in per_seed} == {"0", "1"} and len(per_seed) == 2 * len(summary)
    assert {r["n_seeds"] for r in summary} == {"2"}
    for row in summary:
        if row["final_state_err"] not in ("", "nan"):
            low, mean, high = (
                float(row[c])
                for c in ("final_state_err_ci_low", "final_state_err", "final_state_err_ci_high")
            )
            assert low <= mean <= high
    assert (s11 / "seed0" / "rollout_metrics.json").is_file() and (
        s11 / "seed1" / "rollout_metrics.json"
    ).is_file()
    assert (s11 / "state_err_vs_k.png").is_file()


def test_models_on_different_stores_are_refused_without_building_either_store(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from latentdyn.pipeline.injection import store_root_of_checkpoint
    from latentdyn.pipeline.stage3 import check_same_store
    from latentdyn.pipeline.store import latent_store_path

    cfg = compose_at(tmp_path, ["experiment=exp11_consistency_rollout", *SMOKE], tmp_path / "run")
    own = OmegaConf.to_container(cfg, resolve=True)
    ours = latent_store_path(cfg.copy())
    assert store_root_of_checkpoint(cfg, own) == ours
    other = {**own, "representation": {**own["representation"], "n_mels": 40}}
    theirs = store_root_of_checkpoint(cfg, other)
    assert theirs != ours
    check_same_store([("a", ours), ("b", ours)])
    with pytest.raises(ValueError, match="different latent stores.*skip_mdn"):
        check_same_store([("direction AR", ours), ("MDN", theirs)], ". or skip_mdn=true")
    assert not theirs.exists() and not ours.exists()  # nothing was extracted to find out
