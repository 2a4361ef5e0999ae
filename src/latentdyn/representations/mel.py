"""Log-mel frames as a weight-free latent representation, decoded with Griffin–Lim (DESIGN §7).

Framing. ``hop = sample_rate / frame_rate`` samples (an integer), Hann window of ``2 * hop`` samples
zero-padded to ``n_fft`` (the next power of two). Frame ``t`` is centred on sample ``t * hop + hop / 2``,
the middle of the hop-length chunk ``[t * hop, (t + 1) * hop)`` that :func:`frame_log_energy` measures, and
a signal of ``S`` samples gives ``T = S // hop`` frames: one per full hop, a trailing partial hop only
feeds the last window's tail. Outside the signal the audio is taken as silence (zero padding), which is
defined for any length, unlike reflection.

This half-hop shift (instead of torch's ``center=True`` frames centred on ``t * hop``) also makes
synthesis well conditioned: every output sample in ``[0, T * hop)`` lies where some analysis window is at
least 0.5, so the overlap-add normaliser never divides by a near-zero window tail. That is why the
Griffin–Lim loop below runs its own STFT pair with exactly this framing rather than
``torchaudio.transforms.GriffinLim`` (whose frames are centred on ``t * hop``); the algorithm is the same
(fast Griffin–Lim with momentum, zero-phase initialisation, so deterministic).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
import torchaudio

from latentdyn.representations.energy import frame_log_energy

__all__ = ["MelRepresentation", "frame_log_energy", "hop_length"]

#: Added to the Griffin–Lim phase normalisation so a zero STFT bin keeps a finite (zero) phase.
_PHASE_EPS = 1e-16
#: Floor on the linear power (re full scale) that the mel inversion returns (-300 dB).
_POWER_ZERO = 1e-30


def hop_length(sample_rate: int, frame_rate: float) -> int:
    """Samples per latent frame, ``sample_rate / frame_rate``; ValueError unless it is a whole number."""
    if sample_rate <= 0 or frame_rate <= 0:
        raise ValueError(f"sample_rate and frame_rate must be positive, got {sample_rate}, {frame_rate}")
    hop = sample_rate / frame_rate
    rounded = round(hop)
    if rounded < 1 or abs(hop - rounded) > 1e-9 * hop:
        raise ValueError(
            f"sample_rate / frame_rate = {sample_rate} / {frame_rate} = {hop} is not a whole number of samples"
        )
    return int(rounded)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class MelRepresentation(torch.nn.Module):
    """Natural-log power mel spectrogram frames, ``(B, n_mels, T)`` at ``frame_rate`` Hz.

    ``encode`` computes ``log(max(mel, log_floor))`` of the power (``|STFT|**2``) spectrogram through a
    Slaney-normalised, Slaney-scale mel filterbank (``torchaudio.transforms.MelSpectrogram``). ``decode``
    exponentiates, maps mel power back to a nonnegative linear power spectrum (see :meth:`mel_to_power`)
    and recovers phase with ``griffin_lim_iters`` iterations of fast Griffin–Lim (momentum 0.99).
    Weight-free: nothing is learned or downloaded.

    Args:
        sample_rate: audio rate in Hz.
        frame_rate: frames per second; ``sample_rate / frame_rate`` must be a whole number of samples.
        n_mels: number of mel bands, the latent dimension D.
        n_fft: FFT size; default the next power of two at or above the window length ``2 * hop``.
        f_min, f_max: filterbank range in Hz; ``f_max`` defaults to ``sample_rate / 2``.
        log_floor: power floor before the log (``log(1e-5) ≈ -11.5``, i.e. -50 dB re full scale), which
            bounds the latents below in silence.
        griffin_lim_iters: Griffin–Lim iterations in ``decode``.
        device: where the filterbank and windows live.
        inverse_mel_iters: multiplicative updates of the nonnegative mel inversion in ``decode``.
    """

    name = "mel"
    weights: dict[str, Any]

    def __init__(
        self,
        sample_rate: int = 24000,
        frame_rate: float = 12.5,
        n_mels: int = 80,
        n_fft: int | None = None,
        f_min: float = 0.0,
        f_max: float | None = None,
        log_floor: float = 1e-5,
        griffin_lim_iters: int = 64,
        device: str = "cpu",
        inverse_mel_iters: int = 100,
    ) -> None:
        super().__init__()
        self.hop = hop_length(sample_rate, frame_rate)
        self.win_length = 2 * self.hop
        self.n_fft = _next_pow2(self.win_length) if n_fft is None else int(n_fft)
        if self.n_fft < self.win_length:
            raise ValueError(f"n_fft={self.n_fft} is shorter than the window (2 * hop = {self.win_length})")
        if n_mels < 1 or log_floor <= 0 or griffin_lim_iters < 0 or inverse_mel_iters < 0:
            raise ValueError("n_mels >= 1, log_floor > 0 and iteration counts >= 0 are required")
        self.sample_rate = int(sample_rate)
        self.frame_rate = float(frame_rate)
        self.dim = int(n_mels)
        self.log_floor = float(log_floor)
        self.griffin_lim_iters = int(griffin_lim_iters)
        self.inverse_mel_iters = int(inverse_mel_iters)
        self.weights = {"source": "none", "pretrained": False, "kind": "weight-free"}
        # Zero padding before the first analysis frame, so frame t is centred on t * hop + hop / 2.
        self.pad_left = self.n_fft // 2 - self.hop // 2
        self.pad_right = self.n_fft - self.pad_left
        self.mel_spec = torchaudio.transforms.MelSpectrogram(
            sample_rate=self.sample_rate,
            n_fft=self.n_fft,
            win_length=self.win_length,
            hop_length=self.hop,
            f_min=f_min,
            f_max=f_max,
            n_mels=self.dim,
            window_fn=torch.hann_window,
            power=2.0,
            center=False,
            norm="slaney",
            mel_scale="slaney",
        )
        fb = self.mel_spec.mel_scale.fb  # (F, M): mel = fb.T @ power
        tiny = torch.finfo(torch.float32).tiny
        self.register_buffer("fb_t", fb.T.contiguous())  # (M, F)
        # (F, M): spreads each band's power evenly over its bins (divides by the filter's area).
        self.register_buffer("fb_spread", fb / fb.sum(dim=0).clamp_min(tiny))
        # (F, M): the KL update's back-projection, rows divided by each bin's total filter weight
        # (all-zero rows where no filter reaches, e.g. DC and Nyquist).
        self.register_buffer("fb_update", fb / fb.sum(dim=1, keepdim=True).clamp_min(tiny))
        window = torch.zeros(self.n_fft)
        offset = (self.n_fft - self.win_length) // 2
        window[offset : offset + self.win_length] = torch.hann_window(self.win_length)
        self.register_buffer("fft_window", window)
        self.to(device)

    @property
    def device(self) -> torch.device:
        return self.fb_t.device

    def num_frames(self, num_samples: int) -> int:
        """``num_samples // hop``: one frame per full hop of audio."""
        return int(num_samples) // self.hop

    def _check_wave(self, wave: torch.Tensor) -> None:
        if wave.dim() != 3 or wave.shape[1] != 1:
            raise ValueError(f"expected audio of shape (B, 1, S), got {tuple(wave.shape)}")

    def _pad(self, wave: torch.Tensor) -> torch.Tensor:
        """``(..., S)`` -> ``(..., pad_left + S + pad_right)`` zero-padded for this framing."""
        return F.pad(wave, (self.pad_left, self.pad_right))

    @torch.no_grad()
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S)`` audio -> ``(B, n_mels, S // hop)`` float32 natural-log mel power."""
        self._check_wave(wave)
        n_frames = self.num_frames(wave.shape[-1])
        wave = wave.to(device=self.device, dtype=torch.float32)
        mel = self.mel_spec(self._pad(wave[:, 0]))[..., :n_frames]
        return torch.log(mel.clamp_min(self.log_floor))

    def _stft(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, T * hop)`` -> ``(B, F, T)`` complex STFT with this class's framing (Griffin–Lim analysis)."""
        n_frames = wave.shape[-1] // self.hop
        frames = self._pad(wave).unfold(-1, self.n_fft, self.hop)[:, :n_frames]  # (B, T, n_fft)
        return torch.fft.rfft(frames * self.fft_window, dim=-1).transpose(1, 2)

    def _istft(self, spec: torch.Tensor) -> torch.Tensor:
        """``(B, F, T)`` complex -> ``(B, T * hop)``: windowed overlap-add over the window-squared sum.

        Least-squares inverse of :meth:`_stft` (Griffin & Lim 1984); the normaliser is at least 0.25 on
        the kept samples because every one of them sits where some window is at least 0.5.
        """
        n_frames = spec.shape[-1]
        frames = torch.fft.irfft(spec, n=self.n_fft, dim=1) * self.fft_window[:, None]  # (B, n_fft, T)
        total = (n_frames - 1) * self.hop + self.n_fft
        kw = {"output_size": (1, total), "kernel_size": (1, self.n_fft), "stride": (1, self.hop)}
        signal = F.fold(frames, **kw)[:, 0, 0]
        envelope = F.fold(self.fft_window.square()[None, :, None].expand(1, -1, n_frames), **kw)[0, 0, 0]
        keep = slice(self.pad_left, self.pad_left + n_frames * self.hop)
        return signal[:, keep] / envelope[keep]

    def mel_to_power(self, mel: torch.Tensor) -> torch.Tensor:
        """``(B, n_mels, T)`` mel power -> ``(B, F, T)`` nonnegative linear power whose mel is ``mel``.

        Solves ``fb.T @ p ≈ mel`` over ``p >= 0`` by multiplicative updates for the generalised KL
        divergence (Lee & Seung 2001, NMF with the filterbank as a fixed dictionary), started from each
        band's power spread evenly over its bins. The pseudo-inverse (``InverseMelScale``'s least-squares
        solution) clamped at 0 is much worse for harmonic speech: adjacent low bands with and without a
        harmonic differ by orders of magnitude, the minimum-norm solution oscillates negative, and the
        clamp loses ~0.66 nats of log-mel (measured at 12.5 Hz) against ~0.01 after 100 KL updates. KL
        fits ratios, not differences, so quiet bands are fitted as well as loud ones. Power is floored at
        ``1e-30`` (-300 dB, inaudible) so the updates never run on subnormal floats, which are orders of
        magnitude slower on CPUs.
        """
        mel = mel.clamp_min(torch.finfo(torch.float32).tiny)
        power = torch.matmul(self.fb_spread, mel).clamp_min_(_POWER_ZERO)
        for _ in range(self.inverse_mel_iters):
            ratio = mel / torch.matmul(self.fb_t, power)
            power.mul_(torch.matmul(self.fb_update, ratio)).clamp_min_(_POWER_ZERO)
        return power

    def griffin_lim(self, magnitude: torch.Tensor) -> torch.Tensor:
        """``(B, F, T)`` STFT magnitude -> ``(B, T * hop)`` audio by fast Griffin–Lim (Perraudin et al. 2013).

        Starts from zero phase; each step projects onto consistent spectrograms (iSTFT then STFT),
        extrapolates with momentum 0.99 and keeps only the phase.
        """
        momentum = 0.99
        phase = torch.ones_like(magnitude, dtype=torch.complex64)
        previous = torch.zeros_like(phase)
        for _ in range(self.griffin_lim_iters):
            rebuilt = self._stft(self._istft(magnitude * phase))
            accelerated = rebuilt + momentum * (rebuilt - previous)
            phase = accelerated / (accelerated.abs() + _PHASE_EPS)
            previous = rebuilt
        return self._istft(magnitude * phase)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, n_mels, T)`` log-mel -> ``(B, 1, T * hop)`` float32 audio via Griffin–Lim."""
        if latents.dim() != 3 or latents.shape[1] != self.dim or latents.shape[2] < 1:
            raise ValueError(f"expected latents of shape (B, {self.dim}, T >= 1), got {tuple(latents.shape)}")
        mel = torch.exp(latents.to(device=self.device, dtype=torch.float32))
        magnitude = self.mel_to_power(mel).sqrt()
        return self.griffin_lim(magnitude)[:, None]

    def extra_repr(self) -> str:
        return (
            f"sample_rate={self.sample_rate}, frame_rate={self.frame_rate}, hop={self.hop}, "
            f"n_fft={self.n_fft}, n_mels={self.dim}, log_floor={self.log_floor} "
            f"(log={math.log(self.log_floor):.2f}), griffin_lim_iters={self.griffin_lim_iters}, "
            f"inverse_mel_iters={self.inverse_mel_iters}"
        )
