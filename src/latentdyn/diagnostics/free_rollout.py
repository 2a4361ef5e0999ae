"""Free-running rollouts of Stage 3 (Exp 10, Exp 11): any one-step predictor, optionally corrected, from GT
context windows, scored against the GT trajectory step by step.

A *segment* is ``W + K`` GT frames ``x[t0-W .. t0+K-1]`` of one utterance, in raw latents. The rollout starts
from the GT context ``x[t0-W .. t0-1]`` and the GT state ``x̂[t0-1] = x[t0-1]``; step ``s = 1..K`` (frame
``t = t0 + s - 1``) asks the predictor for a delta given the last W frames of the *believed* trajectory,

    x̂[t] = x̂[t-1] + Δ̂            then, with a correction, x̂[t] <- correction(x̂[t], context)

and appends ``x̂[t]`` to the context: from the first step on, the predicted frame (the reference appended the
GT frame ``x[t0]`` after step 1, which made step 2 teacher-forced; fixed here).

Per step (``K`` values per row): ``state_err`` = ``‖x̂[t-1] - x[t-1]‖`` before the step (Exp 2's convention, 0 at
step 1), ``state_err_after`` = ``‖x̂[t] - x[t]‖`` after it, ``cos`` = cos(x̂[t] - x̂[t-1], x[t] - x[t-1]) of the step
actually taken (after any correction) and the true delta, ``mag_ratio`` of their norms and, given a direction
codebook, ``dir_acc`` (whether the step's nearest codeword is the true delta's). A row whose state turns
non-finite stops there: it is left out of every later step's means and counted in ``nan_share`` (share of rows
that have gone non-finite by the step). The error after ``k`` steps, ``final_state_err`` at ``k``, is the
state error of a ``k``-step rollout's last state: every ``k ≤ K`` reads one ``K``-step rollout's prefix (the same
context gives the same predictions; a sampled prefix is a sample of the shorter rollout).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from latentdyn.models.codebook import nearest_codeword

#: ``step(context (R, W, D), generator) -> Δ̂ (R, D)``: one prediction per row, raw latents.
Stepper = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]
#: ``correction(states (R, D), contexts (R, W, D)) -> (R, D)``.
Correction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PER_STEP: tuple[str, ...] = ("state_err", "state_err_after", "cos", "mag_ratio", "dir_acc")
NORM_FLOOR = 1e-8


@dataclass
class Segments:
    """GT segments ``(N, W + K, D)`` float32 (raw latents), the context ``W`` and where each comes from."""

    frames: torch.Tensor
    window: int
    starts: list[tuple[str, int]]

    @property
    def k_steps(self) -> int:
        return int(self.frames.shape[1]) - self.window


def sample_segments(
    trajectories: Sequence[tuple[str, np.ndarray]],
    window: int,
    k_steps: int,
    n_utterances: int,
    per_utterance: int,
    seed: int,
    max_frames: int | None = None,
) -> Segments:
    """The reference's rollout segments: a seeded shuffle of ``trajectories`` (``(utt_id, (T, D))``), each cropped
    to ``max_frames``; the first ``n_utterances`` that hold a segment give ``per_utterance`` distinct starts
    ``t0`` in ``[W, T - K]`` each (one generator seeded with ``seed``, drawn utterance after utterance)."""
    if window < 1 or k_steps < 1 or n_utterances < 1 or per_utterance < 1:
        raise ValueError(
            f"need window, k_steps, n_utterances, per_utterance >= 1, got {window}, {k_steps}, "
            f"{n_utterances}, {per_utterance}"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(trajectories))
    frames: list[np.ndarray] = []
    starts: list[tuple[str, int]] = []
    used = 0
    for i in order.tolist():
        utt_id, traj = trajectories[i]
        x = np.asarray(traj, dtype=np.float32)[:max_frames]
        first, last = window, int(x.shape[0]) - k_steps  # t0 + K - 1 <= T - 1
        if last < first:
            continue
        candidates = np.arange(first, last + 1)
        t0s = np.sort(rng.choice(candidates, size=min(per_utterance, len(candidates)), replace=False))
        for t0 in t0s.tolist():
            frames.append(x[t0 - window : t0 + k_steps])
            starts.append((utt_id, int(t0)))
        used += 1
        if used == n_utterances:
            break
    if not frames:
        longest = max((len(t) for _, t in trajectories), default=0)
        raise ValueError(
            f"no utterance holds a rollout segment of W + K = {window + k_steps} frames (longest: {longest})"
        )
    return Segments(torch.from_numpy(np.stack(frames)), int(window), starts)


@dataclass
class Rollout:
    """What :func:`free_rollout` produced: believed states ``(N, K, D)`` (NaN after a row broke), the
    per-step ``finite`` mask ``(N, K)`` and the GT segments."""

    states: torch.Tensor
    finite: torch.Tensor
    segments: Segments


@torch.no_grad()
def free_rollout(
    step: Stepper,
    segments: Segments,
    correction: Correction | None = None,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Roll every segment out ``K`` steps (see the module docstring). A row that turns non-finite is frozen:
    its context is replaced by zeros for the predictor (whose draws it no longer affects) and its states are
    NaN from then on."""
    gt = segments.frames.to(torch.float32)
    n, _, dim = gt.shape
    w, k_steps = segments.window, segments.k_steps
    context = gt[:, :w].clone()
    previous = gt[:, w - 1].clone()
    alive = torch.ones(n, dtype=torch.bool, device=gt.device)
    states = torch.full((n, k_steps, dim), float("nan"), device=gt.device)
    finite = torch.zeros(n, k_steps, dtype=torch.bool, device=gt.device)
    for s in range(k_steps):
        state = previous + step(context, generator).to(torch.float32)
        if correction is not None:
            state = correction(state, context).detach().to(torch.float32)
        alive = alive & torch.isfinite(state).all(dim=1)
        state = torch.where(alive[:, None], state, torch.zeros_like(state))
        states[alive, s] = state[alive]
        finite[:, s] = alive
        previous = state
        context = torch.where(alive[:, None, None], torch.cat([context[:, 1:], state[:, None]], dim=1), 0.0)
    return Rollout(states, finite, segments)


def per_step_values(rollout: Rollout, codebook: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Every per-step metric ``(N, K)`` float64, NaN where the row is no longer finite (``dir_acc`` NaN
    everywhere without a codebook)."""
    gt = rollout.segments.frames.to(torch.float32)
    w = rollout.segments.window
    truth = gt[:, w:]  # x[t0 .. t0+K-1]
    before_truth = gt[:, w - 1 : -1]  # x[t0-1 .. t0+K-2]
    states = rollout.states
    before = torch.cat([gt[:, w - 1 : w], states[:, :-1]], dim=1)  # x̂[t-1]
    step = states - before
    true_step = truth - before_truth
    step_norm = torch.linalg.vector_norm(step, dim=-1).clamp_min(NORM_FLOOR)
    true_norm = torch.linalg.vector_norm(true_step, dim=-1).clamp_min(NORM_FLOOR)
    out = {
        "state_err": torch.linalg.vector_norm(before - before_truth, dim=-1),
        "state_err_after": torch.linalg.vector_norm(states - truth, dim=-1),
        "cos": (step * true_step).sum(-1) / (step_norm * true_norm),
        "mag_ratio": step_norm / true_norm,
    }
    if codebook is not None:
        flat = step.reshape(-1, step.shape[-1]).nan_to_num()
        chosen = nearest_codeword(flat, codebook).reshape(step.shape[:2])
        target = nearest_codeword(true_step.reshape(-1, step.shape[-1]), codebook).reshape(step.shape[:2])
        out["dir_acc"] = (chosen == target).to(torch.float32)
    else:
        out["dir_acc"] = torch.full(step.shape[:2], float("nan"))
    finite = rollout.finite
    result = {}
    for name, values in out.items():
        values = values.to(torch.float64).cpu().numpy()
        result[name] = np.where(finite.cpu().numpy(), values, np.nan)
    return result


def _mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def per_step_rows(values: dict[str, np.ndarray], finite: torch.Tensor) -> list[dict[str, Any]]:
    """One row per step ``s = 1..K``: ``step``, ``n`` (rows still finite), ``nan_share``, and the mean of every
    per-step metric over those rows (None when none is)."""
    alive = finite.cpu().numpy()
    rows = []
    for s in range(alive.shape[1]):
        row: dict[str, Any] = {
            "step": s + 1,
            "n": int(alive[:, s].sum()),
            "nan_share": float(1.0 - alive[:, s].mean()),
        }
        row.update({name: _mean(values[name][:, s]) for name in PER_STEP})
        rows.append(row)
    return rows


def horizon_summary(values: dict[str, np.ndarray], finite: torch.Tensor, k: int) -> dict[str, Any]:
    """A ``k``-step rollout's summary (its prefix of the per-step values): ``final_state_err`` (after step k),
    ``mean_state_err`` (after each step, averaged over steps 1..k), ``final_cos``, ``mean_cos``,
    ``final_dir_acc``, ``mean_dir_acc``, ``nan_share`` (rows non-finite by step k) and ``n`` (rows finite)."""
    alive = finite.cpu().numpy()
    if not 1 <= k <= alive.shape[1]:
        raise ValueError(f"k must lie in [1, {alive.shape[1]}], got {k}")
    return {
        "k": int(k),
        "n": int(alive[:, k - 1].sum()),
        "nan_share": float(1.0 - alive[:, k - 1].mean()),
        "final_state_err": _mean(values["state_err_after"][:, k - 1]),
        "mean_state_err": _mean(values["state_err_after"][:, :k]),
        "final_cos": _mean(values["cos"][:, k - 1]),
        "mean_cos": _mean(values["cos"][:, :k]),
        "final_dir_acc": _mean(values["dir_acc"][:, k - 1]),
        "mean_dir_acc": _mean(values["dir_acc"][:, :k]),
    }
