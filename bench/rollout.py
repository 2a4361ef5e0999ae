"""Benchmark: the batched injection diagnostic against a per-start-point, per-mode Python loop.

Both run the same random MLP dynamics model (protocol-conformant, diagonal Gaussian predictive) on the same GT
segments and bank, mean prediction, CPU float32. Prints both wall times, the speed-up, and the largest absolute
difference of the per-step metrics (must be <= 1e-5). Usage: ``uv run python bench/rollout.py [--starts 256]``.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from latentdyn.diagnostics.injection import METRICS, InjectionConfig, injection_schedule, run_injection

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class GaussianPredictive:
    """Diagonal Gaussian over deltas ``(B, D)``."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        self._mean, self._scale = mean, scale

    def log_prob(self, delta: torch.Tensor) -> torch.Tensor:
        z = (delta - self._mean) / self._scale
        return (-0.5 * z**2 - self._scale.log() - LOG_SQRT_2PI).sum(-1)

    def mean(self) -> torch.Tensor:
        return self._mean

    def sample(self, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self._mean.shape, generator=generator, dtype=self._mean.dtype)
        return self._mean + temperature * self._scale * noise


class MLPModel(torch.nn.Module):
    """A random MLP over the flattened ``(W, D)`` window -> Gaussian delta (context-dependent spread)."""

    def __init__(self, dim: int, context: int, horizon: int, hidden: int) -> None:
        super().__init__()
        self.dim, self.context, self.horizon, self.context_stride = dim, context, horizon, horizon
        self.body = torch.nn.Sequential(
            torch.nn.Linear(context * dim, hidden),
            torch.nn.GELU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.GELU(),
        )
        self.head = torch.nn.Linear(hidden, 2 * dim)

    def predictive(self, context: torch.Tensor) -> GaussianPredictive:
        loc, raw = self.head(self.body(context.flatten(1))).chunk(2, dim=-1)
        return GaussianPredictive(0.5 * torch.tanh(loc), torch.nn.functional.softplus(raw) + 0.1)


def run_injection_loop_reference(model, segments, cfg, bank) -> dict[str, np.ndarray]:
    """One start point and one mode at a time on full-resolution frames (mean prediction) -> metric (M, N, H)."""
    w, k, dim = model.context, model.horizon, model.dim
    n, horizon = segments.shape[0], cfg.horizon
    out = {name: np.zeros((len(cfg.modes), n, horizon)) for name in METRICS}
    for m, mode in enumerate(cfg.modes):
        schedule = injection_schedule(mode, horizon, cfg.period, cfg.inject_step)
        for i in range(n):
            gt = segments[i]
            buffer = gt.clone()
            for s in range(horizon):
                p = (w - 1) * k + s * k
                positions = torch.arange(p - (w - 1) * k, p + 1, k)
                if schedule[s]:
                    buffer[positions] = gt[positions]
                with torch.no_grad():
                    dist = model.predictive(buffer[positions][None])
                    target = gt[p + k]
                    nll = -dist.log_prob((target - buffer[p])[None])[0] / dim
                    pred = buffer[p] + dist.mean()[0]
                buffer[p + k] = pred
                out["mse"][m, i, s] = float(((pred - target) ** 2).mean())
                out["cosine"][m, i, s] = float(torch.dot(pred, target) / (pred.norm() * target.norm()))
                out["nll"][m, i, s] = float(nll)
                out["norm_ratio"][m, i, s] = float(pred.norm() / target.norm())
                out["manifold_dist"][m, i, s] = (
                    float((bank - pred).norm(dim=1).min()) if bank is not None else math.nan
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--context", type=int, default=8)
    parser.add_argument("--k", type=int, default=1, help="model horizon = context stride (frames)")
    parser.add_argument("--starts", type=int, default=256)
    parser.add_argument("--horizon", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--bank", type=int, default=2048, help="bank size (0: no manifold distance)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default; >1 thrashes on a busy machine)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MLPModel(args.dim, args.context, args.k, args.hidden).eval()
    length = (args.context - 1) * args.k + 1 + args.horizon * args.k
    segments = torch.randn(args.starts, length, args.dim).cumsum(dim=1) * 0.2
    bank = torch.randn(args.bank, args.dim) if args.bank else None
    cfg = InjectionConfig(
        horizon=args.horizon, n_starts=args.starts, period=8, inject_step=16, bank_size=args.bank
    )

    run_injection(model, segments[:4], cfg, bank)  # warm-up
    t0 = time.perf_counter()
    batched = run_injection(model, segments, cfg, bank)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = run_injection_loop_reference(model, segments, cfg, bank)
    t_loop = time.perf_counter() - t0

    diffs = {name: float(np.max(np.abs(batched.per_start[name] - reference[name]))) for name in METRICS}
    max_diff = (
        max(diffs.values()) if bank is not None else max(v for k, v in diffs.items() if k != "manifold_dist")
    )
    print(
        f"injection diagnostic: D={args.dim} W={args.context} k={args.k} starts={args.starts} H={args.horizon} "
        f"modes={len(cfg.modes)} bank={args.bank} threads={torch.get_num_threads()} (CPU float32, mean prediction)"
    )
    print(
        f"batched  : {t_batched * 1e3:9.1f} ms  ({args.horizon} predictive calls of {len(cfg.modes) * args.starts} rows)"
    )
    print(
        f"per-start: {t_loop * 1e3:9.1f} ms  ({len(cfg.modes) * args.starts * args.horizon} predictive calls of 1 row)"
    )
    print(f"speed-up : {t_loop / t_batched:9.1f}x  (target >= 20x)")
    print("max |batched - loop| per metric: " + ", ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
    print(f"max abs difference: {max_diff:.2e}  (must be <= 1e-5)")
    if not max_diff <= 1e-5:
        raise SystemExit("batched rollout disagrees with the per-start loop")


if __name__ == "__main__":
    main()
