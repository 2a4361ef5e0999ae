"""The β-VAE model (Exp 5): its losses against closed forms, torch.distributions, numpy STFTs and plain loops;
the bottleneck's initialisation and sampling statistics; the Lightning module over a mel base; checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.integrate
import scipy.signal
import scipy.stats
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from latentdyn.models.betavae import (
    BetaVAE,
    BetaVAEModule,
    LatentPredictor,
    delta_windows,
    gaussian_kl,
    load_betavae,
    multi_resolution_stft_loss,
    predictability_loss,
    smoothness_loss,
)

MEL_BASE = {
    "_target_": "latentdyn.representations.mel.MelRepresentation",
    "sample_rate": 24000,
    "frame_rate": 12.5,
    "n_mels": 16,
    "griffin_lim_iters": 2,
}
SIZES = (256, 512, 1024, 2048)


# --- gaussian_kl -------------------------------------------------------------------------------------------
def test_kl_is_zero_at_the_prior() -> None:
    """A posterior equal to N(0, 1) everywhere has no divergence from the prior."""
    zeros = torch.zeros(3, 4, 5)
    assert gaussian_kl(zeros, zeros).item() == 0.0


def test_kl_matches_torch_distributions() -> None:
    """Summed over dimensions and frames, averaged over the batch, against torch.distributions' closed form."""
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 4, 7, generator=gen, dtype=torch.float64) * 2
    logvar = torch.randn(3, 4, 7, generator=gen, dtype=torch.float64)
    oracle = kl_divergence(Normal(mu, (logvar / 2).exp()), Normal(0.0, 1.0)).sum(dim=(1, 2)).mean()
    torch.testing.assert_close(gaussian_kl(mu, logvar), oracle, rtol=1e-12, atol=1e-12)


def test_kl_scalar_matches_numerical_integral() -> None:
    """One scalar posterior against the integral of p log(p / q) (scipy) and the textbook closed form."""
    m, s = 0.7, 0.4
    p, q = scipy.stats.norm(m, s), scipy.stats.norm(0.0, 1.0)
    integral, _ = scipy.integrate.quad(
        lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), m - 20 * s, m + 20 * s
    )
    closed = -math.log(s) + (s**2 + m**2) / 2 - 0.5
    got = gaussian_kl(
        torch.tensor([[[m]]], dtype=torch.float64), torch.tensor([[[2 * math.log(s)]]], dtype=torch.float64)
    )
    assert got.item() == pytest.approx(integral, rel=1e-7)
    assert got.item() == pytest.approx(closed, rel=1e-12)


# --- smoothness_loss ---------------------------------------------------------------------------------------
def test_smoothness_of_constant_latents_is_zero() -> None:
    """Latents that never move have no frame-to-frame step."""
    z = torch.randn(2, 3, 1).expand(2, 3, 10)
    assert smoothness_loss(z).item() == 0.0


def test_smoothness_of_a_ramp_is_mean_squared_slope() -> None:
    """z[:, d, t] = a_d + b_d t steps by b_d every frame, so the loss is mean_d(b_d^2)."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(5, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    t = torch.arange(9, dtype=torch.float64)
    z = (a[:, None] + b[:, None] * t[None, :]).expand(3, 5, 9)
    assert smoothness_loss(z).item() == pytest.approx(float(b.square().mean()), rel=1e-12)


def test_smoothness_needs_two_frames() -> None:
    """A single frame has no step to measure."""
    with pytest.raises(ValueError):
        smoothness_loss(torch.zeros(2, 3, 1))


# --- delta_windows and the predictability loss -------------------------------------------------------------
def _loop_windows(z: torch.Tensor, window: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The oracle: batch-major, then every t in [window, T): frames z_{t-W} .. z_{t-1} one after another
    (frame-major), and the delta z_t - z_{t-1}."""
    contexts, targets = [], []
    for b in range(z.shape[0]):
        for t in range(window, z.shape[2]):
            contexts.append(z[b, :, t - window : t].T.reshape(-1))
            targets.append(z[b, :, t] - z[b, :, t - 1])
    return contexts, targets


@pytest.mark.parametrize(("window", "frames"), [(1, 2), (3, 7), (8, 12), (4, 5)])
def test_delta_windows_match_a_loop(window: int, frames: int) -> None:
    """Contexts and targets row by row against a plain loop (row order: all t of batch 0 first)."""
    gen = torch.Generator().manual_seed(window * 100 + frames)
    z = torch.randn(3, 4, frames, generator=gen)
    contexts, targets = delta_windows(z, window)
    want_c, want_t = _loop_windows(z, window)
    assert contexts.shape == (3 * (frames - window), window * 4)
    assert targets.shape == (3 * (frames - window), 4)
    torch.testing.assert_close(contexts, torch.stack(want_c), rtol=0, atol=0)
    torch.testing.assert_close(targets, torch.stack(want_t), rtol=0, atol=0)


def test_delta_windows_row_order_on_labelled_frames() -> None:
    """With z[b, d, t] = 100 b + 10 t + d the value names its origin, so order mistakes are readable."""
    b, d, t = torch.meshgrid(torch.arange(2), torch.arange(3), torch.arange(5), indexing="ij")
    z = (100 * b + 10 * t + d).float()
    contexts, targets = delta_windows(z, 2)
    # Row 0: batch 0, t = 2, frames 0 and 1; row 3: batch 1, t = 2.
    assert contexts[0].tolist() == [0, 1, 2, 10, 11, 12]
    assert contexts[2].tolist() == [20, 21, 22, 30, 31, 32]
    assert contexts[3].tolist() == [100, 101, 102, 110, 111, 112]
    assert torch.all(targets == 10)


@pytest.mark.parametrize("frames", [0, 3, 8])
def test_delta_windows_empty_when_not_longer_than_window(frames: int) -> None:
    """T <= W leaves no target, and the predictability loss is then 0."""
    z = torch.randn(2, 4, frames)
    contexts, targets = delta_windows(z, 8)
    assert contexts.shape == (0, 32)
    assert targets.shape == (0, 4)
    assert predictability_loss(z, LatentPredictor(4, 8), 8).item() == 0.0


class _TrueDelta(nn.Module):
    """Predicts z_t - z_{t-1} as z_{t-1} - z_{t-2}, read from a frame-major context: exact on ramps."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, contexts: torch.Tensor) -> torch.Tensor:
        return contexts[:, -self.dim :] - contexts[:, -2 * self.dim : -self.dim]


def _ramps(batch: int, dim: int, frames: int, gen: torch.Generator) -> torch.Tensor:
    """``(batch, dim, frames)`` latents z_t = a + b t, a ~ N(0, 1) and b ~ U(-1/4, 1/4) per sequence and dimension."""
    a = torch.randn(batch, dim, 1, generator=gen)
    b = (torch.rand(batch, dim, 1, generator=gen) - 0.5) / 2
    return a + b * torch.arange(frames, dtype=torch.float32)


def test_predictability_is_zero_for_the_true_delta() -> None:
    """A predictor that returns the true delta has no error (dyadic ramps, so float32 steps are exact)."""
    gen = torch.Generator().manual_seed(2)
    a = torch.randint(-8, 9, (3, 4, 1), generator=gen) / 4
    b = torch.randint(-4, 5, (3, 4, 1), generator=gen) / 8
    z = a + b * torch.arange(16, dtype=torch.float32)
    assert predictability_loss(z, _TrueDelta(4), 8).item() == 0.0
    # A wrong frame order (the context read dimension-major) would not be exact.
    assert predictability_loss(z, LatentPredictor(4, 8), 8).item() > 0.0


def test_predictor_learns_linear_trajectories() -> None:
    """On ramps the delta is the constant slope, recoverable from the window: 400 AdamW steps (cosine-decayed
    learning rate) on fresh ramps drive the predictability loss on held-out ramps below 1e-3, where predicting
    zero scores E[b^2] = 1/48 ~ 0.02."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    predictor = LatentPredictor(4, 8)
    opt = torch.optim.AdamW(predictor.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 400)
    for _ in range(400):
        loss = predictability_loss(_ramps(32, 4, 12, gen), predictor, 8)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    held = _ramps(256, 4, 12, gen)
    with torch.no_grad():
        learned = predictability_loss(held, predictor, 8).item()
    assert delta_windows(held, 8)[1].square().mean().item() > 0.01  # what predicting zero would score
    assert learned < 1e-3


# --- multi_resolution_stft_loss ----------------------------------------------------------------------------
def _stft_mag_oracle(x: np.ndarray, n_fft: int) -> np.ndarray:
    """|STFT| of ``(B, S)`` as numpy computes it: reflect-pad n_fft / 2 each side, periodic Hann, hop n_fft / 4."""
    hop = n_fft // 4
    padded = np.pad(x, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    window = scipy.signal.get_window("hann", n_fft)  # periodic, as torch.hann_window
    n_frames = 1 + (padded.shape[1] - n_fft) // hop
    frames = np.stack([padded[:, i * hop : i * hop + n_fft] * window for i in range(n_frames)], axis=-1)
    return np.abs(np.fft.rfft(frames, axis=1))  # (B, n_fft // 2 + 1, frames)


def _mr_stft_oracle(wave: np.ndarray, estimate: np.ndarray) -> float:
    total = float(np.mean(np.abs(estimate - wave)))
    for n_fft in SIZES:
        mag, mag_hat = _stft_mag_oracle(wave, n_fft), _stft_mag_oracle(estimate, n_fft)
        total += float(np.mean(np.abs(mag_hat - mag)))
        total += float(np.mean(np.abs(np.log(np.maximum(mag_hat, 1e-5)) - np.log(np.maximum(mag, 1e-5)))))
    return total


def test_stft_loss_of_identical_waves_is_zero() -> None:
    wave = torch.randn(2, 4000)
    assert multi_resolution_stft_loss(wave, wave.clone()).item() == 0.0


def test_stft_loss_matches_numpy_oracle() -> None:
    """Against a numpy STFT (float64) built from the definition. The target is silent over a stretch where the
    estimate only hisses (|S| ~ 1e-3), so the log term there depends on the 1e-5 floor."""
    rng = np.random.default_rng(4)
    wave = rng.standard_normal((2, 5000)) * 0.3
    wave[:, 1000:3500] = 0.0
    estimate = wave + rng.standard_normal((2, 5000)) * 0.05
    estimate[:, 1000:3500] = rng.standard_normal((2, 2500)) * 1e-4
    got = multi_resolution_stft_loss(torch.from_numpy(wave).float(), torch.from_numpy(estimate).float())
    assert got.item() == pytest.approx(_mr_stft_oracle(wave, estimate), rel=2e-3)


def test_stft_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        multi_resolution_stft_loss(torch.zeros(2, 4000), torch.zeros(2, 3999))


# --- BetaVAE -----------------------------------------------------------------------------------------------
def test_logvar_projection_starts_at_minus_two() -> None:
    """Weight 0 and bias -2: log sigma^2 = -2 for any input, so early samples stay near the mean."""
    vae = BetaVAE(base_dim=6, latent_dim=3)
    assert torch.all(vae.logvar_proj.weight == 0)
    assert torch.all(vae.logvar_proj.bias == -2.0)
    mu, logvar = vae.posterior(torch.randn(2, 6, 9) * 50)
    assert mu.shape == logvar.shape == (2, 3, 9)
    assert torch.all(logvar == -2.0)
    assert vae.to_base(mu).shape == (2, 6, 9)


def test_sample_has_posterior_mean_and_std() -> None:
    """Over 20000 draws, the empirical mean and std of each cell match mu and e^(logvar / 2)."""
    torch.manual_seed(5)
    mu = torch.tensor([[-1.0, 0.0, 2.5], [0.3, 4.0, -2.0]])
    logvar = torch.tensor([[-2.0, 0.0, 1.0], [-4.0, 0.5, 2.0]])
    n = 20000
    draws = BetaVAE.sample(mu.expand(n, 2, 3), logvar.expand(n, 2, 3))
    std = (logvar / 2).exp()
    # Standard errors: std / sqrt(n) for the mean, about std / sqrt(2n) for the std; 5 of them is generous.
    assert torch.all((draws.mean(0) - mu).abs() < 5 * std / math.sqrt(n))
    assert torch.all((draws.std(0) - std).abs() < 5 * std / math.sqrt(2 * n))


def test_sample_is_differentiable_in_both_parameters() -> None:
    mu = torch.zeros(2, 3, 4, requires_grad=True)
    logvar = torch.zeros(2, 3, 4, requires_grad=True)
    BetaVAE.sample(mu, logvar).sum().backward()
    assert mu.grad is not None and logvar.grad is not None and logvar.grad.abs().sum() > 0


# --- BetaVAEModule over a mel base -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wave() -> torch.Tensor:
    return torch.randn(2, 1, 24000, generator=torch.Generator().manual_seed(6)) * 0.1


def test_module_over_mel_reconstructs_latents(wave: torch.Tensor) -> None:
    """Mel decodes with Griffin-Lim (no network), so ``auto`` reconstructs in the latent space."""
    torch.manual_seed(0)
    module = BetaVAEModule(base=MEL_BASE, latent_dim=4, dec_hidden_dim=32)
    assert module.reconstruction == "latent"
    assert module.predictor is None and module.vae.decoder is None
    terms = module.losses(wave)
    assert set(terms) == {"loss", "recon", "kl", "smooth"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in terms.values())
    # The total is the weighted sum (beta 0.01, lambda_smooth 0).
    torch.testing.assert_close(terms["loss"], terms["recon"] + 0.01 * terms["kl"])
    # No base weights in the state (it is not a submodule).
    assert not any(k.startswith("base") for k in module.state_dict())


def test_module_with_predictability_loss(wave: torch.Tensor) -> None:
    torch.manual_seed(0)
    module = BetaVAEModule(
        base=MEL_BASE, latent_dim=4, dec_hidden_dim=32, lambda_pred=0.5, predictor={"window": 4, "hidden": 16}
    )
    assert isinstance(module.predictor, LatentPredictor)
    terms = module.losses(wave)
    assert set(terms) == {"loss", "recon", "kl", "smooth", "pred"}
    assert all(torch.isfinite(v) for v in terms.values())
    torch.testing.assert_close(terms["loss"], terms["recon"] + 0.01 * terms["kl"] + 0.5 * terms["pred"])
    # Two parameter groups: the VAE's and the predictor's, with its own learning rate.
    groups = module.configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == [1e-4, 1e-3]


def test_encode_mean_is_deterministic(wave: torch.Tensor) -> None:
    """The posterior mean: same input, same output, one frame per 1920-sample hop (24000 // 1920 = 12)."""
    module = BetaVAEModule(base=MEL_BASE, latent_dim=4, dec_hidden_dim=32)
    first, second = module.encode_mean(wave), module.encode_mean(wave)
    assert first.shape == (2, 4, 12)
    assert torch.equal(first, second)


def test_audio_reconstruction_needs_a_decoder_network() -> None:
    with pytest.raises(ValueError, match="reconstruction=audio"):
        BetaVAEModule(base=MEL_BASE, latent_dim=4, reconstruction="audio")


# --- checkpoints -------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:You defined a `validation_step`")
@pytest.mark.parametrize("as_omegaconf", [False, True], ids=["dict", "omegaconf"])
def test_checkpoint_round_trip(tmp_path: Path, wave: torch.Tensor, as_omegaconf: bool) -> None:
    """Two training steps, a checkpoint, and load_betavae returns a model that encodes identically. With the
    configs as OmegaConf nodes (as Hydra passes them) the checkpoint must still hold plain data only."""
    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    crops = [torch.randn(1, 24000) * 0.1 for _ in range(4)]
    loader = torch.utils.data.DataLoader(crops, batch_size=2)
    base = OmegaConf.create(MEL_BASE) if as_omegaconf else MEL_BASE
    predictor = OmegaConf.create({"window": 4}) if as_omegaconf else {"window": 4}
    module = BetaVAEModule(base=base, latent_dim=4, dec_hidden_dim=32, lambda_pred=0.1, predictor=predictor)
    before = module.vae.mu_proj.weight.detach().clone()
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    assert not torch.equal(before, module.vae.mu_proj.weight)  # it trained
    path = tmp_path / "betavae.ckpt"
    trainer.save_checkpoint(path)

    loaded = load_betavae(path)
    assert not loaded.training
    assert loaded.reconstruction == "latent" and isinstance(loaded.predictor, LatentPredictor)
    assert torch.equal(loaded.encode_mean(wave), module.encode_mean(wave))


def test_load_rejects_other_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "other.ckpt"
    torch.save({"x": 1}, path)
    with pytest.raises(ValueError, match="not a β-VAE checkpoint"):
        load_betavae(path)


def test_load_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_betavae(tmp_path / "missing.ckpt")
