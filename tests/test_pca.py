"""PCA representation: streaming IncrementalPCA fit against sklearn's batch PCA, bounded-memory chunking,
the stackable representation's round trips, and projected stores."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.linalg import hadamard
from sklearn.decomposition import PCA, IncrementalPCA

from latentdyn.data.latent_store import LatentStore, LatentStoreWriter
from latentdyn.representations.mel import MelRepresentation
from latentdyn.representations.pca import (
    PCAFit,
    PCARepresentation,
    chunk_bounds,
    fit_incremental_pca,
    iter_split_chunks,
    reconstruction_mse,
    write_projected_store,
)

META = {"representation": "toy", "sample_rate": 16000, "frame_rate": 50.0, "weights": {"source": "none"}}


def _toy_latents(
    rng: np.random.Generator, n: int, dim: int, spectrum: np.ndarray, basis: np.ndarray | None = None
) -> np.ndarray:
    """``(n, dim)`` Gaussian frames: covariance eigenvalues ``spectrum`` along the orthonormal columns of
    ``basis`` (default random), then per-dimension scales and offsets (which standardisation undoes)."""
    if basis is None:
        basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    scales = rng.uniform(0.5, 3.0, dim)
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


def _standardized_train(store: LatentStore) -> np.ndarray:
    """The oracle's input: all train rows at once, standardised with the store's stats, float64."""
    rows = store.latents[store.split_rows("train")].astype(np.float64)
    return (rows - store.mean.astype(np.float64)) / store.std.astype(np.float64)


@pytest.fixture(scope="module")
def gapped_store(tmp_path_factory: pytest.TempPathFactory) -> LatentStore:
    """D = 32 with eigenvalues 3^-i: a factor-3 gap between successive components.

    The basis is a normalised Hadamard matrix (entries ±1/sqrt(D)), so every dimension has the same
    variance (the mean of the spectrum) and standardising, the space the fit works in, only rescales the
    spectrum instead of changing it.
    """
    rng = np.random.default_rng(0)
    latents = _toy_latents(rng, 10_000, 32, 3.0 ** -np.arange(32), hadamard(32) / np.sqrt(32))
    return _write_store(tmp_path_factory.mktemp("gapped"), latents)


def _match_up_to_sign(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|cos|`` between corresponding rows of two ``(K, D)`` unit-row matrices."""
    return np.abs(np.sum(a * b, axis=1)) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_streaming_fit_matches_batch_pca_on_a_gapped_spectrum(gapped_store: LatentStore) -> None:
    # The oracle sees the same float16-rounded, standardised train rows all at once. IncrementalPCA is not
    # exact for K < D: after each chunk it keeps only the top-K subspace of what it has seen, so the
    # variance it drops leaks into the kept components' estimates, by an amount that shrinks with the
    # spectral gap at K and with the number of chunks. Measured on this store (factor-3 gaps, 6 chunks of
    # 1,000 rows, two seeds, K = 4 and 8): < 3e-5 relative on the ratios and < 3e-6 on 1 - |cos|. The
    # bounds (1e-3 and 1e-4) leave a 30x margin and still catch a wrong space, scaling or missed chunk.
    fit = fit_incremental_pca(gapped_store, 8, chunk_frames=1000)
    oracle = PCA(n_components=8, svd_solver="full").fit(_standardized_train(gapped_store))
    assert fit.n_samples == oracle.n_samples_ == 6000
    np.testing.assert_allclose(fit.explained_variance_ratio, oracle.explained_variance_ratio_, rtol=1e-3)
    np.testing.assert_allclose(fit.explained_variance, oracle.explained_variance_, rtol=1e-3)
    assert _match_up_to_sign(fit.components, oracle.components_).min() > 1 - 1e-4
    np.testing.assert_allclose(fit.mean, oracle.mean_, atol=1e-10)
    np.testing.assert_allclose(fit.components @ fit.components.T, np.eye(8), atol=1e-10)


def test_full_rank_streaming_fit_is_exact(gapped_store: LatentStore) -> None:
    # With K = D nothing is truncated between chunks: the incremental SVD is exact up to rounding.
    fit = fit_incremental_pca(gapped_store, 32, chunk_frames=700)
    oracle = PCA(n_components=32, svd_solver="full").fit(_standardized_train(gapped_store))
    np.testing.assert_allclose(fit.explained_variance_ratio, oracle.explained_variance_ratio_, rtol=1e-8)
    assert _match_up_to_sign(fit.components, oracle.components_).min() > 1 - 1e-8
    assert fit.explained_fraction(32) == pytest.approx(1.0, abs=1e-10)


def test_first_k_of_a_larger_fit_is_the_k_fit(gapped_store: LatentStore) -> None:
    # Slicing the first k components of one max-dim fit stands in for a k-component fit (same tolerance).
    big = fit_incremental_pca(gapped_store, 8, chunk_frames=1000)
    small = fit_incremental_pca(gapped_store, 4, chunk_frames=1000)
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


def test_fit_rejects_impossible_sizes(gapped_store: LatentStore) -> None:
    with pytest.raises(ValueError, match="n_components"):
        fit_incremental_pca(gapped_store, 33)
    with pytest.raises(ValueError, match="k must be"):
        fit_incremental_pca(gapped_store, 4).explained_fraction(5)


def test_fit_round_trips_through_disk(gapped_store: LatentStore, tmp_path: Path) -> None:
    fit = fit_incremental_pca(gapped_store, 6, chunk_frames=1000)
    fit.save(tmp_path)
    loaded = PCAFit.load(tmp_path)
    for name in (
        "components",
        "mean",
        "explained_variance",
        "explained_variance_ratio",
        "store_mean",
        "store_std",
    ):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(fit, name))
    assert (loaded.n_samples, loaded.n_chunks, loaded.source) == (fit.n_samples, fit.n_chunks, fit.source)


def test_projected_store_keeps_index_and_holds_the_projection(
    gapped_store: LatentStore, tmp_path: Path
) -> None:
    fit = fit_incremental_pca(gapped_store, 6, chunk_frames=1000)
    projected = write_projected_store(fit, gapped_store, 4, tmp_path / "p4")
    assert projected.dim == 4 and projected.meta["representation"] == "pca4-toy"
    assert projected.frame_rate == gapped_store.frame_rate
    assert projected.meta["weights"]["base"] == gapped_store.meta["weights"]
    assert str(gapped_store.root) in projected.meta["weights"]["source"]
    assert projected.index == gapped_store.index
    np.testing.assert_array_equal(projected.log_energy, gapped_store.log_energy)
    expected = fit.project(gapped_store.latents, 4)
    np.testing.assert_allclose(projected.latents.astype(np.float64), expected, rtol=1e-3, atol=1e-3)
    # The writer's train stats of the projections: mean ~ 0 (the PCA mean is the train mean) and variance the
    # explained variance (ddof=1 in sklearn, ddof=0 in the store), up to float16 rounding of the values.
    assert np.abs(projected.mean).max() < 1e-3
    n = fit.n_samples
    np.testing.assert_allclose(projected.std**2, fit.explained_variance[:4] * (n - 1) / n, rtol=2e-3)
    # Train reconstruction error per base dimension = the variance the dropped components carried.
    total = _standardized_train(gapped_store).var(axis=0).sum()
    expected_mse = (1.0 - fit.explained_fraction(4)) * total / gapped_store.dim
    assert reconstruction_mse(projected, "train") == pytest.approx(expected_mse, rel=1e-2)
    assert reconstruction_mse(projected, "test") > 0
    assert np.isnan(reconstruction_mse(gapped_store, "train"))


def test_full_rank_projected_store_is_lossless(gapped_store: LatentStore, tmp_path: Path) -> None:
    fit = fit_incremental_pca(gapped_store, 32, chunk_frames=1000)
    projected = write_projected_store(fit, gapped_store, 32, tmp_path / "p32")
    # Only the float16 rounding of the stored projections (relative 2^-11) is lost.
    assert reconstruction_mse(projected, "test") < 1e-5


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


def test_fit_representation_agrees_with_the_fit_projection(gapped_store: LatentStore) -> None:
    fit = fit_incremental_pca(gapped_store, 6, chunk_frames=1000)

    class Base:  # a stand-in for the toy store's representation: only its dim and provenance matter here
        name, dim, sample_rate, frame_rate, weights = "toy", 32, 16000, 50.0, {"source": "none"}

    rep = fit.representation(Base(), 6)
    z = gapped_store.latents[:300].astype(np.float32)
    y = rep.project(torch.from_numpy(z.T[None]))[0].T.double().numpy()
    np.testing.assert_allclose(y, fit.project(z, 6), rtol=1e-4, atol=1e-4)
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
