"""Objective audio metrics: ideal values, monotonicity in noise, closed forms, oracles, validation, rates."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pesq import pesq
from pystoi import stoi
from scipy import signal

from latentdyn.data.synthetic import generate_utterance, speaker_profile
from latentdyn.diagnostics.audio_metrics import (
    AUDIO_METRIC_KEYS,
    HIGHER_IS_BETTER,
    align,
    audio_distances,
    log_mel_distance,
    multi_resolution_stft_distance,
    pesq_wb,
    si_sdr,
    stft_distance_terms,
    stoi_score,
)

SR = 16000
SNRS_DB = (30.0, 20.0, 10.0, 0.0)
#: P.862.2 mapping of the raw PESQ maximum 4.5 to MOS-LQO.
PESQ_WB_MAX = 0.999 + 4.0 / (1.0 + math.exp(-1.3669 * 4.5 + 3.8224))


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """3 s of the synthetic corpus's speech-like audio at 16 kHz (voiced/unvoiced segments and pauses)."""
    return generate_utterance(speaker_profile(7, 0), np.random.default_rng([7, 0, 0]), 3.0, SR)


def _add_noise(x: np.ndarray, snr_db: float, seed: int = 123) -> np.ndarray:
    """``x`` plus white Gaussian noise at ``snr_db`` relative to the mean power of ``x`` (same noise draw)."""
    noise = np.random.default_rng(seed).standard_normal(x.size)
    return x + noise * math.sqrt(float(np.mean(x.astype(np.float64) ** 2)) / 10.0 ** (snr_db / 10.0))


@pytest.fixture(scope="module")
def noisy_scores(speech: np.ndarray) -> dict[float, dict[str, float | None]]:
    return {snr: audio_distances(speech, _add_noise(speech, snr), SR) for snr in SNRS_DB}


def test_identical_signals_score_the_ideal_values(speech: np.ndarray) -> None:
    scores = audio_distances(speech, speech.copy(), SR)
    assert list(scores) == list(AUDIO_METRIC_KEYS)
    assert scores["mrstft"] == 0.0
    assert scores["log_mel"] == 0.0
    assert scores["si_sdr"] == math.inf or scores["si_sdr"] > 100.0
    assert scores["stoi"] == pytest.approx(1.0, abs=1e-9)
    assert scores["pesq_wb"] == pytest.approx(PESQ_WB_MAX, abs=1e-3)
    # torch inputs (any float dtype) give the same numbers
    as_torch = audio_distances(torch.from_numpy(speech), torch.from_numpy(speech).double(), SR)
    assert as_torch == scores


def test_every_metric_worsens_monotonically_with_noise(
    speech: np.ndarray, noisy_scores: dict[float, dict[str, float | None]]
) -> None:
    ideal = audio_distances(speech, speech, SR)
    for key in AUDIO_METRIC_KEYS:
        # ordered from the ideal to the noisiest: the "goodness" must fall strictly at each step
        values = [ideal[key]] + [noisy_scores[snr][key] for snr in SNRS_DB]
        assert all(v is not None for v in values), key
        goodness = [v if HIGHER_IS_BETTER[key] else -v for v in values]
        assert all(a > b for a, b in zip(goodness, goodness[1:], strict=False)), (key, values)
    # white noise is almost orthogonal to the speech, so SI-SDR is the SNR
    for snr in SNRS_DB:
        assert noisy_scores[snr]["si_sdr"] == pytest.approx(snr, abs=0.2)


def test_si_sdr_matches_its_closed_form() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(4000)
    ref -= ref.mean()
    noise = rng.standard_normal(4000)
    noise -= noise.mean()
    noise -= (noise @ ref) / (ref @ ref) * ref  # orthogonal to ref, still zero-mean
    for a in (0.3, 1.0, -2.5):
        expected = 10.0 * math.log10(a**2 * (ref @ ref) / (noise @ noise))
        assert si_sdr(ref, a * ref + noise) == pytest.approx(expected, rel=1e-10)
        # a DC offset on either side is removed first
        assert si_sdr(ref + 3.0, a * ref + noise - 1.0) == pytest.approx(expected, rel=1e-10)


@settings(max_examples=30, deadline=None)
@given(
    scale_ref=st.floats(1e-3, 1e3) | st.floats(-1e3, -1e-3),
    scale_est=st.floats(1e-3, 1e3) | st.floats(-1e3, -1e-3),
    seed=st.integers(0, 2**16),
)
def test_si_sdr_is_scale_invariant(scale_ref: float, scale_est: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal(1000)
    est = ref + 0.5 * rng.standard_normal(1000)
    assert si_sdr(scale_ref * ref, scale_est * est) == pytest.approx(si_sdr(ref, est), abs=1e-8)


def test_si_sdr_degenerate_inputs() -> None:
    ref = np.random.default_rng(1).standard_normal(1000)
    assert si_sdr(ref, np.zeros(1000)) == -math.inf
    assert si_sdr(ref, np.full(1000, 0.3)) == -math.inf  # a constant is silent once the mean is removed
    with pytest.raises(ValueError, match="reference is constant"):
        si_sdr(np.full(1000, 0.5), ref)


def _numpy_stft_terms(
    ref: np.ndarray, est: np.ndarray, fft_size: int, hop: int, win: int
) -> tuple[float, float]:
    """Oracle: centred, reflect-padded frames; periodic Hann of ``win`` centred in ``fft_size``; rfft."""

    def magnitude(x: np.ndarray) -> np.ndarray:
        padded = np.pad(x, fft_size // 2, mode="reflect")
        n_frames = 1 + (padded.size - fft_size) // hop
        window = np.zeros(fft_size)
        left = (fft_size - win) // 2
        window[left : left + win] = signal.get_window("hann", win, fftbins=True)
        frames = np.stack([padded[i * hop : i * hop + fft_size] * window for i in range(n_frames)])
        return np.sqrt(np.maximum(np.abs(np.fft.rfft(frames, axis=1)) ** 2, 1e-7))

    x, y = magnitude(ref), magnitude(est)
    return float(np.linalg.norm(x - y) / np.linalg.norm(x)), float(np.mean(np.abs(np.log(x) - np.log(y))))


def test_stft_terms_match_a_numpy_oracle() -> None:
    rng = np.random.default_rng(2)
    ref = rng.standard_normal(6000)
    est = ref + 0.3 * rng.standard_normal(6000)
    for fft_size, hop, win in ((512, 50, 240), (1024, 120, 600), (256, 64, 256)):
        got = stft_distance_terms(ref, est, fft_size, hop, win)
        assert got == pytest.approx(_numpy_stft_terms(ref, est, fft_size, hop, win), rel=1e-9)


def test_mrstft_closed_form_for_a_gain_and_its_symmetries() -> None:
    x = np.random.default_rng(3).standard_normal(SR)  # loud and broadband: the power floor is never reached
    for a in (0.5, 2.0, 3.0):
        # spectral convergence |a - 1| + log-magnitude |ln a| at every resolution
        expected = abs(a - 1.0) + abs(math.log(a))
        assert multi_resolution_stft_distance(x, a * x, SR) == pytest.approx(expected, rel=1e-9)
    y = x + np.random.default_rng(4).standard_normal(SR)
    sc_xy, log_xy = stft_distance_terms(x, y, 1024, 120, 600)
    sc_yx, log_yx = stft_distance_terms(y, x, 1024, 120, 600)
    assert log_xy == pytest.approx(log_yx, rel=1e-12)  # the log-magnitude term is symmetric
    assert sc_xy != pytest.approx(sc_yx, rel=1e-3)  # spectral convergence is relative to the reference
    assert stft_distance_terms(x, 2 * x, 512, 50, 240)[0] == pytest.approx(1.0, rel=1e-9)
    assert stft_distance_terms(2 * x, x, 512, 50, 240)[0] == pytest.approx(0.5, rel=1e-9)


def test_log_mel_is_a_gain_in_db_and_invariant_to_a_common_gain(speech: np.ndarray) -> None:
    x = np.random.default_rng(5).standard_normal(SR)
    for gain_db in (-6.0, 3.0):
        est = x * 10.0 ** (gain_db / 20.0)
        assert log_mel_distance(x, est, SR) == pytest.approx(abs(gain_db), rel=1e-6)
    noisy = _add_noise(speech, 10.0)
    base = log_mel_distance(speech, noisy, SR)
    assert log_mel_distance(0.125 * speech, 0.125 * noisy, SR) == pytest.approx(base, rel=1e-9)


def test_short_signals_have_no_stoi_or_pesq(speech: np.ndarray) -> None:
    mid = speech.size // 2
    short = speech[mid : mid + int(0.2 * SR)]
    scores = audio_distances(short, _add_noise(short, 10.0), SR)
    assert scores["stoi"] is None and scores["pesq_wb"] is None
    assert math.isfinite(scores["mrstft"]) and math.isfinite(scores["si_sdr"])
    # 0.5 s passes the length check, but only 0.1 s is above STOI's 40 dB silence threshold: pystoi warns and
    # returns 1e-5; that must come back as None, with no warning escaping
    tone = np.zeros(int(0.5 * SR))
    tone[: int(0.1 * SR)] = np.sin(2 * np.pi * 300.0 * np.arange(int(0.1 * SR)) / SR)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stoi_score(tone, tone, SR) is None


def test_silent_or_vanishing_estimates(speech: np.ndarray) -> None:
    silent = np.zeros_like(speech)
    assert pesq_wb(speech, silent, SR) is None
    assert pesq_wb(silent, speech, SR) is None
    assert stoi_score(silent, speech, SR) is None
    assert stoi_score(speech, silent, SR) == pytest.approx(0.0, abs=1e-9)
    faint = 1e-30 * np.random.default_rng(6).standard_normal(speech.size)
    assert pesq_wb(speech, faint, SR) is None  # the package returns NaN here


def test_align_crops_within_tolerance_and_rejects_beyond() -> None:
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal(10000), rng.standard_normal(10080)
    ref, est = align(a, b)
    assert ref.size == est.size == 10000
    np.testing.assert_array_equal(ref, a)
    np.testing.assert_array_equal(est, b[:10000])
    too_long = rng.standard_normal(10200)  # 2 % longer
    for fn in (
        lambda: align(a, too_long),
        lambda: si_sdr(a, too_long),
        lambda: multi_resolution_stft_distance(too_long, a, SR),
        lambda: log_mel_distance(a, too_long, SR),
        lambda: stoi_score(a, too_long, SR),
        lambda: pesq_wb(a, too_long, SR),
        lambda: audio_distances(a, too_long, SR),
    ):
        with pytest.raises(ValueError, match="differ by 200"):
            fn()
    assert align(a, too_long, atol=200)[1].size == 10000
    assert (
        audio_distances(a, too_long, SR, length_atol=200, with_pesq=False, with_stoi=False)["pesq_wb"] is None
    )


@pytest.mark.parametrize(
    ("reference", "estimate", "sample_rate", "match"),
    [
        (np.array([0.0, np.nan, 1.0] * 400), np.ones(1200), SR, "non-finite"),
        (np.ones(1200), np.array([np.inf] * 1200), SR, "non-finite"),
        (np.ones((2, 1200)), np.ones((2, 1200)), SR, "1-D"),
        (np.ones(0), np.ones(0), SR, "empty"),
        (np.ones(1200, dtype=complex), np.ones(1200), SR, "real"),
        (np.ones(1200), np.ones(1200), 4000, "sample_rate"),
        (np.ones(1200), np.ones(1200), 16000.5, "sample_rate"),
        (np.ones(1200), np.ones(1200), True, "sample_rate"),
    ],
)
def test_invalid_inputs_raise(reference, estimate, sample_rate, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        audio_distances(reference, estimate, sample_rate)


def test_metrics_can_be_switched_off(speech: np.ndarray) -> None:
    scores = audio_distances(speech, speech, SR, with_stoi=False, with_pesq=False)
    assert list(scores) == list(AUDIO_METRIC_KEYS)
    assert scores["stoi"] is None and scores["pesq_wb"] is None


@pytest.mark.parametrize("sample_rate", [24000, 48000])
@pytest.mark.slow
def test_higher_sample_rates(speech: np.ndarray, sample_rate: int) -> None:
    up, down = sample_rate // 8000, 2  # 24 kHz = 16 kHz * 3/2, 48 kHz = 16 kHz * 6/2
    noisy = _add_noise(speech, 20.0)
    ref_hi = signal.resample_poly(speech.astype(np.float64), up, down)
    est_hi = signal.resample_poly(noisy, up, down)
    # PESQ is resampled back to 16 kHz: the score is that of the 16 kHz pair (up to the resampling filters)
    assert pesq_wb(ref_hi, ref_hi, sample_rate) == pytest.approx(PESQ_WB_MAX, abs=1e-3)
    assert pesq_wb(ref_hi, est_hi, sample_rate) == pytest.approx(pesq(SR, speech, noisy, "wb"), abs=0.1)
    # noise above 8 kHz is outside wide-band PESQ: removed by the band-limited resampler, not aliased
    spectrum = np.fft.rfft(np.random.default_rng(8).standard_normal(ref_hi.size))
    spectrum[np.fft.rfftfreq(ref_hi.size, 1.0 / sample_rate) < 10000.0] = 0.0
    hf_noise = np.fft.irfft(spectrum, n=ref_hi.size)
    hf_noise *= np.sqrt(np.mean(ref_hi**2) / np.mean(hf_noise**2))  # 0 dB SNR, all above 10 kHz
    assert pesq_wb(ref_hi, ref_hi + hf_noise, sample_rate) > 4.5
    # pystoi resamples to 10 kHz itself
    assert stoi_score(ref_hi, est_hi, sample_rate) == pytest.approx(stoi(speech, noisy, SR), abs=1e-3)
    scores = audio_distances(ref_hi, est_hi, sample_rate)
    assert all(v is not None and math.isfinite(v) for v in scores.values())


def test_the_reference_reconstruction_distances_match_torchaudio_and_numpy(speech: np.ndarray) -> None:
    """``log_mel_l1`` is the reference study's mel distance (torchaudio's MelSpectrogram defaults, ln, floor
    1e-5, L1); ``waveform_l1`` the mean absolute sample difference."""
    import torch
    import torchaudio

    from latentdyn.diagnostics.audio_metrics import log_mel_l1, waveform_l1

    noisy = _add_noise(speech, 10.0)
    transform = torchaudio.transforms.MelSpectrogram(sample_rate=SR, n_fft=1024, hop_length=256, n_mels=80)
    ref = torch.log(transform(torch.tensor(speech, dtype=torch.float32)).clamp_min(1e-5))
    est = torch.log(transform(torch.tensor(noisy, dtype=torch.float32)).clamp_min(1e-5))
    assert log_mel_l1(speech, noisy, SR) == pytest.approx(float((ref - est).abs().mean()), rel=1e-4)
    assert log_mel_l1(speech, speech, SR) == 0.0
    assert waveform_l1(speech, noisy) == pytest.approx(float(np.mean(np.abs(speech - noisy))), rel=1e-9)
