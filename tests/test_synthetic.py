"""The synthetic corpus: deterministic, well-formed, and speech-like (pitch, pauses, spectral motion)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from latentdyn.data.corpus import Utterance, read_index, write_index
from latentdyn.data.synthetic import SyntheticCorpus, generate_utterance, speaker_profile

#: The specified pitch ranges (Hz), independent of the module's own constants.
SPEC_F0_RANGE = {"M": (85.0, 155.0), "F": (165.0, 255.0)}
SMALL = SyntheticCorpus(n_speakers=6, utterances_per_speaker=3, min_duration=1.0, max_duration=1.5, seed=7)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Utterance]]:
    root = tmp_path_factory.mktemp("synthetic")
    return root, SMALL.materialize(root)


def _relative(utts: list[Utterance], root: Path) -> list[Utterance]:
    return [replace(u, path=str(Path(u.path).relative_to(root))) for u in utts]


def _frames(wave: np.ndarray, sr: int, frame_s: float, hop_s: float) -> np.ndarray:
    n, hop = int(frame_s * sr), int(hop_s * sr)
    return np.lib.stride_tricks.sliding_window_view(wave.astype(np.float64), n)[::hop]


def _autocorrelation_f0(wave: np.ndarray, sr: int, fmin: float = 60.0, fmax: float = 320.0) -> np.ndarray:
    """F0 (Hz) of the loud, periodic 40 ms frames: the lag of the normalised autocorrelation's peak."""
    frames = _frames(wave, sr, 0.04, 0.02)
    energy = (frames**2).sum(axis=1)
    lo, hi = int(sr / fmax), int(sr / fmin)
    f0 = []
    for frame in frames[energy > energy.max() * 10 ** (-15 / 10)]:
        frame = frame - frame.mean()
        ac = np.fft.irfft(np.abs(np.fft.rfft(frame, 2 * frame.size)) ** 2)[: frame.size]
        ac /= ac[0]
        lag = lo + int(np.argmax(ac[lo : hi + 1]))
        if ac[lag] > 0.5:  # voiced: strongly periodic
            f0.append(sr / lag)
    return np.array(f0)


def test_materialize_is_deterministic(tmp_path: Path, small_corpus: tuple[Path, list[Utterance]]) -> None:
    root_a, utts_a = small_corpus
    root_b = tmp_path / "b"
    utts_b = SMALL.materialize(root_b)
    assert _relative(utts_a, root_a) == _relative(utts_b, root_b)
    for ua, ub in zip(utts_a, utts_b, strict=True):
        assert Path(ua.path).read_bytes() == Path(ub.path).read_bytes()
    # The index survives a round trip through the JSON-lines file.
    write_index(utts_b, tmp_path / "index.jsonl")
    assert read_index(tmp_path / "index.jsonl") == utts_b
    # Another seed gives other audio.
    other = replace(SMALL, seed=8).materialize(tmp_path / "c")
    assert Path(other[0].path).read_bytes() != Path(utts_a[0].path).read_bytes()


def test_index_layout_and_durations(small_corpus: tuple[Path, list[Utterance]]) -> None:
    root, utts = small_corpus
    assert len(utts) == SMALL.n_speakers * SMALL.utterances_per_speaker
    assert [u.utt_id for u in utts] == sorted(u.utt_id for u in utts)
    assert len({u.utt_id for u in utts}) == len(utts)
    assert len({u.speaker for u in utts}) == SMALL.n_speakers
    genders = {u.speaker: u.gender for u in utts}
    assert sorted(genders.values()) == ["F"] * 3 + ["M"] * 3
    for u in utts:
        assert re.fullmatch(r"s\d{3}-0-\d{4}", u.utt_id) and u.utt_id.startswith(u.speaker + "-")
        path = Path(u.path)
        assert path.is_absolute() and path == root.resolve() / u.speaker / f"{u.utt_id}.wav"
        assert (u.subset, u.chapter, u.sample_rate) == ("synthetic", "", SMALL.sample_rate)
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.subtype) == (SMALL.sample_rate, 1, "PCM_16")
        assert info.frames == round(u.duration * SMALL.sample_rate)
        assert SMALL.min_duration <= u.duration <= SMALL.max_duration
    durations = np.array([u.duration for u in utts])
    assert durations.std() > 0.02  # drawn per utterance, not constant


def test_written_audio_matches_generator_and_is_normalised(
    small_corpus: tuple[Path, list[Utterance]],
) -> None:
    _, utts = small_corpus
    for u in utts:
        wave, _ = sf.read(u.path, dtype="float32")
        s, i = int(u.speaker[1:]), int(u.utt_id.rsplit("-", 1)[1])
        expected = SMALL.utterance_audio(s, i)
        np.testing.assert_allclose(wave, expected, atol=1.0 / 32768)
        peak = np.abs(wave).max()
        assert 0.49 <= peak <= 0.91


def test_speaker_pitch_follows_profile_and_gender(small_corpus: tuple[Path, list[Utterance]]) -> None:
    _, utts = small_corpus
    medians: dict[str, list[float]] = {"M": [], "F": []}
    for s in range(SMALL.n_speakers):
        profile = speaker_profile(SMALL.seed, s)
        waves = [sf.read(u.path, dtype="float32")[0] for u in utts if u.speaker == f"s{s:03d}"]
        f0 = np.concatenate([_autocorrelation_f0(w, SMALL.sample_rate) for w in waves])
        assert f0.size >= 20, f"speaker {s}: too few voiced frames ({f0.size})"
        p5, median, p95 = np.percentile(f0, [5, 50, 95])
        assert profile.f0_low * 0.97 <= p5 and p95 <= profile.f0_high * 1.03, (s, profile, p5, p95)
        g_low, g_high = SPEC_F0_RANGE[profile.gender]
        assert g_low <= median <= g_high
        assert p95 / p5 > 1.03  # the pitch contour moves
        medians[profile.gender].append(float(median))
    assert max(medians["M"]) < min(medians["F"])


def test_speaker_profiles_differ() -> None:
    profiles = [speaker_profile(1234, s) for s in range(24)]
    for field in ("f0_low", "tract_factor", "speaking_rate", "breathiness"):
        values = [getattr(p, field) for p in profiles]
        assert len(set(values)) == len(values), field
    for p in profiles:
        g_low, g_high = SPEC_F0_RANGE[p.gender]
        assert g_low <= p.f0_low < p.f0_high <= g_high
        assert 0.85 <= p.tract_factor <= 1.15


def test_frames_are_not_stationary(small_corpus: tuple[Path, list[Utterance]]) -> None:
    _, utts = small_corpus
    sr = SMALL.sample_rate
    n = int(0.08 * sr)
    freqs = np.fft.rfftfreq(n, 1 / sr)
    spreads = []
    for u in utts:
        wave, _ = sf.read(u.path, dtype="float64")
        power = np.abs(np.fft.rfft(_frames(wave, sr, 0.08, 0.04) * np.hanning(n), axis=1)) ** 2
        energy_db = 10 * np.log10(power.sum(axis=1) + 1e-20)
        speech = energy_db > energy_db.max() - 30
        assert speech.sum() >= 5
        # Pauses: some frames are more than 30 dB below the loudest.
        assert (~speech).any(), u.utt_id
        centroid = (power * freqs).sum(axis=1) / power.sum(axis=1)
        spreads.append(centroid[speech].std())
    # Every utterance moves (vowel glides at least); most mix vowels with fricatives and bursts.
    assert min(spreads) > 40.0, spreads
    assert np.median(spreads) > 500.0, spreads


def test_generate_utterance_contract() -> None:
    profile = speaker_profile(3, 1)
    for sr in (8000, 16000, 24000):
        wave = generate_utterance(profile, np.random.default_rng([3, 1, 0]), 1.2, sr)
        assert wave.dtype == np.float32 and wave.shape == (round(1.2 * sr),)
        assert np.isfinite(wave).all() and np.abs(wave).max() <= 0.9 + 1e-6
    same = generate_utterance(profile, np.random.default_rng([3, 1, 0]), 1.2, 16000)
    np.testing.assert_array_equal(
        same, generate_utterance(profile, np.random.default_rng([3, 1, 0]), 1.2, 16000)
    )
    with pytest.raises(ValueError, match="duration"):
        generate_utterance(profile, np.random.default_rng(0), 0.1, 16000)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_speakers": 0},
        {"utterances_per_speaker": 0},
        {"min_duration": 3.0, "max_duration": 2.0},
        {"sample_rate": 100},
    ],
)
def test_invalid_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SyntheticCorpus(**kwargs)


def test_materialize_shows_progress_even_without_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Generation takes seconds to minutes: the bar shows in logs and pipes too (stderr is not a TTY here)."""
    SyntheticCorpus(n_speakers=1, utterances_per_speaker=2, min_duration=0.5, max_duration=0.6).materialize(
        tmp_path
    )
    err = capsys.readouterr().err
    assert "synthetic corpus" in err and "2/2" in err
