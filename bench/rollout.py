"""Benchmark: the batched injection diagnostic against a per-start-point, per-mode Python loop.

Both roll out the same random MLP-backed ``DynamicsNet`` (MDN or vMF × LogNormal head, ``horizon_mode=lag``) from
the same GT segments (random walks) with the same fitted baseline and nearest-neighbour bank, median prediction,
reset=frame, CPU float32, all four modes (B injects after 4, 8, 12; C after 1). The loop follows the reference's
semantics (``src/phase1/injection_diag.py``) and shares no code with the engine. Prints both wall times, the
speed-up and the largest difference of the per-step metrics. Usage:
``uv run python bench/rollout.py [--starts 128] [--head mdn|vmf] [--k 1]``.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from latentdyn.diagnostics.injection import METRICS, MODES, InjectionConfig, run_injection
from latentdyn.models.net import DynamicsNet

HEADS = {"mdn": "latentdyn.models.heads.GaussianMDNHead", "vmf": "latentdyn.models.heads.VMFLogNormalHead"}
#: Largest allowed |batched - loop| / max(1, |loop|) (float32, batched against one-row matmuls).
TOLERANCE = 1e-5


def reference_loop(
    model: DynamicsNet, segments: torch.Tensor, cfg: InjectionConfig, baseline, bank: torch.Tensor | None
) -> dict[str, np.ndarray]:
    """One mode and one start at a time, the reference's window rule -> metric ``(M, N, K)``.

    Segment frame ``t0 = W + k - 1`` is the first rolled frame. The window starts as the GT frames ending at
    ``t0 - k``; step ``s`` (frame ``t = t0 + s - 1``) scores the true delta ``x[t] - x[t-1]``, then the state
    advances by the median ``Δ̂`` (GT under teacher forcing or after an injection). After step ``s`` the frame
    appended to the window is GT when ``s < k`` or teacher forcing, else the believed state of step ``s - k + 1``.
    """
    w, k, k_steps = model.context, model.horizon, cfg.k_steps
    t0 = w + k - 1
    n = segments.shape[0]
    inject_after = {
        "A_teacher": set(range(1, k_steps + 1)),
        "B_periodic": set(cfg.inject_after_periodic),
        "C_one_shot": set(cfg.inject_after_one_shot),
        "D_rollout": set(),
    }
    out = {name: np.full((len(cfg.modes), n, k_steps), math.nan) for name in METRICS}
    with torch.no_grad():
        for m, mode in enumerate(cfg.modes):
            teacher = mode == "A_teacher"
            for j in range(n):
                x = segments[j]
                window = [x[f] for f in range(t0 - k - w + 1, t0 - k + 1)]
                x_prev = x[t0 - 1]
                believed: list[torch.Tensor] = []
                for s in range(1, k_steps + 1):
                    t = t0 + s - 1
                    dx = x[t] - x[t - 1]
                    dist = model.predictive(torch.stack(window)[None])
                    nll = -float(dist.log_prob(dx[None])[0])
                    dx_hat = dist.median()[0]
                    nll_b = -float(baseline.log_prob(dx[None])[0])
                    p_norm, y_norm = max(float(dx_hat.norm()), 1e-8), max(float(dx.norm()), 1e-8)
                    x_pred = x_prev + dx_hat
                    x_curr = x[t] if teacher or s in inject_after[mode] else x_pred
                    r = (m, j, s - 1)
                    out["nll"][r], out["nll_baseline"][r], out["dnll"][r] = nll, nll_b, nll - nll_b
                    out["cos"][r] = float(torch.dot(dx_hat, dx)) / (p_norm * y_norm)
                    out["mag_ratio"][r] = p_norm / y_norm
                    out["state_err"][r] = out["state_err_raw"][r] = float((x_prev - x[t - 1]).norm())
                    out["mse"][r] = float((x_pred - x[t]).square().mean())
                    if bank is not None:
                        out["manifold_dist"][r] = float((bank - x_pred).norm(dim=1).min())
                    believed.append(x_curr)
                    x_prev = x_curr
                    if s < k_steps:
                        window = [*window[1:], x[t0 + s - k] if teacher or s < k else believed[s - k]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--context", type=int, default=8)
    parser.add_argument("--k", type=int, default=1, help="context lag (horizon_mode=lag)")
    parser.add_argument("--head", choices=sorted(HEADS), default="mdn")
    parser.add_argument("--starts", type=int, default=128)
    parser.add_argument("--k-steps", type=int, default=16)
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
    head = {"_target_": HEADS[args.head]}
    if args.head == "mdn":
        head["n_components"] = 4
    model = DynamicsNet(
        args.dim,
        args.context,
        args.k,
        {"_target_": "latentdyn.models.backbones.MLPBackbone", "hidden": args.hidden, "layers": 2},
        head,
        horizon_mode="lag",
    ).eval()
    length = args.context + args.k - 1 + args.k_steps
    segments = torch.randn(args.starts, length, args.dim).cumsum(dim=1) * 0.2
    baseline = model.baseline.fit([(segments[:, 1:] - segments[:, :-1]).reshape(-1, args.dim)])
    bank = torch.randn(args.bank, args.dim) if args.bank else None
    cfg = InjectionConfig(k_steps=args.k_steps, bank_size=args.bank, predict="median", reset="frame")

    run_injection(model, segments[:4], cfg, baseline, bank)  # warm-up
    t0 = time.perf_counter()
    batched = run_injection(model, segments, cfg, baseline, bank)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = reference_loop(model, segments, cfg, baseline, bank)
    t_loop = time.perf_counter() - t0

    names = [name for name in METRICS if bank is not None or name != "manifold_dist"]
    abs_diff = {name: float(np.max(np.abs(batched.per_start[name] - reference[name]))) for name in names}
    rel_diff = {
        name: float(
            np.max(
                np.abs(batched.per_start[name] - reference[name]) / np.maximum(1.0, np.abs(reference[name]))
            )
        )
        for name in names
    }
    max_rel = max(rel_diff.values())
    rows = len(cfg.modes) * args.starts
    print(
        f"injection diagnostic: {args.head} head, D={args.dim} W={args.context} k={args.k} starts={args.starts} "
        f"K={args.k_steps} modes={len(MODES)} bank={args.bank} threads={torch.get_num_threads()} "
        "(CPU float32, median prediction, reset=frame)"
    )
    print(f"batched  : {t_batched * 1e3:9.1f} ms  ({args.k_steps} predictive calls of {rows} rows)")
    print(f"per-start: {t_loop * 1e3:9.1f} ms  ({rows * args.k_steps} predictive calls of 1 row)")
    print(f"speed-up : {t_loop / t_batched:9.1f}x  (target >= 20x)")
    print("max |batched - loop| per metric: " + ", ".join(f"{k}={v:.1e}" for k, v in abs_diff.items()))
    print(
        f"max relative difference |batched - loop| / max(1, |loop|): {max_rel:.1e}  (must be <= {TOLERANCE:.0e})"
    )
    if not max_rel <= TOLERANCE:
        raise SystemExit("batched rollout disagrees with the per-start loop")


if __name__ == "__main__":
    main()
