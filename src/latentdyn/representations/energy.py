"""Per-frame log energy of a waveform, aligned with latent frames.

Every representation yields one latent frame per ``hop`` samples (``T = S // hop``); the latent store keeps
the energy of the same hop-length chunks so that diagnostics can slice frames by loudness (DESIGN §9,
``high_energy``) whatever the representation.
"""

from __future__ import annotations

import torch

#: Added to the mean power before the log so digital silence maps to -100 dB, not -inf.
ENERGY_EPS = 1e-10


def frame_log_energy(wave: torch.Tensor, hop: int) -> torch.Tensor:
    """Log energy in dB of each full hop-length chunk of ``wave``.

    Frame ``t`` covers samples ``[t * hop, (t + 1) * hop)``; a trailing partial chunk is dropped, so
    ``T = S // hop`` as for :meth:`Representation.num_frames`. The value is
    ``10 * log10(mean(x**2) + 1e-10)`` (computed in float64, returned as float32), i.e. dB relative to a
    full-scale (amplitude 1) signal's power.

    Args:
        wave: ``(B, 1, S)`` batch or ``(S,)`` single signal.
        hop: frame hop in samples (``sample_rate / frame_rate``).

    Returns:
        ``(B, T)`` for a batch, ``(T,)`` for a single signal; float32 on ``wave``'s device.
    """
    if isinstance(hop, bool) or int(hop) != hop or hop < 1:
        raise ValueError(f"hop must be a positive integer, got {hop!r}")
    hop = int(hop)
    if wave.dim() == 1:
        return frame_log_energy(wave[None, None], hop)[0]
    if wave.dim() != 3 or wave.shape[1] != 1:
        raise ValueError(f"expected a (B, 1, S) batch or an (S,) signal, got shape {tuple(wave.shape)}")
    n_frames = wave.shape[-1] // hop
    chunks = wave[:, 0, : n_frames * hop].to(torch.float64).reshape(wave.shape[0], n_frames, hop)
    power = chunks.square().mean(dim=-1)
    return (10.0 * torch.log10(power + ENERGY_EPS)).to(torch.float32)
