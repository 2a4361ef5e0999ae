"""The audio cache: decoded once at the model's rate, cropped as slices, bad files recorded."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from latentdyn.data.audio import BadAudioError, load_audio
from latentdyn.data.audio_cache import AudioCache, write_audio_cache
from latentdyn.data.audio_crops import CENTRED, AudioCrops
from latentdyn.data.corpus import Utterance

RATE = 24000
#: One 16-bit quantisation step (the cache stores int16).
LSB = 1.0 / 32767


def _utterance(root: Path, name: str, samples: np.ndarray, rate: int) -> Utterance:
    path = root / f"{name}.wav"
    sf.write(path, samples.astype(np.float32), rate, subtype="FLOAT")
    return Utterance(name, name[:2], str(path), samples.size / rate, rate)


@pytest.fixture
def corpus(tmp_path: Path) -> list[Utterance]:
    rng = np.random.default_rng(0)
    t16 = np.arange(int(2.5 * 16000)) / 16000
    return [
        _utterance(
            tmp_path, "a1", 0.3 * np.sin(2 * np.pi * 220 * t16) + 0.01 * rng.standard_normal(t16.size), 16000
        ),
        _utterance(tmp_path, "b1", 0.2 * rng.standard_normal(int(1.5 * RATE)), RATE),
    ]


def test_spans_are_the_decoded_audio_to_one_quantisation_step(
    corpus: list[Utterance], tmp_path: Path
) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    write_audio_cache(corpus, RATE, root, "skip")
    cache = AudioCache(root)
    for utt in corpus:
        full = load_audio(utt.path, RATE)  # the oracle: what extraction encodes
        assert cache.n_samples(utt.utt_id) == full.numel()
        for start, n in ((0, 100), (1234, 5000), (full.numel() - 50, 50)):
            torch.testing.assert_close(
                cache.span(utt.utt_id, start, n), full[start : start + n], atol=LSB, rtol=0
            )
        tail = cache.span(utt.utt_id, full.numel() - 10, 30)
        assert torch.equal(tail[10:], torch.zeros(20))
    # Pickled into a loader worker without its memory map.
    assert pickle.loads(pickle.dumps(cache))._pcm is None


def test_crops_from_the_cache_equal_crops_read_from_the_files(
    corpus: list[Utterance], tmp_path: Path
) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    write_audio_cache(corpus, RATE, root, "skip")
    crop = 30000  # longer than b1: zero-padded in both
    cached = AudioCrops(corpus, RATE, crop, cache=AudioCache(root))
    direct = AudioCrops(corpus, RATE, crop)
    items = np.array([[0, 7], [0, CENTRED], [0, 123456], [1, 3]])
    torch.testing.assert_close(cached[items], direct[items], atol=2 * LSB, rtol=0)
    with pytest.raises(ValueError, match="not in the audio cache"):
        AudioCrops(
            [*corpus, Utterance("zz", "zz", "/nope.wav", 1.0, RATE)], RATE, crop, cache=AudioCache(root)
        )
    with pytest.raises(ValueError, match="at 24000 Hz, the crops at 16000 Hz"):
        AudioCrops(corpus, 16000, crop, cache=AudioCache(root))


def test_bad_files_are_left_out_and_recorded_or_stop_the_build(
    corpus: list[Utterance], tmp_path: Path
) -> None:
    silent = _utterance(tmp_path, "c1", np.zeros(RATE), RATE)
    root = tmp_path / "cache"
    root.mkdir()
    write_audio_cache([*corpus, silent], RATE, root, "skip")
    cache = AudioCache(root)
    assert "c1" not in cache and "a1" in cache
    (record,) = json.loads((root / "bad_files.json").read_text())
    assert record["utt_id"] == "c1" and "silent" in record["reason"]
    strict = tmp_path / "strict"
    strict.mkdir()
    with pytest.raises(BadAudioError, match="silent"):
        write_audio_cache([silent], RATE, strict, "error")
