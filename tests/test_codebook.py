"""Exp 8's codebook pieces against closed forms: spherical k-means, cosine assignment, usage statistics,
near-zero shares, open-loop reconstructions and the drift slope."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latentdyn.models.codebook import (
    angular_error_deg,
    assign_cosine,
    assign_l2,
    divergence,
    divergence_slope,
    fit_kmeans,
    near_zero_fractions,
    nearest_codeword,
    quantised_trajectory,
    unit_rows,
    usage_stats,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _clustered(k: int, dim: int, per: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per`` unit vectors around each of ``k`` well-separated random unit directions."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((k, dim)))
    points = _unit(np.repeat(centres, per, axis=0) + spread * rng.standard_normal((k * per, dim)))
    return centres.astype(np.float32), points.astype(np.float32)


def test_spherical_kmeans_recovers_known_directions_with_unit_centroids() -> None:
    centres, points = _clustered(k=8, dim=16, per=400, spread=0.02, seed=1)
    book = fit_kmeans(points, 8, spherical=True, seed=0, n_iter=50, n_init=10)
    np.testing.assert_allclose(np.linalg.norm(book, axis=1), 1.0, atol=1e-6)
    # Every true direction has a centroid within 1 degree, and each centroid serves one direction.
    angles = np.degrees(np.arccos(np.clip(centres @ book.T, -1.0, 1.0)))
    assert angles.min(axis=1).max() < 1.0
    assert len(set(angles.argmin(axis=1).tolist())) == 8


def test_kmeans_is_deterministic_for_a_seed() -> None:
    _, points = _clustered(k=6, dim=8, per=200, spread=0.3, seed=2)
    a = fit_kmeans(points, 6, spherical=True, seed=5, n_iter=20)
    b = fit_kmeans(points, 6, spherical=True, seed=5, n_iter=20)
    np.testing.assert_array_equal(a, b)


def test_spherical_kmeans_refuses_rows_that_are_not_unit() -> None:
    with pytest.raises(ValueError, match="unit rows"):
        fit_kmeans(np.full((10, 3), 2.0, dtype=np.float32), 2, spherical=True, seed=0)
    with pytest.raises(ValueError, match="K <= N"):
        fit_kmeans(np.eye(3, dtype=np.float32), 4, spherical=False, seed=0)


def test_assignment_is_by_cosine_whatever_the_delta_norm() -> None:
    rng = np.random.default_rng(3)
    book = _unit(rng.standard_normal((5, 4))).astype(np.float32)
    deltas = (rng.standard_normal((200, 4)) * rng.uniform(0.01, 100.0, (200, 1))).astype(np.float32)
    cosines = _unit(deltas) @ book.T
    np.testing.assert_array_equal(assign_cosine(deltas, book), cosines.argmax(axis=1))
    np.testing.assert_array_equal(assign_cosine(deltas * 1e3, book), assign_cosine(deltas, book))
    torch_index = nearest_codeword(torch.from_numpy(deltas), torch.from_numpy(book)).numpy()
    np.testing.assert_array_equal(torch_index, cosines.argmax(axis=1))
    # L2 assignment of raw deltas is not cosine assignment: [1, 0.5] is nearest to [1, 0] in L2 but closer
    # in angle to [10, 1] (cos 0.934 against 0.894).
    raw_book = np.array([[1.0, 0.0], [10.0, 1.0]], dtype=np.float32)
    delta = np.array([[1.0, 0.5]], dtype=np.float32)
    assert assign_l2(delta, raw_book)[0] == 0
    assert assign_cosine(delta, _unit(raw_book))[0] == 1


def test_angular_error_in_degrees() -> None:
    x = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [-1.0, 0.0]])
    y = np.array([[2.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(angular_error_deg(x, y), [0.0, 45.0, 90.0, 180.0], atol=1e-6)


def test_usage_statistics_closed_forms() -> None:
    uniform = usage_stats(np.arange(1000) % 8, 8)
    assert uniform["utilisation"] == 1.0
    assert uniform["entropy"] == pytest.approx(math.log(8))
    assert uniform["entropy_norm"] == pytest.approx(1.0)
    assert uniform["perplexity"] == pytest.approx(8.0)
    single = usage_stats(np.zeros(50, dtype=int), 8)
    assert single["perplexity"] == pytest.approx(1.0) and single["utilisation"] == pytest.approx(1 / 8)
    # 0.1 % of the assignments: a codeword with 1 of 2000 (0.05 %) does not count as used.
    counts = np.concatenate([np.zeros(1999, dtype=int), [1]])
    assert usage_stats(counts, 4)["utilisation"] == pytest.approx(1 / 4)
    p = np.array([0.5, 0.25, 0.25])
    two = usage_stats(np.repeat([0, 1, 2], (p * 400).astype(int)), 3)
    assert two["entropy"] == pytest.approx(-(p * np.log(p)).sum())


def test_near_zero_shares_and_the_moving_filter() -> None:
    norms = np.array([0.0, 0.0005, 0.005, 0.05, 0.3, 1.0, 1.0, 2.0])
    shares = near_zero_fractions(norms, median=1.0, factors=[0.001, 0.01, 0.1, 0.5])
    assert shares == {
        "near_zero_0.001": 2 / 8,
        "near_zero_0.01": 3 / 8,
        "near_zero_0.1": 4 / 8,
        "near_zero_0.5": 5 / 8,
    }
    deltas = norms[:, None] * np.array([[1.0, 0.0]])
    with pytest.raises(ValueError, match="zero norm"):
        unit_rows(deltas)


def _toy_store(root, utterances: dict[str, np.ndarray]):
    """A latent store of train-split ``utterances`` (``utt_id -> (T, D)``)."""
    from latentdyn.data.latent_store import LatentStore, LatentStoreWriter

    meta = {
        "representation": "toy",
        "sample_rate": 16000,
        "frame_rate": 12.5,
        "weights": {"source": "random"},
    }
    dim = next(iter(utterances.values())).shape[1]
    with LatentStoreWriter(root, dim, meta) as writer:
        for utt_id, x in utterances.items():
            writer.add(utt_id, "spk", "train", x.astype(np.float32), np.zeros(len(x), np.float32))
    return LatentStore(root)


def test_split_samples_take_deltas_within_utterances_and_drop_near_zero_ones(tmp_path) -> None:
    from latentdyn.pipeline.stage3 import sample_split, split_delta_norms

    a = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.001], [4.0, 0.001]], dtype=np.float32)
    b = np.array([[10.0, 0.0], [10.0, 0.5]], dtype=np.float32)
    store = _toy_store(tmp_path / "s", {"a": a, "b": b})
    # Deltas never cross the utterance boundary (10 - 4): 1, 0.001, 3 in a; 0.5 in b.
    np.testing.assert_allclose(np.sort(split_delta_norms(store, "train")), [0.001, 0.5, 1.0, 3.0], rtol=1e-3)
    sample = sample_split(store, "train", min_norm=0.01, max_points=None, seed=0)
    assert (sample.n_moving, sample.n_states) == (3, 6)
    np.testing.assert_allclose(sample.moving, [[1.0, 0.0], [3.0, 0.0], [0.0, 0.5]], atol=1e-3)
    small = sample_split(store, "train", min_norm=0.01, max_points=2, seed=0)
    assert len(small.states) < 6 and small.n_states == 6
    again = sample_split(store, "train", min_norm=0.01, max_points=2, seed=0)
    np.testing.assert_array_equal(small.states, again.states)


def _walk(seed: int, steps: int = 30, dim: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.standard_normal((steps, dim)), axis=0).astype(np.float32)


def test_open_loop_through_the_exact_directions_rebuilds_the_trajectory() -> None:
    x = _walk(4)
    exact = unit_rows(np.diff(x, axis=0))
    rebuilt = quantised_trajectory("direction", x, exact, min_norm=0.0)
    np.testing.assert_allclose(rebuilt, x, atol=1e-4)
    assert divergence(rebuilt, x).max() < 1e-4


def test_open_loop_kinds_follow_their_update_rules() -> None:
    x = _walk(5, steps=6, dim=2)
    book = _unit(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    deltas = np.diff(x, axis=0)
    expected = [x[0]]
    for d in deltas:
        c = book[np.argmax(d @ book.T)]
        expected.append(expected[-1] + np.linalg.norm(d) * c)
    np.testing.assert_allclose(quantised_trajectory("direction", x, book, 0.0), expected, atol=1e-5)
    raw_book = 2.0 * book
    expected_raw = [x[0]]
    for d in deltas:
        expected_raw.append(expected_raw[-1] + raw_book[np.argmin(((raw_book - d) ** 2).sum(1))])
    np.testing.assert_allclose(quantised_trajectory("raw_delta", x, raw_book, 0.0), expected_raw, atol=1e-5)
    states = quantised_trajectory("state", x, raw_book, 0.0)
    np.testing.assert_array_equal(states, raw_book[assign_l2(x, raw_book)])
    # A near-zero GT delta leaves the state where it is.
    frozen = quantised_trajectory("direction", x, book, min_norm=1e9)
    np.testing.assert_array_equal(frozen, np.repeat(x[:1], len(x), axis=0))


def test_divergence_slope_is_the_least_squares_slope() -> None:
    t = np.arange(20, dtype=float)
    assert divergence_slope(0.25 * t + 3.0) == pytest.approx(0.25)
    assert divergence_slope(np.array([1.0, 2.0])) == 0.0


def test_a_codebook_file_needs_its_store_and_unit_rows_of_its_dimension(tmp_path) -> None:
    from omegaconf import OmegaConf

    from latentdyn.pipeline.stage3 import load_codebook

    _toy_store(tmp_path / "s", {"a": np.zeros((4, 3), np.float32)})
    good, wide, long = tmp_path / "good.npy", tmp_path / "wide.npy", tmp_path / "long.npy"
    np.save(good, np.eye(3, dtype=np.float32))
    np.save(wide, np.eye(4, dtype=np.float32))
    np.save(long, 2 * np.eye(3, dtype=np.float32))
    cfg = OmegaConf.create({"store": str(tmp_path / "s"), "paths": {"manifest": str(tmp_path / "m.jsonl")}})
    book = load_codebook(cfg, str(good), 3)
    assert book.size == 3 and book.store.dim == 3 and book.source == good
    with pytest.raises(ValueError, match=r"\(K, 3\)"):
        load_codebook(cfg, str(wide), 4)
    with pytest.raises(ValueError, match="unit vectors"):
        load_codebook(cfg, str(long), 3)
    with pytest.raises(ValueError, match="store="):
        load_codebook(OmegaConf.create({"store": None, "paths": cfg.paths}), str(good), 3)
