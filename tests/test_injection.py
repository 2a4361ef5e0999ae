"""Injection diagnostic: schedules, batched rollouts against a per-start loop and closed forms, metrics, outputs."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
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
    injection_schedule,
    run_injection,
    sample_start_segments,
    segment_frames,
)
from latentdyn.diagnostics.manifold import nearest_neighbour_distance, sample_bank

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- protocol-satisfying test models


class GaussianPredictive:
    """Diagonal Gaussian over deltas: ``mean`` ``(B, D)``, ``scale`` broadcastable to it."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        self._mean = mean
        self._scale = scale.expand_as(mean)

    def log_prob(self, delta: torch.Tensor) -> torch.Tensor:
        return torch.distributions.Normal(self._mean, self._scale).log_prob(delta).sum(-1)

    def mean(self) -> torch.Tensor:
        return self._mean

    def sample(self, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self._mean.shape, generator=generator, dtype=self._mean.dtype)
        return self._mean + temperature * self._scale * noise


class PersistenceModel:
    """Delta = 0 with a fixed Gaussian spread ``sigma`` (scalar or ``(D,)``)."""

    def __init__(self, dim: int, context: int, horizon: int, sigma: float | torch.Tensor = 1.0, stride=None):
        self.dim, self.context, self.horizon = dim, context, horizon
        self.context_stride = horizon if stride is None else stride
        self.sigma = torch.as_tensor(sigma, dtype=torch.float32)

    def predictive(self, context: torch.Tensor) -> GaussianPredictive:
        mean = torch.zeros(context.shape[0], self.dim)
        return GaussianPredictive(mean, self.sigma * torch.ones_like(mean))


class OracleModel:
    """Knows the GT segments: finds the last context frame among them and returns the exact GT delta."""

    def __init__(self, segments: torch.Tensor, context: int, horizon: int) -> None:
        self.dim, self.context, self.horizon, self.context_stride = (
            segments.shape[2],
            context,
            horizon,
            horizon,
        )
        self.frames = segments[:, :-horizon].reshape(-1, self.dim)
        self.next_frames = segments[:, horizon:].reshape(-1, self.dim)

    def predictive(self, context: torch.Tensor) -> GaussianPredictive:
        last = context[:, -1]
        idx = torch.cdist(last.double(), self.frames.double()).argmin(dim=1)
        return GaussianPredictive(self.next_frames[idx] - last, torch.ones(1))


class MLPModel(torch.nn.Module):
    """A random nonlinear model of the whole window with a context-dependent Gaussian spread."""

    def __init__(self, dim: int, context: int, horizon: int, hidden: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.dim, self.context, self.horizon, self.context_stride = dim, context, horizon, horizon
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(torch.nn.Linear(context * dim, hidden), torch.nn.Tanh())
        self.loc = torch.nn.Linear(hidden, dim)
        self.raw_scale = torch.nn.Linear(hidden, dim)

    def predictive(self, context: torch.Tensor) -> GaussianPredictive:
        h = self.body(context.flatten(1))
        return GaussianPredictive(
            0.5 * torch.tanh(self.loc(h)), torch.nn.functional.softplus(self.raw_scale(h)) + 0.1
        )


# --------------------------------------------------------------------------- reference loop (not in the library)


def run_injection_loop_reference(model, segments, cfg, bank, correction=None) -> dict[str, np.ndarray]:
    """One start point and one mode at a time on full-resolution frames (mean prediction) -> metric (M, N, H)."""
    w, k, dim = model.context, model.horizon, model.dim
    n, horizon = segments.shape[0], cfg.horizon
    out = {name: np.zeros((len(cfg.modes), n, horizon)) for name in METRICS}
    for m, mode in enumerate(cfg.modes):
        schedule = injection_schedule(mode, horizon, cfg.period, cfg.inject_step)
        free_running = not bool(schedule.all())
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
                if correction is not None and free_running:
                    pred = correction(pred[None])[0]
                buffer[p + k] = pred
                out["mse"][m, i, s] = float(((pred - target) ** 2).mean())
                out["cosine"][m, i, s] = float(torch.dot(pred, target) / (pred.norm() * target.norm()))
                out["nll"][m, i, s] = float(nll)
                out["norm_ratio"][m, i, s] = float(pred.norm() / target.norm())
                out["manifold_dist"][m, i, s] = (
                    float((bank - pred).norm(dim=1).min()) if bank is not None else math.nan
                )
    return out


def _cfg(**overrides) -> InjectionConfig:
    base = {"modes": list(MODES), "horizon": 6, "n_starts": 4, "period": 3, "inject_step": 4, "bank_size": 0}
    return InjectionConfig(**{**base, **overrides})


def _segments(n: int, w: int, k: int, horizon: int, dim: int, seed: int = 0, extra: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, (w - 1) * k + 1 + horizon * k + extra, dim, generator=g)


# --------------------------------------------------------------------------- schedules and config


def test_schedules_per_mode() -> None:
    t, f = True, False
    expected = {
        "A_teacher": [t] * 7,
        "B_periodic": [t, f, f, t, f, f, t],
        "C_one_shot": [t, f, f, f, t, f, f],
        "D_rollout": [t, f, f, f, f, f, f],
    }
    for mode, values in expected.items():
        schedule = injection_schedule(mode, horizon=7, period=3, inject_step=4)
        assert schedule.dtype == torch.bool
        assert schedule.tolist() == values, mode
    assert injection_schedule("C_one_shot", 5, 3, 9).tolist() == [t, f, f, f, f]
    with pytest.raises(ValueError, match="unknown injection mode"):
        injection_schedule("E_other", 4, 2, 2)


def test_config_from_yaml_and_validation() -> None:
    yaml_cfg = OmegaConf.load(REPO_ROOT / "conf" / "diagnostic" / "injection.yaml")
    cfg = instantiate(yaml_cfg)
    assert isinstance(cfg, InjectionConfig)
    assert cfg.modes == list(MODES) and isinstance(cfg.modes, list)
    assert (cfg.horizon, cfg.period, cfg.inject_step, cfg.predict) == (32, 8, 16, "mean")
    bad = [
        {"modes": ["A_teacher", "Z"]},
        {"modes": []},
        {"modes": "D_rollout"},
        {"modes": ["D_rollout", "D_rollout"]},
        {"horizon": 0},
        {"period": 0},
        {"inject_step": -1},
        {"predict": "median"},
        {"n_samples": 0},
        {"temperature": 0.0},
        {"divergence_factor": -1.0},
        {"band": "minmax"},
        {"band_level": 1.0},
        {"horizon": 2.5},
        {"split": ""},
    ]
    for override in bad:
        with pytest.raises(ValueError):
            _cfg(**override)


def test_model_geometry_errors() -> None:
    segments = _segments(2, 3, 2, 6, 4)
    with pytest.raises(ValueError, match="context_stride == model.horizon"):
        run_injection(PersistenceModel(4, 3, 2, stride=1), segments, _cfg(), None)
    with pytest.raises(ValueError, match="need"):
        run_injection(PersistenceModel(4, 3, 2), segments[:, :-1], _cfg(), None)
    with pytest.raises(ValueError, match="model.dim"):
        run_injection(PersistenceModel(5, 3, 2), segments, _cfg(), None)


# --------------------------------------------------------------------------- rollouts against closed forms


def test_oracle_has_zero_error_in_every_mode() -> None:
    w, k, horizon, dim = 3, 2, 6, 5
    segments = _segments(4, w, k, horizon, dim)
    result = run_injection(OracleModel(segments, w, k), segments, _cfg(), None)
    assert result.per_start["mse"].shape == (4, 4, horizon)
    assert np.all(result.per_start["mse"] < 1e-10)
    np.testing.assert_allclose(result.per_start["cosine"], 1.0, atol=1e-6)
    np.testing.assert_allclose(result.per_start["norm_ratio"], 1.0, atol=1e-6)


def test_persistence_matches_direct_computation() -> None:
    w, k, horizon, dim = 3, 2, 7, 4
    segments = _segments(5, w, k, horizon, dim, extra=3)
    cfg = _cfg(horizon=horizon, period=3)
    result = run_injection(PersistenceModel(dim, w, k), segments, cfg, None)
    z = segments.double().numpy()
    p = [(w - 1) * k + s * k for s in range(horizon)]
    teacher = np.stack([((z[:, p[s]] - z[:, p[s] + k]) ** 2).mean(-1) for s in range(horizon)], axis=1)
    rollout = np.stack([((z[:, p[0]] - z[:, p[s] + k]) ** 2).mean(-1) for s in range(horizon)], axis=1)
    periodic = np.stack(
        [((z[:, p[s - s % 3]] - z[:, p[s] + k]) ** 2).mean(-1) for s in range(horizon)], axis=1
    )
    mse = result.per_start["mse"]
    np.testing.assert_allclose(mse[MODES.index("A_teacher")], teacher, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mse[MODES.index("D_rollout")], rollout, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mse[MODES.index("B_periodic")], periodic, rtol=1e-5, atol=1e-6)


def test_nll_against_scipy() -> None:
    w, k, horizon, dim = 2, 3, 4, 6
    segments = _segments(3, w, k, horizon, dim, seed=3)
    sigma = torch.linspace(0.5, 2.0, dim)
    cfg = _cfg(modes=["A_teacher", "D_rollout"], horizon=horizon)
    result = run_injection(PersistenceModel(dim, w, k, sigma=sigma), segments, cfg, None)
    z, sd = segments.double().numpy(), sigma.double().numpy()
    p0, p1 = (w - 1) * k, w * k
    # Step 0 (GT context): delta = z[p0 + k] - z[p0].
    expected0 = -norm.logpdf(z[:, p0 + k] - z[:, p0], 0.0, sd).sum(-1) / dim
    np.testing.assert_allclose(result.per_start["nll"][0, :, 0], expected0, rtol=1e-5)
    np.testing.assert_allclose(result.per_start["nll"][1, :, 0], expected0, rtol=1e-5)
    # Step 1 free-running: the context's last frame is the persistence prediction z[p0], not GT z[p1].
    expected_roll = -norm.logpdf(z[:, p1 + k] - z[:, p0], 0.0, sd).sum(-1) / dim
    expected_teacher = -norm.logpdf(z[:, p1 + k] - z[:, p1], 0.0, sd).sum(-1) / dim
    np.testing.assert_allclose(result.per_start["nll"][1, :, 1], expected_roll, rtol=1e-5)
    np.testing.assert_allclose(result.per_start["nll"][0, :, 1], expected_teacher, rtol=1e-5)


def test_divergence_step_closed_form() -> None:
    # GT is a ramp z_t = a + t v, so persistence has MSE (k |v|)^2/D teacher-forced and ((s+1) k |v|)^2/D free.
    w, k, horizon, dim, n = 2, 2, 6, 3, 4
    t = torch.arange((w - 1) * k + 1 + horizon * k, dtype=torch.float32)
    v = torch.tensor([0.1, -0.2, 0.05])
    segments = torch.randn(n, 1, dim) + t[None, :, None] * v
    result = run_injection(
        PersistenceModel(dim, w, k), segments, _cfg(modes=["A_teacher", "D_rollout"], horizon=horizon), None
    )
    np.testing.assert_array_equal(result.per_start["divergence_step"], [[horizon] * n, [1] * n])
    assert result.summaries["A_teacher"]["diverged_fraction"] == 0.0
    assert result.summaries["D_rollout"]["divergence_step"] == 1.0
    assert result.summaries["D_rollout"]["diverged_fraction"] == 1.0
    # Without A_teacher the reference is D_rollout's own step-0 MSE: (s+1)^2 > 5 first at s = 2.
    alone = run_injection(
        PersistenceModel(dim, w, k),
        segments,
        _cfg(modes=["D_rollout"], horizon=horizon, divergence_factor=5),
        None,
    )
    np.testing.assert_array_equal(alone.per_start["divergence_step"], [[2] * n])
    ramp_auc = sum(((s + 1) * k) ** 2 for s in range(horizon)) * float((v**2).mean())
    assert result.summaries["D_rollout"]["auc_mse"] == pytest.approx(ramp_auc, rel=1e-4)
    assert result.summaries["D_rollout"]["mse_at_H"] == pytest.approx(
        (horizon * k) ** 2 * float((v**2).mean()), 1e-4
    )


def test_correction_applies_to_free_running_frames_only() -> None:
    w, k, horizon, dim = 3, 1, 5, 4
    segments = _segments(3, w, k, horizon, dim, seed=5)
    cfg = _cfg(modes=["A_teacher", "D_rollout"], horizon=horizon)
    shift = torch.tensor([0.3, -0.1, 0.2, 0.5])
    model = PersistenceModel(dim, w, k)
    plain = run_injection(model, segments, cfg, None)
    shifted = run_injection(model, segments, cfg, None, correction=lambda x: x + shift)
    np.testing.assert_array_equal(shifted.per_start["mse"][0], plain.per_start["mse"][0])
    z, c = segments.double().numpy(), shift.double().numpy()
    p0 = (w - 1) * k
    expected = np.stack(
        [((z[:, p0] + (s + 1) * c - z[:, p0 + (s + 1) * k]) ** 2).mean(-1) for s in range(horizon)], axis=1
    )
    np.testing.assert_allclose(shifted.per_start["mse"][1], expected, rtol=1e-5)
    assert not np.allclose(shifted.per_start["mse"][1], plain.per_start["mse"][1])


# --------------------------------------------------------------------------- batched against the loop


@pytest.mark.parametrize("with_correction", [False, True])
def test_batched_equals_per_start_loop(with_correction: bool) -> None:
    w, k, horizon, dim, n = 4, 2, 9, 6, 5
    segments = _segments(n, w, k, horizon, dim, seed=1, extra=2)
    bank = torch.randn(50, dim, generator=torch.Generator().manual_seed(9))
    model = MLPModel(dim, w, k)
    cfg = _cfg(horizon=horizon, period=3, inject_step=5)
    correction = (lambda x: 0.9 * x + 0.2 * torch.tanh(x)) if with_correction else None
    result = run_injection(model, segments, cfg, bank, correction=correction)
    reference = run_injection_loop_reference(model, segments, cfg, bank, correction=correction)
    for name in METRICS:
        np.testing.assert_allclose(result.per_start[name], reference[name], atol=1e-5, rtol=0, err_msg=name)
    # The modes really differ (the buffer logic is exercised), and D_rollout drifts from A_teacher.
    mse = result.per_start["mse"]
    assert not np.allclose(mse[0], mse[3]) and not np.allclose(mse[1], mse[2])


def test_degenerate_modes_equal_their_limits() -> None:
    w, k, horizon, dim = 3, 2, 7, 5
    segments = _segments(4, w, k, horizon, dim, seed=2)
    model = MLPModel(dim, w, k, seed=3)
    cfg = _cfg(horizon=horizon, period=1, inject_step=horizon)
    result = run_injection(model, segments, cfg, None)
    a, b, c, d = (MODES.index(m) for m in MODES)
    for name in ("mse", "cosine", "nll", "norm_ratio"):  # equal up to float32 batch-position rounding
        np.testing.assert_allclose(result.per_start[name][b], result.per_start[name][a], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(result.per_start[name][c], result.per_start[name][d], rtol=1e-6, atol=1e-6)
    assert not np.allclose(result.per_start["mse"][a], result.per_start["mse"][d])


def test_sampling_statistics_and_seed() -> None:
    w, k, horizon, dim, n, samples = 2, 1, 4, 16, 8, 400
    segments = _segments(n, w, k, horizon, dim, seed=4)
    sigma, temperature = 0.8, 0.5
    model = PersistenceModel(dim, w, k, sigma=sigma)
    modes = ["A_teacher", "D_rollout"]
    cfg = _cfg(
        modes=modes, horizon=horizon, predict="sample", n_samples=samples, temperature=temperature, seed=11
    )
    result = run_injection(model, segments, cfg, None)
    z, var = segments.double().numpy(), (temperature * sigma) ** 2
    p = [(w - 1) * k + s * k for s in range(horizon)]
    # Noise accumulates along a free-running rollout (s + 1 independent draws) and not under teacher forcing.
    teacher = np.stack([((z[:, p[s]] - z[:, p[s] + k]) ** 2).mean(-1) + var for s in range(horizon)], axis=1)
    rollout = np.stack(
        [((z[:, p[0]] - z[:, p[s] + k]) ** 2).mean(-1) + (s + 1) * var for s in range(horizon)], 1
    )
    np.testing.assert_allclose(result.per_start["mse"][0].mean(0), teacher.mean(0), rtol=0.05)
    np.testing.assert_allclose(result.per_start["mse"][1].mean(0), rollout.mean(0), rtol=0.05)
    again = run_injection(model, segments, cfg, None)
    np.testing.assert_array_equal(again.per_start["mse"], result.per_start["mse"])
    other = run_injection(model, segments, dataclasses.replace(cfg, seed=12), None)
    assert not np.array_equal(other.per_start["mse"], result.per_start["mse"])


# --------------------------------------------------------------------------- nearest neighbours, bank, segments


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


def test_sample_start_segments() -> None:
    rng = np.random.default_rng(0)
    lengths = [4, 9, 3, 11]
    trajectories = [rng.standard_normal((t, 2)).astype(np.float32) for t in lengths]
    window, horizon_frames = 3, 4  # 7 frames: valid starts 3 (len 9) + 5 (len 11) = 8
    segments = sample_start_segments(trajectories, window, horizon_frames, n_starts=8, seed=0)
    assert segments.shape == (8, 7, 2) and segments.dtype == torch.float32
    slices = {(u, t0) for u, t in enumerate(trajectories) for t0 in range(len(t) - 6)}
    found = set()
    for seg in segments.numpy():
        match = [(u, t0) for u, t0 in slices if np.array_equal(trajectories[u][t0 : t0 + 7], seg)]
        assert len(match) == 1
        found.add(match[0])
    assert found == slices  # without replacement: every valid start exactly once
    again = sample_start_segments(
        [torch.as_tensor(t) for t in trajectories], window, horizon_frames, 5, seed=3
    )
    np.testing.assert_array_equal(
        again, sample_start_segments(trajectories, window, horizon_frames, 5, seed=3)
    )
    assert sample_start_segments(trajectories, window, horizon_frames, 20, seed=0).shape == (20, 7, 2)
    with pytest.raises(ValueError, match="needs 12 frames"):
        sample_start_segments(trajectories, 4, 8, 3, seed=0)
    assert segment_frames(PersistenceModel(2, 8, 3), horizon=5) == (22, 15)


# --------------------------------------------------------------------------- aggregation and outputs


def test_bands_and_tidy_rows() -> None:
    w, k, horizon, dim = 2, 1, 5, 4
    segments = _segments(30, w, k, horizon, dim, seed=6)
    model = MLPModel(dim, w, k, seed=1)
    result = run_injection(model, segments, _cfg(horizon=horizon, band_level=0.8), None)
    assert len(result.per_step) == len(MODES) * len(METRICS) * horizon
    row = next(r for r in result.per_step if (r["mode"], r["metric"], r["step"]) == ("D_rollout", "mse", 3))
    values = result.per_start["mse"][3, :, 3]
    assert row["mean"] == pytest.approx(values.mean())
    assert (row["lo"], row["hi"]) == pytest.approx(tuple(np.percentile(values, [10, 90])))
    boot = run_injection(model, segments, _cfg(horizon=horizon, band="bootstrap"), None)
    brow = next(r for r in boot.per_step if (r["mode"], r["metric"], r["step"]) == ("D_rollout", "mse", 3))
    assert row["lo"] < brow["lo"] < brow["mean"] < brow["hi"] < row["hi"]
    nan_rows = [r for r in result.per_step if r["metric"] == "manifold_dist"]
    assert all(math.isnan(r["mean"]) for r in nan_rows)


def test_write_outputs(tmp_path: Path) -> None:
    w, k, horizon, dim = 2, 2, 4, 3
    segments = _segments(6, w, k, horizon, dim, seed=7)
    bank = torch.randn(20, dim)
    result = run_injection(MLPModel(dim, w, k), segments, _cfg(horizon=horizon), bank)
    paths = result.write(tmp_path / "inj", frame_rate=12.5)
    with (tmp_path / "inj" / "per_step.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["mode", "step", "metric", "mean", "lo", "hi"]
    assert len(rows) == len(MODES) * len(METRICS) * horizon
    payload = json.loads((tmp_path / "inj" / "metrics.json").read_text())
    assert payload["config"]["horizon"] == horizon
    assert payload["summaries"]["D_rollout"]["auc_mse"] == pytest.approx(
        result.summaries["D_rollout"]["auc_mse"]
    )
    for metric in METRICS:
        png = tmp_path / "inj" / f"injection_{metric}.png"
        assert png in paths and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    flat = result.to_metrics()
    expected_keys = {"auc_mse", "mse_at_H", "nll_mean", "cosine_mean", "divergence_step", "diverged_fraction"}
    assert all(f"{m}/{key}" in flat for m in MODES for key in expected_keys)
    assert flat["D_rollout/mse_at_H"] == result.summaries["D_rollout"]["mse_at_H"]
    # Without a bank the manifold metrics are NaN: left out of the flat metrics, null in JSON, no figure.
    no_bank = run_injection(MLPModel(dim, w, k), segments, _cfg(horizon=horizon), None)
    assert "D_rollout/manifold_dist_mean" not in no_bank.to_metrics()
    no_bank.write(tmp_path / "nb")
    assert (
        json.loads((tmp_path / "nb" / "metrics.json").read_text())["summaries"]["A_teacher"][
            "manifold_dist_mean"
        ]
        is None
    )
    assert not (tmp_path / "nb" / "injection_manifold_dist.png").exists()
    diag = no_bank.to_dict()
    assert len(diag["curves"]["C_one_shot"]["mse"]["mean"]) == horizon
    json.dumps(diag, allow_nan=False)
