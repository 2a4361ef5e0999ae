"""The score model, its DSM loss and the Langevin / Tweedie corrections, against Gaussian closed forms.

For data ``x ~ N(μ, s² I)`` and noise ``z = x + σ ε``, everything is known: the smoothed distribution is
``N(μ, (s² + σ²) I)`` with score ``-(z - μ) / (s² + σ²)``; Tweedie's posterior mean is
``E[x | z] = (s² z + σ² μ) / (s² + σ²)``; the σ²-weighted DSM loss of the exact score has expectation
``D s² / (s² + σ²)``; and unadjusted Langevin with step ``h`` on ``N(m, v)`` is stationary at ``N(m, v / (1 -
h / (2v)))``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latentdyn.diagnostics.corrections import LangevinCorrection, TweedieCorrection
from latentdyn.diagnostics.injection import InjectionConfig, merge_modes, run_injection
from latentdyn.models.score import ScoreModule, ScoreNetwork, SigmaEmbedding, dsm_loss, sample_sigma

MU = torch.tensor([0.5, -1.0, 2.0])
S2 = 0.3  # data variance per dimension


def gaussian_score(z: torch.Tensor, sigma: float, context: torch.Tensor | None = None) -> torch.Tensor:
    """Exact score of N(MU, S2 I) smoothed by N(0, sigma² I)."""
    return -(z - MU) / (S2 + float(sigma) ** 2)


class ExactScoreNet(torch.nn.Module):
    """A 'network' that returns the exact smoothed score (per-row σ), for the DSM loss's expectation."""

    def forward(
        self, z: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        return -(z - MU) / (S2 + sigma**2)


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_tweedie_step_with_the_exact_score_is_the_closed_form(sigma: float, scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = MU + math.sqrt(S2) * torch.randn(64, 3, generator=g)
    z = x + sigma * torch.randn(64, 3, generator=g)
    out = TweedieCorrection(score=gaussian_score, sigma=sigma, scale=scale)(z)
    shrink = sigma**2 / (S2 + sigma**2)
    # z moves toward the mean by the fraction scale·σ²/(s²+σ²); scale 1 gives the posterior mean E[x | z].
    torch.testing.assert_close(out, z - scale * shrink * (z - MU))
    if scale == 1.0:
        torch.testing.assert_close(out, (S2 * z + sigma**2 * MU) / (S2 + sigma**2))


def test_langevin_with_zero_step_or_zero_steps_leaves_the_state_unchanged() -> None:
    z = torch.randn(10, 3)
    for corr in (
        LangevinCorrection(score=gaussian_score, n_steps=5, step_size=0.0, sigma=0.1),
        LangevinCorrection(score=gaussian_score, n_steps=5, step_size=0.0, sigma=0.1, noise=True),
        LangevinCorrection(score=gaussian_score, n_steps=0, step_size=0.1, sigma=0.1, noise=True),
    ):
        assert torch.equal(corr(z), z)


def test_langevin_without_noise_is_gradient_ascent_on_the_smoothed_log_density() -> None:
    sigma, eta, n = 0.25, 0.5, 4
    z = torch.randn(8, 3)
    expected = z.clone()
    h = eta * sigma**2
    for _ in range(n):  # z <- z + h (μ - z) / (s² + σ²): the distance to μ shrinks geometrically
        expected = expected + h * (MU - expected) / (S2 + sigma**2)
    out = LangevinCorrection(score=gaussian_score, n_steps=n, step_size=eta, sigma=sigma)(z)
    torch.testing.assert_close(out, MU + (1 - h / (S2 + sigma**2)) ** n * (z - MU))
    torch.testing.assert_close(out, expected)


def test_langevin_with_noise_samples_the_ula_stationary_distribution() -> None:
    # 1-D target N(m, v) (the exact score at σ), step h = η σ²: ULA is stationary at N(m, v / (1 - h / (2v))).
    m, v, sigma, eta = 0.7, 1.0, 1.0, 0.2
    h = eta * sigma**2

    def score(z: torch.Tensor, s: float, context: torch.Tensor | None = None) -> torch.Tensor:
        return -(z - m) / v

    corr = LangevinCorrection(score=score, n_steps=150, step_size=eta, sigma=sigma, noise=True, seed=3)
    out = corr(torch.full((40000, 1), m, dtype=torch.float64))
    var = float(out.var())
    expected = v / (1 - h / (2 * v))  # 1.111..., against v = 1 for an exact sampler
    assert abs(float(out.mean()) - m) < 0.02
    assert var == pytest.approx(expected, rel=0.03)
    # The noise is seeded: the same correction config gives the same draws.
    again = LangevinCorrection(score=score, n_steps=150, step_size=eta, sigma=sigma, noise=True, seed=3)
    assert torch.equal(again(torch.full((40000, 1), m, dtype=torch.float64)), out)


@pytest.mark.parametrize("sigma", [0.1, 0.5])
def test_dsm_loss_of_the_exact_score_has_the_closed_form_expectation(sigma: float) -> None:
    g = torch.Generator().manual_seed(1)
    n = 200_000
    x = MU + math.sqrt(S2) * torch.randn(n, 3, generator=g)
    eps = torch.randn(n, 3, generator=g)
    sig = torch.full((n, 1), sigma)
    loss = float(dsm_loss(ExactScoreNet(), x, sig, eps))
    assert loss == pytest.approx(3 * S2 / (S2 + sigma**2), rel=0.01)
    # Any other score costs more: twice the exact one adds E‖σ s*‖² = D σ² / (s² + σ²) in expectation.

    class Doubled(torch.nn.Module):
        def forward(self, z, s, c=None):
            return 2 * ExactScoreNet()(z, s)

    doubled = float(dsm_loss(Doubled(), x, sig, eps))
    assert doubled == pytest.approx(loss + 3 * sigma**2 / (S2 + sigma**2), rel=0.02)


def test_sigma_is_log_uniform_on_its_range() -> None:
    sig = sample_sigma(100_000, 0.01, 1.0, torch.Generator().manual_seed(0))
    assert float(sig.min()) >= 0.01 and float(sig.max()) <= 1.0
    # log σ uniform on [log 0.01, 0]: its quartiles are at σ = 0.01^(3/4), 0.1, 0.01^(1/4).
    q = np.quantile(sig.log10().numpy(), [0.25, 0.5, 0.75])
    np.testing.assert_allclose(q, [-1.5, -1.0, -0.5], atol=0.02)


def test_network_shapes_conditioning_and_sigma_embedding() -> None:
    net = ScoreNetwork(dim=5, hidden_dim=16, n_layers=2, sigma_embed_dim=8, context_frames=3)
    z, ctx = torch.randn(4, 5), torch.randn(4, 3, 5)
    assert net(z, torch.full((4, 1), 0.1), ctx).shape == (4, 5)
    assert net(z, 0.1, ctx).shape == (4, 5)  # a scalar σ for the batch
    with pytest.raises(ValueError, match="conditional"):
        net(z, 0.1)
    with pytest.raises(ValueError, match=r"\(B, 3, 5\)"):
        net(z, 0.1, torch.randn(4, 2, 5))
    # The condition changes the output; an unconditional model has no context projection.
    assert not torch.allclose(net(z, 0.1, ctx), net(z, 0.1, ctx + 1))
    assert ScoreNetwork(dim=5, hidden_dim=16).context_proj is None
    emb = SigmaEmbedding(8, 0.01, 1.0)
    e = emb(torch.tensor([[0.01], [0.1], [1.0]]))
    assert e.shape == (3, 8) and torch.isfinite(e).all()
    assert torch.cdist(e, e)[np.triu_indices(3, 1)].min() > 0.5  # noise levels a decade apart are told apart


def test_score_module_picks_the_reference_width_by_dimension() -> None:
    assert ScoreModule(dim=512).hparams.hidden_dim == 1024
    assert ScoreModule(dim=32).hparams.hidden_dim == 512
    assert ScoreModule(dim=32, hidden_dim=64).net.output_proj.in_features == 64
    with pytest.raises(ValueError, match="sigma_min"):
        ScoreModule(dim=4, sigma_min=1.0, sigma_max=0.5)


def test_a_short_dsm_fit_learns_the_gaussian_score() -> None:
    torch.manual_seed(0)
    model = ScoreModule(dim=3, hidden_dim=64, n_layers=2, sigma_embed_dim=16, sigma_min=0.05, sigma_max=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(600):
        x = MU + math.sqrt(S2) * torch.randn(256, 3)
        loss = model._loss({"target": x, "context": x[:, None]}, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    z = MU + math.sqrt(S2 + 0.25) * torch.randn(2000, 3)
    with torch.no_grad():
        learned = model.score(z, 0.5)
    exact = gaussian_score(z, 0.5)
    cos = torch.nn.functional.cosine_similarity(learned, exact, dim=1)
    assert float(cos.mean()) > 0.95
    rel = float((learned - exact).norm() / exact.norm())
    assert rel < 0.25


# --------------------------------------------------------------------------- in the injection diagnostic


def _model_and_baseline():
    """A lag-1 model predicting a constant delta, and a standard-normal baseline (test_injection's helpers)."""
    from tests.test_injection import ConstantModel, _gaussian_baseline

    return ConstantModel(3, 2, 1, step=torch.full((3,), 0.2)), _gaussian_baseline(3)


def _inputs():
    cfg = InjectionConfig(modes=["D_rollout"], k_steps=6, bank_size=0, inject_after_periodic=[2])
    segments = torch.randn(5, 2 + cfg.k_steps, 3, generator=torch.Generator().manual_seed(0))
    return cfg, segments


def test_an_identity_correction_reproduces_d_rollout_bit_for_bit_and_modes_merge() -> None:
    cfg, segments = _inputs()
    model, baseline = _model_and_baseline()
    plain = run_injection(model, segments, cfg, baseline)
    zero = LangevinCorrection(score=gaussian_score, n_steps=3, step_size=0.0, sigma=0.1)
    same = run_injection(model, segments, cfg, baseline, correction=zero)
    for name, values in plain.per_start.items():
        np.testing.assert_array_equal(values, same.per_start[name], err_msg=name)
    pulled = run_injection(
        model, segments, cfg, baseline, correction=TweedieCorrection(score=gaussian_score, sigma=1.0)
    )
    merged = merge_modes([("D_rollout", plain, "D_rollout"), ("D_corrected", pulled, "D_rollout")])
    assert merged.modes == ["D_rollout", "D_corrected"]
    np.testing.assert_array_equal(merged.per_start["state_err"][0], plain.per_start["state_err"][0])
    np.testing.assert_array_equal(merged.per_start["state_err"][1], pulled.per_start["state_err"][0])
    assert not np.array_equal(merged.per_start["state_err"][1], merged.per_start["state_err"][0])
    assert {r["mode"] for r in merged.per_step} == {"D_rollout", "D_corrected"}
    summary = merged.to_dict()["modes"]
    assert set(summary) == {"D_rollout", "D_corrected"}
    assert "D_corrected/state_err_at_K" in merged.to_metrics()
    with pytest.raises(ValueError, match="repeat"):
        merge_modes([("D_rollout", plain, "D_rollout"), ("D_rollout", pulled, "D_rollout")])
    fewer = run_injection(model, segments[:3], cfg, baseline)
    with pytest.raises(ValueError, match="start points"):
        merge_modes([("a", plain, "D_rollout"), ("b", fewer, "D_rollout")])


def test_corrections_refuse_bad_settings() -> None:
    with pytest.raises(ValueError, match="sigma"):
        TweedieCorrection(score=gaussian_score, sigma=0.0)
    with pytest.raises(ValueError, match="sigma"):
        LangevinCorrection(score=gaussian_score, sigma=-1.0)
    with pytest.raises(ValueError, match="n_steps"):
        LangevinCorrection(score=gaussian_score, n_steps=1.5)
    with pytest.raises(ValueError, match="step_size"):
        LangevinCorrection(score=gaussian_score, step_size=float("nan"))
