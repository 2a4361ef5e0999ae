"""Objective distances between a reference waveform and an estimate of it (DESIGN §9, "Audio").

Used to score decoded rollouts against the decoded ground-truth latents (``decode(z_true)``), and once per
representation ``decode(z_true)`` against the original audio (the codec's reconstruction ceiling). Every
function takes two 1-D real signals ``(S,)`` (numpy arrays or torch tensors, any real dtype) at the same
sample rate, validates them (:class:`ValueError` on non-1-D, empty or non-finite input, a bad sample rate, or
lengths further apart than the tolerance of :func:`align`) and computes in float64. The metrics:

* ``mrstft`` — multi-resolution STFT distance (Yamamoto et al. 2020, Parallel WaveGAN), lower is better, 0
  for identical signals;
* ``log_mel`` — mean absolute log-mel-power difference in dB, lower is better, 0 for identical signals;
* ``si_sdr`` — scale-invariant signal-to-distortion ratio in dB (Le Roux et al. 2019), higher is better,
  ``+inf`` for identical signals;
* ``stoi`` — short-time objective intelligibility (Taal et al. 2011, via pystoi), in ``[0, 1]`` up to rounding,
  higher is better; ``None`` where STOI does not apply (too short, silent reference);
* ``pesq_wb`` — wide-band PESQ (ITU-T P.862.2, via the ``pesq`` package) at 16 kHz, MOS-LQO in about
  ``[1.04, 4.64]``, higher is better; ``None`` where PESQ does not apply (too short, no utterance detected,
  silent input).

``None`` (never NaN) marks "not applicable", so a table can tell a metric that does not apply from one that
failed.
"""

from __future__ import annotations

import importlib
import logging
import math
import numbers
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torchaudio.functional as AF
from pesq import PesqError, pesq

from latentdyn.data.audio import resample

log = logging.getLogger(__name__)

# The module (the package re-exports the function under the same name): its constants and ``stoi``.
_pystoi = importlib.import_module("pystoi.stoi")

#: Keys of :func:`audio_distances`, in order.
AUDIO_METRIC_KEYS: tuple[str, ...] = ("mrstft", "log_mel", "si_sdr", "stoi", "pesq_wb")
#: Whether a larger value of each metric means a closer estimate.
HIGHER_IS_BETTER: dict[str, bool] = {
    "mrstft": False,
    "log_mel": False,
    "si_sdr": True,
    "stoi": True,
    "pesq_wb": True,
}

#: Lowest sample rate accepted, Hz.
MIN_SAMPLE_RATE = 8000
#: Sample rate at which wide-band PESQ is computed, Hz.
PESQ_SAMPLE_RATE = 16000
#: Default relative length tolerance of :func:`align` (decoded audio is a few samples off, not seconds).
LENGTH_RTOL = 0.01
#: Parallel WaveGAN's resolutions (samples): FFT sizes, hop sizes, window lengths.
MRSTFT_FFT_SIZES: tuple[int, ...] = (512, 1024, 2048)
MRSTFT_HOP_SIZES: tuple[int, ...] = (50, 120, 240)
MRSTFT_WIN_LENGTHS: tuple[int, ...] = (240, 600, 1200)
#: Floor on the STFT power in :func:`stft_distance_terms` (Parallel WaveGAN's clamp).
MRSTFT_POWER_FLOOR = 1e-7
#: PESQ error codes that mean "does not apply" rather than "failed", with their reasons.
_PESQ_NOT_APPLICABLE: dict[int, str] = {
    PesqError.BUFFER_TOO_SHORT: "shorter than 1/4 s",
    PesqError.NO_UTTERANCES_DETECTED: "no utterance detected",
}
#: Shortest input pystoi can frame into its 30-frame analysis segments, in samples at its 10 kHz rate.
_STOI_MIN_SAMPLES_10K = _pystoi.N_FRAME + (_pystoi.N - 1) * (_pystoi.N_FRAME // 2)


def _as_signal(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """``x`` as a finite, non-empty 1-D float64 numpy array, or ValueError naming ``name``."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise ValueError(f"{name} must be real, got a complex tensor")
        arr = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        arr = np.asarray(x)
        if np.iscomplexobj(arr):
            raise ValueError(f"{name} must be real, got a complex array")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (S,), got shape {tuple(arr.shape)}; squeeze batch/channel axes")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has {int(np.sum(~np.isfinite(arr)))} non-finite samples")
    return arr


def _check_sample_rate(sample_rate: int) -> int:
    """``sample_rate`` as an int >= :data:`MIN_SAMPLE_RATE`, or ValueError."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real):
        raise ValueError(f"sample_rate must be a number of Hz, got {sample_rate!r}")
    if not float(sample_rate).is_integer() or sample_rate < MIN_SAMPLE_RATE:
        raise ValueError(f"sample_rate must be an integer >= {MIN_SAMPLE_RATE} Hz, got {sample_rate}")
    return int(sample_rate)


def align(
    reference: np.ndarray | torch.Tensor,
    estimate: np.ndarray | torch.Tensor,
    *,
    rtol: float = LENGTH_RTOL,
    atol: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate two 1-D signals and crop both to the shorter length (samples dropped from the end).

    Decoded audio starts where its reference starts and differs in length by a few samples of codec framing,
    so the common prefix is compared. Lengths further apart than ``max(atol, rtol * longer_length)`` samples
    raise ValueError: such a pair is almost surely mismatched (wrong file, wrong sample rate), and cropping it
    would score unrelated audio. Pass ``atol`` (e.g. one codec frame of samples) to compare a decoded signal
    with an original whose length is not a multiple of the codec's hop.

    Returns:
        ``(reference, estimate)`` as float64 numpy arrays of the same length ``(S,)``.
    """
    ref = _as_signal(reference, "reference")
    est = _as_signal(estimate, "estimate")
    if rtol < 0 or atol < 0:
        raise ValueError(f"length tolerances must be >= 0, got rtol={rtol}, atol={atol}")
    longer = max(ref.size, est.size)
    diff = abs(ref.size - est.size)
    if diff > max(atol, rtol * longer):
        raise ValueError(
            f"reference has {ref.size} samples and estimate {est.size}: they differ by {diff} "
            f"(> max(atol={atol}, rtol={rtol} x {longer})); are they the same utterance at the same rate?"
        )
    n = min(ref.size, est.size)
    return ref[:n], est[:n]


def _power_spectrogram(x: np.ndarray, fft_size: int, hop_size: int, win_length: int) -> torch.Tensor:
    """``|STFT|²`` ``(fft_size // 2 + 1, frames)`` float64: periodic Hann window, centred frames, reflect pad."""
    if not 0 < win_length <= fft_size or hop_size < 1:
        raise ValueError(
            f"need 0 < win_length <= fft_size and hop_size >= 1, got fft_size={fft_size}, "
            f"hop_size={hop_size}, win_length={win_length}"
        )
    if x.size <= fft_size // 2:
        raise ValueError(
            f"signal of {x.size} samples is too short for an STFT of size {fft_size} "
            f"(needs more than {fft_size // 2} samples)"
        )
    spec = torch.stft(
        torch.from_numpy(x),
        n_fft=fft_size,
        hop_length=hop_size,
        win_length=win_length,
        window=torch.hann_window(win_length, dtype=torch.float64),
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )
    return spec.real.square() + spec.imag.square()


def stft_distance_terms(
    reference: np.ndarray | torch.Tensor,
    estimate: np.ndarray | torch.Tensor,
    fft_size: int,
    hop_size: int,
    win_length: int,
) -> tuple[float, float]:
    """Spectral convergence and log-magnitude distance at one STFT resolution (Yamamoto et al. 2020).

    With magnitudes ``X = sqrt(max(|STFT(reference)|², 1e-7))`` and ``Y`` likewise for the estimate (Hann
    window of ``win_length`` samples, ``fft_size``-point FFT, hop ``hop_size``, centred frames):

    * spectral convergence ``‖X - Y‖_F / ‖X‖_F`` — relative, normalised by the *reference*, so not symmetric
      (``estimate = a * reference`` gives ``|a - 1|``);
    * log-magnitude distance ``mean |ln X - ln Y|`` over bins and frames — symmetric, in nats of magnitude
      (``estimate = a * reference`` gives ``|ln a|`` where the floor is not reached).

    Returns:
        ``(spectral_convergence, log_magnitude_distance)``; both 0 for identical signals.
    """
    ref, est = align(reference, estimate)
    mag_ref = _power_spectrogram(ref, fft_size, hop_size, win_length).clamp_min(MRSTFT_POWER_FLOOR).sqrt()
    mag_est = _power_spectrogram(est, fft_size, hop_size, win_length).clamp_min(MRSTFT_POWER_FLOOR).sqrt()
    convergence = torch.linalg.vector_norm(mag_ref - mag_est) / torch.linalg.vector_norm(mag_ref)
    log_distance = (mag_ref.log() - mag_est.log()).abs().mean()
    return float(convergence), float(log_distance)


def multi_resolution_stft_distance(
    reference: np.ndarray | torch.Tensor,
    estimate: np.ndarray | torch.Tensor,
    sample_rate: int,
    fft_sizes: Sequence[int] = MRSTFT_FFT_SIZES,
    hop_sizes: Sequence[int] = MRSTFT_HOP_SIZES,
    win_lengths: Sequence[int] = MRSTFT_WIN_LENGTHS,
) -> float:
    """Multi-resolution STFT distance: mean over resolutions of spectral convergence + log-magnitude distance.

    The auxiliary loss of Parallel WaveGAN (Yamamoto et al. 2020, eq. 4-6), ``(1/M) Σ_m (L_sc,m + L_mag,m)``
    with the terms of :func:`stft_distance_terms`; the defaults are that paper's three resolutions (FFT
    512/1024/2048, hop 50/120/240, Hann window 240/600/1200 samples). Resolutions are in samples, so values
    are comparable between signals at the same ``sample_rate`` (validated, otherwise unused). 0 for identical
    signals; not symmetric (the spectral convergence is relative to the reference).
    """
    _check_sample_rate(sample_rate)
    if not len(fft_sizes) == len(hop_sizes) == len(win_lengths) or len(fft_sizes) == 0:
        raise ValueError(
            f"need as many (>= 1) fft_sizes, hop_sizes and win_lengths, got {len(fft_sizes)}, "
            f"{len(hop_sizes)}, {len(win_lengths)}"
        )
    ref, est = align(reference, estimate)
    total = 0.0
    for fft_size, hop_size, win_length in zip(fft_sizes, hop_sizes, win_lengths, strict=True):
        convergence, log_distance = stft_distance_terms(
            ref, est, int(fft_size), int(hop_size), int(win_length)
        )
        total += convergence + log_distance
    return total / len(fft_sizes)


def log_mel_distance(
    reference: np.ndarray | torch.Tensor,
    estimate: np.ndarray | torch.Tensor,
    sample_rate: int,
    n_mels: int = 80,
    fft_size: int = 1024,
    hop_size: int = 256,
    dynamic_range_db: float = 80.0,
) -> float:
    """Mean absolute difference of log-mel power spectrograms, in dB.

    Mel power ``M = mel_fbank @ |STFT|²`` (Hann window of ``fft_size`` samples, hop ``hop_size``; ``n_mels``
    Slaney-scale, Slaney-normalised bands from 0 Hz to ``sample_rate / 2``, as librosa's default), then
    ``D = mean over (band, frame) of |10 log10 max(M_ref, f) - 10 log10 max(M_est, f)|`` with the floor ``f``
    ``dynamic_range_db`` below the reference's loudest mel bin. The floor keeps near-silent bins (pauses, the
    noise floor) from dominating and makes ``D`` invariant to a common gain of both signals; a gain error of
    ``g`` dB on the estimate scores ``|g|`` where neither side is floored. Symmetric only up to the floor
    (which follows the reference). 0 for identical signals.
    """
    sample_rate = _check_sample_rate(sample_rate)
    if n_mels < 1 or dynamic_range_db <= 0:
        raise ValueError(f"need n_mels >= 1 and dynamic_range_db > 0, got {n_mels}, {dynamic_range_db}")
    ref, est = align(reference, estimate)
    fbank = AF.melscale_fbanks(
        fft_size // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate, norm="slaney", mel_scale="slaney"
    ).to(torch.float64)  # (freqs, mels)
    mel_ref = fbank.T @ _power_spectrogram(ref, fft_size, hop_size, fft_size)
    mel_est = fbank.T @ _power_spectrogram(est, fft_size, hop_size, fft_size)
    peak = float(mel_ref.max())
    floor = max(peak * 10.0 ** (-dynamic_range_db / 10.0), torch.finfo(torch.float64).tiny)
    db_ref = 10.0 * mel_ref.clamp_min(floor).log10()
    db_est = 10.0 * mel_est.clamp_min(floor).log10()
    return float((db_ref - db_est).abs().mean())


def waveform_l1(reference: np.ndarray | torch.Tensor, estimate: np.ndarray | torch.Tensor) -> float:
    """Mean absolute sample difference of two signals (full scale 1): the reference study's ``l1``."""
    ref, est = align(reference, estimate)
    return float(np.mean(np.abs(ref - est)))


def log_mel_l1(
    reference: np.ndarray | torch.Tensor,
    estimate: np.ndarray | torch.Tensor,
    sample_rate: int,
    n_mels: int = 80,
    fft_size: int = 1024,
    hop_size: int = 256,
    floor: float = 1e-5,
) -> float:
    """The reference study's ``mel_distance``: mean ``|ln max(M_ref, 1e-5) - ln max(M_est, 1e-5)|`` in nats of
    mel power ``M`` (torchaudio's ``MelSpectrogram`` defaults: Hann window of ``fft_size``, hop ``hop_size``,
    centred frames with reflection padding, ``n_mels`` HTK-scale bands without normalisation, power 2).

    Unlike :func:`log_mel_distance` the floor is absolute, so silence counts; kept for comparison with the
    reference's reported numbers. 0 for identical signals.
    """
    sample_rate = _check_sample_rate(sample_rate)
    ref, est = align(reference, estimate)
    fbank = AF.melscale_fbanks(fft_size // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate).to(torch.float64)

    def log_mel(x: np.ndarray) -> torch.Tensor:
        return (fbank.T @ _power_spectrogram(x, fft_size, hop_size, fft_size)).clamp_min(floor).log()

    return float((log_mel(ref) - log_mel(est)).abs().mean())


def si_sdr(reference: np.ndarray | torch.Tensor, estimate: np.ndarray | torch.Tensor) -> float:
    """Scale-invariant signal-to-distortion ratio in dB (Le Roux et al. 2019).

    Both signals are made zero-mean; with ``α = <ŝ, s> / ‖s‖²`` the target is ``α s`` and the distortion
    ``ŝ - α s``, and ``SI-SDR = 10 log10(‖α s‖² / ‖ŝ - α s‖²)``. Invariant to rescaling either signal
    (by any non-zero factor) and to DC offsets. ``+inf`` when the distortion is exactly zero (identical
    signals up to scale and offset) and ``-inf`` for a constant (silent) estimate, which carries no signal;
    callers that average must handle both. A constant reference raises ValueError (no target to project on).
    """
    ref, est = align(reference, estimate)
    # Constancy is tested before mean removal, which leaves rounding residue on a constant signal.
    if np.all(ref == ref[0]):
        raise ValueError("reference is constant (zero energy after mean removal): SI-SDR is undefined")
    if np.all(est == est[0]):
        return float("-inf")
    ref = ref - ref.mean()
    est = est - est.mean()
    ref_energy = float(ref @ ref)
    target = (float(est @ ref) / ref_energy) * ref
    distortion = est - target
    distortion_energy = float(distortion @ distortion)
    target_energy = float(target @ target)
    if distortion_energy == 0.0:
        return float("inf")
    if target_energy == 0.0:
        return float("-inf")
    return 10.0 * math.log10(target_energy / distortion_energy)


def stoi_score(
    reference: np.ndarray | torch.Tensor, estimate: np.ndarray | torch.Tensor, sample_rate: int
) -> float | None:
    """Classic STOI (pystoi, ``extended=False``; pystoi resamples to 10 kHz itself).

    ``None`` where STOI does not apply, with the reason logged: a silent (all-zero) reference, or fewer than
    the 30 analysis frames (about 0.4 s) STOI needs once pystoi has removed frames more than 40 dB below
    the loudest — pystoi would then crash on very short inputs or return a meaningless ``1e-5``.
    """
    sample_rate = _check_sample_rate(sample_rate)
    ref, est = align(reference, estimate)
    if not np.any(ref):
        log.info("STOI not computed: the reference is silent")
        return None
    if ref.size * _pystoi.FS / sample_rate < _STOI_MIN_SAMPLES_10K:
        log.info("STOI not computed: %.3f s is too short (STOI needs 30 frames)", ref.size / sample_rate)
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score = _pystoi.stoi(ref, est, sample_rate, extended=False)
    if any("Not enough STFT frames" in str(w.message) for w in caught):
        log.info("STOI not computed: fewer than 30 non-silent frames in %.3f s", ref.size / sample_rate)
        return None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return float(score)


def pesq_wb(
    reference: np.ndarray | torch.Tensor, estimate: np.ndarray | torch.Tensor, sample_rate: int
) -> float | None:
    """Wide-band PESQ (ITU-T P.862.2, MOS-LQO) at 16 kHz.

    Both signals are resampled from ``sample_rate`` to 16 kHz (:func:`latentdyn.data.audio.resample`,
    torchaudio's windowed sinc) and scored with ``pesq(16000, ref, est, "wb")``, which normalises both by
    their joint peak. Identical signals score the P.862.2 maximum, ``0.999 + 4 / (1 + exp(-1.3669 * 4.5 +
    3.8224)) ≈ 4.644``. ``None`` where PESQ does not apply, with the reason logged: shorter than 1/4 s, no
    utterance detected, or a silent (all-zero) or vanishingly faint (~1e-20 to 1e-30 of the reference's level) estimate,
    which the package cannot score. Other package errors raise :class:`pesq.PesqError`.
    """
    sample_rate = _check_sample_rate(sample_rate)
    ref, est = align(reference, estimate)
    if not np.any(ref) or not np.any(est):
        log.info("PESQ not computed: the %s is silent", "reference" if not np.any(ref) else "estimate")
        return None
    pair = torch.from_numpy(np.stack([ref, est]))
    ref16, est16 = resample(pair, sample_rate, PESQ_SAMPLE_RATE).numpy()
    # Error codes come back as negative ints (a MOS is >= ~1); a NaN (an estimate too faint for PESQ's float
    # arithmetic) would otherwise surface as an unrelated ValueError from the package's error lookup.
    score = pesq(PESQ_SAMPLE_RATE, ref16, est16, "wb", on_error=PesqError.RETURN_VALUES)
    if math.isnan(score):
        log.info("PESQ not computed: the estimate is too faint (the package returned NaN)")
        return None
    if score in _PESQ_NOT_APPLICABLE:
        log.info("PESQ not computed (%.3f s): %s", ref.size / sample_rate, _PESQ_NOT_APPLICABLE[score])
        return None
    if score < 0:
        raise PesqError(f"PESQ failed with error code {score}")
    return float(score)


def audio_distances(
    reference: np.ndarray | torch.Tensor,
    estimate: np.ndarray | torch.Tensor,
    sample_rate: int,
    *,
    with_stoi: bool = True,
    with_pesq: bool = True,
    length_rtol: float = LENGTH_RTOL,
    length_atol: int = 0,
) -> dict[str, float | None]:
    """Every metric of this module for one pair, keyed by :data:`AUDIO_METRIC_KEYS` (always all keys).

    The pair is aligned once with :func:`align` (``length_rtol``, ``length_atol``). ``stoi`` / ``pesq_wb`` are
    ``None`` when switched off or not applicable; ``si_sdr`` may be ``±inf`` (see :func:`si_sdr`).
    """
    ref, est = align(reference, estimate, rtol=length_rtol, atol=length_atol)
    return {
        "mrstft": multi_resolution_stft_distance(ref, est, sample_rate),
        "log_mel": log_mel_distance(ref, est, sample_rate),
        "si_sdr": si_sdr(ref, est),
        "stoi": stoi_score(ref, est, sample_rate) if with_stoi else None,
        "pesq_wb": pesq_wb(ref, est, sample_rate) if with_pesq else None,
    }
