"""Codebooks of frame-to-frame latent deltas (Exp 8): spherical k-means on unit directions, k-means on raw deltas
and on states (VQ), and the assignments a direction AR model (Exp 10) is trained on.

A *direction codebook* ``C`` ``(K, D)`` holds unit vectors; a delta ``Δ`` is coded as ``‖Δ‖ · c_a`` with
``a = argmax_j cos(Δ, c_j)``. Spherical k-means maximises the summed cosine of every unit delta to its centroid
(faiss ``Kmeans(spherical=True)``: centroids re-normalised after each update), seeded, so a config and a seed
give one codebook on CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

#: Codebook kinds Exp 8 compares: unit directions (spherical k-means), raw deltas, states (VQ).
KINDS: tuple[str, ...] = ("direction", "raw_delta", "state")
#: Below this many points per centroid (faiss's own threshold) a codebook is warned about.
FEW_POINTS_PER_CENTROID = 39

log = logging.getLogger(__name__)
NORM_FLOOR = 1e-12


def delta_norms(deltas: np.ndarray) -> np.ndarray:
    """``‖Δ‖`` per row ``(N,)`` float64."""
    return np.linalg.norm(np.asarray(deltas, dtype=np.float64), axis=1)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` ``(N, D)`` scaled to unit L2 norm (float32); a zero row is an error (its direction is
    undefined: drop near-zero deltas first)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms <= NORM_FLOOR):
        raise ValueError(f"{int(np.sum(norms <= NORM_FLOOR))} rows have zero norm: no direction")
    return (x / norms).astype(np.float32)


def near_zero_fractions(norms: np.ndarray, median: float, factors: Sequence[float]) -> dict[str, float]:
    """Share of deltas with ``‖Δ‖ < f · median`` for each factor ``f``: ``{"near_zero_<f>": share}``."""
    norms = np.asarray(norms, dtype=np.float64)
    if norms.size == 0:
        raise ValueError("no deltas")
    return {f"near_zero_{f:g}": float(np.mean(norms < float(f) * float(median))) for f in factors}


def fit_kmeans(
    x: np.ndarray, n_clusters: int, *, spherical: bool, seed: int, n_iter: int = 25, n_init: int = 1
) -> np.ndarray:
    """k-means centroids ``(K, D)`` float32 of ``x`` ``(N, D)`` with faiss (seeded; ``spherical``: cosine
    objective with unit-norm centroids, ``x`` must be unit rows). faiss trains on at most 256 points per
    centroid (a seeded subsample of larger ``x``), as its default."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is not news
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be (N, D), got shape {x.shape}")
    if not 1 <= n_clusters <= len(x):
        raise ValueError(f"need 1 <= K <= N points, got K={n_clusters}, N={len(x)}")
    if spherical and not np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-4):
        raise ValueError("spherical k-means needs unit rows (unit_rows)")
    if len(x) < FEW_POINTS_PER_CENTROID * n_clusters:
        log.warning(
            "k-means of %d points into K=%d: fewer than %d points per centroid, the codebook will be noisy",
            len(x), n_clusters, FEW_POINTS_PER_CENTROID,
        )  # fmt: skip
    km = faiss.Kmeans(
        x.shape[1], int(n_clusters), niter=int(n_iter), nredo=int(n_init), seed=int(seed),
        spherical=bool(spherical), verbose=False, min_points_per_centroid=1,
    )  # fmt: skip
    km.train(x)
    centroids = np.asarray(km.centroids, dtype=np.float32).reshape(int(n_clusters), x.shape[1])
    if spherical:
        centroids = unit_rows(centroids)
    return centroids


def assign_cosine(directions: np.ndarray, codebook: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Index of the codeword with the largest cosine to each row ``(N,)`` int64 (rows need not be unit; the
    codebook's rows are unit)."""
    x = np.asarray(directions, dtype=np.float32)
    c = np.asarray(codebook, dtype=np.float32)
    return np.concatenate(
        [np.argmax(x[i : i + chunk] @ c.T, axis=1) for i in range(0, len(x), chunk)] or [np.zeros(0, int)]
    ).astype(np.int64)


def assign_l2(x: np.ndarray, codebook: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Index of the nearest codeword in Euclidean distance to each row ``(N,)`` int64."""
    x = np.asarray(x, dtype=np.float32)
    c = np.asarray(codebook, dtype=np.float32)
    c_sq = np.sum(c.astype(np.float64) ** 2, axis=1)
    out = [
        np.argmin(c_sq[None] - 2.0 * (x[i : i + chunk] @ c.T).astype(np.float64), axis=1)
        for i in range(0, len(x), chunk)
    ]
    return np.concatenate(out or [np.zeros(0, int)]).astype(np.int64)


def angular_error_deg(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Angle in degrees between the rows of ``x`` and ``y`` ``(N, D)`` -> ``(N,)`` (float64, clipped cosine)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    nx = np.maximum(np.linalg.norm(x, axis=1), NORM_FLOOR)
    ny = np.maximum(np.linalg.norm(y, axis=1), NORM_FLOOR)
    cos = np.clip(np.sum(x * y, axis=1) / (nx * ny), -1.0, 1.0)
    return np.degrees(np.arccos(cos))


def usage_stats(assignments: np.ndarray, n_codes: int, min_share: float = 0.001) -> dict[str, float]:
    """How evenly a codebook is used: ``utilisation`` (share of codewords with at least ``min_share`` of the
    assignments), ``entropy`` (nats), ``entropy_norm`` (entropy / log K) and ``perplexity`` (e^entropy)."""
    counts = np.bincount(np.asarray(assignments, dtype=np.int64), minlength=int(n_codes)).astype(np.float64)
    total = counts.sum()
    if total == 0:
        raise ValueError("no assignments")
    p = counts / total
    nz = p[p > 0]
    entropy = float(-np.sum(nz * np.log(nz)))
    return {
        "utilisation": float(np.mean(p >= float(min_share))),
        "entropy": entropy,
        "entropy_norm": entropy / float(np.log(n_codes)) if n_codes > 1 else 0.0,
        "perplexity": float(np.exp(entropy)),
    }


def quantised_trajectory(kind: str, x: np.ndarray, codebook: np.ndarray, min_norm: float) -> np.ndarray:
    """Open-loop reconstruction ``(T, D)`` of a trajectory ``x`` ``(T, D)`` through a codebook of ``kind``.

    ``direction``: ``x̂[0] = x[0]``, ``x̂[t] = x̂[t-1] + ‖Δ_t‖ · c_a`` (``a`` the codeword nearest to Δ_t in
    cosine); ``raw_delta``: ``x̂[t] = x̂[t-1] + c_a`` (nearest in L2); for both, a GT delta below ``min_norm``
    (the near-zero threshold the codebooks were fitted with) leaves the state unchanged. ``state``:
    ``x̂[t] = c_a``, the nearest codeword to ``x[t]`` (VQ, no accumulation). Errors accumulate in the delta
    kinds: the codebook alone, with the true magnitudes and choices, is what a perfect AR model would replay.
    """
    x = np.asarray(x, dtype=np.float32)
    if kind == "state":
        return np.asarray(codebook, dtype=np.float32)[assign_l2(x, codebook)]
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    deltas = np.diff(x, axis=0)
    norms = delta_norms(deltas)
    if kind == "direction":
        steps = norms[:, None] * np.asarray(codebook, dtype=np.float64)[assign_cosine(deltas, codebook)]
    else:
        steps = np.asarray(codebook, dtype=np.float64)[assign_l2(deltas, codebook)]
    steps[norms < float(min_norm)] = 0.0
    out = np.empty_like(x, dtype=np.float64)
    out[0] = x[0]
    out[1:] = x[0] + np.cumsum(steps, axis=0)
    return out.astype(np.float32)


def divergence(x_hat: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``‖x̂[t] - x[t]‖`` per frame ``(T,)`` float64."""
    return np.linalg.norm(np.asarray(x_hat, np.float64) - np.asarray(x, np.float64), axis=1)


def divergence_slope(errors: np.ndarray) -> float:
    """Least-squares slope of the per-frame divergence against the frame index (latent units per frame; 0 for
    fewer than 3 frames): how fast an open-loop reconstruction drifts away."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.size < 3:
        return 0.0
    return float(np.polyfit(np.arange(errors.size, dtype=np.float64), errors, 1)[0])


def nearest_codeword(delta: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index ``(B,)`` of the codeword (rows of ``codebook`` ``(K, D)``, unit) with the largest cosine to each
    delta ``(B, D)``: the argmax of ``Δ · c`` (the positive factor ``1/‖Δ‖`` does not change it)."""
    return (delta.float() @ codebook.float().T).argmax(dim=-1)
