"""PCA representation: streaming IncrementalPCA fits in the raw and the train-standardised space against
independent oracles (numpy SVD, sklearn's batch PCA), bounded-memory chunking, the stackable
representation's round trips, projected stores, and the raw-space isometry the injection's ``state_err_raw``
relies on."""

from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.linalg import hadamard
from sklearn.decomposition import PCA, IncrementalPCA

from latentdyn.data.latent_store import LatentStore, LatentStoreWriter
from latentdyn.diagnostics.injection import InjectionConfig, run_injection
from latentdyn.models.baselines import DiagonalGaussianBaseline
from latentdyn.representations.mel import MelRepresentation
from latentdyn.representations.pca import (
    FIT_INFO,
    PCAFit,
    PCARepresentation,
    chunk_bounds,
    fit_incremental_pca,
    iter_split_chunks,
    projection_space,
    reconstruction_mse,
    write_projected_store,
)

META = {"representation": "toy", "sample_rate": 16000, "frame_rate": 50.0, "weights": {"source": "none"}}
STANDARDIZED = "train_standardized"


def _toy_latents(
    rng: np.random.Generator,
    n: int,
    dim: int,
    spectrum: np.ndarray,
    basis: np.ndarray | None = None,
    scaled: bool = True,
) -> np.ndarray:
    """``(n, dim)`` Gaussian frames: covariance eigenvalues ``spectrum`` along the orthonormal columns of
    ``basis`` (default random), then (``scaled``) per-dimension scales, and per-dimension offsets.

    Standardisation undoes scales and offsets; centring undoes only the offsets, so without ``scaled`` the
    raw covariance has exactly ``spectrum`` as eigenvalues.
    """
    if basis is None:
        basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    scales = rng.uniform(0.5, 3.0, dim) if scaled else np.ones(dim)
    offsets = rng.uniform(-2.0, 2.0, dim)
    return ((rng.standard_normal((n, dim)) * np.sqrt(spectrum)) @ basis.T) * scales + offsets


def _write_store(root: Path, latents: np.ndarray, utt_frames: int = 100) -> LatentStore:
    """A store of ``latents`` cut into utterances of ``utt_frames`` rows with interleaved splits
    (train, train, test, train, val, ...), so train rows are not one contiguous block."""
    pattern = ("train", "train", "test", "train", "val")
    with LatentStoreWriter(root, dim=latents.shape[1], meta=META) as writer:
        for i, start in enumerate(range(0, latents.shape[0], utt_frames)):
            z = latents[start : start + utt_frames]
            energy = np.linspace(-60.0, -10.0, z.shape[0])
            writer.add(f"u{i:04d}", f"s{i % 7}", pattern[i % len(pattern)], z, energy, "F" if i % 2 else "M")
    return LatentStore(root)


def _raw_train(store: LatentStore) -> np.ndarray:
    """All train rows at once, as stored (float16-rounded), float64."""
    return store.latents[store.split_rows("train")].astype(np.float64)


def _standardized_train(store: LatentStore) -> np.ndarray:
    """The standardised-space oracle's input: all train rows standardised with the store's stats, float64."""
    return (_raw_train(store) - store.mean.astype(np.float64)) / store.std.astype(np.float64)


def _svd_oracle(store: LatentStore) -> dict[str, np.ndarray]:
    """PCA of the raw train rows from the SVD of the centred matrix ``X - mean = U S V^T``: the mean, the
    components (rows of ``V^T``), the variances ``S² / (n - 1)`` and the ratios ``S² / Σ S²``."""
    x = _raw_train(store)
    mean = x.mean(axis=0)
    _, sing, vt = np.linalg.svd(x - mean, full_matrices=False)
    return {
        "mean": mean,
        "components": vt,
        "variance": sing**2 / (x.shape[0] - 1),
        "ratio": sing**2 / np.sum(sing**2),
        "n": np.array(x.shape[0]),
    }


@pytest.fixture(scope="module")
def gapped_store(tmp_path_factory: pytest.TempPathFactory) -> LatentStore:
    """D = 32 with eigenvalues 3^-i *after standardisation*: a factor-3 gap between successive components.

    The basis is a normalised Hadamard matrix (entries ±1/sqrt(D)), so every dimension has the same
    variance (the mean of the spectrum) before the per-dimension scales, and standardising only rescales the
    spectrum. The raw latents carry per-dimension scales in 0.5..3, so their own principal axes differ.
    """
    rng = np.random.default_rng(0)
    latents = _toy_latents(rng, 10_000, 32, 3.0 ** -np.arange(32), hadamard(32) / np.sqrt(32))
    return _write_store(tmp_path_factory.mktemp("gapped"), latents)


@pytest.fixture(scope="module")
def raw_gapped_store(tmp_path_factory: pytest.TempPathFactory) -> LatentStore:
    """D = 32 with raw covariance eigenvalues 3^-i along a random basis (no per-dimension scales), offsets
    in ±2 (which centring removes)."""
    rng = np.random.default_rng(0)
    latents = _toy_latents(rng, 10_000, 32, 3.0 ** -np.arange(32), scaled=False)
    return _write_store(tmp_path_factory.mktemp("raw_gapped"), latents)


def _match_up_to_sign(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|cos|`` between corresponding rows of two ``(K, D)`` unit-row matrices."""
    return np.abs(np.sum(a * b, axis=1)) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_raw_fit_matches_the_svd_of_the_centred_train_matrix(raw_gapped_store: LatentStore) -> None:
    # The default space: raw latents, centred, not whitened. The oracle is the SVD of the centred train
    # matrix (float16-rounded rows, as the fit reads them). IncrementalPCA is not exact for K < D: after each
    # chunk it keeps only the top-K subspace of what it has seen, so the dropped variance leaks into the kept
    # components' estimates, by an amount that shrinks with the spectral gap at K and the number of chunks.
    # Measured on this store (6 chunks of 1,000 rows, K = 8): 2.4e-5 relative on the variances and 1.4e-6 on
    # 1 - |cos|; over data seeds 0, 4, 7, 11 and K = 4, 8 at most 2.5e-4 and 4.1e-5. The bounds (1e-3, 1e-4)
    # hold for all of them and still catch a wrong space, a whitening, a scaling or a missed chunk.
    fit = fit_incremental_pca(raw_gapped_store, 8, chunk_frames=1000)
    oracle = _svd_oracle(raw_gapped_store)
    assert fit.space == "raw" and fit.n_samples == int(oracle["n"]) == 6000
    np.testing.assert_array_equal(fit.store_mean, np.zeros(32))
    np.testing.assert_array_equal(fit.store_std, np.ones(32))
    np.testing.assert_allclose(fit.mean, oracle["mean"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(fit.explained_variance, oracle["variance"][:8], rtol=1e-3)
    np.testing.assert_allclose(fit.explained_variance_ratio, oracle["ratio"][:8], rtol=1e-3)
    assert _match_up_to_sign(fit.components, oracle["components"][:8]).min() > 1 - 1e-4
    np.testing.assert_allclose(fit.components @ fit.components.T, np.eye(8), atol=1e-10)
    # The fit's projection of a raw frame is C (z - mean), with no whitening: the projected train variance
    # along component i is its eigenvalue, not 1.
    z = _raw_train(raw_gapped_store)
    y = fit.project(z, 8)
    np.testing.assert_allclose(y, (z - oracle["mean"]) @ fit.components.T, rtol=0, atol=1e-10)
    np.testing.assert_allclose(y.var(axis=0, ddof=1), oracle["variance"][:8], rtol=1e-3)


def test_full_rank_raw_fit_is_exact_and_differs_from_the_standardized_fit(gapped_store: LatentStore) -> None:
    # With K = D nothing is truncated between chunks: the incremental SVD is exact up to rounding. On a store
    # with per-dimension scales the raw principal axes are not the standardised ones.
    raw = fit_incremental_pca(gapped_store, 32, chunk_frames=700)
    oracle = _svd_oracle(gapped_store)
    np.testing.assert_allclose(raw.explained_variance, oracle["variance"], rtol=1e-8)
    np.testing.assert_allclose(raw.explained_variance_ratio, oracle["ratio"], rtol=1e-8)
    assert _match_up_to_sign(raw.components, oracle["components"]).min() > 1 - 1e-8
    standardized = fit_incremental_pca(gapped_store, 32, chunk_frames=700, space=STANDARDIZED)
    assert _match_up_to_sign(raw.components[:1], standardized.components[:1])[0] < 0.99


def test_standardized_fit_matches_batch_pca_on_a_gapped_spectrum(gapped_store: LatentStore) -> None:
    # The oracle sees the same float16-rounded, standardised train rows all at once. Measured on this store
    # (factor-3 gaps, 6 chunks of 1,000 rows, two seeds, K = 4 and 8): < 3e-5 relative on the ratios and
    # < 3e-6 on 1 - |cos|. The bounds (1e-3 and 1e-4) leave a 30x margin and still catch a wrong space,
    # scaling or missed chunk.
    fit = fit_incremental_pca(gapped_store, 8, chunk_frames=1000, space=STANDARDIZED)
    oracle = PCA(n_components=8, svd_solver="full").fit(_standardized_train(gapped_store))
    assert fit.space == STANDARDIZED
    assert fit.n_samples == oracle.n_samples_ == 6000
    np.testing.assert_allclose(fit.explained_variance_ratio, oracle.explained_variance_ratio_, rtol=1e-3)
    np.testing.assert_allclose(fit.explained_variance, oracle.explained_variance_, rtol=1e-3)
    assert _match_up_to_sign(fit.components, oracle.components_).min() > 1 - 1e-4
    np.testing.assert_allclose(fit.mean, oracle.mean_, atol=1e-10)
    np.testing.assert_allclose(fit.components @ fit.components.T, np.eye(8), atol=1e-10)
    np.testing.assert_allclose(fit.store_mean, gapped_store.mean, rtol=0, atol=0)
    np.testing.assert_allclose(fit.store_std, gapped_store.std, rtol=0, atol=0)


def test_full_rank_standardized_fit_is_exact(gapped_store: LatentStore) -> None:
    fit = fit_incremental_pca(gapped_store, 32, chunk_frames=700, space=STANDARDIZED)
    oracle = PCA(n_components=32, svd_solver="full").fit(_standardized_train(gapped_store))
    np.testing.assert_allclose(fit.explained_variance_ratio, oracle.explained_variance_ratio_, rtol=1e-8)
    assert _match_up_to_sign(fit.components, oracle.components_).min() > 1 - 1e-8
    assert fit.explained_fraction(32) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("space", ["raw", STANDARDIZED])
def test_first_k_of_a_larger_fit_is_the_k_fit(
    gapped_store: LatentStore, raw_gapped_store: LatentStore, space: str
) -> None:
    # Slicing the first k components of one max-dim fit stands in for a k-component fit (same tolerance).
    store = raw_gapped_store if space == "raw" else gapped_store
    big = fit_incremental_pca(store, 8, chunk_frames=1000, space=space)
    small = fit_incremental_pca(store, 4, chunk_frames=1000, space=space)
    np.testing.assert_allclose(big.explained_variance_ratio[:4], small.explained_variance_ratio, rtol=1e-3)
    assert _match_up_to_sign(big.components[:4], small.components).min() > 1 - 1e-4


@pytest.mark.parametrize(
    ("n_rows", "chunk"), [(1, 5), (4, 5), (5, 5), (9, 5), (10, 5), (10_001, 1000), (7, 1)]
)
def test_chunk_bounds_cover_the_rows_without_short_chunks(n_rows: int, chunk: int) -> None:
    bounds = chunk_bounds(n_rows, chunk)
    sizes = np.diff(bounds)
    assert bounds[0] == 0 and bounds[-1] == n_rows
    assert len(sizes) == max(1, n_rows // chunk)
    assert sizes.max() < 2 * chunk or len(sizes) == 1
    assert sizes.min() >= min(chunk, n_rows)


def test_chunks_are_the_split_rows_in_order(gapped_store: LatentStore) -> None:
    chunks = list(iter_split_chunks(gapped_store, "train", 450))
    assert len(chunks) == 6000 // 450
    expected = gapped_store.latents[gapped_store.split_rows("train")].astype(np.float32)
    np.testing.assert_array_equal(np.concatenate(chunks), expected)


def test_fit_streams_in_chunks_and_never_loads_the_store(tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(1)
    store = _write_store(tmp_path / "big", _toy_latents(rng, 40_000, 32, 1.0 / (1.0 + np.arange(32))))
    batches: list[int] = []
    original = IncrementalPCA.partial_fit

    def spy(self, X, y=None, check_input=True):
        batches.append(len(X))
        return original(self, X, y, check_input)

    monkeypatch.setattr(IncrementalPCA, "partial_fit", spy)
    train_rows = 24_000
    full_float64 = train_rows * 32 * 8  # the train split as one float64 array: 6.1 MB
    tracemalloc.start()
    try:
        fit = fit_incremental_pca(store, 8, chunk_frames=500)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fit.n_samples == train_rows and fit.n_chunks == len(batches) == train_rows // 500
    assert sum(batches) == train_rows and max(batches) < 1000
    # A few chunk-sized float64 copies (0.13 MB each) live at once (peak measured 0.7 MB); loading the
    # split would need 6.1 MB.
    assert peak < full_float64 / 4, f"peak traced memory {peak / 1e6:.2f} MB"


def test_fit_rejects_impossible_sizes_and_unknown_spaces(gapped_store: LatentStore) -> None:
    with pytest.raises(ValueError, match="n_components"):
        fit_incremental_pca(gapped_store, 33)
    with pytest.raises(ValueError, match="k must be"):
        fit_incremental_pca(gapped_store, 4).explained_fraction(5)
    with pytest.raises(ValueError, match="space"):
        fit_incremental_pca(gapped_store, 4, space="whitened")


FIT_ARRAY_NAMES = (
    "components",
    "mean",
    "explained_variance",
    "explained_variance_ratio",
    "store_mean",
    "store_std",
)


@pytest.mark.parametrize("space", ["raw", STANDARDIZED])
def test_fit_round_trips_through_disk(gapped_store: LatentStore, tmp_path: Path, space: str) -> None:
    fit = fit_incremental_pca(gapped_store, 6, chunk_frames=1000, space=space)
    fit.save(tmp_path)
    assert json.loads((tmp_path / FIT_INFO).read_text())["space"] == space
    loaded = PCAFit.load(tmp_path)
    for name in FIT_ARRAY_NAMES:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(fit, name))
    assert (loaded.n_samples, loaded.n_chunks, loaded.source, loaded.space) == (
        fit.n_samples,
        fit.n_chunks,
        fit.source,
        space,
    )


def test_a_fit_saved_without_its_space_loads_as_standardized(
    gapped_store: LatentStore, tmp_path: Path
) -> None:
    # Fits written before the space was recorded were all fitted in the standardised space.
    fit_incremental_pca(gapped_store, 3, chunk_frames=1000, space=STANDARDIZED).save(tmp_path)
    info = json.loads((tmp_path / FIT_INFO).read_text())
    del info["space"]
    (tmp_path / FIT_INFO).write_text(json.dumps(info))
    assert PCAFit.load(tmp_path).space == STANDARDIZED


def test_raw_projected_store_round_trips_to_the_best_rank_k_approximation(
    raw_gapped_store: LatentStore, tmp_path: Path
) -> None:
    store, k = raw_gapped_store, 4
    fit = fit_incremental_pca(store, 8, chunk_frames=1000)
    projected = write_projected_store(fit, store, k, tmp_path / "p4")
    assert projected.dim == k and projected.meta["representation"] == "pca4-toy"
    assert projected.meta["extra"]["pca"]["space"] == "raw" and projected.meta["weights"]["space"] == "raw"
    assert projection_space(projected) == "raw" and projection_space(store) is None
    assert projected.index == store.index
    oracle = _svd_oracle(store)
    # Stored: the centred, unwhitened projections C_k (z - mean), float16-rounded (relative 2^-11).
    z = store.latents.astype(np.float64)
    y = projected.latents.astype(np.float64)
    np.testing.assert_allclose(y, (z - oracle["mean"]) @ fit.components[:k].T, rtol=2e-3, atol=2e-3)
    # Decoding the stored projections gives the best rank-k approximation of the centred frames (the
    # oracle's own projector V_k^T V_k, sign-free), up to the fit's streaming error and float16 rounding.
    decoded = y @ fit.components[:k] + fit.mean
    v = oracle["components"][:k]
    best = (z - oracle["mean"]) @ v.T @ v + oracle["mean"]
    np.testing.assert_allclose(decoded, best, rtol=0, atol=5e-3)
    # The projected train variance is the oracle's eigenvalue (ddof=0 in the store), not 1: no whitening.
    n = int(oracle["n"])
    np.testing.assert_allclose(projected.std**2, oracle["variance"][:k] * (n - 1) / n, rtol=5e-3)
    assert np.abs(projected.mean).max() < 5e-3
    # Train reconstruction MSE per raw dimension = the variance the dropped components carry (ddof=0) / D.
    dropped = float(np.sum(oracle["variance"][k:])) * (n - 1) / n / store.dim
    assert reconstruction_mse(projected, "train") == pytest.approx(dropped, rel=1e-2)


def test_full_rank_raw_projected_store_decodes_to_the_raw_latents(
    raw_gapped_store: LatentStore, tmp_path: Path
) -> None:
    fit = fit_incremental_pca(raw_gapped_store, 32, chunk_frames=1000)
    projected = write_projected_store(fit, raw_gapped_store, 32, tmp_path / "p32")
    z = raw_gapped_store.latents.astype(np.float64)
    decoded = projected.latents.astype(np.float64) @ fit.components + fit.mean
    # Only the float16 rounding of the stored projections (|y| <~ 4, spacing <= 2^-9) is lost.
    np.testing.assert_allclose(decoded, z, rtol=0, atol=1e-2)
    assert reconstruction_mse(projected, "test") < 1e-5


def test_standardized_projected_store_keeps_index_and_holds_the_projection(
    gapped_store: LatentStore, tmp_path: Path
) -> None:
    fit = fit_incremental_pca(gapped_store, 6, chunk_frames=1000, space=STANDARDIZED)
    projected = write_projected_store(fit, gapped_store, 4, tmp_path / "p4")
    assert projected.dim == 4 and projected.meta["representation"] == "pca4-toy"
    assert projection_space(projected) == STANDARDIZED and projected.meta["weights"]["space"] == STANDARDIZED
    assert projected.frame_rate == gapped_store.frame_rate
    assert projected.meta["weights"]["base"] == gapped_store.meta["weights"]
    assert str(gapped_store.root) in projected.meta["weights"]["source"]
    assert projected.index == gapped_store.index
    np.testing.assert_array_equal(projected.log_energy, gapped_store.log_energy)
    x = (gapped_store.latents.astype(np.float64) - gapped_store.mean) / gapped_store.std
    expected = (x - fit.mean) @ fit.components[:4].T
    np.testing.assert_allclose(projected.latents.astype(np.float64), expected, rtol=1e-3, atol=1e-3)
    # The writer's train stats of the projections: mean ~ 0 (the PCA mean is the train mean) and variance the
    # explained variance (ddof=1 in sklearn, ddof=0 in the store), up to float16 rounding of the values.
    assert np.abs(projected.mean).max() < 1e-3
    n = fit.n_samples
    np.testing.assert_allclose(projected.std**2, fit.explained_variance[:4] * (n - 1) / n, rtol=2e-3)
    # Train reconstruction error per base dimension (standardised units) = the variance the dropped
    # components carried.
    total = _standardized_train(gapped_store).var(axis=0).sum()
    expected_mse = (1.0 - fit.explained_fraction(4)) * total / gapped_store.dim
    assert reconstruction_mse(projected, "train") == pytest.approx(expected_mse, rel=1e-2)
    assert reconstruction_mse(projected, "test") > 0
    assert np.isnan(reconstruction_mse(gapped_store, "train"))


def test_full_rank_standardized_projected_store_is_lossless(
    gapped_store: LatentStore, tmp_path: Path
) -> None:
    fit = fit_incremental_pca(gapped_store, 32, chunk_frames=1000, space=STANDARDIZED)
    projected = write_projected_store(fit, gapped_store, 32, tmp_path / "p32")
    # Only the float16 rounding of the stored projections (relative 2^-11) is lost.
    assert reconstruction_mse(projected, "test") < 1e-5


def test_raw_space_decoding_is_an_isometry_and_standardized_is_not(
    gapped_store: LatentStore, tmp_path: Path
) -> None:
    # Distances between two projected points equal those between their decodings in the raw latent space
    # for a raw-space fit (C_k C_k^T = I, the PCA mean cancels), also for the stored float16 projections; a
    # standardised-space fit decodes with a per-dimension rescaling, which stretches distances.
    rng = np.random.default_rng(5)
    for space, isometric in (("raw", True), (STANDARDIZED, False)):
        fit = fit_incremental_pca(gapped_store, 6, chunk_frames=1000, space=space)
        y = write_projected_store(fit, gapped_store, 6, tmp_path / space).latents[:200].astype(np.float64)
        y_hat = y + rng.normal(scale=0.3, size=y.shape)

        def decode(p: np.ndarray, fit: PCAFit = fit) -> np.ndarray:
            return (p @ fit.components + fit.mean) * fit.store_std + fit.store_mean

        raw_dist = np.linalg.norm(decode(y_hat) - decode(y), axis=1)
        own_dist = np.linalg.norm(y_hat - y, axis=1)
        if isometric:
            np.testing.assert_allclose(raw_dist, own_dist, rtol=1e-10)
        else:
            assert np.abs(raw_dist / own_dist - 1).max() > 0.1


class _UnitGaussian:
    """``N(loc, I)``: the predictive of :class:`_LinearExtrapolation`."""

    def __init__(self, loc: torch.Tensor) -> None:
        self.loc = loc

    def log_prob(self, delta: torch.Tensor) -> torch.Tensor:
        d = delta.shape[-1]
        return -0.5 * (delta - self.loc).square().sum(-1) - 0.5 * d * math.log(2 * math.pi)

    def median(self) -> torch.Tensor:
        return self.loc

    def mean(self) -> torch.Tensor:
        return self.loc


class _LinearExtrapolation:
    """Δ̂ = x[t-1] - x[t-2] (W = 2, lag 1): commutes with any affine map, so a rollout of projections decodes
    to the rollout of the decoded frames."""

    context, horizon, context_stride, horizon_mode = 2, 1, 1, "lag"

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def predictive(self, context: torch.Tensor) -> _UnitGaussian:
        return _UnitGaussian(context[:, -1] - context[:, -2])


def test_injection_state_err_raw_of_a_raw_projection_is_the_raw_space_error(
    gapped_store: LatentStore, tmp_path: Path
) -> None:
    # The injection engine's state_err_raw of a rollout on a raw-space projected store equals the error of
    # the same rollout computed on the decoded (raw, D = 32) frames, here by a numpy oracle.
    k, k_steps = 5, 6
    fit = fit_incremental_pca(gapped_store, 8, chunk_frames=1000)
    projected = write_projected_store(fit, gapped_store, k, tmp_path / "p5")
    length = 2 + k_steps  # W + lag - 1 + K
    y = projected.latents.astype(np.float32)
    segments = np.stack([y[s : s + length] for s in range(0, 2000, 97)])  # (N, L, k), stored float16 values
    cfg = InjectionConfig(modes=["D_rollout"], k_steps=k_steps, inject_after_periodic=[2], bank_size=0)
    baseline = DiagonalGaussianBaseline(torch.zeros(k), torch.ones(k))
    result = run_injection(_LinearExtrapolation(k), torch.from_numpy(segments), cfg, baseline)
    engine = result.per_start["state_err_raw"][0]  # (N, K)
    np.testing.assert_array_equal(engine, result.per_start["state_err"][0])

    truth = segments.astype(np.float64) @ fit.components[:k] + fit.mean  # decoded GT, (N, L, 32)
    states = truth.copy()
    oracle = np.empty(engine.shape)
    for s in range(k_steps):
        i = 2 + s
        oracle[:, s] = np.linalg.norm(states[:, i - 1] - truth[:, i - 1], axis=1)
        states[:, i] = 2 * states[:, i - 1] - states[:, i - 2]
    assert oracle[:, -1].min() > 0.1  # the rollout does drift
    np.testing.assert_allclose(engine, oracle, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def mel() -> MelRepresentation:
    return MelRepresentation(
        sample_rate=16000, frame_rate=50.0, n_mels=16, griffin_lim_iters=2, inverse_mel_iters=5
    )


def _orthonormal(rng: np.random.Generator, k: int, d: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q[:k]


def test_pca_representation_encodes_through_the_base_and_decodes_to_audio(mel: MelRepresentation) -> None:
    rng = np.random.default_rng(2)
    mean, scale = rng.normal(size=16), rng.uniform(0.5, 2.0, 16)
    rep = PCARepresentation(mel, _orthonormal(rng, 5, 16), mean, scale, source="/cache/latents/x")
    assert (rep.name, rep.dim, rep.sample_rate, rep.frame_rate) == ("pca5-mel", 5, 16000, 50.0)
    assert rep.weights["base"] == mel.weights and "/cache/latents/x" in rep.weights["source"]
    assert rep.num_frames(16000) == mel.num_frames(16000) == 50
    wave = torch.from_numpy(rng.normal(scale=0.1, size=(2, 1, 8000)).astype(np.float32))
    y = rep.encode(wave)
    assert y.shape == (2, 5, 25)
    z = mel.encode(wave).double().numpy()
    manual = np.einsum("kd,bdt->bkt", rep.components.double().numpy(), (z - mean[:, None]) / scale[:, None])
    np.testing.assert_allclose(y.double().numpy(), manual, rtol=1e-4, atol=1e-4)
    audio = rep.decode(y)
    assert audio.shape == (2, 1, 25 * mel.hop) and torch.isfinite(audio).all()
    # The projection of a reconstruction is the projection itself (C C^T = I).
    torch.testing.assert_close(rep.project(rep.inverse(y)), y, rtol=1e-4, atol=1e-4)


def test_full_rank_pca_representation_is_lossless(mel: MelRepresentation) -> None:
    rng = np.random.default_rng(3)
    rep = PCARepresentation(mel, _orthonormal(rng, 16, 16), rng.normal(size=16), rng.uniform(0.5, 2.0, 16))
    z = torch.from_numpy(rng.normal(scale=3.0, size=(3, 16, 7)).astype(np.float32))
    torch.testing.assert_close(rep.inverse(rep.project(z)), z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("space", ["raw", STANDARDIZED])
def test_fit_representation_agrees_with_the_fit_projection(gapped_store: LatentStore, space: str) -> None:
    fit = fit_incremental_pca(gapped_store, 6, chunk_frames=1000, space=space)

    class Base:  # a stand-in for the toy store's representation: only its dim and provenance matter here
        name, dim, sample_rate, frame_rate, weights = "toy", 32, 16000, 50.0, {"source": "none"}

    rep = fit.representation(Base(), 6)
    assert rep.weights["space"] == space
    z = gapped_store.latents[:300].astype(np.float64)
    x = z if space == "raw" else (z - gapped_store.mean) / gapped_store.std
    y = rep.project(torch.from_numpy(z.astype(np.float32).T[None]))[0].T.double().numpy()
    np.testing.assert_allclose(y, (x - fit.mean) @ fit.components[:6].T, rtol=1e-4, atol=1e-4)
    if space == "raw":  # a raw-space projection: offset = the PCA mean, no per-dimension scaling
        np.testing.assert_allclose(rep.offset.double().numpy(), fit.mean, rtol=1e-6)
        np.testing.assert_array_equal(rep.divisor.numpy(), np.ones(32, dtype=np.float32))
    with pytest.raises(ValueError, match="dim"):
        fit.representation(type("Other", (Base,), {"dim": 12})(), 6)


def test_pca_representation_rejects_bad_shapes(mel: MelRepresentation) -> None:
    with pytest.raises(ValueError, match="components"):
        PCARepresentation(mel, np.eye(17)[:, :17], np.zeros(16))
    with pytest.raises(ValueError, match="orthonormal"):
        PCARepresentation(mel, 2.0 * np.eye(16)[:4], np.zeros(16))
    with pytest.raises(ValueError, match="mean and scale"):
        PCARepresentation(mel, np.eye(16)[:4], np.zeros(15))
    with pytest.raises(ValueError, match="positive"):
        PCARepresentation(mel, np.eye(16)[:4], np.zeros(16), np.zeros(16))
