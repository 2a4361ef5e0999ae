"""GAN losses and pure VAE-GAN pieces against independent oracles.

Hinge losses are checked on hand-computed logits, feature matching against numpy, the MS-STFT
discriminator's shapes against the STFT frame/bin counts and its ability to learn a toy real/fake split,
and ``kl_ramp`` / ``CausalDeltaPredictor`` / ``predictability_loss`` against closed forms and numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latentdyn.models.gan import (
    build_msstft_discriminator,
    discriminator_hinge_loss,
    feature_matching_loss,
    generator_hinge_loss,
)
from latentdyn.models.vae_gan import CausalDeltaPredictor, kl_ramp, predictability_loss

SR = 24000


def t(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- hinge losses


def test_discriminator_hinge_matches_hand_computed_per_scale_means_then_scale_mean() -> None:
    """D hinge = mean over scales of [mean relu(1 - real) + mean relu(1 + fake)], scales of different shapes."""
    real = [
        t([[2.0, 0.5, -1.0]]),  # relu(1 - r) = 0, 0.5, 2        -> 2.5 / 3
        t([[[0.0, 1.0], [3.0, -0.5]]]),  # 1, 0, 0, 1.5          -> 2.5 / 4
    ]
    fake = [
        t([[-2.0, 0.0, 1.5]]),  # relu(1 + f) = 0, 1, 2.5        -> 3.5 / 3
        t([[[-1.0, 0.5], [0.25, -3.0]]]),  # 0, 1.5, 1.25, 0     -> 2.75 / 4
    ]
    scale0 = 2.5 / 3 + 3.5 / 3
    scale1 = 2.5 / 4 + 2.75 / 4
    expected = (scale0 + scale1) / 2
    got = discriminator_hinge_loss(real, fake)
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # not the mean over all pooled elements (which would weight the larger scale more)
    pooled = (2.5 + 2.5) / 7 + (3.5 + 2.75) / 7
    assert not math.isclose(expected, pooled)


def test_generator_hinge_matches_hand_computed_values() -> None:
    """G hinge = mean over scales of mean relu(1 - fake), scales of different shapes."""
    fake = [
        t([[0.0, 2.0, -1.0, 0.5]]),  # 1, 0, 2, 0.5 -> 3.5 / 4
        t([[[-2.0], [1.0], [0.75]]]),  # 3, 0, 0.25 -> 3.25 / 3
        t([[5.0]]),  # 0
    ]
    expected = (3.5 / 4 + 3.25 / 3 + 0.0) / 3
    assert generator_hinge_loss(fake).item() == pytest.approx(expected, rel=1e-12)


def test_hinge_losses_vanish_beyond_the_margins() -> None:
    """D hinge is 0 when real >= 1 and fake <= -1; G hinge is 0 when fake >= 1; both positive inside."""
    gen = torch.Generator().manual_seed(0)
    real = [1 + torch.rand(2, 1, 5, 3, generator=gen), torch.ones(2, 1, 4, 7)]
    fake = [-1 - torch.rand(2, 1, 5, 3, generator=gen), -torch.ones(2, 1, 4, 7)]
    assert discriminator_hinge_loss(real, fake).item() == 0.0
    assert generator_hinge_loss([-f for f in fake]).item() == 0.0  # fake logits >= 1
    # just inside the margin the losses are positive
    assert discriminator_hinge_loss([r - 0.1 for r in real], fake).item() > 0
    assert discriminator_hinge_loss(real, [f + 0.1 for f in fake]).item() > 0
    assert generator_hinge_loss([-f - 0.1 for f in fake]).item() > 0


def test_hinge_losses_reject_mismatched_or_empty_scales() -> None:
    """One logit map per scale for both real and fake, and at least one."""
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError):
        discriminator_hinge_loss([x, x], [x])
    with pytest.raises(ValueError):
        discriminator_hinge_loss([], [])
    with pytest.raises(ValueError):
        generator_hinge_loss([])


# ------------------------------------------------------------------------------------------- feature matching


def _feature_maps(seed: int) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """Two scales with a different number of maps and shapes per map; real and fake."""
    rng = np.random.default_rng(seed)
    shapes = [[(2, 3, 4, 5), (2, 3, 4, 3), (2, 1, 4, 3)], [(2, 3, 2, 9), (2, 3, 2, 5)]]
    real = [[rng.normal(size=s) * (k + 1) for k, s in enumerate(scale)] for scale in shapes]
    fake = [[r + rng.normal(size=r.shape) * 0.5 for r in scale] for scale in real]
    return real, fake


@pytest.mark.parametrize("normalization", ["relative", "absolute"])
def test_feature_matching_matches_numpy(normalization: str) -> None:
    """Mean over every map of every scale of mean|f - f_hat| (divided by mean|f| when relative)."""
    real, fake = _feature_maps(1)
    terms = []
    for real_maps, fake_maps in zip(real, fake, strict=True):
        for r, f in zip(real_maps, fake_maps, strict=True):
            d = np.mean(np.abs(r - f))
            terms.append(d / np.mean(np.abs(r)) if normalization == "relative" else d)
    expected = float(np.mean(terms))

    got = feature_matching_loss(
        [[torch.from_numpy(r) for r in s] for s in real],
        [[torch.from_numpy(f) for f in s] for s in fake],
        normalization=normalization,
    )
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_feature_matching_relative_and_absolute_differ_by_the_real_scale() -> None:
    """Scaling both real and fake maps by c leaves the relative loss unchanged and scales the absolute by c."""
    real, fake = _feature_maps(2)
    c = 7.0

    def loss(scale: float, normalization: str) -> float:
        return feature_matching_loss(
            [[torch.from_numpy(r * scale) for r in s] for s in real],
            [[torch.from_numpy(f * scale) for f in s] for s in fake],
            normalization=normalization,
        ).item()

    assert loss(c, "relative") == pytest.approx(loss(1.0, "relative"), rel=1e-10)
    assert loss(c, "absolute") == pytest.approx(c * loss(1.0, "absolute"), rel=1e-10)


def test_feature_matching_detaches_real_features() -> None:
    """Gradient reaches the fake maps (d/df of mean|f - r| = sign(f - r) / n) and never the real ones."""
    real_np, fake_np = _feature_maps(3)
    real = [[torch.tensor(r, requires_grad=True) for r in s] for s in real_np]
    fake = [[torch.tensor(f, requires_grad=True) for f in s] for s in fake_np]
    feature_matching_loss(real, fake, normalization="absolute").backward()
    n_maps = sum(len(s) for s in real)
    for real_maps, fake_maps, fake_arrays, real_arrays in zip(real, fake, fake_np, real_np, strict=True):
        for r, f, f_np, r_np in zip(real_maps, fake_maps, fake_arrays, real_arrays, strict=True):
            assert r.grad is None
            assert f.grad is not None
            expected = np.sign(f_np - r_np) / f_np.size / n_maps
            np.testing.assert_allclose(f.grad.numpy(), expected, rtol=1e-12)


def test_feature_matching_rejects_an_unknown_normalization() -> None:
    """Only ``relative`` and ``absolute`` are accepted."""
    x = [[torch.ones(1, 2, 3)]]
    with pytest.raises(ValueError, match="normalization"):
        feature_matching_loss(x, x, normalization="l2")


# ---------------------------------------------------------------------------------------------- discriminator


def test_discriminator_returns_one_logit_map_and_five_feature_maps_per_scale() -> None:
    """Per scale n_fft: a (B, 1, frames, bins/16) logit map and 5 (B, filters, frames, .) feature maps, where
    frames = (S - n_fft) // hop + 1 (no centering) and bins = n_fft / 2 + 1 halved (ceil) by 3 strided convs."""
    torch.manual_seed(0)
    n_ffts = [256, 512]
    disc = build_msstft_discriminator(filters=8, n_ffts=n_ffts)
    batch, samples = 2, 4800
    logits, features = disc(torch.randn(batch, 1, samples))
    assert len(logits) == len(features) == len(n_ffts)
    for n_fft, logit, maps in zip(n_ffts, logits, features, strict=True):
        frames = (samples - n_fft) // (n_fft // 4) + 1
        widths = [n_fft // 2 + 1]
        for _ in range(3):
            widths.append(math.ceil(widths[-1] / 2))
        widths.append(widths[-1])  # the last 3x3 conv keeps the width
        assert logit.shape == (batch, 1, frames, widths[-1])
        assert len(maps) == 5
        assert [tuple(m.shape) for m in maps] == [(batch, 8, frames, w) for w in widths]


def test_discriminator_rejects_tiny_or_empty_n_ffts() -> None:
    """n_ffts must be a non-empty list of sizes >= 8."""
    with pytest.raises(ValueError):
        build_msstft_discriminator(filters=8, n_ffts=[])
    with pytest.raises(ValueError):
        build_msstft_discriminator(filters=8, n_ffts=[256, 4])


def _toy_batch(
    gen: torch.Generator, batch: int = 4, samples: int = 2400
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real: sine tones of random frequency and phase; fake: white noise of the same RMS."""
    freq = 100 + 1900 * torch.rand(batch, 1, 1, generator=gen)
    phase = 2 * math.pi * torch.rand(batch, 1, 1, generator=gen)
    amp = 0.1 + 0.4 * torch.rand(batch, 1, 1, generator=gen)
    time = torch.arange(samples) / SR
    real = amp * torch.sin(2 * math.pi * freq * time + phase)
    noise = torch.randn(batch, 1, samples, generator=gen)
    fake = noise * real.pow(2).mean(-1, keepdim=True).sqrt() / noise.pow(2).mean(-1, keepdim=True).sqrt()
    return real, fake


def test_discriminator_learns_to_tell_tones_from_noise_with_the_hinge_loss() -> None:
    """30 AdamW steps of the D hinge loss make mean D(tones) > mean D(noise) on a fresh batch (untrained, the
    two means agree to ~1e-4; a sign error in the loss would push them the other way)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    disc = build_msstft_discriminator(filters=8, n_ffts=[256, 512])
    opt = torch.optim.AdamW(disc.parameters(), lr=1e-3)
    for _ in range(30):
        real, fake = _toy_batch(gen)
        loss = discriminator_hinge_loss(disc(real)[0], disc(fake)[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    real, fake = _toy_batch(gen)
    with torch.no_grad():
        real_logit = torch.stack([lg.mean() for lg in disc(real)[0]]).mean()
        fake_logit = torch.stack([lg.mean() for lg in disc(fake)[0]]).mean()
    assert real_logit.item() > fake_logit.item() + 0.1


# -------------------------------------------------------------------------------------------------- kl_ramp


@pytest.mark.parametrize(
    ("step", "start", "ramp", "expected"),
    [
        (0, 5, 10, 0.0),
        (4, 5, 10, 0.0),
        (5, 5, 10, 0.1),
        (9, 5, 10, 0.5),
        (14, 5, 10, 1.0),
        (15, 5, 10, 1.0),
        (1000, 5, 10, 1.0),
        (0, 0, 4, 0.25),
        (2, 0, 4, 0.75),
        (3, 3, 0, 1.0),
        (2, 3, 0, 0.0),
        (7, 3, 0, 1.0),
        (0, 0, 1, 1.0),
    ],
)
def test_kl_ramp_closed_form(step: int, start: int, ramp: int, expected: float) -> None:
    """0 before start, (step - start + 1) / ramp from start, capped at 1; ramp 0 gives 1 from start."""
    assert kl_ramp(step, start, ramp) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------------------- predictability loss


def _predictor(dim: int, kernel: int, seed: int) -> tuple[CausalDeltaPredictor, np.ndarray, np.ndarray]:
    """A predictor whose conv weight (D, D, k) and bias (D,) are set by hand from a numpy RNG."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(dim, dim, kernel)) / np.sqrt(dim * kernel)
    bias = rng.normal(size=dim) * 0.1
    pred = CausalDeltaPredictor(dim, kernel_size=kernel).double()
    with torch.no_grad():
        pred.conv.weight.copy_(torch.from_numpy(weight))
        pred.conv.bias.copy_(torch.from_numpy(bias))
    return pred, weight, bias


def _causal_conv_numpy(z: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """out[b, :, t] = bias + sum_j W[:, :, j] @ z[b, :, t - (k - 1) + j], frames before 0 being zero."""
    batch, dim, steps = z.shape
    kernel = weight.shape[-1]
    out = np.empty_like(z)
    for b in range(batch):
        for time in range(steps):
            acc = bias.copy()
            for j in range(kernel):
                src = time - (kernel - 1) + j
                if src >= 0:
                    acc += weight[:, :, j] @ z[b, :, src]
            out[b, :, time] = acc
    return out


def _predictability_numpy(z: np.ndarray, weight: np.ndarray, bias: np.ndarray, alpha: float) -> float:
    kernel = weight.shape[-1]
    delta_hat = _causal_conv_numpy(z, weight, bias)
    steps = range(kernel - 1, z.shape[-1] - 1)
    cos, sq = [], []
    for b in range(z.shape[0]):
        for time in steps:
            d_hat = delta_hat[b, :, time]
            delta = z[b, :, time + 1] - z[b, :, time]
            cos.append(d_hat @ delta / (np.linalg.norm(d_hat) * np.linalg.norm(delta)))
            sq.extend((z[b, :, time] + d_hat - z[b, :, time + 1]) ** 2)
    return alpha * float(np.mean(1 - np.array(cos))) + (1 - alpha) * float(np.mean(sq))


def test_causal_delta_predictor_matches_numpy_causal_conv() -> None:
    """Output is a left-zero-padded causal convolution with the hand-set weights."""
    pred, weight, bias = _predictor(dim=3, kernel=4, seed=0)
    z = np.random.default_rng(1).normal(size=(2, 3, 9))
    with torch.no_grad():
        got = pred(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(got, _causal_conv_numpy(z, weight, bias), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("kernel", "steps"), [(4, 12), (3, 4), (1, 5), (6, 7)])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_predictability_loss_matches_numpy(kernel: int, steps: int, alpha: float) -> None:
    """alpha mean(1 - cos) + (1 - alpha) MSE over the steps t = k - 1 .. T - 2 whose context is whole."""
    pred, weight, bias = _predictor(dim=4, kernel=kernel, seed=kernel)
    z = np.random.default_rng(10 + steps).normal(size=(3, 4, steps))
    got = predictability_loss(torch.from_numpy(z), pred, alpha).item()
    assert got == pytest.approx(_predictability_numpy(z, weight, bias, alpha), rel=1e-9)


def test_causal_delta_predictor_is_causal() -> None:
    """Changing frames after t leaves outputs 0..t unchanged; changing frame t changes output t."""
    pred, _, _ = _predictor(dim=3, kernel=4, seed=5)
    rng = np.random.default_rng(6)
    z = torch.from_numpy(rng.normal(size=(2, 3, 10)))
    with torch.no_grad():
        base = pred(z)
        for cut in range(z.shape[-1] - 1):
            changed = z.clone()
            changed[:, :, cut + 1 :] = torch.from_numpy(rng.normal(size=changed[:, :, cut + 1 :].shape))
            out = pred(changed)
            torch.testing.assert_close(out[:, :, : cut + 1], base[:, :, : cut + 1], rtol=0, atol=0)
            assert not torch.allclose(out[:, :, cut + 1], base[:, :, cut + 1])


@pytest.mark.parametrize(("kernel", "steps"), [(4, 4), (4, 2), (4, 1), (1, 1), (6, 6)])
def test_predictability_loss_is_zero_without_a_whole_context_step(kernel: int, steps: int) -> None:
    """With T <= kernel no step t = k - 1 .. T - 2 exists: the loss is exactly 0."""
    pred, _, _ = _predictor(dim=3, kernel=kernel, seed=0)
    z = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, steps)))
    loss = predictability_loss(z, pred, 0.5)
    assert loss.shape == () and loss.item() == 0.0
    # one more frame gives one step and a positive loss
    z_more = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, kernel + 1)))
    assert predictability_loss(z_more, pred, 0.5).item() > 0


def test_causal_delta_predictor_rejects_a_zero_kernel() -> None:
    """kernel_size must be >= 1."""
    with pytest.raises(ValueError):
        CausalDeltaPredictor(3, kernel_size=0)
