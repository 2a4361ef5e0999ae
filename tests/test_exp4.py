"""Exp 4 under debug=smoke: summary per variant, explained-variance curve, injection diagnostics, and
projected stores derived (and cached) from the base store."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig, open_dict

from latentdyn.experiments import exp4_linear_readout as exp4
from latentdyn.experiments.phase0 import prepare_latent_store
from latentdyn.representations.pca import PCAFit
from tests.conftest import compose_at

DIMS = (4, 8)
MODES = ("A_teacher", "B_periodic", "C_one_shot", "D_rollout")


def _compose(root: Path, *overrides: str) -> DictConfig:
    return compose_at(
        root,
        [
            "experiment=exp4_linear_readout",
            "debug=smoke",
            "logger=none",
            f"pca.dims=[{','.join(map(str, DIMS))}]",
            "pca.chunk_frames=64",
            "battery.slices=[all]",
            *overrides,
        ],
        root / "run",
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[DictConfig, dict[str, float]]:
    cfg = _compose(tmp_path_factory.mktemp("exp4"))
    return cfg, exp4.run(cfg)


def _summary(cfg: DictConfig) -> list[dict[str, str]]:
    with (Path(cfg.run_dir) / "summary.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_summary_has_a_row_per_variant(smoke_run) -> None:
    cfg, metrics = smoke_run
    rows = {r["variant"]: r for r in _summary(cfg)}
    assert list(rows) == ["raw", *(f"pca{k}" for k in DIMS)]
    assert int(rows["raw"]["dim"]) == 80 and rows["raw"]["representation"] == "mel"
    assert (
        float(rows["raw"]["explained_variance_fraction"]) == 1.0 and float(rows["raw"]["recon_mse_test"]) == 0
    )
    fractions = [float(rows[f"pca{k}"]["explained_variance_fraction"]) for k in DIMS]
    assert 0 < fractions[0] < fractions[1] < 1
    recon = [float(rows[f"pca{k}"]["recon_mse_test"]) for k in DIMS]
    assert recon[0] > recon[1] > 0
    for k in DIMS:
        row = rows[f"pca{k}"]
        assert int(row["dim"]) == k and row["representation"] == f"pca{k}-mel"
    for row in rows.values():
        assert np.isfinite(float(row["k1_nll_per_dim"])) and float(row["k1_mse_vs_persistence"]) > 0
        for mode in MODES:
            assert np.isfinite(float(row[f"{mode}_auc_mse"]))
        assert metrics[f"{row['variant']}/k1_nll_per_dim"] == pytest.approx(float(row["k1_nll_per_dim"]))
    with (Path(cfg.run_dir) / "tables.csv").open() as fh:
        battery = list(csv.DictReader(fh))
    assert {(r["variant"], r["predictor"]) for r in battery} == {
        (v, p) for v in rows for p in ("model", "persistence", "linear")
    }
    assert (Path(cfg.run_dir) / "pca4" / "checkpoints" / "vmf_k1_final.ckpt").is_file()


def test_explained_variance_curve_matches_the_fit(smoke_run) -> None:
    cfg, _ = smoke_run
    run_dir = Path(cfg.run_dir)
    with (run_dir / "explained_variance.csv").open() as fh:
        curve = list(csv.DictReader(fh))
    assert [int(r["component"]) for r in curve] == list(range(1, max(DIMS) + 1))
    ratios = np.array([float(r["explained_variance_ratio"]) for r in curve])
    assert np.all(np.diff(ratios) <= 1e-12) and ratios.min() > 0
    np.testing.assert_allclose([float(r["cumulative_ratio"]) for r in curve], np.cumsum(ratios))
    rows = {r["variant"]: r for r in _summary(cfg)}
    for k in DIMS:
        assert float(rows[f"pca{k}"]["explained_variance_fraction"]) == pytest.approx(ratios[:k].sum())
    png = run_dir / "explained_variance.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_injection_diag_per_variant(smoke_run) -> None:
    cfg, _ = smoke_run
    diag = json.loads((Path(cfg.run_dir) / "injection_diag.json").read_text())
    assert list(diag) == ["raw", *(f"pca{k}" for k in DIMS)]
    for variant, result in diag.items():
        assert set(result["summaries"]) == set(MODES)
        assert result["dim"] == (80 if variant == "raw" else int(variant[3:]))
        assert len(result["curves"]["D_rollout"]["mse"]["mean"]) == cfg.diagnostic.horizon
        assert (Path(cfg.run_dir) / variant / "injection" / "per_step.csv").is_file()


def test_projected_stores_are_derived_and_cached(smoke_run, monkeypatch) -> None:
    cfg, _ = smoke_run
    cache = Path(cfg.paths.cache_dir)
    assert len([p for p in (cache / "pca_fit").iterdir() if p.is_dir()]) == 1
    built = {p.name: (p / "artifact.json").read_text() for p in (cache / "pca").iterdir() if p.is_dir()}
    assert len(built) == len(DIMS)
    base = prepare_latent_store(cfg)
    fit = PCAFit.load(next(p for p in (cache / "pca_fit").iterdir() if p.is_dir()))

    def no_refit(*args, **kwargs):
        raise AssertionError("the cached PCA fit should have been reused")

    monkeypatch.setattr(exp4, "fit_incremental_pca", no_refit)
    for k in DIMS:  # a second request reuses the store untouched
        store = exp4.prepare_projected_store(cfg, base, k)
        assert (store.root / "artifact.json").read_text() == built[store.root.name]
        assert store.index == base.index
        np.testing.assert_array_equal(store.log_energy, base.log_energy)
        expected = fit.project(base.latents, k)
        np.testing.assert_allclose(store.latents.astype(np.float64), expected, rtol=2e-3, atol=2e-3)
    # A new dim below the fit's derives a new store from the cached fit (no refit).
    new = exp4.prepare_projected_store(cfg, base, 2)
    assert new.dim == 2 and new.root.name not in built
    # Nothing else was built: the run's stores plus the new one.
    assert {p.name for p in (cache / "pca").iterdir() if p.is_dir()} == {*built, new.root.name}


def test_dims_are_validated(smoke_run, tmp_path: Path) -> None:
    cfg, _ = smoke_run
    too_big = cfg.copy()
    with open_dict(too_big):
        too_big.pca.dims = [4, 81]
        too_big.run_dir = str(tmp_path)
    with pytest.raises(ValueError, match="exceed the dimension 80"):
        exp4.run(too_big)
    for bad in ([], [0, 4], [2.5]):
        with open_dict(too_big):
            too_big.pca.dims = bad
        with pytest.raises(ValueError, match="positive integers"):
            exp4.pca_dims(too_big)
