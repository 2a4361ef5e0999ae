"""Tests of latentdyn.models.distributions against independent oracles (mpmath, scipy, closed forms)."""

from __future__ import annotations

import math
from functools import cache

import mpmath
import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from scipy.integrate import cumulative_trapezoid

from latentdyn.models.distributions import (
    DiagonalGaussianMixture,
    LogNormalMagnitude,
    VonMisesFisher,
    delta_log_prob,
    log_sphere_area,
    lognormal_log_prob,
    mdn_scales,
    soft_clamp,
    vmf_log_normalizer,
    vmf_log_prob,
    vmf_mean_resultant_length,
)

DIMS = [3, 8, 32, 128, 512]
KAPPAS = np.logspace(-3, 5, 25)
f64 = torch.float64


# --------------------------------------------------------------------------------------------
# mpmath references
# --------------------------------------------------------------------------------------------


@cache
def mp_log_normalizer(dim: int, kappa: float) -> float:
    with mpmath.workdps(40):
        nu = mpmath.mpf(dim) / 2 - 1
        k = mpmath.mpf(kappa)
        value = nu * mpmath.log(k) - (nu + 1) * mpmath.log(2 * mpmath.pi) - mpmath.log(mpmath.besseli(nu, k))
        return float(value)


@cache
def mp_mean_resultant_length(dim: int, kappa: float) -> float:
    with mpmath.workdps(40):
        nu = mpmath.mpf(dim) / 2 - 1
        k = mpmath.mpf(kappa)
        return float(mpmath.besseli(nu + 1, k) / mpmath.besseli(nu, k))


@cache
def mp_w_variance(dim: int, kappa: float) -> float:
    """Var(μ·x) = 1 - (D-1) A/κ - A², evaluated in 40-digit arithmetic (cancels at large κ)."""
    with mpmath.workdps(40):
        nu = mpmath.mpf(dim) / 2 - 1
        k = mpmath.mpf(kappa)
        a = mpmath.besseli(nu + 1, k) / mpmath.besseli(nu, k)
        return float(1 - (dim - 1) * a / k - a * a)


def random_unit(dim: int, seed: int, dtype: torch.dtype = f64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(dim, generator=g, dtype=f64)
    return (v / v.norm()).to(dtype)


# --------------------------------------------------------------------------------------------
# log C_D and A_D
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", DIMS)
def test_log_normalizer_matches_mpmath(dim: int) -> None:
    ours = vmf_log_normalizer(dim, torch.tensor(KAPPAS, dtype=f64)).numpy()
    ref = np.array([mp_log_normalizer(dim, float(k)) for k in KAPPAS])
    rel = np.abs(ours - ref) / np.abs(ref)
    assert rel.max() <= 1e-6, (dim, KAPPAS[rel.argmax()], rel.max())


@pytest.mark.parametrize("dim", [3, 32, 512])
def test_log_normalizer_float32_matches_mpmath(dim: int) -> None:
    kappa32 = torch.tensor(KAPPAS, dtype=torch.float32)
    ours = vmf_log_normalizer(dim, kappa32)
    assert ours.dtype == torch.float32
    ref = np.array([mp_log_normalizer(dim, float(k)) for k in kappa32.double()])
    rel = np.abs(ours.double().numpy() - ref) / np.abs(ref)
    assert rel.max() <= 1e-6, rel.max()


@pytest.mark.parametrize("dim", DIMS)
def test_mean_resultant_length_and_gradient_match_mpmath(dim: int) -> None:
    kappa = torch.tensor(KAPPAS, dtype=f64, requires_grad=True)
    (grad,) = torch.autograd.grad(vmf_log_normalizer(dim, kappa).sum(), kappa)
    a = vmf_mean_resultant_length(dim, kappa.detach()).numpy()
    ref = np.array([mp_mean_resultant_length(dim, float(k)) for k in KAPPAS])
    assert np.max(np.abs(a - ref) / ref) <= 1e-6
    assert np.max(np.abs(-grad.numpy() - ref) / ref) <= 1e-6


@pytest.mark.parametrize("dim", [3, 32, 512])
def test_second_derivative_matches_mpmath(dim: int) -> None:
    kappas = [0.01, 1.0, 30.0, 1000.0]
    kappa = torch.tensor(kappas, dtype=f64, requires_grad=True)
    (grad,) = torch.autograd.grad(vmf_log_normalizer(dim, kappa).sum(), kappa, create_graph=True)
    (hess,) = torch.autograd.grad(grad.sum(), kappa)
    with mpmath.workdps(40):
        nu = mpmath.mpf(dim) / 2 - 1

        def log_c(k: mpmath.mpf) -> mpmath.mpf:
            return nu * mpmath.log(k) - mpmath.log(mpmath.besseli(nu, k))

        ref = np.array([float(mpmath.diff(log_c, mpmath.mpf(k), 2)) for k in kappas])
    np.testing.assert_allclose(hess.numpy(), ref, rtol=1e-5, atol=1e-12)


def test_d3_closed_form() -> None:
    kappa = np.logspace(-3, 5, 200)
    # C_3(κ) = κ / (4π sinh κ)  ⇒  log C_3 = log κ - log 2π - κ - log(1 - e^{-2κ}).
    closed = np.log(kappa) - np.log(2 * np.pi) - kappa - np.log(-np.expm1(-2 * kappa))
    ours = vmf_log_normalizer(3, torch.tensor(kappa, dtype=f64)).numpy()
    np.testing.assert_allclose(ours, closed, rtol=1e-12)
    # A_3(κ) = coth κ - 1/κ, compared where the closed form is itself accurate.
    k = kappa[kappa > 0.1]
    a3 = 1.0 / np.tanh(k) - 1.0 / k
    np.testing.assert_allclose(
        vmf_mean_resultant_length(3, torch.tensor(k, dtype=f64)).numpy(), a3, rtol=1e-12
    )


@pytest.mark.parametrize("dim", [2, 3, 8, 128, 512])
def test_small_kappa_limit_is_uniform_density(dim: int) -> None:
    # κ → 0: C_D → 1 / |S^{D-1}| = Γ(D/2) / (2 π^{D/2}).
    expected = math.lgamma(dim / 2) - math.log(2) - (dim / 2) * math.log(math.pi)
    ours = vmf_log_normalizer(dim, torch.tensor([0.0, 1e-12], dtype=f64))
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-12)
    assert vmf_mean_resultant_length(dim, torch.tensor([0.0], dtype=f64)).item() == 0.0


def test_log_normalizer_preserves_shape_and_rejects_bad_dim() -> None:
    kappa = torch.rand(3, 4, 5, dtype=f64) * 100
    assert vmf_log_normalizer(16, kappa).shape == (3, 4, 5)
    with pytest.raises(ValueError, match="dimension"):
        vmf_log_normalizer(1, kappa)


# --------------------------------------------------------------------------------------------
# VonMisesFisher density
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [3, 8, 32, 128])
@pytest.mark.parametrize("kappa", [1e-2, 1.0, 20.0, 500.0, 1e4])
def test_log_prob_matches_scipy(dim: int, kappa: float) -> None:
    if not scipy.special.ive(dim / 2 - 1, kappa) > 1e-300:
        pytest.skip("scipy's ive underflows here")
    mu = random_unit(dim, seed=dim).numpy()
    x = scipy.stats.vonmises_fisher(mu, kappa).rvs(50, random_state=np.random.default_rng(1))
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    ref = scipy.stats.vonmises_fisher(mu, kappa).logpdf(x)
    dist = VonMisesFisher(torch.tensor(mu), torch.tensor(kappa, dtype=f64))
    ours = dist.log_prob(torch.tensor(x)).numpy()
    assert np.all(np.isfinite(ref))
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6 * kappa)


def test_log_prob_float32_keeps_precision_at_large_kappa() -> None:
    dim, kappa = 512, 1e5
    mu64 = random_unit(dim, seed=3)
    x64 = VonMisesFisher(mu64, torch.tensor(kappa, dtype=f64)).sample(
        (200,), generator=torch.Generator().manual_seed(0)
    )
    ref = vmf_log_prob(x64, mu64, torch.tensor(kappa, dtype=f64))
    ours = VonMisesFisher(mu64.float(), torch.tensor(kappa)).log_prob(x64.float())
    assert ours.dtype == torch.float32
    # The naive float32 form log C + κ μ·x is off by ~1e-2 here (κ · 6e-8 and the ulp of log C ≈ -1e5).
    assert (ours.double() - ref).abs().max() <= 2e-3


def test_log_prob_gradcheck() -> None:
    dim = 5
    loc = random_unit(dim, seed=0).requires_grad_(True)
    x = torch.stack([random_unit(dim, seed=s) for s in range(1, 4)]).requires_grad_(True)
    kappa = torch.tensor([0.5, 7.0, 40.0], dtype=f64, requires_grad=True)

    def fn(x_: torch.Tensor, loc_: torch.Tensor, kappa_: torch.Tensor) -> torch.Tensor:
        return VonMisesFisher(loc_, kappa_, validate_args=False).log_prob(x_)

    assert torch.autograd.gradcheck(fn, (x, loc, kappa))
    big = torch.tensor([300.0, 3000.0, 3e4], dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k: vmf_log_normalizer(64, k), (big,), rtol=1e-4)


def test_entropy_and_mean() -> None:
    dim = 16
    mu = random_unit(dim, seed=4)
    kappas = [0.1, 10.0, 1e3, 1e5]
    dist = VonMisesFisher(mu.expand(4, dim), torch.tensor(kappas, dtype=f64))
    ref_ent = [-mp_log_normalizer(dim, k) - k * mp_mean_resultant_length(dim, k) for k in kappas]
    np.testing.assert_allclose(dist.entropy().numpy(), ref_ent, rtol=1e-9)
    for k, h in zip(kappas[:3], dist.entropy()[:3], strict=True):
        assert h.item() == pytest.approx(scipy.stats.vonmises_fisher(mu.numpy(), k).entropy(), rel=1e-8)
    a = np.array([mp_mean_resultant_length(dim, k) for k in kappas])
    np.testing.assert_allclose(dist.mean.numpy(), a[:, None] * mu.numpy()[None], rtol=1e-10, atol=1e-15)


def test_validation_errors() -> None:
    mu = random_unit(4, seed=0)
    with pytest.raises(ValueError, match="unit vectors"):
        VonMisesFisher(2 * mu, torch.tensor(1.0, dtype=f64), validate_args=True)
    with pytest.raises(ValueError, match="concentration must be > 0"):
        VonMisesFisher(mu, torch.tensor(0.0, dtype=f64), validate_args=True)
    with pytest.raises(ValueError, match="concentration must be > 0"):
        VonMisesFisher(mu, torch.tensor(float("nan"), dtype=f64), validate_args=True)
    dist = VonMisesFisher(mu, torch.tensor(1.0, dtype=f64), validate_args=True)
    with pytest.raises(ValueError, match="unit vectors"):
        dist.log_prob(torch.ones(4, dtype=f64))
    with pytest.raises(ValueError, match="last dimension"):
        dist.log_prob(torch.ones(3, dtype=f64) / math.sqrt(3))
    VonMisesFisher(2 * mu, torch.tensor(1.0, dtype=f64), validate_args=False)  # no error


def test_batch_shapes_and_expand() -> None:
    loc = torch.stack([random_unit(6, seed=s) for s in range(3)])
    dist = VonMisesFisher(loc, torch.tensor([[1.0], [2.0]], dtype=f64))
    assert dist.batch_shape == (2, 3) and dist.event_shape == (6,)
    assert dist.sample((4,), generator=torch.Generator().manual_seed(0)).shape == (4, 2, 3, 6)
    assert dist.log_prob(loc).shape == (2, 3)
    assert dist.expand(torch.Size([5, 2, 3])).log_prob(loc).shape == (5, 2, 3)


@pytest.mark.parametrize(
    ("x_shape", "loc_shape", "kappa_shape"),
    [
        ((6,), (6,), ()),
        ((7, 6), (6,), ()),
        ((7, 6), (7, 6), (7,)),
        ((4, 7, 6), (4, 1, 6), (4, 1)),
        ((4, 7, 6), (7, 6), (7,)),
        ((3, 1, 6), (1, 5, 6), (3, 5)),
        ((1, 6), (5, 6), (5,)),
    ],
)
def test_vmf_log_prob_broadcasting_matches_dot_product_form(x_shape, loc_shape, kappa_shape) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(x_shape, generator=g, dtype=f64), dim=-1).requires_grad_(
        True
    )
    loc = torch.nn.functional.normalize(
        torch.randn(loc_shape, generator=g, dtype=f64), dim=-1
    ).requires_grad_(True)
    kappa = (torch.rand(kappa_shape, generator=g, dtype=f64) * 50 + 0.1).requires_grad_(True)
    ours = vmf_log_prob(x, loc, kappa)
    ref = vmf_log_normalizer(6, kappa) + kappa * (x * loc).sum(-1)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours.detach().numpy(), ref.detach().numpy(), rtol=1e-12)
    grads = torch.autograd.grad(ours.sum(), (x, loc, kappa))
    # d/dx of -(κ/2)‖x-μ‖² is κ(μ - x): it differs from κμ by the radial part -κx only.
    ref_grads = torch.autograd.grad(
        (ref - 0.5 * kappa * (x.square().sum(-1) + loc.square().sum(-1) - 2)).sum(), (x, loc, kappa)
    )
    for a, b in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------


def s_cdf(dim: int, kappa: float) -> tuple[np.ndarray, np.ndarray]:
    """CDF of s = 1 - μ·x on a fine grid, by integrating ∝ e^{-κs} (s(2-s))^{(D-3)/2} in log space."""
    s = np.concatenate([[0.0], np.logspace(-16, np.log10(2.0), 60001)])
    with np.errstate(divide="ignore"):
        log_dens = -kappa * s + 0.5 * (dim - 3) * (np.log(s) + np.log(2.0 - s))
    if dim == 3:
        log_dens = -kappa * s
    dens = np.exp(log_dens - log_dens.max())
    cdf = cumulative_trapezoid(dens, s, initial=0.0)
    return s, cdf / cdf[-1]


def one_minus_w(x: torch.Tensor, mu: torch.Tensor) -> np.ndarray:
    return (0.5 * (x - mu).square().sum(-1)).numpy()


@pytest.mark.parametrize("dim", [32, 512])
@pytest.mark.parametrize("kappa", [1.0, 10.0, 100.0, 1e3, 1e4, 1e5])
def test_sampler_ks(dim: int, kappa: float) -> None:
    mu = random_unit(dim, seed=dim)
    x = VonMisesFisher(mu, torch.tensor(kappa, dtype=f64)).sample(
        (3000,), generator=torch.Generator().manual_seed(int(kappa) + dim)
    )
    np.testing.assert_allclose(x.norm(dim=-1).numpy(), 1.0, atol=1e-12)
    grid, cdf = s_cdf(dim, kappa)
    result = scipy.stats.kstest(one_minus_w(x, mu), lambda v: np.interp(v, grid, cdf))
    assert result.pvalue > 1e-3, result


@pytest.mark.parametrize("kappa", [0.01, 1.0, 10.0, 1e4])
def test_sampler_d2_matches_scipy_von_mises(kappa: float) -> None:
    """D = 2 (Beta(½, ½) proposals, the Gamma α < 1 path): angles follow scipy's von Mises."""
    x = VonMisesFisher(torch.tensor([1.0, 0.0], dtype=f64), torch.tensor(kappa, dtype=f64)).sample(
        (3000,), generator=torch.Generator().manual_seed(0)
    )
    angles = torch.atan2(x[:, 1], x[:, 0]).numpy()
    assert scipy.stats.kstest(angles, scipy.stats.vonmises(kappa).cdf).pvalue > 1e-3


def test_ks_catches_wrong_kappa() -> None:
    """The KS oracle above has power: samples at κ = 110 fail against the κ = 100 CDF."""
    dim, mu = 32, random_unit(32, seed=0)
    x = VonMisesFisher(mu, torch.tensor(110.0, dtype=f64)).sample(
        (3000,), generator=torch.Generator().manual_seed(0)
    )
    grid, cdf = s_cdf(dim, 100.0)
    assert scipy.stats.kstest(one_minus_w(x, mu), lambda v: np.interp(v, grid, cdf)).pvalue < 1e-6


@pytest.mark.parametrize("dim", [3, 32, 512])
@pytest.mark.parametrize("kappa", [1e-3, 1.0, 50.0, 1e5])
def test_sampler_moments_of_w(dim: int, kappa: float) -> None:
    n = 20000
    mu = random_unit(dim, seed=7)
    x = VonMisesFisher(mu, torch.tensor(kappa, dtype=f64)).sample(
        (n,), generator=torch.Generator().manual_seed(1)
    )
    s = one_minus_w(x, mu)
    a, var = mp_mean_resultant_length(dim, kappa), mp_w_variance(dim, kappa)
    mean_w = 1.0 - s.mean()
    assert abs(mean_w - a) <= 5 * math.sqrt(var / n), (mean_w, a)
    centred = s - s.mean()
    var_hat = centred.var()
    se_var = math.sqrt(np.var(centred**2) / n)
    assert abs(var_hat - var) <= 5 * se_var, (var_hat, var)


def test_sampler_tangent_part_is_uniform() -> None:
    dim, kappa, n = 6, 5.0, 40000
    mu = random_unit(dim, seed=11)
    x = VonMisesFisher(mu, torch.tensor(kappa, dtype=f64)).sample(
        (n,), generator=torch.Generator().manual_seed(2)
    )
    w = x @ mu
    v = (x - w[:, None] * mu) / torch.sqrt(1 - w * w)[:, None]
    np.testing.assert_allclose(v.norm(dim=-1).numpy(), 1.0, atol=1e-9)
    assert (v @ mu).abs().max() < 1e-9
    se = 1.0 / math.sqrt((dim - 1) * n)
    assert v.mean(0).abs().max() < 5 * se
    second = (v.T @ v / n).numpy()
    expected = (np.eye(dim) - np.outer(mu, mu)) / (dim - 1)
    assert np.abs(second - expected).max() < 6 * math.sqrt(3.0 / n) / (dim - 1)
    a = mp_mean_resultant_length(dim, kappa)
    np.testing.assert_allclose(x.mean(0).numpy(), a * mu.numpy(), atol=5 / math.sqrt(n))


def test_sampler_per_row_kappa_and_float32() -> None:
    dim, n = 64, 8000
    kappas = [0.5, 100.0, 1e4]
    loc = torch.stack([random_unit(dim, seed=s) for s in range(3)])
    dist = VonMisesFisher(loc.float(), torch.tensor(kappas))
    x = dist.sample((n,), generator=torch.Generator().manual_seed(3))
    assert x.shape == (n, 3, dim) and x.dtype == torch.float32
    for j, k in enumerate(kappas):
        w = (x[:, j].double() @ loc[j]).numpy()
        a, var = mp_mean_resultant_length(dim, k), mp_w_variance(dim, k)
        assert abs(w.mean() - a) <= 5 * math.sqrt(var / n) + 1e-6, (k, w.mean(), a)


def test_sampler_is_deterministic_with_generator_and_max_rounds() -> None:
    dist = VonMisesFisher(random_unit(10, seed=0), torch.tensor([0.1, 3.0, 300.0], dtype=f64))
    a = dist.sample((50,), generator=torch.Generator().manual_seed(5))
    b = dist.sample((50,), generator=torch.Generator().manual_seed(5))
    c = dist.sample((50,), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = dist.sample((50,), generator=torch.Generator().manual_seed(5), max_rounds=3)
    e = dist.sample((50,), generator=torch.Generator().manual_seed(5), max_rounds=3)
    assert torch.equal(d, e)
    dim, kappa, mu = 32, 100.0, random_unit(32, seed=1)
    x = VonMisesFisher(mu, torch.tensor(kappa, dtype=f64)).sample(
        (3000,), generator=torch.Generator().manual_seed(7), max_rounds=2
    )
    grid, cdf = s_cdf(dim, kappa)
    assert scipy.stats.kstest(one_minus_w(x, mu), lambda v: np.interp(v, grid, cdf)).pvalue > 1e-3


# --------------------------------------------------------------------------------------------
# LogNormal and the delta density
# --------------------------------------------------------------------------------------------


def test_lognormal_log_prob_matches_scipy() -> None:
    r = torch.tensor([1e-6, 0.1, 1.0, 3.0, 1e4], dtype=f64)
    mu, sigma = torch.tensor(0.3, dtype=f64), torch.tensor(0.7, dtype=f64)
    ref = scipy.stats.lognorm.logpdf(r.numpy(), s=0.7, scale=math.exp(0.3))
    np.testing.assert_allclose(lognormal_log_prob(r, mu, sigma).numpy(), ref, rtol=1e-12)
    dist = LogNormalMagnitude(mu, sigma)
    np.testing.assert_allclose(dist.log_prob(r).numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(dist.log_prob_from_log(torch.log(r)).numpy(), ref, rtol=1e-12)
    samples = dist.sample((20000,), generator=torch.Generator().manual_seed(0))
    assert abs(torch.log(samples).mean().item() - 0.3) < 5 * 0.7 / math.sqrt(20000)


def test_delta_density_matches_explicit_formula_d3() -> None:
    mu = random_unit(3, seed=2)
    kappa, m, s = 4.0, -0.5, 0.6
    delta = torch.randn(100, 3, dtype=f64, generator=torch.Generator().manual_seed(0))
    r = delta.norm(dim=-1).numpy()
    u = (delta / delta.norm(dim=-1, keepdim=True)).numpy()
    ref = (
        scipy.stats.vonmises_fisher(mu.numpy(), kappa).logpdf(u)
        + scipy.stats.lognorm.logpdf(r, s=s, scale=math.exp(m))
        - 2 * np.log(r)
    )
    ours = delta_log_prob(
        delta, mu, torch.tensor(kappa, dtype=f64), torch.tensor(m, dtype=f64), torch.tensor(s, dtype=f64)
    )
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10)


def test_delta_density_integrates_to_one_d2_grid() -> None:
    """Cartesian Riemann sum in R²: checks the (D-1) log|Δ| Jacobian without polar coordinates."""
    mu = torch.tensor([math.cos(0.3), math.sin(0.3)], dtype=f64)
    kappa, m, s = 3.0, 0.0, 0.4
    h = 0.01
    axis = torch.arange(-12.0, 12.0 + h / 2, h, dtype=f64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    logp = delta_log_prob(
        grid, mu, torch.tensor(kappa, dtype=f64), torch.tensor(m, dtype=f64), torch.tensor(s, dtype=f64)
    )
    total = torch.exp(logp).sum().item() * h * h
    assert total == pytest.approx(1.0, abs=1e-4)


def test_delta_density_integrates_to_one_d3_importance_sampling() -> None:
    n, dim = 400_000, 3
    mu = random_unit(dim, seed=5)
    kappa, m, s = 2.0, 0.0, 0.5
    centre, scale = 0.5 * mu, 1.5
    g = torch.Generator().manual_seed(0)
    z = centre + scale * torch.randn(n, dim, generator=g, dtype=f64)
    log_q = torch.tensor(
        scipy.stats.multivariate_normal(centre.numpy(), scale**2 * np.eye(dim)).logpdf(z.numpy()), dtype=f64
    )
    logp = delta_log_prob(
        z, mu, torch.tensor(kappa, dtype=f64), torch.tensor(m, dtype=f64), torch.tensor(s, dtype=f64)
    )
    ratio = torch.exp(logp - log_q)
    se = ratio.std().item() / math.sqrt(n)
    assert abs(ratio.mean().item() - 1.0) <= 5 * se and se < 0.01


def test_delta_nll_per_dim_is_comparable_with_gaussian() -> None:
    """Isotropic Gaussian deltas: an (almost) uniform vMF × a fitted LogNormal costs almost no more
    nats/dim than the true Gaussian (whose NLL/dim is ½ log(2πeσ²)), and never clearly less."""
    dim, n, sigma = 64, 20000, 0.3
    delta = sigma * torch.randn(n, dim, dtype=f64, generator=torch.Generator().manual_seed(0))
    log_r = delta.norm(dim=-1).log()
    m, s = log_r.mean(), log_r.std()
    nll = -delta_log_prob(delta, random_unit(dim, seed=1), torch.tensor(1e-3, dtype=f64), m, s) / dim
    gauss = 0.5 * math.log(2 * math.pi * math.e * sigma**2)
    gap = nll.mean().item() - gauss
    assert -3 * nll.std().item() / math.sqrt(n) < gap < 0.01, gap


def test_delta_zero_is_finite_with_finite_gradients() -> None:
    delta = torch.zeros(2, 4, dtype=f64, requires_grad=True)
    loc = random_unit(4, seed=0).expand(2, 4).clone().requires_grad_(True)
    kappa = torch.tensor([1.0, 50.0], dtype=f64, requires_grad=True)
    m = torch.zeros(2, dtype=f64, requires_grad=True)
    s = torch.ones(2, dtype=f64, requires_grad=True)
    out = delta_log_prob(delta, loc, kappa, m, s, eps=1e-8)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for t in (delta, loc, kappa, m, s):
        assert torch.isfinite(t.grad).all()


# --------------------------------------------------------------------------------------------
# Diagonal Gaussian mixture
# --------------------------------------------------------------------------------------------


def test_mdn_single_component_is_gaussian() -> None:
    g = torch.Generator().manual_seed(0)
    means = torch.randn(1, 4, dtype=f64, generator=g)
    scales = torch.rand(1, 4, dtype=f64, generator=g) + 0.1
    x = torch.randn(10, 4, dtype=f64, generator=g)
    mix = DiagonalGaussianMixture(torch.zeros(1, dtype=f64), means, scales)
    ref = scipy.stats.multivariate_normal(means[0].numpy(), np.diag(scales[0].numpy() ** 2)).logpdf(x.numpy())
    np.testing.assert_allclose(mix.log_prob(x).numpy(), ref, rtol=1e-12)


def test_mdn_identical_components_and_logit_shift() -> None:
    g = torch.Generator().manual_seed(1)
    means = torch.randn(3, 5, dtype=f64, generator=g)
    scales = torch.rand(3, 5, dtype=f64, generator=g) + 0.2
    x = torch.randn(7, 5, dtype=f64, generator=g)
    logits = torch.randn(3, dtype=f64, generator=g)
    one = DiagonalGaussianMixture(torch.zeros(1, dtype=f64), means[:1], scales[:1]).log_prob(x)
    same = DiagonalGaussianMixture(logits, means[:1].expand(3, 5), scales[:1].expand(3, 5)).log_prob(x)
    np.testing.assert_allclose(same.numpy(), one.numpy(), rtol=1e-12)
    a = DiagonalGaussianMixture(logits, means, scales).log_prob(x)
    b = DiagonalGaussianMixture(logits + 123.4, means, scales).log_prob(x)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)


def test_mdn_two_component_hand_value() -> None:
    # weights softmax([0, log 3]) = (0.25, 0.75); N(1; 0, 1) = e^{-1/2}/√(2π); N(1; 2, 0.5²) = e^{-2}/(0.5 √(2π)).
    mix = DiagonalGaussianMixture(
        torch.tensor([0.0, math.log(3.0)], dtype=f64),
        torch.tensor([[0.0], [2.0]], dtype=f64),
        torch.tensor([[1.0], [0.5]], dtype=f64),
    )
    expected = math.log(
        0.25 * math.exp(-0.5) / math.sqrt(2 * math.pi)
        + 0.75 * math.exp(-2.0) / (0.5 * math.sqrt(2 * math.pi))
    )
    assert mix.log_prob(torch.tensor([1.0], dtype=f64)).item() == pytest.approx(expected, rel=1e-14)
    assert mix.mean.item() == pytest.approx(0.75 * 2.0, rel=1e-14)
    assert mix.variance.item() == pytest.approx(0.25 * 1.0 + 0.75 * (0.25 + 4.0) - 1.5**2, rel=1e-12)


def test_mdn_sampling_moments_and_determinism() -> None:
    mix = DiagonalGaussianMixture(
        torch.tensor([0.0, math.log(3.0)], dtype=f64),
        torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=f64),
        torch.tensor([[1.0, 0.3], [0.5, 0.2]], dtype=f64),
    )
    n = 100_000
    x = mix.sample((n,), generator=torch.Generator().manual_seed(0))
    assert x.shape == (n, 2)
    se = torch.sqrt(mix.variance / n)
    assert ((x.mean(0) - mix.mean).abs() < 5 * se).all()
    assert ((x.var(0) / mix.variance - 1).abs() < 0.03).all()
    y = mix.sample((5,), generator=torch.Generator().manual_seed(9))
    assert torch.equal(y, mix.sample((5,), generator=torch.Generator().manual_seed(9)))


def test_mdn_scale_floor_is_nan_free() -> None:
    sigma_min = 1e-3
    raw = torch.full((4, 3, 8), -30.0, requires_grad=True)
    scales = mdn_scales(raw, sigma_min)
    assert torch.all(scales >= sigma_min)
    assert torch.allclose(scales, torch.full_like(scales, sigma_min))
    logits = torch.randn(4, 3, requires_grad=True)
    means = torch.randn(4, 3, 8, requires_grad=True)
    x = 5.0 * torch.randn(4, 8)  # thousands of σ from every mean
    out = DiagonalGaussianMixture(logits, means, scales).log_prob(x)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for t in (raw, logits, means):
        assert torch.isfinite(t.grad).all()
    with pytest.raises(ValueError, match="scales"):
        DiagonalGaussianMixture(logits, means, torch.zeros(4, 3, 8), validate_args=True)


# --------------------------------------------------------------------------------------------
# soft_clamp and log |S^{D-1}|
# --------------------------------------------------------------------------------------------

LO, HI = -2.0, 12.0  # the vMF head's log κ range


def mp_soft_clamp(x: float, lo: float, hi: float) -> tuple[float, float]:
    """``lo + log(1 + e^{x-lo}) - log(1 + e^{x-hi})`` and its derivative ``σ(x-lo) - σ(x-hi)``, 50 digits."""
    with mpmath.workdps(50):
        x, lo, hi = mpmath.mpf(x), mpmath.mpf(lo), mpmath.mpf(hi)
        value = lo + mpmath.log1p(mpmath.exp(x - lo)) - mpmath.log1p(mpmath.exp(x - hi))
        grad = 1 / (1 + mpmath.exp(lo - x)) - 1 / (1 + mpmath.exp(hi - x))
        return float(value), float(grad)


@pytest.mark.parametrize("dtype", [torch.float32, f64], ids=str)
def test_soft_clamp_is_nearly_the_identity_inside(dtype: torch.dtype) -> None:
    x = torch.linspace(LO + 6, HI - 6, 101, dtype=dtype)
    margin = torch.minimum(x - LO, HI - x)
    # soft_clamp(x) - x = softplus(lo - x) - softplus(x - hi), each at most e^{-margin}
    assert torch.all((soft_clamp(x, LO, HI) - x).abs() <= 2 * torch.exp(-margin) + 1e-5)
    with pytest.raises(ValueError):
        soft_clamp(x, 1.0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, f64], ids=str)
@pytest.mark.parametrize(
    "region",
    [
        pytest.param((LO - 200, HI + 5), id="below-and-inside"),
        pytest.param((HI, HI + 200), id="above"),
    ],
)
def test_soft_clamp_is_monotone_within_its_bounds_and_matches_mpmath(
    dtype: torch.dtype, region: tuple[float, float]
) -> None:
    """Values stay in [lo, hi] and never decrease (the naive form overshoots hi by an ulp above it and is not
    monotone there: float32 from x ≈ hi + 18, float64 from x ≈ hi + 50)."""
    x = torch.linspace(*region, 4001, dtype=dtype)
    y = soft_clamp(x, LO, HI)
    ref = np.array([mp_soft_clamp(v, LO, HI)[0] for v in x.double().tolist()[::40]])
    np.testing.assert_allclose(y.double().numpy()[::40], ref, rtol=0, atol=1e-5)
    assert torch.all((y >= LO) & (y <= HI)) and torch.all(torch.diff(y) >= 0)


HUGE = [1e3, 1e6, 1e8, 1e12, 1e30]


@pytest.mark.parametrize(
    ("dtype", "magnitude"),
    [pytest.param(dt, m) for dt in (torch.float32, f64) for m in HUGE],
    ids=lambda v: str(v),
)
def test_soft_clamp_saturates_at_its_bounds_for_huge_inputs(dtype: torch.dtype, magnitude: float) -> None:
    y = soft_clamp(torch.tensor([magnitude, -magnitude], dtype=dtype), LO, HI)
    assert torch.isfinite(y).all() and torch.all((y >= LO) & (y <= HI))
    assert y[0].item() == pytest.approx(HI, abs=1e-5) and y[1].item() == pytest.approx(LO, abs=1e-5)


_GRAD_POINTS = [LO - 50, LO - 30, LO - 10, LO, 0.5 * (LO + HI), HI, HI + 10, HI + 30, HI + 50]


@pytest.mark.parametrize("dtype", [torch.float32, f64], ids=str)
@pytest.mark.parametrize(
    "x",
    _GRAD_POINTS,
)
def test_soft_clamp_gradient_is_positive_outside_the_bounds(dtype: torch.dtype, x: float) -> None:
    """Unlike a hard clamp (gradient 0 outside [lo, hi]) the gradient σ(x-lo) - σ(x-hi) stays > 0: 50 nats past
    a bound it is ~e^{-50} ≈ 2e-22, representable in float32."""
    t = torch.tensor([x], dtype=dtype, requires_grad=True)
    (grad,) = torch.autograd.grad(soft_clamp(t, LO, HI).sum(), t)
    _, ref = mp_soft_clamp(x, LO, HI)
    assert 0.0 < grad.item() <= 1.0
    assert grad.item() == pytest.approx(ref, rel=1e-2 if dtype == torch.float32 else 1e-6)


def test_hard_clamp_comparison_has_no_gradient_outside() -> None:
    """The failure mode soft_clamp exists to avoid (the reference's clamps): zero gradient past the bounds."""
    t = torch.tensor([LO - 5, HI + 5], requires_grad=True)
    (grad,) = torch.autograd.grad(t.clamp(LO, HI).sum(), t)
    assert torch.equal(grad, torch.zeros(2))
    (soft,) = torch.autograd.grad(soft_clamp(t, LO, HI).sum(), t)
    assert torch.all(soft > 0)


@pytest.mark.parametrize("dim", [1, 2, 3, 4, 7, 64, 512])
def test_log_sphere_area_matches_gamma_formula(dim: int) -> None:
    # |S^{D-1}| = 2 π^{D/2} / Γ(D/2): 2 points (D=1), 2π (D=2), 4π (D=3), 2π² (D=4).
    expected = math.log(2.0) + 0.5 * dim * math.log(math.pi) - scipy.special.gammaln(0.5 * dim)
    assert log_sphere_area(dim) == pytest.approx(expected, rel=1e-13, abs=1e-13)
    known = {1: 2.0, 2: 2 * math.pi, 3: 4 * math.pi, 4: 2 * math.pi**2}
    if dim in known:
        assert log_sphere_area(dim) == pytest.approx(math.log(known[dim]), rel=1e-14)
    with pytest.raises(ValueError):
        log_sphere_area(0)
