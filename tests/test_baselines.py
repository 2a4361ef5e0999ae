"""Unconditional baselines (ΔNLL's reference densities) against scipy, and the heads' bounded parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import gammaln
from scipy.stats import lognorm, norm

from latentdyn.diagnostics.battery import battery_metrics
from latentdyn.models.baselines import MIN_VARIANCE, DiagonalGaussianBaseline, SphereLogNormalBaseline
from latentdyn.models.heads import (
    GaussianMDNHead,
    MDNPredictive,
    VMFLogNormalHead,
    VMFLogNormalPredictive,
)

f64 = torch.float64
#: The floor the reference puts on fitted variances.
FLOOR = 1e-6


def make_deltas(n: int, dim: int, seed: int, spread: float = 1.0) -> np.ndarray:
    """``(n, dim)`` float64 deltas with distinct per-dimension means and scales."""
    rng = np.random.default_rng(seed)
    mean, scale = rng.uniform(-1, 1, dim) * spread, rng.uniform(0.3, 3.0, dim) * spread
    return mean + scale * rng.standard_normal((n, dim))


def batches_of(x: np.ndarray, sizes: list[int]) -> list[torch.Tensor]:
    """``x`` cut into consecutive batches of the given sizes (0 allowed), which must cover it exactly."""
    assert sum(sizes) == len(x)
    cuts = np.cumsum([0, *sizes])
    return [torch.from_numpy(x[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def log_sphere_area(dim: int) -> float:
    """log |S^{D-1}| = log(2 π^{D/2} / Γ(D/2))."""
    return math.log(2.0) + 0.5 * dim * math.log(math.pi) - float(gammaln(0.5 * dim))


def sphere_log_pdf(x: np.ndarray, m: float, s: float) -> np.ndarray:
    """Uniform direction on S^{D-1} × LogNormal(m, s²) norm, as a density in R^D (polar Jacobian r^{D-1})."""
    d, r = x.shape[-1], np.linalg.norm(x, axis=-1)
    return -log_sphere_area(d) + lognorm.logpdf(r, s=s, scale=math.exp(m)) - (d - 1) * np.log(r)


# ------------------------------------------------------------------------------------------------------------
# Diagonal Gaussian
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 5, 64])
def test_diagonal_gaussian_fit_and_log_prob_match_scipy(dim: int) -> None:
    train, test = make_deltas(400, dim, 0), make_deltas(50, dim, 1)
    base = DiagonalGaussianBaseline.fit([torch.from_numpy(train)])
    mean, var = train.mean(0), train.var(0, ddof=1)
    np.testing.assert_allclose(base.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(base.var.numpy(), var, rtol=1e-12)
    expected = norm.logpdf(test, loc=mean, scale=np.sqrt(var)).sum(-1)
    got = base.log_prob(torch.from_numpy(test))
    assert got.shape == (50,) and got.dtype == f64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    # float32 in, float32 out, same values to float32 precision
    got32 = base.log_prob(torch.from_numpy(test).float())
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), expected, rtol=1e-5)


def test_diagonal_gaussian_variance_floor() -> None:
    train = make_deltas(100, 4, 2)
    train[:, 1] = 0.25  # a constant dimension: ddof=1 variance 0
    base = DiagonalGaussianBaseline.fit([torch.from_numpy(train)])
    assert MIN_VARIANCE == FLOOR and base.var[1].item() == FLOOR
    np.testing.assert_allclose(base.var.numpy()[[0, 2, 3]], train[:, [0, 2, 3]].var(0, ddof=1), rtol=1e-12)
    test = train[:5].copy()
    expected = norm.logpdf(test, loc=base.mean.numpy(), scale=np.sqrt([*base.var.numpy()])).sum(-1)
    np.testing.assert_allclose(base.log_prob(torch.from_numpy(test)).numpy(), expected, rtol=1e-12)
    single = DiagonalGaussianBaseline.fit([torch.ones(1, 3)])  # one delta: no spread to estimate
    assert torch.equal(single.var, torch.full((3,), FLOOR, dtype=f64))


@pytest.mark.parametrize(
    "family", [DiagonalGaussianBaseline, SphereLogNormalBaseline], ids=lambda c: c.__name__
)
def test_fit_needs_deltas(family: type) -> None:
    with pytest.raises(ValueError, match="zero deltas"):
        family.fit([])
    with pytest.raises(ValueError, match="zero deltas"):
        family.fit([torch.zeros(0, 3)])


# ------------------------------------------------------------------------------------------------------------
# Uniform direction × LogNormal norm
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 3, 5, 64, 512])
def test_sphere_lognormal_fit_and_log_prob_match_scipy(dim: int) -> None:
    train, test = make_deltas(300, dim, 3), make_deltas(40, dim, 4)
    base = SphereLogNormalBaseline.fit([torch.from_numpy(train)])
    log_r = np.log(np.linalg.norm(train, axis=-1))
    assert base.dim == dim
    assert base.log_mag_mean == pytest.approx(log_r.mean(), rel=1e-12)
    assert base.log_mag_var == pytest.approx(log_r.var(ddof=1), rel=1e-12)
    got = base.log_prob(torch.from_numpy(test))
    assert got.shape == (40,) and got.dtype == f64
    expected = sphere_log_pdf(test, log_r.mean(), log_r.std(ddof=1))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    with pytest.raises(ValueError, match="D="):
        base.log_prob(torch.zeros(2, dim + 1))


def test_sphere_lognormal_variance_floor() -> None:
    rng = np.random.default_rng(5)
    train = rng.standard_normal((50, 4))
    train *= 2.0 / np.linalg.norm(train, axis=-1, keepdims=True)  # every norm is 2
    base = SphereLogNormalBaseline.fit([torch.from_numpy(train)])
    assert base.log_mag_mean == pytest.approx(math.log(2.0), rel=1e-12) and base.log_mag_var == FLOOR
    expected = sphere_log_pdf(train[:3], math.log(2.0), math.sqrt(FLOOR))
    np.testing.assert_allclose(base.log_prob(torch.from_numpy(train[:3])).numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize("sizes", [[1, 7, 0, 123, 369], [250, 250], [499, 1]], ids=str)
def test_streaming_fit_equals_the_one_shot_fit(sizes: list[int]) -> None:
    x = make_deltas(
        500, 6, 6, spread=40.0
    )  # a large mean against the spread: a naive E[x²]-E[x]² would drift
    one = DiagonalGaussianBaseline.fit([torch.from_numpy(x)])
    many = DiagonalGaussianBaseline.fit(batches_of(x, sizes))
    np.testing.assert_allclose(many.mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(many.var.numpy(), x.var(0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(many.var.numpy(), one.var.numpy(), rtol=1e-10)
    sphere_one = SphereLogNormalBaseline.fit([torch.from_numpy(x)])
    sphere_many = SphereLogNormalBaseline.fit(iter(batches_of(x, sizes)))  # any iterable, consumed once
    log_r = np.log(np.linalg.norm(x, axis=-1))
    assert sphere_many.log_mag_mean == pytest.approx(log_r.mean(), rel=1e-12)
    assert sphere_many.log_mag_var == pytest.approx(log_r.var(ddof=1), rel=1e-10)
    assert sphere_many.log_mag_var == pytest.approx(sphere_one.log_mag_var, rel=1e-10)
    # float32 batches are accumulated in float64
    many32 = DiagonalGaussianBaseline.fit(b.float() for b in batches_of(x, sizes))
    np.testing.assert_allclose(
        many32.mean.numpy(), x.astype(np.float32).astype(np.float64).mean(0), rtol=1e-10
    )


# ------------------------------------------------------------------------------------------------------------
# ΔNLL of a model that outputs the baseline's parameters is 0
# ------------------------------------------------------------------------------------------------------------


class ConstantModel:
    """A context-blind model: every window gets the same predictive, built by ``make(batch_size)``."""

    def __init__(self, make) -> None:
        self.make = make

    def predictive(self, context: torch.Tensor):
        return self.make(context.shape[0])


def window_batches(deltas: np.ndarray, size: int) -> list[dict[str, torch.Tensor]]:
    """Battery batches whose true deltas are ``deltas`` (the other fields are zeros: state 0, target = Δ)."""
    out = []
    for lo in range(0, len(deltas), size):
        d = torch.from_numpy(deltas[lo : lo + size]).float()
        zeros = torch.zeros_like(d)
        out.append(dict(context=zeros[:, None], target_delta=d, last=zeros, target=d.clone(), prev=zeros))
    return out


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("dim", [5, 64])
def test_mdn_with_the_gaussian_baselines_parameters_has_zero_dnll(k: int, dim: int) -> None:
    train, test = make_deltas(500, dim, 7), make_deltas(64, dim, 8)
    base = DiagonalGaussianBaseline.fit([torch.from_numpy(train)])
    logits = torch.randn(
        k, generator=torch.Generator().manual_seed(0)
    )  # identical components: weights irrelevant

    def make(b: int) -> MDNPredictive:
        means = base.mean.float().expand(b, k, dim)
        scales = base.var.sqrt().float().expand(b, k, dim)
        return MDNPredictive(logits.expand(b, k), means, scales)

    got = make(len(test)).log_prob(torch.from_numpy(test).float())
    expected = base.log_prob(torch.from_numpy(test))
    np.testing.assert_allclose(got.double().numpy(), expected.numpy(), rtol=1e-5)
    metrics = battery_metrics(ConstantModel(make), window_batches(test, 16), unconditional=base)
    assert metrics["dnll"] == pytest.approx(0.0, abs=1e-5 * abs(metrics["nll"]))
    assert metrics["nll"] == pytest.approx(-expected.mean().item(), rel=1e-5)


@pytest.mark.parametrize("dim", [3, 5, 64, 512])
def test_vmf_with_tiny_kappa_and_the_baselines_norm_has_zero_dnll(dim: int) -> None:
    """κ → 0: vMF's normaliser tends to 1/|S^{D-1}|, so vMF(κ≈0) × LogNormal(m, s) is the sphere baseline."""
    train, test = make_deltas(500, dim, 9, spread=3.0), make_deltas(64, dim, 10, spread=3.0)
    base = SphereLogNormalBaseline.fit([torch.from_numpy(train)])
    loc = torch.nn.functional.normalize(
        torch.randn(1, dim, generator=torch.Generator().manual_seed(1)), dim=-1
    )

    def make(b: int) -> VMFLogNormalPredictive:
        return VMFLogNormalPredictive(
            loc.expand(b, dim),
            torch.full((b,), 1e-6),
            torch.full((b,), base.log_mag_mean),
            torch.full((b,), math.sqrt(base.log_mag_var)),
        )

    got = make(len(test)).log_prob(torch.from_numpy(test).float())
    expected = base.log_prob(torch.from_numpy(test))
    np.testing.assert_allclose(got.double().numpy(), expected.numpy(), rtol=1e-5)
    metrics = battery_metrics(ConstantModel(make), window_batches(test, 16), unconditional=base)
    assert metrics["dnll"] == pytest.approx(0.0, abs=1e-5 * abs(metrics["nll"]))


def test_heads_name_their_baseline_family() -> None:
    assert VMFLogNormalHead.baseline is SphereLogNormalBaseline
    assert GaussianMDNHead.baseline is DiagonalGaussianBaseline


# ------------------------------------------------------------------------------------------------------------
# Heads keep their parameters bounded, with gradients, however large their input
# ------------------------------------------------------------------------------------------------------------

IN, DIM = 4, 6


def vmf_head_with_raw(raw: float) -> tuple[VMFLogNormalHead, torch.Tensor]:
    """A vMF head and an input ``h`` of norm |raw| whose pre-activations of log κ, m and log s all equal ``raw``."""
    head = VMFLogNormalHead(IN, DIM)
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.bias.zero_()
        head.proj.weight[:DIM, 1] = torch.linspace(-1, 1, DIM)  # some direction
        head.proj.weight[DIM:, 0] = 1.0
    h = torch.zeros(1, IN)
    h[0, 0], h[0, 1] = raw, 1.0
    return head, h


@pytest.mark.parametrize(
    "raw",
    [
        *(pytest.param(r, id=f"{r:g}") for r in (-1e30, -1e6, -1e3, -42.0, 0.0, 42.0, 1e3, 1e6, 1e9, 1e30)),
    ],
)
def test_vmf_head_parameters_stay_in_the_reference_ranges(raw: float) -> None:
    head, h = vmf_head_with_raw(raw)
    out = head(h)
    log_kappa, m, log_s = out.kappa.log().item(), out.log_mag_mu.item(), out.log_mag_sigma.log().item()
    for value, (lo, hi) in ((log_kappa, (-2, 12)), (m, (-5, 12)), (log_s, (-5, 2))):
        assert math.isfinite(value) and lo - 1e-6 <= value <= hi + 1e-6
        if abs(raw) > 40:  # saturated at the bound on raw's side
            assert value == pytest.approx(hi if raw > 0 else lo, abs=1e-4)
    assert torch.isfinite(out.log_prob(torch.ones(1, DIM))).all()


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(-42.0, id="40-below"),
        pytest.param(-2.0, id="at-lower"),
        pytest.param(5.0, id="inside"),
        pytest.param(22.0, id="10-above"),
        pytest.param(52.0, id="40-above"),
    ],
)
def test_vmf_head_kappa_keeps_a_gradient_past_its_bounds(raw: float) -> None:
    """An input that drives log κ's pre-activation 40 past a bound still moves κ's weights (a hard clamp, the
    reference's, passes exactly 0 there and the head stays stuck)."""
    head, h = vmf_head_with_raw(raw)
    kappa = head(h).kappa
    assert torch.isfinite(kappa).all() and math.exp(-2) * (1 - 1e-6) <= kappa.item() <= math.exp(12) * (
        1 + 1e-6
    )
    (grad,) = torch.autograd.grad(kappa.log().sum(), head.proj.weight)
    assert torch.all(torch.isfinite(grad))
    assert grad[DIM, 0].item() != 0.0  # d log κ / d w = soft_clamp'(raw) · h_0
    assert grad[DIM, 0].item() * raw > 0


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(-47.0, id="40-below"),
        pytest.param(1.0, id="inside"),
        pytest.param(42.0, id="40-above"),
    ],
)
def test_mdn_head_scales_stay_bounded_with_a_gradient(raw: float) -> None:
    head = GaussianMDNHead(IN, DIM, n_components=2)
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.bias.zero_()
        head.proj.weight[-2 * DIM :, 0] = 1.0  # every log-scale pre-activation = h_0
    h = torch.zeros(1, IN)
    h[0, 0] = raw
    scales = head(h).scales
    assert torch.isfinite(scales).all()
    assert torch.all((scales >= math.exp(-7) * (1 - 1e-6)) & (scales <= math.exp(2) * (1 + 1e-6)))
    (grad,) = torch.autograd.grad(scales.log().sum(), head.proj.weight)
    assert torch.all(grad[-2 * DIM :, 0] != 0.0)
