"""Audio crops for the β-VAE: crop offsets against their closed form, span reads against whole-file loading
(``load_audio`` then slicing), the seeded and resumable crop loaders, and the datamodule's splits.

Most tests use *coded ramps*: 24 kHz files whose sample ``i`` of utterance ``k`` is ``(k * 1000 + i) * CODE``,
so a crop's first sample says which utterance it came from and where it starts, independently of the code
that picked them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from latentdyn.data.audio import load_audio
from latentdyn.data.audio_crops import CENTRED, AudioCrops, crop_loader, crop_offset
from latentdyn.data.corpus import Utterance
from latentdyn.data.windows import ResumableBatchLoader

RATE = 24000
#: Crop length of the loader tests, in samples (short, so the tests read little).
CROP = 64
#: Value step of a coded ramp: utterance k's sample i holds (k * 1000 + i) * CODE (exact in float32).
CODE = 1e-6


def write_utterance(path: Path, samples: np.ndarray, sample_rate: int, utt_id: str = "") -> Utterance:
    """Write mono float32 ``samples`` to ``path`` (a lossless float WAV) and return its record."""
    sf.write(path, samples.astype(np.float32), sample_rate, subtype="FLOAT")
    return Utterance(
        utt_id=utt_id or path.stem,
        speaker="spk",
        path=str(path),
        duration=len(samples) / sample_rate,
        sample_rate=sample_rate,
    )


def coded_ramps(root: Path, codes: Sequence[int], lengths: Sequence[int]) -> list[Utterance]:
    """One 24 kHz coded ramp per ``(code, length)`` (lengths < 1000 samples)."""
    root.mkdir(parents=True, exist_ok=True)
    return [
        write_utterance(root / f"u{code:03d}.wav", (code * 1000 + np.arange(n)) * CODE, RATE)
        for code, n in zip(codes, lengths, strict=True)
    ]


def decode(batch: torch.Tensor) -> list[tuple[int, int]]:
    """``(utterance code, start sample)`` of each crop of a ``(B, 1, S)`` batch of coded ramps."""
    codes = torch.round(batch[:, 0, 0].double() / CODE).long().tolist()
    return [divmod(c, 1000) for c in codes]


def lengths_for(n: int, seed: int = 0) -> list[int]:
    """``n`` ramp lengths in [CROP // 2, 8 CROP): some shorter than a crop, most longer."""
    return np.random.default_rng(seed).integers(CROP // 2, 8 * CROP, n).tolist()


def run_batches(loader: ResumableBatchLoader, n: int) -> list[torch.Tensor]:
    """The first ``n`` batches of ``loader`` over as many epochs as needed, iterated like a training loop
    (a fresh ``iter`` per epoch, stopping mid-epoch when ``n`` is reached)."""
    out: list[torch.Tensor] = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


# --- crop_offset ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_samples", [0, 1, 63, 64])
@pytest.mark.parametrize("draw", [0, 1, 7, 2**31 - 1, CENTRED])
def test_crop_offset_without_room_is_zero(n_samples: int, draw: int) -> None:
    """A signal not longer than the crop (room <= 0) is cropped from its start, whatever the draw."""
    assert crop_offset(n_samples, 64, draw) == 0


@pytest.mark.parametrize(
    ("n_samples", "crop", "start"), [(65, 64, 0), (66, 64, 1), (100, 64, 18), (1001, 10, 495)]
)
def test_crop_offset_centred(n_samples: int, crop: int, start: int) -> None:
    """CENTRED starts at ``(n - crop) // 2`` (written out by hand above)."""
    assert crop_offset(n_samples, crop, CENTRED) == start


@pytest.mark.parametrize("room", [1, 2, 7, 30])
def test_crop_offset_reaches_every_start_equally(room: int) -> None:
    """Draws ``0 .. 5 (room + 1) - 1`` hit every start in ``[0, room]`` exactly 5 times; each is draw mod
    (room + 1); large draws stay in range."""
    crop = 50
    counts = [0] * (room + 1)
    for draw in range(5 * (room + 1)):
        start = crop_offset(crop + room, crop, draw)
        assert start == draw - (draw // (room + 1)) * (room + 1)
        counts[start] += 1
    assert counts == [5] * (room + 1)
    for draw in (2**31 - 1, 2**31 - 2, 123_456_789):
        assert 0 <= crop_offset(crop + room, crop, draw) <= room


# --- AudioCrops.crop against whole-file loading ----------------------------------------------------------------


def oracle_crop(utt: Utterance, sample_rate: int, start: int, crop: int) -> torch.Tensor:
    """The whole file at ``sample_rate`` (``load_audio``), sliced at ``start`` and zero-padded to ``crop``."""
    wave = load_audio(utt.path, sample_rate)[start : start + crop]
    return torch.nn.functional.pad(wave, (0, crop - wave.shape[0]))


@pytest.fixture
def noise_24k(tmp_path: Path) -> Utterance:
    """1.3 s of uniform noise in [-0.9, 0.9] at 24 kHz."""
    rng = np.random.default_rng(1)
    return write_utterance(tmp_path / "n24.wav", rng.uniform(-0.9, 0.9, 31_200), RATE)


@pytest.fixture
def tones_16k(tmp_path: Path) -> Utterance:
    """2.0077 s (an odd sample count) of two tones plus mild noise at 16 kHz, LibriSpeech's rate."""
    n = 32_123
    t = np.arange(n) / 16000
    rng = np.random.default_rng(2)
    x = (
        0.4 * np.sin(2 * np.pi * 440 * t)
        + 0.3 * np.sin(2 * np.pi * 3123.4 * t)
        + 0.05 * rng.standard_normal(n)
    )
    return write_utterance(tmp_path / "t16.wav", x, 16000)


def test_crop_at_the_target_rate_is_a_slice_of_the_file(noise_24k: Utterance) -> None:
    """A file already at the target rate: the span read equals the whole file's slice, bit for bit."""
    crop = 12_000
    crops = AudioCrops([noise_24k], RATE, crop)
    room = 31_200 - crop
    for draw, start in [(0, 0), (1, 1), (room, room), (room + 1, 0), (7777, 7777), (CENTRED, room // 2)]:
        got = crops.crop(noise_24k, draw)
        assert got.shape == (crop,) and got.dtype == torch.float32
        assert torch.equal(got, oracle_crop(noise_24k, RATE, start, crop)), draw


# The resampler's windowed sinc spans ~68 source samples on each side of an output sample; the span read has a
# 256-sample margin, so every output sample of the crop sees the same real neighbours as in the whole-file
# resample, and the outputs may differ only by float rounding of the convolution (1e-5 is ~100 float32 ulps at
# full scale). Reads that start within the margin of the file's start are clamped to sample 0 and see what the
# whole-file resample sees there (zeros before the file).
RESAMPLE_ATOL = 1e-5


@pytest.mark.parametrize("start", [0, 1, 2, 3, 100, 383])
def test_resampled_crop_near_the_file_start_matches_whole_file(tones_16k: Utterance, start: int) -> None:
    """16 kHz -> 24 kHz, crops whose read begins at the file's first sample: equal to resampling the whole
    file and slicing, up to float rounding."""
    crop = 12_000
    got = AudioCrops([tones_16k], RATE, crop).crop(tones_16k, start)
    assert got.shape == (crop,)
    assert (got - oracle_crop(tones_16k, RATE, start, crop)).abs().max().item() < RESAMPLE_ATOL


def test_resampled_crop_anywhere_matches_whole_file(tones_16k: Utterance) -> None:
    """16 kHz -> 24 kHz, crops anywhere in the file (mid-file, centred, flush with the end): equal to the
    whole-file resample's slice up to float rounding."""
    crop = 12_000
    crops = AudioCrops([tones_16k], RATE, crop)
    n_target = round(32_123 * 1.5)
    room = n_target - crop
    starts = [*range(2000, 2012), room // 2, room - 1, room]
    errors = {
        s: (crops.crop(tones_16k, s) - oracle_crop(tones_16k, RATE, s, crop)).abs().max().item()
        for s in starts
    }
    assert max(errors.values()) < RESAMPLE_ATOL, errors


@pytest.mark.parametrize(("rate", "n"), [(RATE, 5000), (16000, 3001)])
def test_short_file_is_zero_padded_to_the_crop(tmp_path: Path, rate: int, n: int) -> None:
    """A file shorter than the crop: its whole (resampled) waveform, then zeros up to exactly crop_samples."""
    crop = 12_000
    x = 0.5 * np.sin(2 * np.pi * 300 * np.arange(n) / rate)
    utt = write_utterance(tmp_path / f"short{rate}.wav", x, rate)
    whole = load_audio(utt.path, RATE)
    assert whole.shape[0] < crop
    for draw in (0, 12345, CENTRED):
        got = AudioCrops([utt], RATE, crop).crop(utt, draw)
        assert got.shape == (crop,)
        assert (got[: whole.shape[0]] - whole).abs().max().item() < RESAMPLE_ATOL
        assert torch.count_nonzero(got[whole.shape[0] :]) == 0


def test_getitem_batches_rows_of_index_and_draw(tmp_path: Path) -> None:
    """``crops[(n, 2) rows]`` is ``(n, 1, crop)`` float32, row j the crop of utterance rows[j, 0] at the start
    rows[j, 1] picks (coded ramps say which)."""
    lengths = [40, 64, 65, 300, 999]
    utts = coded_ramps(tmp_path, range(5), lengths)
    crops = AudioCrops(utts, RATE, CROP)
    rows = np.array([[3, 7], [0, 5], [4, CENTRED], [2, 1], [3, 10**9], [1, 3]], dtype=np.int64)
    batch = crops[rows]
    assert batch.shape == (len(rows), 1, CROP) and batch.dtype == torch.float32
    expected = []
    for i, draw in rows.tolist():
        room = lengths[i] - CROP
        expected.append((i, 0 if room <= 0 else (room // 2 if draw == CENTRED else draw % (room + 1))))
    assert decode(batch) == expected
    # The 40-sample ramp is padded with zeros after its last sample.
    assert torch.count_nonzero(batch[1, 0, 40:]) == 0 and batch[1, 0, 39] > 0


# --- crop_loader / CropBatchSampler -------------------------------------------------------------------------------


@pytest.fixture
def ramps(tmp_path: Path) -> list[Utterance]:
    """Twelve coded ramps, codes 0..11, of lengths in [CROP/2, 8 CROP)."""
    return coded_ramps(tmp_path / "ramps", range(12), lengths_for(12))


def epochs(loader: ResumableBatchLoader, n_epochs: int) -> list[list[tuple[int, int]]]:
    """The decoded ``(code, start)`` crops of ``n_epochs`` whole epochs, one list per epoch."""
    return [[pair for batch in loader for pair in decode(batch)] for _ in range(n_epochs)]


def test_loader_is_reproducible_per_seed(ramps: list[Utterance]) -> None:
    """The same seed gives the same crops (order and offsets, tensors equal) over several epochs; another seed
    gives others."""
    crops = AudioCrops(ramps, RATE, CROP)
    a = run_batches(crop_loader(crops, 4, True, seed=3, num_workers=0), 9)
    b = run_batches(crop_loader(crops, 4, True, seed=3, num_workers=0), 9)
    c = run_batches(crop_loader(crops, 4, True, seed=4, num_workers=0), 9)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert [decode(x) for x in a] != [decode(x) for x in c]


def test_each_epoch_is_a_permutation_with_random_offsets(ramps: list[Utterance]) -> None:
    """12 utterances, batch 4: every epoch crops each utterance once, at a start in its range; epochs differ in
    order, and an utterance's offset changes across epochs."""
    lengths = [int(round(u.duration * RATE)) for u in ramps]
    loader = crop_loader(AudioCrops(ramps, RATE, CROP), 4, True, seed=0, num_workers=0)
    assert len(loader) == 3
    seen = epochs(loader, 6)
    for epoch in seen:
        assert sorted(code for code, _ in epoch) == list(range(12))
        for code, start in epoch:
            assert 0 <= start <= max(lengths[code] - CROP, 0)
    assert len({tuple(code for code, _ in epoch) for epoch in seen}) == 6
    long_codes = [k for k, n in enumerate(lengths) if n - CROP >= 20]
    starts = {k: {dict(epoch)[k] for epoch in seen} for k in long_codes}
    assert all(len(s) > 1 for s in starts.values()), starts


def test_drop_last_drops_the_partial_batch(ramps: list[Utterance]) -> None:
    """10 utterances, batch 4: two full batches an epoch (len 2), 8 distinct utterances."""
    loader = crop_loader(AudioCrops(ramps[:10], RATE, CROP), 4, True, seed=0, num_workers=0)
    assert len(loader) == 10 // 4
    for epoch in range(3):
        batches = list(loader)
        assert [b.shape for b in batches] == [(4, 1, CROP)] * 2
        codes = [code for b in batches for code, _ in decode(b)]
        assert len(set(codes)) == 8 and set(codes) <= set(range(10)), epoch


def test_too_few_training_utterances_raise(ramps: list[Utterance]) -> None:
    with pytest.raises(ValueError, match="fewer than one batch of 16"):
        crop_loader(AudioCrops(ramps, RATE, CROP), 16, True, seed=0, num_workers=0)


def test_unshuffled_loader_gives_centred_crops_in_order(ramps: list[Utterance]) -> None:
    """Validation: utterances in order, the last batch kept (12 = 5 + 5 + 2), each crop centred, the same
    every epoch."""
    lengths = [int(round(u.duration * RATE)) for u in ramps]
    loader = crop_loader(AudioCrops(ramps, RATE, CROP), 5, False, seed=0, num_workers=0)
    assert [b.shape[0] for b in loader] == [5, 5, 2]
    expected = [(k, max(n - CROP, 0) // 2) for k, n in enumerate(lengths)]
    assert epochs(loader, 2) == [expected, expected]


def test_iterating_a_crop_loader_leaves_the_global_rng_alone(ramps: list[Utterance]) -> None:
    crops = AudioCrops(ramps, RATE, CROP)
    before = torch.get_rng_state()
    for shuffle in (True, False):
        list(crop_loader(crops, 4, shuffle, seed=0, num_workers=0))
    assert torch.equal(torch.get_rng_state(), before)


# --- resuming ----------------------------------------------------------------------------------------------------

TOTAL_BATCHES = 10  # 3 batches an epoch (10 utterances, batch 3, drop_last): over three epoch boundaries


@pytest.mark.parametrize(("stop", "workers"), [(0, 0), (1, 0), (2, 0), (3, 0), (5, 0), (7, 0), (4, 2)])
def test_resumed_loader_continues_the_uninterrupted_run(
    ramps: list[Utterance], stop: int, workers: int
) -> None:
    """Stopped after ``stop`` batches (mid-epoch, at an epoch's end, in a later epoch), a fresh loader with the
    same seed that loads the state dict yields exactly the batches the uninterrupted run yields next, across
    the following epoch boundaries. With worker processes (which read ahead) too."""
    crops = AudioCrops(ramps[:10], RATE, CROP)
    reference = run_batches(crop_loader(crops, 3, True, seed=11, num_workers=0), TOTAL_BATCHES)
    first = crop_loader(crops, 3, True, seed=11, num_workers=workers)
    before = run_batches(first, stop)
    state = first.state_dict()
    resumed = crop_loader(crops, 3, True, seed=11, num_workers=workers)
    resumed.load_state_dict(state)
    after = run_batches(resumed, TOTAL_BATCHES - stop)
    got = before + after
    assert len(got) == len(reference)
    for i, (x, y) in enumerate(zip(got, reference, strict=True)):
        assert torch.equal(x, y), (i, decode(x), decode(y))


# --- the datamodule ----------------------------------------------------------------------------------------------


@pytest.fixture
def splits(tmp_path: Path) -> dict[str, list[Utterance]]:
    """Coded-ramp splits: train codes 0..5, val 10..13, test 20..22."""
    return {
        "train": coded_ramps(tmp_path / "train", range(6), lengths_for(6, 1)),
        "val": coded_ramps(tmp_path / "val", range(10, 14), lengths_for(4, 2)),
        "test": coded_ramps(tmp_path / "test", range(20, 23), lengths_for(3, 3)),
    }


def test_datamodule_draws_each_loader_from_its_split(splits: dict[str, list[Utterance]]) -> None:
    """Train batches come from the train utterances only (each once an epoch), val from val only (centred,
    in order); max_val_crops keeps the first val utterances."""
    from latentdyn.data.audio_crops import AudioCropDataModule

    dm = AudioCropDataModule(splits, sample_rate=RATE, crop_seconds=CROP / RATE, batch_size=2, seed=5)
    assert dm.crop_samples == CROP
    assert dm.train.utterances == splits["train"] and dm.val.utterances == splits["val"]
    for _ in range(2):
        train = [pair for batch in dm.train_dataloader() for pair in decode(batch)]
        assert sorted(code for code, _ in train) == list(range(6))
    val_lengths = [int(round(u.duration * RATE)) for u in splits["val"]]
    val = [pair for batch in dm.val_dataloader() for pair in decode(batch)]
    assert val == [(10 + i, max(n - CROP, 0) // 2) for i, n in enumerate(val_lengths)]

    capped = AudioCropDataModule(
        splits, sample_rate=RATE, crop_seconds=CROP / RATE, batch_size=2, max_val_crops=3
    )
    assert [code for batch in capped.val_dataloader() for code, _ in decode(batch)] == [10, 11, 12]
    no_val = AudioCropDataModule({"train": splits["train"]}, sample_rate=RATE, crop_seconds=CROP / RATE)
    assert no_val.val_dataloader() == []


def test_datamodule_with_fewer_train_utterances_than_a_batch_raises(
    splits: dict[str, list[Utterance]],
) -> None:
    from latentdyn.data.audio_crops import AudioCropDataModule

    dm = AudioCropDataModule(splits, sample_rate=RATE, crop_seconds=CROP / RATE, batch_size=8)
    with pytest.raises(
        ValueError, match=r"6 training utterances are fewer than one batch of 8: lower the batch"
    ):
        dm.train_dataloader()
