"""Exp 4 under debug=smoke: the reference's MDN per horizon on raw latents and raw-space PCA projections, the
summary's battery and injection columns (against tables.csv and injection_diag.json), the raw-scale state
errors, the explained-variance curve, and projected stores derived (and cached, per space) from the base."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import DictConfig, open_dict

from latentdyn.experiments import exp4_linear_readout as exp4
from latentdyn.pipeline.store import prepare_latent_store
from latentdyn.representations.pca import PCAFit
from tests.conftest import compose_at

DIMS = (2, 3)
HORIZONS = (1, 2)
VARIANTS = ("raw", *(f"pca{k}" for k in DIMS))
MODES = ("A_teacher", "B_periodic", "C_one_shot", "D_rollout")
BATTERY = ("nll", "dnll", "cos", "logmag_r2", "mag_ratio", "mse")
INJECTION = ("dnll", "cos", "mag_ratio", "state_err", "state_err_at_K", "state_err_raw", "state_err_raw_at_K")


def _compose(root: Path, *overrides: str) -> DictConfig:
    return compose_at(
        root,
        [
            "experiment=exp4_linear_readout",
            "debug=smoke",
            "logger=none",
            f"pca.dims=[{','.join(map(str, DIMS))}]",
            "pca.chunk_frames=64",
            f"horizons=[{','.join(map(str, HORIZONS))}]",
            "battery.slices=[all]",
            *overrides,
        ],
        root / "run",
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[DictConfig, dict[str, float]]:
    cfg = _compose(tmp_path_factory.mktemp("exp4"))
    return cfg, exp4.run(cfg)


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _summary(cfg: DictConfig) -> dict[str, dict[str, str]]:
    return {r["variant"]: r for r in _csv(Path(cfg.run_dir) / "summary.csv")}


def test_experiment_config_is_the_reference_setup(tmp_path: Path) -> None:
    cfg = compose_at(tmp_path, ["experiment=exp4_linear_readout"], tmp_path / "run")
    assert list(cfg.pca.dims) == [32, 64] and cfg.pca.space == "raw"
    assert list(cfg.horizons) == [1, 2, 4, 8] and cfg.trainer.max_steps == 15000
    assert cfg.model.name == "mdn" and cfg.model.head.n_components == 8
    backbone = cfg.model.backbone
    assert (backbone.hidden, backbone.layers, backbone.dropout, backbone.layer_norm) == (512, 2, 0.0, False)
    assert cfg.model.context == 8 and cfg.horizon_mode == "lag" and cfg.standardize is False


@pytest.mark.slow
def test_summary_has_a_row_per_variant_with_the_battery_columns(smoke_run) -> None:
    cfg, metrics = smoke_run
    rows = _summary(cfg)
    assert list(rows) == list(VARIANTS)
    assert int(rows["raw"]["dim"]) == 80 and rows["raw"]["representation"] == "mel"
    assert float(rows["raw"]["explained_variance_fraction"]) == 1.0
    assert float(rows["raw"]["recon_mse_test"]) == 0
    fractions = [float(rows[f"pca{k}"]["explained_variance_fraction"]) for k in DIMS]
    assert 0 < fractions[0] < fractions[1] < 1
    recon = [float(rows[f"pca{k}"]["recon_mse_test"]) for k in DIMS]
    assert recon[0] > recon[1] > 0
    for k in DIMS:
        assert int(rows[f"pca{k}"]["dim"]) == k and rows[f"pca{k}"]["representation"] == f"pca{k}-mel"
    # Each k{k}_* column is the model row of the battery on the training slice (tables.csv), and
    # k{k}_mse_vs_persistence the ratio of its MSE to the persistence row's.
    battery = _csv(Path(cfg.run_dir) / "tables.csv")
    assert {(r["variant"], r["predictor"]) for r in battery} == {
        (v, p) for v in VARIANTS for p in ("model", "persistence", "linear")
    }
    for variant, row in rows.items():
        for k in HORIZONS:
            mine = {
                r["predictor"]: r
                for r in battery
                if r["variant"] == variant and int(r["horizon"]) == k and r["slice"] == "all"
            }
            for metric in BATTERY:
                assert float(row[f"k{k}_{metric}"]) == pytest.approx(
                    float(mine["model"][metric]), nan_ok=True
                )
            for metric in ("nll", "dnll", "cos", "mse"):
                assert math.isfinite(float(row[f"k{k}_{metric}"]))
            ratio = float(mine["model"]["mse"]) / float(mine["persistence"]["mse"])
            assert float(row[f"k{k}_mse_vs_persistence"]) == pytest.approx(ratio)
        assert "k4_dnll" not in row
    assert (Path(cfg.run_dir) / "pca2" / "checkpoints" / "mdn_k2_final.ckpt").is_file()


@pytest.mark.slow
def test_injection_columns_and_key_metrics(smoke_run) -> None:
    cfg, metrics = smoke_run
    rows = _summary(cfg)
    diag = json.loads((Path(cfg.run_dir) / "injection_diag.json").read_text())
    assert set(diag) == set(VARIANTS)
    for variant, row in rows.items():
        result = diag[variant]
        assert result["horizon_k"] == 1 and result["dim"] == int(row["dim"])
        assert result["state_err_raw_is_raw_latent_units"] is True
        assert set(result["modes"]) == set(MODES)
        assert len(result["modes"]["D_rollout"]["per_step"]) == cfg.diagnostic.k_steps
        for mode in MODES:
            for key in INJECTION:
                value = float(row[f"{mode}_{key}"])
                assert value == pytest.approx(result["modes"][mode][key]), (variant, mode, key)
                assert math.isfinite(value)
        # Raw latents modelled raw, and raw-space (isometric) projections: the raw-scale state error is the
        # model-space one. Teacher forcing keeps the state exact; a free rollout drifts.
        for mode in MODES:
            for suffix in ("", "_at_K"):
                raw = float(row[f"{mode}_state_err_raw{suffix}"])
                assert raw == pytest.approx(float(row[f"{mode}_state_err{suffix}"]), rel=1e-6)
        assert float(row["A_teacher_state_err_raw_at_K"]) == 0.0
        assert float(row["D_rollout_state_err_raw_at_K"]) > 0.0
        injection_dir = Path(cfg.run_dir) / variant / "injection"
        assert (injection_dir / "per_step.csv").is_file()
        for column in exp4.KEY_COLUMNS:
            assert metrics[f"{variant}/{column}"] == pytest.approx(float(row[column]))
    assert set(exp4.KEY_COLUMNS) == {"k1_dnll", "D_rollout_dnll", "D_rollout_state_err_raw_at_K"}
    record = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())
    assert record["pca_space"] == "raw" and record["config"]["space"] == "raw"


@pytest.mark.slow
def test_explained_variance_curve_matches_the_fit(smoke_run) -> None:
    cfg, _ = smoke_run
    run_dir = Path(cfg.run_dir)
    curve = _csv(run_dir / "explained_variance.csv")
    assert [int(r["component"]) for r in curve] == list(range(1, max(DIMS) + 1))
    ratios = np.array([float(r["explained_variance_ratio"]) for r in curve])
    assert np.all(np.diff(ratios) <= 1e-12) and ratios.min() > 0
    np.testing.assert_allclose([float(r["cumulative_ratio"]) for r in curve], np.cumsum(ratios))
    rows = _summary(cfg)
    for k in DIMS:
        assert float(rows[f"pca{k}"]["explained_variance_fraction"]) == pytest.approx(ratios[:k].sum())
    png = run_dir / "explained_variance.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_projected_stores_are_raw_space_derived_and_cached(smoke_run, monkeypatch) -> None:
    cfg, _ = smoke_run
    cache = Path(cfg.paths.cache_dir)
    fits = [p for p in (cache / "pca_fit").iterdir() if p.is_dir()]
    assert len(fits) == 1
    built = {p.name: (p / "artifact.json").read_text() for p in (cache / "pca").iterdir() if p.is_dir()}
    assert len(built) == len(DIMS)
    base = prepare_latent_store(cfg)
    fit = PCAFit.load(fits[0])
    assert fit.space == "raw"
    assert json.loads((fits[0] / "artifact.json").read_text())["spec"]["space"] == "raw"
    # The raw-space fit: the PCA mean is the raw train mean (centred, not standardised).
    train = base.latents[base.split_rows("train")].astype(np.float64)
    np.testing.assert_allclose(fit.mean, train.mean(axis=0), rtol=1e-6, atol=1e-6)

    def no_refit(*args, **kwargs):
        raise AssertionError("the cached PCA fit should have been reused")

    monkeypatch.setattr(exp4, "fit_incremental_pca", no_refit)
    for k in DIMS:  # a second request reuses the store untouched
        store = exp4.prepare_projected_store(cfg, base, k)
        assert (store.root / "artifact.json").read_text() == built[store.root.name]
        assert store.meta["extra"]["pca"]["space"] == "raw"
        assert store.index == base.index
        np.testing.assert_array_equal(store.log_energy, base.log_energy)
        # Stored: C_k (z - mean), unwhitened, float16-rounded.
        expected = (base.latents.astype(np.float64) - fit.mean) @ fit.components[:k].T
        np.testing.assert_allclose(store.latents.astype(np.float64), expected, rtol=2e-3, atol=2e-2)
    # A new dim below the fit's derives a new store from the cached fit (no refit).
    new = exp4.prepare_projected_store(cfg, base, 1)
    assert new.dim == 1 and new.root.name not in built
    # Nothing else was built: the run's stores plus the new one.
    assert {p.name for p in (cache / "pca").iterdir() if p.is_dir()} == {*built, new.root.name}


@pytest.mark.slow
def test_the_standardized_space_is_a_separate_cache(smoke_run) -> None:
    cfg, _ = smoke_run
    cache = Path(cfg.paths.cache_dir)
    before = {p.name for p in (cache / "pca").iterdir() if p.is_dir()}
    std_cfg = cfg.copy()
    with open_dict(std_cfg):
        std_cfg.pca.space = "train_standardized"
    base = prepare_latent_store(std_cfg)
    store = exp4.prepare_projected_store(std_cfg, base, DIMS[0])
    assert store.root.name not in before
    assert store.meta["extra"]["pca"]["space"] == "train_standardized"
    spec = json.loads((store.root / "artifact.json").read_text())["spec"]
    assert spec["fit"]["space"] == "train_standardized"
    # Stored: C_k ((z - m) / s - mu) with the base store's train statistics.
    fit, _ = exp4.prepare_pca_fit(std_cfg, base, max(DIMS))
    assert fit.space == "train_standardized"
    np.testing.assert_allclose(fit.store_std, base.std.astype(np.float64))
    x = (base.latents.astype(np.float64) - base.mean) / base.std
    expected = (x - fit.mean) @ fit.components[: DIMS[0]].T
    np.testing.assert_allclose(store.latents.astype(np.float64), expected, rtol=2e-3, atol=2e-2)
    # Its decoding rescales each dimension, so its state errors are not in raw latent units.
    assert exp4.raw_scale_is_isometric(store) is False
    assert exp4.raw_scale_is_isometric(base) is True
    raw_store = exp4.prepare_projected_store(cfg, base, DIMS[0])
    assert exp4.raw_scale_is_isometric(raw_store) is True


def test_injection_columns_blank_the_raw_scale_of_a_non_isometric_variant() -> None:
    summary = {key: float(i + 1) for i, key in enumerate(INJECTION)}
    result = SimpleNamespace(modes=["D_rollout"], mode_summary=lambda mode: summary)
    isometric = exp4.injection_columns(result, isometric=True)
    assert isometric == {f"D_rollout_{key}": value for key, value in summary.items()}
    other = exp4.injection_columns(result, isometric=False)
    assert math.isnan(other["D_rollout_state_err_raw"]) and math.isnan(other["D_rollout_state_err_raw_at_K"])
    assert other["D_rollout_state_err"] == summary["state_err"]


@pytest.mark.slow
def test_dims_space_and_slice_are_validated(smoke_run, tmp_path: Path) -> None:
    cfg, _ = smoke_run
    bad = cfg.copy()
    with open_dict(bad):
        bad.pca.dims = [4, 81]
        bad.run_dir = str(tmp_path)
    with pytest.raises(ValueError, match="exceed the dimension 80"):
        exp4.run(bad)
    for dims in ([], [0, 4], [2.5]):
        with open_dict(bad):
            bad.pca.dims = dims
        with pytest.raises(ValueError, match="positive integers"):
            exp4.pca_dims(bad)
    with open_dict(bad):
        bad.pca.dims = [2]
        bad.pca.space = "whitened"
    with pytest.raises(ValueError, match="space"):
        exp4.run(bad)
    with open_dict(bad):
        bad.pca.space = "raw"
        bad.datamodule.slice = "high_energy"
    with pytest.raises(ValueError, match="battery.slices"):
        exp4.run(bad)
