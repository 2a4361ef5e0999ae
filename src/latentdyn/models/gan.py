"""Adversarial training of an audio decoder: EnCodec's multi-scale STFT discriminator and the hinge losses.

The discriminator (:func:`build_msstft_discriminator`) is ``encodec.msstftd.MultiScaleSTFTDiscriminator``: one
2-D convolutional network per STFT resolution (n_fft in (256, 512, 1024, 2048) by default, hop n_fft / 4,
window n_fft) over the real and imaginary parts of the normalised complex spectrogram, returning per scale a
logit map and the activations of its layers (the features matched by :func:`feature_matching_loss`).

Losses, each averaged over the S scales (logit maps averaged over their elements):

* discriminator hinge: (1/S) sum_s [mean relu(1 - D_s(x)) + mean relu(1 + D_s(x_hat))];
* generator hinge: (1/S) sum_s mean relu(1 - D_s(x_hat));
* feature matching, ``relative`` (EnCodec's): (1/(S L)) sum_{s,l} mean|f - f_hat| / mean|f| over the L
  feature maps of each scale (real features detached); ``absolute`` (the reference study's): without the
  division.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FEATURE_MATCHING",
    "build_msstft_discriminator",
    "discriminator_hinge_loss",
    "feature_matching_loss",
    "generator_hinge_loss",
]

#: ``feature_matching`` normalisations.
FEATURE_MATCHING = ("relative", "absolute")


def build_msstft_discriminator(
    filters: int = 32, n_ffts: Sequence[int] = (256, 512, 1024, 2048)
) -> nn.Module:
    """EnCodec's MS-STFT discriminator with ``filters`` channels, one scale per n_fft (hop n_fft / 4, window
    n_fft). Its forward maps audio ``(B, 1, S)`` to ``(logits per scale, feature maps per scale)``."""
    import warnings

    from encodec.msstftd import MultiScaleSTFTDiscriminator

    n_ffts = [int(n) for n in n_ffts]
    if not n_ffts or any(n < 8 for n in n_ffts):
        raise ValueError(f"discriminator n_ffts must be a non-empty list of sizes >= 8, got {n_ffts}")
    with warnings.catch_warnings():
        # encodec's NormConv2d uses torch.nn.utils.weight_norm, deprecated in favour of parametrizations.
        warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
        return MultiScaleSTFTDiscriminator(
            filters=int(filters), n_ffts=n_ffts, hop_lengths=[n // 4 for n in n_ffts], win_lengths=n_ffts
        )


def discriminator_hinge_loss(
    real_logits: Sequence[torch.Tensor], fake_logits: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Hinge loss of the discriminator: real logits pushed above +1, fake ones below -1, averaged over scales."""
    if len(real_logits) != len(fake_logits) or not real_logits:
        raise ValueError(
            f"expected one logit map per scale for both, got {len(real_logits)} and {len(fake_logits)}"
        )
    terms = [
        F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real_logits, fake_logits, strict=True)
    ]
    return torch.stack(terms).mean()


def generator_hinge_loss(fake_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Hinge loss of the generator: mean relu(1 - D(x_hat)), averaged over scales."""
    if not fake_logits:
        raise ValueError("expected at least one logit map")
    return torch.stack([F.relu(1 - f).mean() for f in fake_logits]).mean()


def feature_matching_loss(
    real_features: Sequence[Sequence[torch.Tensor]],
    fake_features: Sequence[Sequence[torch.Tensor]],
    normalization: str = "relative",
) -> torch.Tensor:
    """L1 distance of the discriminator's feature maps on generated audio to those on real audio (detached),
    averaged over every map of every scale; ``relative`` divides each by the real map's mean magnitude."""
    if normalization not in FEATURE_MATCHING:
        raise ValueError(
            f"feature matching normalization must be one of {FEATURE_MATCHING}, got {normalization!r}"
        )
    terms = []
    for real_maps, fake_maps in zip(real_features, fake_features, strict=True):
        for real, fake in zip(real_maps, fake_maps, strict=True):
            real = real.detach()
            distance = F.l1_loss(fake, real)
            if normalization == "relative":
                distance = distance / real.abs().mean().clamp_min(1e-8)
            terms.append(distance)
    if not terms:
        raise ValueError("expected at least one feature map")
    return torch.stack(terms).mean()
