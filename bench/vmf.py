"""vMF benchmark: accuracy of log C_D / A_D against mpmath, and log_prob throughput against scipy.

Run: ``uv run python bench/vmf.py`` (CPU, well under a minute).  Prints two tables:

1. max relative error of ``vmf_log_normalizer`` and ``vmf_mean_resultant_length`` per dimension D
   over 25 log-spaced κ in [1e-3, 1e5] against mpmath (40 digits), next to the number of those κ at
   which scipy's ``ive``-based normaliser is not usable (``ive`` underflows to 0 or subnormal);
2. ``VonMisesFisher.log_prob`` throughput (points/s) against ``scipy.stats.vonmises_fisher.logpdf``
   on the same points at D = 128, scipy called once per (μ, κ) group in its vectorised form:
   (a) 4 groups of 25k points, torch given the grouped layout ``x (G, n, D)``, ``loc (G, 1, D)``;
   (b) 100k points each with its own (μ, κ), as a dynamics model produces them: torch in one batched
       call, scipy one call per point (timed on 500 points and scaled).
   Timings are the minimum over repeats (robust to other load on the machine), with one torch
   thread and with torch's default thread count.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import mpmath
import numpy as np
import scipy.special
import scipy.stats
import torch

from latentdyn.models.distributions import VonMisesFisher, vmf_log_normalizer, vmf_mean_resultant_length


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time of ``fn`` over ``repeats`` calls after one warm-up call (seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def accuracy_table() -> None:
    kappas = np.logspace(-3, 5, 25)
    kt = torch.tensor(kappas, dtype=torch.float64)
    print("== accuracy against mpmath (25 log-spaced kappa in [1e-3, 1e5]) ==")
    print(f"{'D':>5} {'max rel err log C_D':>20} {'max rel err A_D':>16} {'scipy unusable':>15}")
    worst_c = worst_a = 0.0
    for dim in [2, 3, 4, 8, 16, 32, 64, 128, 256, 512]:
        ours_c = vmf_log_normalizer(dim, kt).numpy()
        ours_a = vmf_mean_resultant_length(dim, kt).numpy()
        ref_c, ref_a = [], []
        with mpmath.workdps(40):
            nu = mpmath.mpf(dim) / 2 - 1
            for k in kappas:
                km = mpmath.mpf(float(k))
                i0, i1 = mpmath.besseli(nu, km), mpmath.besseli(nu + 1, km)
                ref_c.append(
                    float(nu * mpmath.log(km) - (nu + 1) * mpmath.log(2 * mpmath.pi) - mpmath.log(i0))
                )
                ref_a.append(float(i1 / i0))
        err_c = np.max(np.abs(ours_c - ref_c) / np.abs(ref_c))
        err_a = np.max(np.abs(ours_a - ref_a) / np.abs(ref_a))
        ive = scipy.special.ive(dim / 2 - 1, kappas)
        unusable = int(np.sum(~(ive > np.finfo(np.float64).tiny)))
        worst_c, worst_a = max(worst_c, err_c), max(worst_a, err_a)
        print(f"{dim:>5} {err_c:>20.2e} {err_a:>16.2e} {unusable:>12d}/25")
    print(f"worst: log C_D {worst_c:.2e}, A_D {worst_a:.2e}\n")


def grouped_throughput(dim: int, kappas: list[float], n_per_group: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    mus, xs = [], []
    for kappa in kappas:
        mu = rng.standard_normal(dim)
        mu /= np.linalg.norm(mu)
        x = scipy.stats.vonmises_fisher(mu, kappa).rvs(n_per_group, random_state=rng)
        mus.append(mu)
        xs.append(x / np.linalg.norm(x, axis=-1, keepdims=True))
    frozen = [scipy.stats.vonmises_fisher(mu, k) for mu, k in zip(mus, kappas, strict=True)]

    def run_scipy() -> list[np.ndarray]:
        return [f.logpdf(x) for f, x in zip(frozen, xs, strict=True)]

    ref = np.stack(run_scipy())
    assert np.all(np.isfinite(ref)), "scipy must be finite on the benchmark points"
    t_scipy = best_time(run_scipy, repeats)
    n = len(kappas) * n_per_group
    print(f"== (a) grouped: D={dim}, {len(kappas)} groups x {n_per_group} points, kappa={kappas} ==")
    print(f"scipy.stats.vonmises_fisher.logpdf (float64): {t_scipy * 1e3:8.2f} ms  {n / t_scipy:12.3e} pts/s")
    for dtype in (torch.float64, torch.float32):
        x_t = torch.tensor(np.stack(xs), dtype=dtype)
        loc_t = torch.tensor(np.stack(mus), dtype=dtype).unsqueeze(1)
        kappa_t = torch.tensor(kappas, dtype=dtype).unsqueeze(1)
        for validate in (True, False):

            def run_torch(
                v: bool = validate,
                loc: torch.Tensor = loc_t,
                kappa: torch.Tensor = kappa_t,
                x: torch.Tensor = x_t,
            ) -> torch.Tensor:
                return VonMisesFisher(loc, kappa, validate_args=v).log_prob(x)

            err = np.max(np.abs(run_torch().double().numpy() - ref) / np.maximum(np.abs(ref), 1.0))
            t = best_time(run_torch, repeats)
            print(
                f"torch {str(dtype)[6:]:7s} validate={validate!s:5s}:      {t * 1e3:8.2f} ms  {n / t:12.3e} pts/s"
                f"  ratio {t_scipy / t:6.1f}x  (max rel diff to scipy {err:.1e})"
            )
    print()


def per_row_throughput(dim: int, n: int, n_scipy: int, repeats: int) -> None:
    rng = np.random.default_rng(1)
    kappas = 10.0 ** rng.uniform(1, 4, n)
    mus = rng.standard_normal((n, dim))
    mus /= np.linalg.norm(mus, axis=-1, keepdims=True)
    # Points near each mean (exact sampling does not matter for timing): x = normalise(μ + noise/√κ).
    xs = mus + rng.standard_normal((n, dim)) / np.sqrt(kappas)[:, None]
    xs /= np.linalg.norm(xs, axis=-1, keepdims=True)

    def run_scipy() -> list[float]:
        return [scipy.stats.vonmises_fisher(mus[i], kappas[i]).logpdf(xs[i]) for i in range(n_scipy)]

    ref = np.array(run_scipy())
    t_scipy = best_time(run_scipy, 2) / n_scipy * n
    print(
        f"== (b) per-row parameters: D={dim}, {n} points each with its own (mu, kappa), kappa in [10, 1e4] =="
    )
    print(
        f"scipy (one call per point, scaled from {n_scipy}):   {t_scipy * 1e3:8.1f} ms  {n / t_scipy:12.3e} pts/s"
    )
    for dtype in (torch.float64, torch.float32):
        x_t, loc_t = torch.tensor(xs, dtype=dtype), torch.tensor(mus, dtype=dtype)
        kappa_t = torch.tensor(kappas, dtype=dtype)

        def run_torch(
            loc: torch.Tensor = loc_t, kappa: torch.Tensor = kappa_t, x: torch.Tensor = x_t
        ) -> torch.Tensor:
            return VonMisesFisher(loc, kappa).log_prob(x)

        out = run_torch()[:n_scipy].double().numpy()
        err = np.max(np.abs(out - ref) / np.maximum(np.abs(ref), 1.0))
        t = best_time(run_torch, repeats)
        print(
            f"torch {str(dtype)[6:]:7s} validate=True  (one call):    {t * 1e3:8.1f} ms  {n / t:12.3e} pts/s"
            f"  ratio {t_scipy / t:8.1f}x  (max rel diff to scipy {err:.1e})"
        )
    print()


def main() -> None:
    start = time.perf_counter()
    default_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, scipy {scipy.__version__}, torch threads {default_threads}\n")
    accuracy_table()
    # One torch thread (as numpy's elementwise code) and the default; on a loaded machine the
    # multi-threaded timings suffer most from contention.
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        print(f"---- torch threads = {threads} ----")
        grouped_throughput(dim=128, kappas=[10.0, 100.0, 1e3, 1e4], n_per_group=25_000, repeats=15)
        per_row_throughput(dim=128, n=100_000, n_scipy=500, repeats=5)
    torch.set_num_threads(default_threads)
    print(f"total bench time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
