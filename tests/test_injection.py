"""Injection diagnostic (the reference's protocol): closed forms on a ramp, the window rule against the reference's
per-start loop, geometry, start points, schema and outputs."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy.stats import norm

from latentdyn.diagnostics.injection import (
    METRICS,
    MODES,
    InjectionConfig,
    RolloutGeometry,
    rollout_geometry,
    run_injection,
    sample_starts,
)
from latentdyn.diagnostics.manifold import nearest_neighbour_distance, sample_bank
from latentdyn.models.baselines import DiagonalGaussianBaseline
from latentdyn.models.heads import MDNPredictive
from latentdyn.models.net import DynamicsNet

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_2PI = math.log(2.0 * math.pi)
#: The keys of every per-step entry of the reference's injection_diag.json.
REFERENCE_STEP_KEYS = {"step", "n", "nll", "nll_baseline", "dnll", "cos", "mag_ratio", "state_err"}


# --------------------------------------------------------------------------- protocol-satisfying test doubles


class PointPredictive:
    """Median, mean and (noise-free) sample all ``point`` ``(B, D)``; density ``N(point, σ² I)`` in closed form.

    With ``noisy`` a sample is ``point + temperature · σ · ε``, ``ε ~ N(0, I)`` drawn from ``generator``."""

    def __init__(self, point: torch.Tensor, sigma: float, noisy: bool = False) -> None:
        self.point, self.sigma, self.noisy = point, float(sigma), noisy

    def log_prob(self, delta: torch.Tensor) -> torch.Tensor:
        d = delta.shape[-1]
        sq = (delta - self.point).square().sum(-1)
        return -0.5 * sq / self.sigma**2 - d * math.log(self.sigma) - 0.5 * d * LOG_2PI

    def median(self) -> torch.Tensor:
        return self.point

    def mean(self) -> torch.Tensor:
        return self.point

    def sample(self, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.noisy:
            return self.point
        noise = torch.randn(self.point.shape, generator=generator, dtype=self.point.dtype)
        return self.point + temperature * self.sigma * noise


class ConstantModel:
    """Predicts the constant delta ``step`` (default 0: the zero predictor) whatever the context, and records every
    context ``(B, W, D)`` it is called with (in call order)."""

    def __init__(
        self,
        dim: int,
        context: int,
        horizon: int,
        *,
        sigma: float = 1.0,
        step: torch.Tensor | None = None,
        horizon_mode: str = "lag",
        context_stride: int = 1,
        noisy: bool = False,
    ) -> None:
        self.dim, self.context, self.horizon = dim, context, horizon
        self.horizon_mode, self.context_stride = horizon_mode, context_stride
        self.sigma, self.noisy = sigma, noisy
        self.step = torch.zeros(dim) if step is None else step
        self.calls: list[torch.Tensor] = []

    def predictive(self, context: torch.Tensor) -> PointPredictive:
        self.calls.append(context.detach().clone())
        point = self.step.to(context.dtype).expand(context.shape[0], self.dim).clone()
        return PointPredictive(point, self.sigma, self.noisy)


class GaussianModel:
    """Ignores its context and outputs a fixed diagonal Gaussian ``N(mean, diag var)`` as a one-component MDN."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, context: int, horizon: int) -> None:
        self.dim, self.context, self.horizon = mean.shape[0], context, horizon
        self.horizon_mode, self.context_stride = "lag", 1
        self.mean, self.scale = mean.float(), var.float().sqrt()

    def predictive(self, context: torch.Tensor) -> MDNPredictive:
        b = context.shape[0]
        return MDNPredictive(
            torch.zeros(b, 1),
            self.mean.expand(b, 1, self.dim).clone(),
            self.scale.expand(b, 1, self.dim).clone(),
        )


def dynamics_net(head: str, dim: int, window: int, k: int, seed: int = 0) -> DynamicsNet:
    """A random tiny MLP-backed DynamicsNet (``horizon_mode=lag``) with the named head, in eval mode."""
    torch.manual_seed(seed)
    head_cfg = {"_target_": f"latentdyn.models.heads.{head}"}
    if head == "GaussianMDNHead":
        head_cfg["n_components"] = 3
    return DynamicsNet(
        dim,
        window,
        k,
        {"_target_": "latentdyn.models.backbones.MLPBackbone", "hidden": 16, "layers": 1},
        head_cfg,
        horizon_mode="lag",
    ).eval()


# --------------------------------------------------------------------------- the reference loop (not in the library)


def reference_loop(
    model,
    segments: torch.Tensor,
    cfg: InjectionConfig,
    baseline,
    bank: torch.Tensor | None = None,
    correction: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    raw_scale: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """The reference's rollout (``src/phase1/injection_diag.py``), one mode and one start at a time -> (M, N, K).

    Segment frame ``o = W + k - 1`` is ``t0``. The window starts as the GT frames ending at ``t0 - k``; step ``s``
    (frame ``t = t0 + s - 1``) scores the true delta ``x[t] - x[t-1]`` under it, then the state advances
    ``x̂[t] = x̂[t-1] + Δ̂`` (median; corrected in free-running modes), or is GT under teacher forcing or after an
    injection. After step ``s`` the frame appended to the window (the one at ``t0 + s - k``) is GT when ``s < k``
    or teacher forcing, else the believed state of step ``s - k + 1``. ``reset=context`` additionally turns the
    believed history and the current window back to GT at an injection.
    """
    w, k, k_steps = model.context, model.horizon, cfg.k_steps
    t0 = w + k - 1
    n, dim = segments.shape[0], segments.shape[2]
    scale = torch.ones(dim) if raw_scale is None else raw_scale
    schedule = {
        "A_teacher": set(range(1, k_steps + 1)),
        "B_periodic": set(cfg.inject_after_periodic),
        "C_one_shot": set(cfg.inject_after_one_shot),
        "D_rollout": set(),
    }
    out = {name: np.full((len(cfg.modes), n, k_steps), np.nan) for name in METRICS}
    for m, mode in enumerate(cfg.modes):
        teacher = mode == "A_teacher"
        for j in range(n):
            x = segments[j]
            window = [x[f] for f in range(t0 - k - w + 1, t0 - k + 1)]
            x_prev = x[t0 - 1]
            believed: list[torch.Tensor] = []  # x̂[t0 + s - 1] after step s
            for s in range(1, k_steps + 1):
                t = t0 + s - 1
                dx = x[t] - x[t - 1]
                with torch.no_grad():
                    dist = model.predictive(torch.stack(window)[None])
                    nll = -float(dist.log_prob(dx[None])[0])
                    dx_hat = dist.median()[0]
                nll_b = -float(baseline.log_prob(dx[None])[0])
                p_norm, y_norm = max(float(dx_hat.norm()), 1e-8), max(float(dx.norm()), 1e-8)
                r = (m, j, s - 1)
                out["nll"][r], out["nll_baseline"][r], out["dnll"][r] = nll, nll_b, nll - nll_b
                out["cos"][r] = float(torch.dot(dx_hat, dx)) / (p_norm * y_norm)
                out["mag_ratio"][r] = p_norm / y_norm
                out["state_err"][r] = float((x_prev - x[t - 1]).norm())
                out["state_err_raw"][r] = float(((x_prev - x[t - 1]) * scale).norm())
                x_pred = x_prev + dx_hat
                if correction is not None and not teacher:
                    x_pred = correction(x_pred[None], torch.stack(window)[None])[0]
                x_curr = x[t] if teacher or s in schedule[mode] else x_pred
                believed.append(x_curr)
                x_prev = x_curr
                # mse and manifold distance score the step's prediction, before an injection replaces it.
                out["mse"][r] = float((x_pred - x[t]).square().mean())
                out["manifold_dist"][r] = (
                    float((bank - x_pred).norm(dim=1).min()) if bank is not None else math.nan
                )
                if cfg.reset == "context" and s in schedule[mode]:
                    believed = [x[t0 + i] for i in range(s)]
                    window = [x[f] for f in range(t - k - w + 1, t - k + 1)]
                if s < k_steps:
                    new_end = t0 + s - k
                    new = x[new_end] if teacher or s < k else believed[s - k]
                    window = [*window[1:], new]
    return out


# --------------------------------------------------------------------------- helpers


def _cfg(**overrides) -> InjectionConfig:
    """The reference's schedules (B after 4, 8, 12; C after 1), K = 16, no bank; default injection steps beyond a
    smaller ``k_steps`` are dropped."""
    k_steps = overrides.get("k_steps", 16)
    base = {
        "k_steps": 16,
        "bank_size": 0,
        "inject_after_periodic": [s for s in (4, 8, 12) if isinstance(k_steps, int) and s <= k_steps],
        "inject_after_one_shot": [1],
    }
    return InjectionConfig(**{**base, **overrides})


def ramp_segments(t0s: list[int], origin: int, k_steps: int, dim: int) -> torch.Tensor:
    """Segments ``(N, origin + K, D)`` of the ramp ``x[t] = t · 1``: segment frame ``i`` is frame ``t0 - origin + i``."""
    return torch.stack(
        [torch.arange(t0 - origin, t0 + k_steps, dtype=torch.float32)[:, None].expand(-1, dim) for t0 in t0s]
    )


def steps_since_injection(injected: set[int], s: int) -> int:
    """Free-running steps taken since the last GT state, counted after step ``s`` (0 when ``s`` injected)."""
    return s - max([0, *(i for i in injected if i <= s)])


def _random_walk(n: int, length: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cumsum(0.3 * torch.randn(n, length, dim, generator=g), dim=1)


def _gaussian_baseline(dim: int, seed: int = 0) -> DiagonalGaussianBaseline:
    g = torch.Generator().manual_seed(seed)
    return DiagonalGaussianBaseline.fit([0.5 + 0.3 * torch.randn(64, dim, generator=g)])


# --------------------------------------------------------------------------- config


def test_config_from_yaml_and_validation() -> None:
    yaml_cfg = OmegaConf.load(REPO_ROOT / "conf" / "diagnostic" / "injection.yaml")
    root = OmegaConf.create(
        {"predict": "median", "diagnostic": yaml_cfg}
    )  # `predict: ${predict}` is top-level
    cfg = instantiate(root.diagnostic)
    assert isinstance(cfg, InjectionConfig)
    assert cfg.modes == list(MODES) and isinstance(cfg.modes, list)
    assert (cfg.k_steps, cfg.n_utterances, cfg.starts_per_utterance, cfg.max_frames) == (16, 16, 8, 2000)
    assert (cfg.inject_after_periodic, cfg.inject_after_one_shot) == ([4, 8, 12], [1])
    assert (cfg.reset, cfg.predict, cfg.seed) == ("frame", "median", 42)
    bad = [
        {"modes": ["A_teacher", "Z"]},
        {"modes": []},
        {"modes": "D_rollout"},
        {"modes": ["D_rollout", "D_rollout"]},
        {"k_steps": 0},
        {"k_steps": 2.5},
        {"k_steps": True},
        {"n_utterances": 0},
        {"starts_per_utterance": 0},
        {"max_frames": 1},
        {"inject_after_periodic": [0, 4]},
        {"inject_after_periodic": [4, 17]},
        {"inject_after_one_shot": "1"},
        {"reset": "soft"},
        {"predict": "mode"},
        {"n_samples": 0},
        {"temperature": 0.0},
        {"temperature": float("inf")},
        {"bank_size": -1},
        {"seed": -1},
        {"band": "minmax"},
        {"band_level": 1.0},
        {"split": ""},
    ]
    for override in bad:
        with pytest.raises(ValueError):
            _cfg(**override)
    # Duplicates and order in the injection steps do not matter.
    assert _cfg(inject_after_periodic=[8, 4, 8]).inject_after_periodic == [4, 8]


def test_injection_schedules() -> None:
    cfg = _cfg()
    expected = {
        "A_teacher": list(range(16)),
        "B_periodic": [3, 7, 11],
        "C_one_shot": [0],
        "D_rollout": [],
    }
    for mode, indices in expected.items():
        schedule = cfg.inject_after(mode)
        assert schedule.dtype == torch.bool and schedule.shape == (16,)
        assert torch.nonzero(schedule).flatten().tolist() == indices, mode
    with pytest.raises(ValueError, match="unknown injection mode"):
        cfg.inject_after("E_other")


# --------------------------------------------------------------------------- closed forms on a ramp


@pytest.mark.parametrize("k", [1, 2])
def test_zero_predictor_on_a_ramp(k: int) -> None:
    w, k_steps, dim = 3, 16, 4
    t0s = [10, 23, 40]
    segments = ramp_segments(t0s, w + k - 1, k_steps, dim)
    sigma = 0.7
    base_mean, base_var = torch.tensor([0.5, 1.0, 1.5, -1.0]), torch.tensor([0.5, 2.0, 1.0, 4.0])
    baseline = DiagonalGaussianBaseline(base_mean, base_var)
    raw_scale = torch.tensor([1.0, 2.0, 0.5, 3.0])
    model = ConstantModel(dim, w, k, sigma=sigma)
    result = run_injection(model, segments, _cfg(), baseline, raw_scale=raw_scale)
    a, b, c, d = (MODES.index(m) for m in ("A_teacher", "B_periodic", "C_one_shot", "D_rollout"))
    err = result.per_start["state_err"]
    assert err.shape == (4, len(t0s), k_steps)
    root_d, steps = math.sqrt(dim), np.arange(1, k_steps + 1)

    # The checks (step s is index s - 1).
    np.testing.assert_array_equal(err[a], 0.0)
    assert np.all(err[c][:, 1] == 0.0) and np.all(err[c][:, 2] > 0.0)
    for s in (5, 9, 13):
        np.testing.assert_array_equal(err[b][:, s - 1], 0.0)
    assert np.all(err[d][:, 1:] > 0.0)
    np.testing.assert_allclose(err[d], np.broadcast_to((steps - 1) * root_d, err[d].shape), rtol=1e-6)

    # Every mode: the state error before step s is (free steps since the last GT state) · sqrt(D).
    injected = {"A_teacher": set(steps), "B_periodic": {4, 8, 12}, "C_one_shot": {1}, "D_rollout": set()}
    for m, mode in enumerate(MODES):
        lag_steps = np.array([steps_since_injection(injected[mode], s - 1) for s in steps], dtype=float)
        np.testing.assert_allclose(err[m], np.broadcast_to(lag_steps * root_d, err[m].shape), rtol=1e-6)
        np.testing.assert_allclose(
            result.per_start["state_err_raw"][m],
            np.broadcast_to(lag_steps * float(raw_scale.norm()), err[m].shape),
            rtol=1e-6,
        )
        # The prediction x̂[t-1] + 0 misses x[t] by (lag + 1) in every dim, whether or not GT is injected after.
        np.testing.assert_allclose(
            result.per_start["mse"][m], np.broadcast_to((lag_steps + 1) ** 2, err[m].shape), rtol=1e-6
        )

    # The true delta is 1 in every dim at every step: nll, nll_baseline, dnll are constants; Δ̂ = 0.
    ones = np.ones(dim)
    nll = -norm.logpdf(ones, 0.0, sigma).sum()
    nll_b = -norm.logpdf(ones, base_mean.numpy(), np.sqrt(base_var.numpy())).sum()
    np.testing.assert_allclose(result.per_start["nll"], nll, rtol=1e-6)
    np.testing.assert_allclose(result.per_start["nll_baseline"], nll_b, rtol=1e-6)
    np.testing.assert_allclose(result.per_start["dnll"], nll - nll_b, rtol=1e-5)
    np.testing.assert_array_equal(result.per_start["cos"], 0.0)
    np.testing.assert_allclose(result.per_start["mag_ratio"], 0.0, atol=1e-7)
    assert np.isnan(result.per_start["manifold_dist"]).all()
    # One predictive call per step for every (mode, start) row.
    assert [c.shape for c in model.calls] == [(4 * len(t0s), w, dim)] * k_steps


def test_constant_drift_with_bank_manifold_distance() -> None:
    """Δ̂ = 0.5 · 1 on the ramp: the D_rollout state lags by s/2 per dim; the bank's nearest frame is brute force."""
    w, k, k_steps, dim = 2, 1, 6, 3
    segments = ramp_segments([5, 9], w + k - 1, k_steps, dim)
    bank = torch.randn(40, dim, generator=torch.Generator().manual_seed(0)) * 4 + 5
    model = ConstantModel(dim, w, k, step=torch.full((dim,), 0.5))
    result = run_injection(
        model, segments, _cfg(modes=["D_rollout"], k_steps=k_steps), _gaussian_baseline(dim), bank
    )
    for j, t0 in enumerate([5, 9]):
        for s in range(1, k_steps + 1):
            state = (t0 - 1 + 0.5 * s) * np.ones(dim)  # x̂[t0 + s - 1]
            truth = (t0 + s - 1) * np.ones(dim)
            assert result.per_start["mse"][0, j, s - 1] == pytest.approx(((state - truth) ** 2).mean())
            nearest = np.sqrt(((bank.double().numpy() - state) ** 2).sum(1)).min()
            assert result.per_start["manifold_dist"][0, j, s - 1] == pytest.approx(nearest, rel=1e-5)
    np.testing.assert_allclose(result.per_start["cos"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(result.per_start["mag_ratio"], 0.5, rtol=1e-6)


# --------------------------------------------------------------------------- the context window


def _ramp_contexts(calls: list[torch.Tensor], start: int) -> list[list[float]]:
    """The recorded windows of one row as lists of frame values (the ramp's value is its frame index)."""
    return [call[start, :, 0].tolist() for call in calls]


def test_frame_injection_keeps_older_predicted_frames_context_reset_does_not() -> None:
    # W = 3, k = 2: step s (frame t = t0 + s - 1) reads frames t0 + s - 5 .. t0 + s - 3. C_one_shot injects GT
    # after step 2 (x̂[t0+1] := x[t0+1]). x̂[t0] is the zero predictor's x[t0-1] from step 1; later states stay
    # x[t0+1]. With reset=frame the window of steps 3 and 4 still holds that step-1 prediction; with
    # reset=context the injection turned the history up to t0+1 back to GT.
    w, k, k_steps, dim = 3, 2, 6, 2
    t0s = [10, 25]
    expected_offsets = {
        "frame": [[-4, -3, -2], [-3, -2, -1], [-2, -1, -1], [-1, -1, 1], [-1, 1, 1], [1, 1, 1]],
        "context": [[-4, -3, -2], [-3, -2, -1], [-2, -1, 0], [-1, 0, 1], [0, 1, 1], [1, 1, 1]],
    }
    segments = ramp_segments(t0s, w + k - 1, k_steps, dim)
    seen = {}
    for reset, offsets in expected_offsets.items():
        model = ConstantModel(dim, w, k)
        cfg = _cfg(modes=["C_one_shot"], k_steps=k_steps, inject_after_one_shot=[2], reset=reset)
        result = run_injection(model, segments, cfg, _gaussian_baseline(dim))
        assert len(model.calls) == k_steps
        for j, t0 in enumerate(t0s):
            expected = [[float(t0 + o) for o in step] for step in offsets]
            assert _ramp_contexts(model.calls, j) == expected, (reset, t0)
            assert all(bool((call[j, :, 0] == call[j, :, 1]).all()) for call in model.calls)
        seen[reset] = result
    # The state (and so state_err) does not depend on the reset for a context-blind model.
    np.testing.assert_array_equal(
        seen["frame"].per_start["state_err"], seen["context"].per_start["state_err"]
    )


def test_teacher_window_is_ground_truth_with_lag() -> None:
    w, k, k_steps, dim = 4, 3, 5, 1
    t0 = 20
    model = ConstantModel(dim, w, k)
    run_injection(
        model,
        ramp_segments([t0], w + k - 1, k_steps, dim),
        _cfg(modes=["A_teacher"], k_steps=k_steps),
        _gaussian_baseline(dim),
    )
    for s, call in enumerate(model.calls, start=1):
        t = t0 + s - 1
        assert call[0, :, 0].tolist() == [float(f) for f in range(t - k - w + 1, t - k + 1)]


@pytest.mark.parametrize(
    ("head", "k", "reset", "with_correction"),
    [
        ("VMFLogNormalHead", 1, "frame", False),
        ("VMFLogNormalHead", 2, "frame", True),
        ("GaussianMDNHead", 1, "frame", True),
        ("GaussianMDNHead", 2, "frame", False),
        ("VMFLogNormalHead", 2, "context", False),
        ("GaussianMDNHead", 2, "context", True),
    ],
)
def test_batched_engine_equals_reference_loop(head: str, k: int, reset: str, with_correction: bool) -> None:
    w, k_steps, dim, n = 3, 8, 4, 4
    net = dynamics_net(head, dim, w, k, seed=k)
    segments = _random_walk(n, w + k - 1 + k_steps, dim, seed=k + 10)
    bank = torch.randn(60, dim, generator=torch.Generator().manual_seed(9))
    baseline = (
        _gaussian_baseline(dim)
        if head == "GaussianMDNHead"
        else net.baseline.fit([0.3 * torch.randn(200, dim)])
    )
    raw_scale = torch.tensor([0.5, 1.0, 2.0, 3.0])
    cfg = _cfg(k_steps=k_steps, inject_after_periodic=[3, 6], inject_after_one_shot=[2], reset=reset)
    # Reads its context window too (as a conditional score model does): the engine must pass the right one.
    correction = (
        (lambda x, ctx: 0.9 * x + 0.1 * torch.tanh(x) + 0.05 * ctx.mean(dim=1)) if with_correction else None
    )
    result = run_injection(net, segments, cfg, baseline, bank, correction, raw_scale=raw_scale)
    expected = reference_loop(net, segments, cfg, baseline, bank, correction, raw_scale)
    for name in METRICS:
        np.testing.assert_allclose(result.per_start[name], expected[name], rtol=1e-4, atol=1e-5, err_msg=name)
    # The modes really differ (the window logic is exercised) and teacher forcing has no state error.
    err = result.per_start["state_err"]
    assert not np.allclose(err[0], err[3]) and not np.allclose(err[1], err[2])
    np.testing.assert_array_equal(err[0], 0.0)


# --------------------------------------------------------------------------- geometry: lag and stride models


def test_rollout_geometry() -> None:
    assert rollout_geometry(ConstantModel(2, 8, 1)) == RolloutGeometry(8, 1, 1)
    lag = rollout_geometry(ConstantModel(2, 8, 4))
    assert lag == RolloutGeometry(8, 4, 1) and lag.origin == 11 and lag.segment_length(16) == 27
    stride = rollout_geometry(ConstantModel(2, 8, 4, horizon_mode="stride", context_stride=4))
    assert stride == RolloutGeometry(8, 1, 4) and stride.origin == 8
    with pytest.raises(ValueError, match="context_stride == horizon"):
        rollout_geometry(ConstantModel(2, 8, 4, horizon_mode="stride", context_stride=1))
    with pytest.raises(ValueError, match="context_stride == horizon"):
        run_injection(
            ConstantModel(2, 3, 2, horizon_mode="stride", context_stride=1),
            ramp_segments([10], 3, 4, 2),
            _cfg(k_steps=4),
            _gaussian_baseline(2),
        )

    class NoDim:
        context, horizon, context_stride = 3, 1, 1

    with pytest.raises(ValueError, match="lacks `dim`"):
        rollout_geometry(NoDim())


def test_stride_model_runs_lag_one_on_the_subsampled_trajectory() -> None:
    w, k, k_steps, dim = 3, 2, 5, 2
    model = ConstantModel(dim, w, k, horizon_mode="stride", context_stride=k)
    geometry = rollout_geometry(model)
    length = 40
    trajectories = [("u0", np.arange(length, dtype=np.float32)[:, None].repeat(dim, 1))]
    cfg = _cfg(k_steps=k_steps, n_utterances=1, starts_per_utterance=3)
    starts = sample_starts(trajectories, geometry, cfg)
    assert starts.segments.shape == (3, w + k_steps, dim)
    for segment, (utt, t0) in zip(starts.segments, starts.starts, strict=True):
        # t0 is a frame of the full trajectory: every step spans k frames, the context is k apart.
        assert utt == "u0" and t0 % k == 0
        np.testing.assert_array_equal(segment[:, 0].numpy(), np.arange(t0 - k * w, t0 + k * k_steps, k))
    result = run_injection(model, starts.segments, cfg, _gaussian_baseline(dim))
    assert (result.frames_per_step, result.horizon_k, result.window_size) == (k, k, w)
    steps = np.arange(1, k_steps + 1)
    d_rollout = result.per_start["state_err"][MODES.index("D_rollout")]
    np.testing.assert_allclose(d_rollout, np.broadcast_to((steps - 1) * k * math.sqrt(dim), d_rollout.shape))
    t0 = starts.starts[0][1]
    assert model.calls[0][0, :, 0].tolist() == [float(t0 - k * (w - i)) for i in range(w)]
    assert result.to_dict()["frames_per_step"] == k


def test_run_injection_input_errors() -> None:
    model = ConstantModel(4, 3, 2)
    segments = ramp_segments([10, 12], 4, 6, 4)
    cfg, baseline = _cfg(k_steps=6), _gaussian_baseline(4)
    with pytest.raises(ValueError, match="are needed"):
        run_injection(model, segments[:, :-1], cfg, baseline)
    with pytest.raises(ValueError, match="model.dim"):
        run_injection(ConstantModel(5, 3, 2), segments, cfg, baseline)
    with pytest.raises(ValueError, match=r"\(N, L, D\)"):
        run_injection(model, segments[0], cfg, baseline)
    with pytest.raises(ValueError, match="bank"):
        run_injection(model, segments, cfg, baseline, bank=torch.zeros(5, 3))


# --------------------------------------------------------------------------- start points


def _tagged_trajectories(lengths: list[int], dim: int = 2) -> list[tuple[str, np.ndarray]]:
    """Utterance ``u`` has frame values ``1000 u + t``, so a segment tells where it was cut from."""
    return [
        (f"utt{u}", (1000 * u + np.arange(t, dtype=np.float32))[:, None].repeat(dim, 1))
        for u, t in enumerate(lengths)
    ]


def test_sample_starts() -> None:
    geometry = RolloutGeometry(window=3, lag=2, subsample=1)  # origin 4
    k_steps = 5  # t0 in [4, T - 6): an utterance needs T >= 11 frames
    lengths = [11, 10, 30, 14, 3, 50, 22]
    trajectories = _tagged_trajectories(lengths)
    cfg = _cfg(k_steps=k_steps, n_utterances=10, starts_per_utterance=6, max_frames=2000, seed=3)
    points = sample_starts(trajectories, geometry, cfg)
    long_enough = {f"utt{u}" for u, t in enumerate(lengths) if t >= 11}
    assert set(points.utterances) == long_enough and len(points.utterances) == len(long_enough)
    assert points.segments.dtype == torch.float32 and points.segments.shape[1:] == (9, 2)
    assert len(points.starts) == points.segments.shape[0]
    per_utt: dict[str, list[int]] = {}
    for segment, (utt, t0) in zip(points.segments.numpy(), points.starts, strict=True):
        u, length = int(utt[3:]), lengths[int(utt[3:])]
        assert 4 <= t0 < length - k_steps - 1
        np.testing.assert_array_equal(segment[:, 0], 1000 * u + np.arange(t0 - 4, t0 + k_steps))
        per_utt.setdefault(utt, []).append(t0)
    for utt, t0s in per_utt.items():
        available = lengths[int(utt[3:])] - k_steps - 1 - 4
        assert len(set(t0s)) == len(t0s) == min(6, available)
    assert per_utt["utt0"] == [4]  # exactly one valid start in 11 frames; none in utt1's 10
    # Seeded: the same call gives the same starts, another seed other starts.
    again = sample_starts(trajectories, geometry, cfg)
    assert again.starts == points.starts and torch.equal(again.segments, points.segments)
    other = sample_starts(trajectories, geometry, dataclasses.replace(cfg, seed=4))
    assert other.starts != points.starts
    # torch trajectories give the same segments.
    as_torch = [(u, torch.from_numpy(t)) for u, t in trajectories]
    assert torch.equal(sample_starts(as_torch, geometry, cfg).segments, points.segments)


def test_sample_starts_limits_and_crop() -> None:
    geometry = RolloutGeometry(window=2, lag=1, subsample=1)  # origin 2
    k_steps = 4  # t0 in [2, T - 5): an utterance needs T >= 8 frames
    trajectories = _tagged_trajectories([40, 60, 7, 80, 100])
    cfg = _cfg(k_steps=k_steps, n_utterances=2, starts_per_utterance=3, max_frames=2000)
    points = sample_starts(trajectories, geometry, cfg)
    assert len(points.utterances) == 2 and len(points.starts) == 6
    assert {u for u, _ in points.starts} == set(points.utterances)
    assert all(sum(u == v for v, _ in points.starts) == 3 for u in points.utterances)
    # max_frames: every segment lies within the first max_frames frames; utterances cropped too short are skipped.
    crop = dataclasses.replace(cfg, n_utterances=5, starts_per_utterance=50, max_frames=12)
    cropped = sample_starts(trajectories, geometry, crop)
    assert set(cropped.utterances) == {"utt0", "utt1", "utt3", "utt4"}
    assert all(2 <= t0 < 12 - k_steps - 1 for _, t0 in cropped.starts)
    assert len(cropped.starts) == 4 * 5  # t0 in [2, 7) for each
    assert float(cropped.segments[..., 0].remainder(1000).max()) < 12
    # Clear error when nothing is long enough.
    with pytest.raises(ValueError, match="no utterance is long enough"):
        sample_starts(_tagged_trajectories([5, 7, 6]), geometry, cfg)
    with pytest.raises(ValueError, match="no utterance is long enough"):
        sample_starts(trajectories, geometry, dataclasses.replace(cfg, max_frames=7))


# --------------------------------------------------------------------------- baseline and dnll


def test_model_equal_to_the_baseline_scores_zero_dnll() -> None:
    w, k, k_steps, dim, n = 3, 1, 8, 5, 6
    g = torch.Generator().manual_seed(1)
    baseline = DiagonalGaussianBaseline.fit(
        [torch.randn(300, dim, generator=g) * torch.linspace(0.5, 2, dim) + 0.2]
    )
    model = GaussianModel(baseline.mean, baseline.var, w, k)
    segments = _random_walk(n, w + k - 1 + k_steps, dim, seed=2)
    result = run_injection(model, segments, _cfg(k_steps=k_steps, inject_after_periodic=[4]), baseline)
    np.testing.assert_allclose(result.per_start["dnll"], 0.0, atol=2e-5)
    np.testing.assert_allclose(
        result.per_start["dnll"], result.per_start["nll"] - result.per_start["nll_baseline"], atol=1e-5
    )
    # nll_baseline is the scipy diagonal Gaussian on the true one-frame delta x[t] - x[t-1].
    z = segments.double().numpy()
    true_delta = z[:, w + k - 1 :] - z[:, w + k - 2 : -1]  # (N, K, D)
    expected = -norm.logpdf(true_delta, baseline.mean.numpy(), np.sqrt(baseline.var.numpy())).sum(-1)
    for m in range(len(MODES)):
        np.testing.assert_allclose(result.per_start["nll_baseline"][m], expected, rtol=1e-5)
    for row in result.to_dict()["modes"].values():
        for step in row["per_step"]:
            assert step["dnll"] == pytest.approx(step["nll"] - step["nll_baseline"], abs=1e-5)
            assert step["dnll"] == pytest.approx(0.0, abs=2e-5)


# --------------------------------------------------------------------------- correction hook


def test_correction_only_on_free_running_rows() -> None:
    w, k, k_steps, dim = 2, 1, 16, 3
    t0s = [6, 11]
    segments = ramp_segments(t0s, w + k - 1, k_steps, dim)
    shift = torch.tensor([0.3, -0.1, 0.2])
    seen_rows: list[int] = []

    def correction(x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        seen_rows.append(x.shape[0])
        assert context.shape == (x.shape[0], w, dim)
        return x + shift

    model, baseline = ConstantModel(dim, w, k), _gaussian_baseline(dim)
    plain = run_injection(model, segments, _cfg(), baseline)
    corrected = run_injection(model, segments, _cfg(), baseline, correction=correction)
    # Called once per step on the rows of B, C and D only (3 modes x 2 starts), never on A_teacher's.
    assert seen_rows == [3 * len(t0s)] * k_steps
    a, b, d = MODES.index("A_teacher"), MODES.index("B_periodic"), MODES.index("D_rollout")
    for name in ("state_err", "mse", "nll", "cos"):
        np.testing.assert_array_equal(corrected.per_start[name][a], plain.per_start[name][a])
    # D_rollout: x̂[t0-1+j] = x[t0-1] + j·shift while x[t0-1+j] = x[t0-1] + j·1.
    steps = np.arange(1, k_steps + 1)
    gap = float((shift - 1.0).norm())
    np.testing.assert_allclose(
        corrected.per_start["state_err"][d],
        np.broadcast_to((steps - 1) * gap, (len(t0s), k_steps)),
        rtol=1e-5,
    )
    # An injection still resets B_periodic's state to GT, whatever the correction did.
    for s in (5, 9, 13):
        np.testing.assert_array_equal(corrected.per_start["state_err"][b][:, s - 1], 0.0)
    only_teacher = run_injection(model, segments, _cfg(modes=["A_teacher"]), baseline, correction=correction)
    assert len(seen_rows) == k_steps  # not called at all
    np.testing.assert_array_equal(only_teacher.per_start["state_err"], 0.0)


# --------------------------------------------------------------------------- sampling


def test_sampling_statistics_and_seed() -> None:
    w, k, k_steps, dim, n, samples = 2, 1, 4, 16, 8, 300
    sigma, temperature = 0.8, 0.5
    model = ConstantModel(dim, w, k, sigma=sigma, noisy=True)
    segments = ramp_segments(list(range(5, 5 + n)), w + k - 1, k_steps, dim)
    cfg = _cfg(
        modes=["A_teacher", "D_rollout"],
        k_steps=k_steps,
        inject_after_periodic=[],
        inject_after_one_shot=[],
        predict="sample",
        n_samples=samples,
        temperature=temperature,
        seed=11,
    )
    result = run_injection(model, segments, cfg, _gaussian_baseline(dim))
    assert model.calls[0].shape[0] == 2 * n * samples
    var, steps = (temperature * sigma) ** 2, np.arange(1, k_steps + 1)
    # After step s the free state is x[t0-1] + (s draws): E mse = s² + s (Tσ)²; teacher forcing predicts from
    # x[t-1] with one draw: E mse = 1 + (Tσ)².
    np.testing.assert_allclose(result.per_start["mse"][1].mean(0), steps**2 + steps * var, rtol=0.05)
    np.testing.assert_allclose(result.per_start["mse"][0].mean(0), 1 + var, rtol=0.05)
    np.testing.assert_array_equal(result.per_start["state_err"][0], 0.0)
    again = run_injection(model, segments, cfg, _gaussian_baseline(dim))
    np.testing.assert_array_equal(again.per_start["mse"], result.per_start["mse"])
    other = run_injection(model, segments, dataclasses.replace(cfg, seed=12), _gaussian_baseline(dim))
    assert not np.array_equal(other.per_start["mse"], result.per_start["mse"])


# --------------------------------------------------------------------------- nearest neighbours and bank


def test_nearest_neighbour_distance_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    x, bank = torch.randn(37, 5, generator=g), torch.randn(101, 5, generator=g) * 2
    x[3] = bank[77]
    brute = np.sqrt(((x.double().numpy()[:, None] - bank.double().numpy()[None]) ** 2).sum(-1)).min(1)
    chunked = nearest_neighbour_distance(x, bank, chunk=16, query_chunk=7)
    np.testing.assert_allclose(chunked.numpy(), brute, rtol=1e-5, atol=1e-6)
    assert float(chunked[3]) < 1e-6
    np.testing.assert_allclose(nearest_neighbour_distance(x, bank).numpy(), brute, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        nearest_neighbour_distance(x, bank[:, :4])


def test_sample_bank_rows_come_from_trajectories() -> None:
    rng = np.random.default_rng(0)
    trajectories = [rng.standard_normal((t, 3)).astype(np.float16) for t in (5, 0, 12, 7)]
    bank = sample_bank(trajectories, size=10, seed=1)
    all_frames = np.concatenate(trajectories).astype(np.float32)
    assert bank.shape == (10, 3) and bank.dtype == torch.float32
    idx = [int(np.flatnonzero((all_frames == row).all(1))[0]) for row in bank.numpy()]
    assert len(set(idx)) == 10 and idx == sorted(idx)
    np.testing.assert_array_equal(sample_bank(trajectories, size=10, seed=1), bank)
    assert not torch.equal(sample_bank(trajectories, size=10, seed=2), bank)
    np.testing.assert_array_equal(sample_bank([torch.as_tensor(t) for t in trajectories], 100, 0), all_frames)


# --------------------------------------------------------------------------- aggregation and outputs


def test_bands_and_tidy_rows() -> None:
    w, k, k_steps, dim = 2, 1, 5, 4
    net = dynamics_net("GaussianMDNHead", dim, w, k, seed=1)
    segments = _random_walk(30, w + k - 1 + k_steps, dim, seed=6)
    cfg = _cfg(k_steps=k_steps, inject_after_periodic=[2], band_level=0.8)
    result = run_injection(net, segments, cfg, _gaussian_baseline(dim))
    assert len(result.per_step) == len(MODES) * len(METRICS) * k_steps
    row = next(r for r in result.per_step if (r["mode"], r["metric"], r["step"]) == ("D_rollout", "dnll", 3))
    values = result.per_start["dnll"][MODES.index("D_rollout"), :, 2]
    assert row["mean"] == pytest.approx(values.mean())
    assert (row["lo"], row["hi"]) == pytest.approx(tuple(np.percentile(values, [10, 90])))
    boot = run_injection(net, segments, dataclasses.replace(cfg, band="bootstrap"), _gaussian_baseline(dim))
    brow = next(r for r in boot.per_step if (r["mode"], r["metric"], r["step"]) == ("D_rollout", "dnll", 3))
    assert brow["mean"] == pytest.approx(row["mean"])
    assert row["lo"] < brow["lo"] < brow["mean"] < brow["hi"] < row["hi"]
    nan_rows = [r for r in result.per_step if r["metric"] == "manifold_dist"]
    assert nan_rows and all(math.isnan(r["mean"]) for r in nan_rows)


def test_schema_of_injection_diag() -> None:
    w, k, k_steps, dim = 3, 1, 16, 4
    t0s = [10, 23, 40]
    segments = ramp_segments(t0s, w + k - 1, k_steps, dim)
    result = run_injection(
        ConstantModel(dim, w, k), segments, _cfg(), _gaussian_baseline(dim), n_utterances=2
    )
    diag = result.to_dict()
    assert (diag["n_utterances"], diag["horizon_k"], diag["window_size"], diag["k_steps"]) == (2, 1, 3, 16)
    assert list(diag["modes"]) == list(MODES)
    root_d = math.sqrt(dim)
    injected = {
        "A_teacher": set(range(1, 17)),
        "B_periodic": {4, 8, 12},
        "C_one_shot": {1},
        "D_rollout": set(),
    }
    for mode, entry in diag["modes"].items():
        assert {"n", "nll", "nll_baseline", "dnll", "cos", "mag_ratio", "state_err", "per_step"} <= set(entry)
        assert entry["n"] == len(t0s) * k_steps
        assert [step["step"] for step in entry["per_step"]] == list(range(1, k_steps + 1))
        errs = [steps_since_injection(injected[mode], s - 1) * root_d for s in range(1, k_steps + 1)]
        for step, err in zip(entry["per_step"], errs, strict=True):
            assert REFERENCE_STEP_KEYS <= set(step)
            assert step["n"] == len(t0s)
            assert step["state_err"] == pytest.approx(err, rel=1e-6, abs=1e-9)
        # Overall values average the steps (every step has the same n).
        assert entry["state_err"] == pytest.approx(np.mean(errs), rel=1e-6, abs=1e-9)
        assert entry["dnll"] == pytest.approx(entry["nll"] - entry["nll_baseline"], abs=1e-6)
        assert entry["manifold_dist"] is None  # no bank: null, not NaN
    json.dumps(diag, allow_nan=False)
    flat = result.to_metrics()
    assert flat["D_rollout/state_err_at_K"] == pytest.approx((k_steps - 1) * root_d)
    assert "D_rollout/manifold_dist" not in flat


def test_write_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    w, k, k_steps, dim = 2, 1, 4, 3
    net = dynamics_net("VMFLogNormalHead", dim, w, k, seed=2)
    segments = _random_walk(6, w + k - 1 + k_steps, dim, seed=7)
    cfg = _cfg(k_steps=k_steps, inject_after_periodic=[2, 3])
    result = run_injection(net, segments, cfg, net.baseline.fit([torch.randn(50, dim)]), torch.randn(20, dim))
    out = tmp_path / "inj"
    paths = result.write(out, frame_rate=12.5, title="vmf k=1")
    assert json.loads((out / "injection_diag.json").read_text()) == json.loads(json.dumps(result.to_dict()))
    with (out / "per_step.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["mode", "step", "metric", "mean", "lo", "hi"]
    assert len(rows) == len(MODES) * len(METRICS) * k_steps
    assert {r["step"] for r in rows} == {str(s) for s in range(1, k_steps + 1)}
    for metric in ("dnll", "cos", "mag_ratio", "state_err"):
        png = out / f"injection_{metric}.png"
        assert png in paths and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        title = Image.open(png).text["Title"]  # the figure's suptitle, kept in the PNG
        assert "vmf k=1" in title and metric in title
