"""Several seeds per variant: the ``seeds`` key, its validation and defaults, and Exp 4 end to end over two seeds
(per-seed outputs, summary with CI columns, one per-seed row per variant and seed)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from latentdyn.pipeline.seeds import PER_SEED_NAME, run_seeds, seed_config, seed_label
from tests.conftest import compose_at

COMPARING = ("exp3_rep_compare", "exp4_linear_readout", "exp5_betavae", "exp11_consistency_rollout")


@pytest.mark.parametrize("experiment", COMPARING)
def test_comparing_experiments_default_to_three_seeds_and_smoke_to_one(
    tmp_path: Path, experiment: str
) -> None:
    cfg = compose_at(tmp_path, [f"experiment={experiment}"], tmp_path / "run")
    assert run_seeds(cfg) == [0, 1, 2]
    smoke = compose_at(tmp_path, [f"experiment={experiment}", "debug=smoke", "seed=5"], tmp_path / "run")
    assert run_seeds(smoke) == [5]  # one run with the run's seed: the old layout and run time
    override = compose_at(
        tmp_path, [f"experiment={experiment}", "debug=smoke", "seeds=[0,1]"], tmp_path / "run"
    )
    assert run_seeds(override) == [0, 1]


def test_without_seeds_a_run_uses_its_seed(tmp_path: Path) -> None:
    cfg = compose_at(tmp_path, ["experiment=exp1_vmf", "seed=7"], tmp_path / "run")
    assert cfg.seeds is None and run_seeds(cfg) == [7]


@pytest.mark.parametrize(
    ("seeds", "match"),
    [([], "non-empty"), ("0,1", "non-empty"), ([0, -1], "non-negative"), ([0, 1.5], "non-negative"),
     ([True], "non-negative"), ([1, 1], "distinct")],
)  # fmt: skip
def test_bad_seeds_are_a_clear_error(seeds, match: str) -> None:
    cfg = OmegaConf.create({"seed": 0, "seeds": seeds})
    with pytest.raises(ValueError, match=f"seeds.*{match}|{match}.*seeds"):
        run_seeds(cfg)


def test_seed_layout_and_config() -> None:
    assert seed_label(0, [0]) == "." and seed_label(3, [3], "pca2") == "pca2"
    assert seed_label(1, [0, 1], "pca2") == "seed1/pca2" and seed_label(1, [0, 1]) == "seed1"
    cfg = OmegaConf.create({"seed": 0, "seeds": [0, 1], "run_dir": "/r"})
    s_cfg = seed_config(cfg, 1, "/r/seed1")
    assert (s_cfg.seed, s_cfg.seeds, s_cfg.run_dir) == (1, None, "/r/seed1")
    assert cfg.seed == 0 and list(cfg.seeds) == [0, 1]


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_exp4_over_two_seeds_reports_means_and_cis(tmp_path: Path) -> None:
    from latentdyn.experiments import exp4_linear_readout as exp4

    cfg = compose_at(
        tmp_path,
        [
            "experiment=exp4_linear_readout",
            "debug=smoke",
            "logger=none",
            "seeds=[0,1]",
            "pca.dims=[2]",
            "pca.chunk_frames=64",
            "horizons=[1]",
            "battery.slices=[all]",
        ],
        tmp_path / "run",
    )
    metrics = exp4.run(cfg)
    run_dir = Path(cfg.run_dir)
    variants = ("raw", "pca2")

    per_seed = _csv(run_dir / PER_SEED_NAME)
    assert sorted((r["variant"], r["seed"]) for r in per_seed) == sorted(
        (v, s) for v in variants for s in ("0", "1")
    )
    summary = {r["variant"]: r for r in _csv(run_dir / "summary.csv")}
    assert list(summary) == list(variants)
    for variant, row in summary.items():
        assert int(row["n_seeds"]) == 2
        seeds_rows = [r for r in per_seed if r["variant"] == variant]
        for column in ("k1_dnll", "k1_cos", "D_rollout_dnll", "D_rollout_state_err_at_K"):
            mean, low, high = (float(row[column + s]) for s in ("", "_ci_low", "_ci_high"))
            values = [float(r[column]) for r in seeds_rows]
            assert mean == pytest.approx(sum(values) / 2)
            assert low <= mean <= high
            assert (low, high) == pytest.approx((min(values), max(values)))  # two values: [min, max]
        # The seed changes the model: the two seeds' metrics differ.
        assert float(seeds_rows[0]["k1_dnll"]) != float(seeds_rows[1]["k1_dnll"])
        assert float(seeds_rows[0]["D_rollout_state_err_at_K"]) != float(
            seeds_rows[1]["D_rollout_state_err_at_K"]
        )
        # Seed-independent inputs: the same projection for both seeds (a zero-width interval).
        assert float(row["explained_variance_fraction_ci_low"]) == float(row["explained_variance_fraction"])
        for seed in (0, 1):
            assert (run_dir / f"seed{seed}" / variant / "checkpoints" / "mdn_k1_final.ckpt").is_file()
            assert (run_dir / f"seed{seed}" / variant / "injection" / "per_step.csv").is_file()
        assert not (run_dir / variant).exists()
        assert (run_dir / "injection_ci" / variant / "injection_dnll.png").is_file()
        assert metrics[f"{variant}/k1_dnll"] == pytest.approx(float(row["k1_dnll"]))
        assert metrics[f"{variant}/k1_dnll_ci_low"] == pytest.approx(float(row["k1_dnll_ci_low"]))
        assert metrics[f"{variant}/k1_dnll_ci_high"] == pytest.approx(float(row["k1_dnll_ci_high"]))
    assert metrics["n_seeds"] == 2
    # One PCA fit and one projected store, shared by the seeds.
    cache = Path(cfg.paths.cache_dir)
    assert len([p for p in (cache / "pca").iterdir() if p.is_dir()]) == 1
    assert (run_dir / "dnll_vs_horizon.png").read_bytes()[:4] == b"\x89PNG"
    ci_curves = _csv(run_dir / "injection_ci" / "raw" / "per_step.csv")
    assert all(int(r["n_seeds"]) == 2 for r in ci_curves)
    finite = [r for r in ci_curves if math.isfinite(float(r["mean"]))]
    assert finite and all(float(r["lo"]) <= float(r["mean"]) <= float(r["hi"]) for r in finite)
    diag = json.loads((run_dir / "injection_diag.json").read_text())
    assert set(diag["raw"]) == {"seed0", "seed1"}
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["seeds"] == [0, 1]
