"""Exp 8 direction-codebook fit: faiss spherical k-means against scikit-learn's ``MiniBatchKMeans``.

The reference study fitted its direction codebooks with ``MiniBatchKMeans(init="k-means++", n_init=1,
max_iter=300, batch_size=4096)`` on the unit deltas and renormalised the centroids; this project fits them with
faiss spherical k-means (``latentdyn.models.codebook.fit_kmeans(spherical=True)``, Exp 8's ``n_iter: 25``).
Both are fitted on the same N unit vectors in D = 32, drawn seeded as a mixture around 4096 random unit
directions with a von-Mises-like spread (``normalise(mu_c + spread * gaussian)``), so the data have the
cluster structure of real latent deltas. faiss trains on at most 256 points per centroid (a seeded subsample
of N, its default, which ``fit_kmeans`` keeps); MiniBatchKMeans streams over all N.

Measured: wall time of each fit (``time.perf_counter``, the fit alone, not the data), and on one held-out set
of fresh vectors from the same mixture, assigned to each codebook by cosine: the mean and median angle to the
assigned codeword (degrees) and the utilisation (share of codewords with >= 0.1 % of the assignments). Both
libraries use their default thread count (the machine's cores). Printed side by side with the speed-up
t_sklearn / t_faiss (no target: issue 12 asks for the figures); one check: faiss's mean angular error is no
worse than MiniBatchKMeans' + 0.5 degrees (PASS/FAIL), i.e. the faster fit is not a worse codebook.
A measurement, not a test: exits 0 whenever it could measure.
Run: ``uv run python bench/codebook.py [--n 1000000] [--k 1024] [--quick]`` (defaults: a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from latentdyn.models.codebook import angular_error_deg, assign_cosine, fit_kmeans, unit_rows, usage_stats

ANGLE_TOLERANCE_DEG = 0.5


def mixture_centres(n_centres: int, dim: int, seed: int) -> np.ndarray:
    """``n_centres`` random unit directions ``(C, D)`` float32."""
    rng = np.random.default_rng([seed, 0])
    return unit_rows(rng.standard_normal((n_centres, dim), dtype=np.float32))


def sample_mixture(
    centres: np.ndarray, n: int, spread: float, seed: int, stream: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors ``normalise(mu_c + spread * gaussian)`` ``(N, D)`` float32 with ``c`` uniform over the
    centres, and ``c`` ``(N,)``; ``stream`` keeps the training and evaluation draws apart."""
    rng = np.random.default_rng([seed, stream])
    labels = rng.integers(0, len(centres), n)
    noise = rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    noise *= np.float32(spread)
    noise += centres[labels]
    return unit_rows(noise), labels


def evaluate(x_eval: np.ndarray, codebook: np.ndarray) -> dict[str, float]:
    """Angle of each evaluation vector to its codeword (assigned by cosine) and the codebook's utilisation."""
    codes = assign_cosine(x_eval, codebook)
    angles = angular_error_deg(x_eval, codebook[codes])
    usage = usage_stats(codes, len(codebook), min_share=0.001)
    return {
        "mean": float(np.mean(angles)),
        "median": float(np.median(angles)),
        "utilisation": usage["utilisation"],
        "perplexity": usage["perplexity"],
    }


def fit_sklearn(x: np.ndarray, k: int, seed: int, max_iter: int, batch_size: int) -> tuple[np.ndarray, dict]:
    """The reference's fit: MiniBatchKMeans on the unit vectors, centroids renormalised to unit length."""
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(
        n_clusters=k, init="k-means++", n_init=1, max_iter=max_iter, batch_size=batch_size, random_state=seed
    )
    km.fit(x)
    info = {"n_iter": int(km.n_iter_), "n_steps": int(km.n_steps_)}
    return unit_rows(km.cluster_centers_), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--n", type=int, default=None, help="training vectors (default 1_000_000; --quick 100k)"
    )
    parser.add_argument("--k", type=int, default=None, help="codebook size (default 1024; --quick 256)")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--centres", type=int, default=4096, help="mixture components of the data")
    parser.add_argument("--spread", type=float, default=0.15, help="gaussian scale around each unit centre")
    parser.add_argument("--n-eval", type=int, default=100_000, help="held-out evaluation vectors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faiss-iter", type=int, default=25, help="faiss iterations (Exp 8's n_iter)")
    parser.add_argument(
        "--sk-max-iter", type=int, default=300, help="MiniBatchKMeans max_iter (reference: 300)"
    )
    parser.add_argument("--sk-batch-size", type=int, default=4096, help="MiniBatchKMeans batch_size")
    parser.add_argument("--quick", action="store_true", help="N = 100k, K = 256 (unless --n / --k are given)")
    args = parser.parse_args()
    n = args.n if args.n is not None else (100_000 if args.quick else 1_000_000)
    k = args.k if args.k is not None else (256 if args.quick else 1024)

    import faiss
    import sklearn
    from threadpoolctl import threadpool_info

    pools = ", ".join(sorted({f"{p['internal_api']} {p['num_threads']}" for p in threadpool_info()}))
    print(
        f"faiss {faiss.__version__} (omp threads {faiss.omp_get_max_threads()}), scikit-learn "
        f"{sklearn.__version__}; thread pools: {pools}"
    )

    t0 = time.perf_counter()
    centres = mixture_centres(args.centres, args.dim, args.seed)
    x_train, _ = sample_mixture(centres, n, args.spread, args.seed, stream=1)
    x_eval, eval_labels = sample_mixture(centres, args.n_eval, args.spread, args.seed, stream=2)
    to_centre = angular_error_deg(x_eval, centres[eval_labels])
    print(
        f"data: N={n} train + {args.n_eval} eval unit vectors, D={args.dim}, mixture of {args.centres} "
        f"directions, spread {args.spread} (eval mean angle to its own mixture direction "
        f"{np.mean(to_centre):.2f} deg), generated in {time.perf_counter() - t0:.1f} s"
    )
    faiss_points = min(n, 256 * k)
    print(
        f"K={k}; faiss trains on min(N, 256 K) = {faiss_points} points (its default subsample of "
        f"at most 256 per centroid), {args.faiss_iter} iterations; MiniBatchKMeans streams over all N, "
        f"max_iter {args.sk_max_iter}, batch {args.sk_batch_size}\n"
    )

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    cb_faiss = fit_kmeans(x_train, k, spherical=True, seed=args.seed, n_iter=args.faiss_iter, n_init=1)
    t_faiss = time.perf_counter() - t0
    print(f"faiss fit: {t_faiss:.1f} s", flush=True)

    t0 = time.perf_counter()
    cb_sk, sk_info = fit_sklearn(x_train, k, args.seed, args.sk_max_iter, args.sk_batch_size)
    t_sk = time.perf_counter() - t0
    print(
        f"MiniBatchKMeans fit: {t_sk:.1f} s ({sk_info['n_iter']} epochs, {sk_info['n_steps']} mini-batch "
        f"steps before its early stop)",
        flush=True,
    )
    print(
        f"1-min load average before the fits {load_before:.2f}, after {os.getloadavg()[0]:.2f} (the fits "
        f"alone bring it towards {faiss.omp_get_max_threads()}; well above that, other processes competed "
        f"for the cores and the times are noisy)\n"
    )

    rows = [
        (f"faiss spherical ({args.faiss_iter} it, {faiss_points} pts)", t_faiss, evaluate(x_eval, cb_faiss)),
        (f"MiniBatchKMeans (max_iter {args.sk_max_iter}, N pts)", t_sk, evaluate(x_eval, cb_sk)),
    ]
    print(f"== held-out angular error ({args.n_eval} vectors, assigned by cosine) ==")
    print(
        f"{'method':<44} {'fit s':>8} {'mean deg':>9} {'median deg':>11} {'utilisation':>12} {'perplexity':>11}"
    )
    for name, seconds, m in rows:
        print(
            f"{name:<44} {seconds:>8.1f} {m['mean']:>9.3f} {m['median']:>11.3f} {m['utilisation']:>12.3f} "
            f"{m['perplexity']:>11.1f}"
        )
    if 1.0 / k < 0.001:
        print(
            f"(K={k}: an evenly used codebook gives each codeword 1/K = {100 / k:.3f} % < 0.1 % of the "
            f"assignments, so utilisation sits near 0.5 by sampling noise; perplexity ~ K means even use)"
        )
    speedup = t_sk / t_faiss
    diff = rows[0][2]["mean"] - rows[1][2]["mean"]
    diff_median = rows[0][2]["median"] - rows[1][2]["median"]
    angle_ok = diff <= ANGLE_TOLERANCE_DEG
    print(f"\nspeed-up t_sklearn / t_faiss: {speedup:6.2f}x")
    print(
        f"mean angle faiss - sklearn: {diff:+6.3f} deg (median {diff_median:+.3f})  "
        f"(target <= +{ANGLE_TOLERANCE_DEG} deg): {'PASS' if angle_ok else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
