"""Exp 10/11's direction AR and free-running rollouts: the magnitude's density against scipy, nucleus sampling,
an oracle direction AR reproducing the quantised trajectory, the first step's context, determinism, NaN
handling, the per-step conventions, and best_sigmas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from latentdyn.diagnostics.free_rollout import (
    Segments,
    free_rollout,
    horizon_summary,
    per_step_rows,
    per_step_values,
    sample_segments,
)
from latentdyn.models.codebook import quantised_trajectory, unit_rows
from latentdyn.models.direction_ar import DirectionARNet, DirectionPredictive, lognormal_nll, top_p_sample

MLP = {"_target_": "latentdyn.models.backbones.MLPBackbone", "hidden": 32, "layers": 2, "layer_norm": False}


def test_magnitude_nll_is_the_lognormal_density_of_the_norm() -> None:
    m = torch.tensor([0.05, 0.7, 1.0, 3.0, 40.0])
    mu = torch.tensor([-1.0, 0.0, 0.3, 1.0, 2.0])
    sigma = torch.tensor([0.2, 0.5, 1.0, 1.5, 2.0])
    expected = -stats.lognorm.logpdf(m.numpy(), s=sigma.numpy(), scale=np.exp(mu.numpy()))
    np.testing.assert_allclose(lognormal_nll(m, mu, sigma).numpy(), expected, rtol=1e-5)


def test_top_p_draws_only_from_the_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    draws = top_p_sample(logits, 0.7, g)
    # The nucleus of p = 0.7: the classes whose higher-ranked mass is below 0.7, i.e. {0, 1}; renormalised.
    assert set(draws.tolist()) == {0, 1}
    assert (draws == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)
    # A tiny p keeps the most probable class only; p = 1 keeps them all.
    assert set(top_p_sample(logits, 1e-6, g).tolist()) == {0}
    assert set(top_p_sample(logits, 1.0, g).tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="top_p"):
        top_p_sample(logits, 0.0)


def _oracle_stepper(x: np.ndarray, t0: int, codebook: np.ndarray) -> object:
    """A direction AR that outputs, at its s-th call, the true codeword of Δ = x[t0+s] - x[t0+s-1] with
    certainty and the true norm as its median magnitude."""
    deltas = np.diff(x, axis=0)[t0 - 1 :]
    calls = {"n": 0}
    book = torch.from_numpy(codebook)

    def step(context: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        d = torch.from_numpy(deltas[calls["n"]])[None]
        calls["n"] += 1
        index = (d @ book.T).argmax(dim=-1)
        logits = torch.full((1, len(codebook)), -30.0).scatter(1, index[:, None], 30.0)
        out = DirectionPredictive(logits, torch.log(d.norm(dim=-1)), torch.full((1,), 0.5), book)
        return out.step("argmax", generator=generator)

    return step


def _walk(steps: int = 20, dim: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.standard_normal((steps, dim)), axis=0).astype(np.float32)


def test_an_oracle_direction_ar_reproduces_the_quantised_trajectory() -> None:
    x = _walk()
    book = unit_rows(np.random.default_rng(1).standard_normal((6, 3))).astype(np.float32)
    w, t0, k = 4, 5, 10
    segments = Segments(torch.from_numpy(x[None, t0 - w : t0 + k]), w, [("u", t0)])
    rollout = free_rollout(_oracle_stepper(x, t0, book), segments)
    # The open-loop reconstruction from x[t0-1] with the true magnitudes and codewords.
    expected = quantised_trajectory("direction", x[t0 - 1 : t0 + k], book, min_norm=0.0)[1:]
    np.testing.assert_allclose(rollout.states[0].numpy(), expected, atol=1e-5)


def test_the_first_step_feeds_the_predicted_frame_back_not_the_ground_truth() -> None:
    x = _walk()
    w, t0 = 3, 6
    seen: list[torch.Tensor] = []

    def step(context: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        seen.append(context.clone())
        return torch.full((1, 3), 0.5)

    free_rollout(step, Segments(torch.from_numpy(x[None, t0 - w : t0 + 3]), w, [("u", t0)]))
    torch.testing.assert_close(seen[0][0], torch.from_numpy(x[t0 - w : t0]))
    predicted = torch.from_numpy(x[t0 - 1]) + 0.5
    # Step 2 reads x̂[t0] (the reference appended x[t0] here, which made step 2 teacher-forced).
    torch.testing.assert_close(seen[1][0, -1], predicted)
    assert not torch.allclose(seen[1][0, -1], torch.from_numpy(x[t0]))
    torch.testing.assert_close(seen[2][0, -2:], torch.stack([predicted, predicted + 0.5]))


def _net(seed: int = 0, k: int = 8, dim: int = 4, w: int = 3) -> DirectionARNet:
    torch.manual_seed(seed)
    book = torch.from_numpy(unit_rows(np.random.default_rng(seed).standard_normal((k, dim))))
    return DirectionARNet(dim, w, k, MLP, codebook=book).eval()


def _segments(n: int = 6, w: int = 3, k: int = 8, dim: int = 4) -> Segments:
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((n, w + k, dim)).astype(np.float32))
    return Segments(x, w, [("u", i) for i in range(n)])


def test_argmax_rollouts_are_deterministic_and_sampled_ones_follow_the_seed() -> None:
    net, segments = _net(), _segments()

    def rollout(strategy: str, seed: int) -> torch.Tensor:
        step = lambda c, g: net(c).step(strategy, 0.9, g)  # noqa: E731
        return free_rollout(step, segments, generator=torch.Generator().manual_seed(seed)).states

    torch.testing.assert_close(rollout("argmax", 0), rollout("argmax", 1), rtol=0, atol=0)
    torch.testing.assert_close(rollout("categorical", 3), rollout("categorical", 3), rtol=0, atol=0)
    assert not torch.equal(rollout("categorical", 3), rollout("categorical", 4))
    # argmax steps by the median magnitude e^μ along the most probable codeword.
    out = net(segments.frames[:, :3])
    expected = torch.exp(out.log_mag_mu)[:, None] * net.codebook[out.logits.argmax(-1)]
    torch.testing.assert_close(out.step("argmax"), expected)


def test_bounds_of_the_magnitude_parameters_hold_for_any_input() -> None:
    net = _net()
    out = net(1e4 * torch.randn(16, 3, 4))
    assert (out.log_mag_mu >= -5.0).all() and (out.log_mag_mu <= 12.0).all()
    assert (out.log_mag_sigma >= math.exp(-5.0) - 1e-6).all() and (
        out.log_mag_sigma <= math.exp(0.7) + 1e-5
    ).all()


def test_per_step_state_errors_before_and_after_each_step() -> None:
    x = _walk(steps=12, dim=2)
    w, t0, k = 2, 4, 5
    segments = Segments(torch.from_numpy(x[None, t0 - w : t0 + k]), w, [("u", t0)])
    rollout = free_rollout(lambda c, g: torch.zeros(1, 2), segments)  # the state stays at x[t0-1]
    values = per_step_values(rollout)
    after = np.linalg.norm(x[t0 : t0 + k] - x[t0 - 1], axis=1)
    np.testing.assert_allclose(values["state_err_after"][0], after, rtol=1e-5)
    np.testing.assert_allclose(
        values["state_err"][0], np.concatenate([[0.0], after[:-1]]), rtol=1e-5, atol=1e-6
    )
    summary = horizon_summary(values, rollout.finite, 3)
    assert summary["final_state_err"] == pytest.approx(after[2], rel=1e-5)
    assert summary["mean_state_err"] == pytest.approx(after[:3].mean(), rel=1e-5)


def test_a_row_that_turns_non_finite_stops_and_counts_in_the_nan_share() -> None:
    segments = _segments(n=4, k=6)
    calls = {"n": 0}

    def step(context: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        calls["n"] += 1
        delta = torch.full((4, 4), 0.1)
        if calls["n"] == 3:
            delta[1] = float("inf")  # row 1 breaks at step 3
        return delta

    rollout = free_rollout(step, segments)
    assert rollout.finite[1].tolist() == [True, True, False, False, False, False]
    assert torch.isnan(rollout.states[1, 2:]).all() and torch.isfinite(rollout.states[[0, 2, 3]]).all()
    values = per_step_values(rollout)
    rows = per_step_rows(values, rollout.finite)
    assert [r["n"] for r in rows] == [4, 4, 3, 3, 3, 3]
    assert rows[2]["nan_share"] == pytest.approx(0.25) and rows[1]["nan_share"] == 0.0
    assert horizon_summary(values, rollout.finite, 6)["nan_share"] == pytest.approx(0.25)
    assert np.isfinite(rows[5]["state_err_after"])


def test_segments_are_seeded_and_fit_their_utterances() -> None:
    rng = np.random.default_rng(0)
    trajectories = [
        (f"u{i}", rng.standard_normal((n, 2)).astype(np.float32)) for i, n in enumerate([30, 12, 9, 40])
    ]
    a = sample_segments(trajectories, window=3, k_steps=6, n_utterances=3, per_utterance=2, seed=7)
    b = sample_segments(trajectories, window=3, k_steps=6, n_utterances=3, per_utterance=2, seed=7)
    assert a.starts == b.starts and torch.equal(a.frames, b.frames)
    assert a.frames.shape[1:] == (9, 2)
    lengths = dict((u, len(x)) for u, x in trajectories)
    for (utt, t0), frames in zip(a.starts, a.frames, strict=True):
        assert 3 <= t0 <= lengths[utt] - 6
        np.testing.assert_array_equal(frames.numpy(), dict(trajectories)[utt][t0 - 3 : t0 + 6])
    with pytest.raises(ValueError, match="no utterance holds"):
        sample_segments(trajectories, window=30, k_steps=30, n_utterances=1, per_utterance=1, seed=0)


def _entry(condition: str, sigma: float | None, k: int, err: float, nan: float = 0.0) -> dict:
    return {
        "condition": condition,
        "sigma": sigma,
        "k": k,
        "final_state_err": err,
        "final_cos": 0.1,
        "nan_share": nan,
    }


def test_best_sigmas_picks_the_lowest_error_among_runs_that_are_not_mostly_nan() -> None:
    from latentdyn.experiments.exp11_consistency_rollout import best_sigmas

    entries = [
        _entry("a", None, 4, 2.0),
        _entry("a_tweedie", 0.01, 4, 1.9),
        _entry("a_tweedie", 0.1, 4, 0.5, nan=0.6),  # lowest, but mostly NaN: skipped
        _entry("a_tweedie", 0.25, 4, 1.2, nan=0.4),
        _entry("a_tweedie", 0.5, 4, None),
        _entry("a_tweedie", 0.25, 8, 0.1),  # another k
        _entry("b_tweedie", 0.1, 4, 3.0, nan=0.9),
    ]
    best = best_sigmas(entries, target_k=4, max_nan_share=0.5)
    assert best["a_tweedie"]["best_sigma"] == 0.25 and best["a_tweedie"]["state_err"] == 1.2
    assert best["a_tweedie"]["uncorrected_state_err"] == 2.0 and best["a_tweedie"]["n_valid"] == 2
    assert best["b_tweedie"]["best_sigma"] is None and "NaN share" in best["b_tweedie"]["reason"]
    assert set(best) == {"a_tweedie", "b_tweedie"}
