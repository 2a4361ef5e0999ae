"""Audio loading: round trip, channel mixing, resampling, and every bad-file case named."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from latentdyn.data.audio import BadAudioError, load_audio, resample


def _sine(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_frequency(wave: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
    return float(np.fft.rfftfreq(wave.size, 1 / sr)[np.argmax(spectrum)])


def test_round_trip_pcm16(tmp_path: Path) -> None:
    wave = _sine(440.0, 16000, 0.5) + 0.1 * np.random.default_rng(0).uniform(-1, 1, 8000).astype(np.float32)
    path = tmp_path / "a.wav"
    sf.write(path, wave, 16000, subtype="PCM_16")
    loaded = load_audio(path, 16000)
    assert loaded.dtype == torch.float32 and loaded.shape == (8000,)
    np.testing.assert_allclose(loaded.numpy(), wave, atol=1.0 / 32768 + 1e-7)
    assert load_audio(str(path), 16000).equal(loaded)  # str paths too


def test_stereo_is_averaged_to_mono(tmp_path: Path) -> None:
    left, right = _sine(300.0, 16000, 0.25), _sine(1000.0, 16000, 0.25, amp=0.3)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    loaded = load_audio(path, 16000)
    assert loaded.shape == (4000,)
    np.testing.assert_allclose(loaded.numpy(), (left + right) / 2, atol=1e-7)


def test_resample_length_and_frequency(tmp_path: Path) -> None:
    sr_in, sr_out = 16000, 24000
    path = tmp_path / "sine.wav"
    sf.write(path, _sine(1234.0, sr_in, 1.0), sr_in, subtype="FLOAT")
    loaded = load_audio(path, sr_out).numpy()
    assert loaded.shape == (24000,)
    assert abs(_peak_frequency(loaded, sr_out) - 1234.0) <= 1.0  # 1 Hz bins
    # Away from the edges the sine is reproduced sample for sample at the new rate.
    t = np.arange(24000) / sr_out
    np.testing.assert_allclose(
        loaded[1000:-1000], 0.5 * np.sin(2 * np.pi * 1234.0 * t)[1000:-1000], atol=2e-3
    )
    assert np.abs(loaded).max() <= 1.0


def test_resample_is_identity_at_equal_rates_and_downsamples() -> None:
    wave = torch.from_numpy(_sine(3000.0, 24000, 0.5))
    assert resample(wave, 24000, 24000) is wave
    down = resample(wave, 24000, 16000)
    assert down.shape == (8000,)
    assert abs(_peak_frequency(down.numpy(), 16000) - 3000.0) <= 2.0
    # A tone above the new Nyquist is removed, not aliased.
    high = resample(torch.from_numpy(_sine(10000.0, 24000, 0.5)), 24000, 16000)
    assert high[500:-500].abs().max() < 1e-3
    with pytest.raises(ValueError):
        resample(wave, 0, 16000)


def _corrupt(path: Path) -> None:
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really a wav file at all" * 4)


def _empty(path: Path) -> None:
    sf.write(path, np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")


def _zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _nan(path: Path) -> None:
    wave = _sine(200.0, 16000, 0.1)
    wave[100] = np.nan
    sf.write(path, wave, 16000, subtype="FLOAT")


def _inf(path: Path) -> None:
    wave = _sine(200.0, 16000, 0.1)
    wave[5] = np.inf
    sf.write(path, wave, 16000, subtype="FLOAT")


def _zeros(path: Path) -> None:
    sf.write(path, np.zeros(1600, dtype=np.float32), 16000, subtype="PCM_16")


def _too_loud(path: Path) -> None:
    sf.write(path, _sine(200.0, 16000, 0.1, amp=1.5), 16000, subtype="FLOAT")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_corrupt, "unreadable"),
        (_zero_bytes, "unreadable"),
        (_empty, "empty"),
        (_nan, "non-finite"),
        (_inf, "non-finite"),
        (_zeros, "silent"),
        (_too_loud, "outside"),
        (None, "no such file"),
    ],
)
def test_bad_files_raise_naming_the_file(tmp_path: Path, make, reason: str) -> None:
    path = tmp_path / "bad_file_17.wav"
    if make is not None:
        make(path)
    with pytest.raises(BadAudioError) as info:
        load_audio(path, 16000)
    err = info.value
    assert err.path == str(path) and reason in err.reason
    assert str(path) in str(err) and reason in str(err)
    # Survives pickling (errors cross process boundaries in data loaders).
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.reason) == (err.path, err.reason)


def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(BadAudioError, match="not a regular file"):
        load_audio(tmp_path, 16000)


def test_resample_padding_to_whole_seconds_does_not_change_the_output() -> None:
    import torchaudio.functional as AF

    from latentdyn.data.audio import _RESAMPLE_KW

    g = torch.Generator().manual_seed(0)
    for n in (1, 999, 16000, 16001, 31234):
        x = torch.randn(n, generator=g)
        direct = AF.resample(x, 16000, 24000, **_RESAMPLE_KW)
        ours = resample(x, 16000, 24000)
        assert ours.shape == direct.shape
        torch.testing.assert_close(ours, direct, atol=2e-6, rtol=0)
