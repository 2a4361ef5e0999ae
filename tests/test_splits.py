"""Speaker-disjoint, gender-stratified, seed-deterministic splits, utterance filters, and the reference
study's split (``data/split=reference``) checked against its own split files (tests/data/reference_splits)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import call
from hypothesis import given, settings
from hypothesis import strategies as st

from latentdyn.data.corpus import Utterance
from latentdyn.data.splits import (
    SPLITS,
    filter_utterances,
    reference_splits,
    speaker_splits,
    stratified_splits,
)
from latentdyn.data.synthetic import SyntheticCorpus

REFERENCE_DIR = Path(__file__).parent / "data" / "reference_splits"


def _pool(n_male: int, n_female: int, n_unknown: int = 0, per_speaker: int = 3) -> list[Utterance]:
    """Utterances of ``per_speaker`` each for speakers of the given genders, durations 1..per_speaker s."""
    genders = ["M"] * n_male + ["F"] * n_female + ["U"] * n_unknown
    return [
        Utterance(
            utt_id=f"{spk:04d}-1-{i:04d}",
            speaker=f"{spk:04d}",
            path=f"/data/{spk}/{i}.flac",
            duration=float(i + 1),
            sample_rate=16000,
            gender=g,
        )
        for spk, g in enumerate(genders)
        for i in range(per_speaker)
    ]


def _speakers(split: list[Utterance]) -> set[str]:
    return {u.speaker for u in split}


def _gender_counts(split: list[Utterance]) -> Counter[str]:
    return Counter({u.speaker: u.gender for u in split}.values())


def _assert_proportional(splits: dict[str, list[Utterance]], pool: list[Utterance]) -> None:
    """Each split's per-gender speaker count is within 1 of its proportional share of the pool."""
    pool_counts = _gender_counts(pool)
    n_pool = sum(pool_counts.values())
    for split in splits.values():
        n = len(_speakers(split))
        counts = _gender_counts(split)
        for g, n_g in pool_counts.items():
            assert abs(counts[g] - n * n_g / n_pool) < 1.0, (counts, pool_counts)


def test_synthetic_corpus_splits(tmp_path: Path) -> None:
    corpus = SyntheticCorpus(
        n_speakers=6, utterances_per_speaker=3, min_duration=1.0, max_duration=1.2, seed=3
    )
    utts = corpus.materialize(tmp_path)
    splits = speaker_splits(utts, n_speakers={"train": 4, "val": 1, "test": 1}, seed=0)
    assert [len(_speakers(splits[s])) for s in SPLITS] == [4, 1, 1]
    assert _gender_counts(splits["train"]) == Counter({"M": 2, "F": 2})
    assert sorted(u.utt_id for s in SPLITS for u in splits[s]) == sorted(u.utt_id for u in utts)


def test_disjoint_sorted_and_deterministic() -> None:
    pool = _pool(10, 8, 2)
    counts = {"train": 12, "val": 4, "test": 4}
    splits = speaker_splits(pool, n_speakers=counts, seed=5)
    assert list(splits) == list(SPLITS)
    for a in SPLITS:
        assert [u.utt_id for u in splits[a]] == sorted(u.utt_id for u in splits[a])
        assert len(_speakers(splits[a])) == counts[a]
        for b in SPLITS:
            if a != b:
                assert not _speakers(splits[a]) & _speakers(splits[b])
        # A speaker's utterances all go to the same split.
        assert all(len(splits[a]) == 3 * len(_speakers(splits[a])) for a in SPLITS)
    assert speaker_splits(pool, n_speakers=counts, seed=5) == splits
    shuffled = [pool[i] for i in np.random.default_rng(0).permutation(len(pool))]
    assert speaker_splits(shuffled, n_speakers=counts, seed=5) == splits
    assert speaker_splits(list(reversed(pool)), n_speakers=counts, seed=5) == splits
    others = [speaker_splits(pool, n_speakers=counts, seed=s) for s in range(6, 9)]
    assert any(_speakers(o["train"]) != _speakers(splits["train"]) for o in others)


def test_seed_changes_the_assignment() -> None:
    pool = _pool(10, 10)
    trains = {
        frozenset(
            _speakers(speaker_splits(pool, n_speakers={"train": 10, "val": 5, "test": 5}, seed=s)["train"])
        )
        for s in range(5)
    }
    assert len(trains) >= 4


def test_gender_stratification_mirrors_the_pool() -> None:
    pool = _pool(15, 9, 3)
    splits = speaker_splits(pool, fractions={"train": 0.7, "val": 0.15, "test": 0.15}, seed=1)
    assert sum(len(_speakers(s)) for s in splits.values()) == 27
    _assert_proportional(splits, pool)
    # Without stratification a split may be far from proportional for some seed.
    skews = []
    for seed in range(30):
        flat = speaker_splits(
            pool, n_speakers={"train": 9, "val": 9, "test": 9}, seed=seed, stratify_by_gender=False
        )
        skews.append(max(abs(_gender_counts(s)["M"] - 5) for s in flat.values()))
        strat = speaker_splits(pool, n_speakers={"train": 9, "val": 9, "test": 9}, seed=seed)
        assert all(_gender_counts(s) == Counter({"M": 5, "F": 3, "U": 1}) for s in strat.values())
    assert max(skews) >= 2


@settings(max_examples=60, deadline=None)
@given(
    n_male=st.integers(0, 12),
    n_female=st.integers(0, 12),
    n_unknown=st.integers(0, 4),
    weights=st.tuples(st.integers(1, 10), st.integers(0, 5), st.integers(0, 5)),
    seed=st.integers(0, 2**32 - 1),
)
def test_fraction_mode_properties(n_male, n_female, n_unknown, weights, seed) -> None:
    pool = _pool(n_male, n_female, n_unknown, per_speaker=1)
    n_total = n_male + n_female + n_unknown
    fractions = {s: w / sum(weights) for s, w in zip(SPLITS, weights, strict=True)}
    n_positive = sum(w > 0 for w in weights)
    if n_total < n_positive:
        if n_total == 0:
            with pytest.raises(ValueError, match="empty"):
                speaker_splits(pool, fractions=fractions, seed=seed)
        else:
            with pytest.raises(ValueError, match="at least"):
                speaker_splits(pool, fractions=fractions, seed=seed)
        return
    splits = speaker_splits(pool, fractions=fractions, seed=seed)
    sizes = {s: len(_speakers(splits[s])) for s in SPLITS}
    assert sum(sizes.values()) == n_total  # every speaker used exactly once
    assert set().union(*(_speakers(v) for v in splits.values())) == {u.speaker for u in pool}
    for s, w in zip(SPLITS, weights, strict=True):
        if w > 0:
            assert sizes[s] >= 1
            assert abs(sizes[s] - fractions[s] * n_total) < 1.0 + (n_positive - 1)
        else:
            assert sizes[s] == 0
    _assert_proportional(splits, pool)


def test_n_speakers_mode_uses_a_subset_and_partial_keys() -> None:
    pool = _pool(6, 6)
    splits = speaker_splits(pool, n_speakers={"train": 3, "test": 1}, seed=2)
    assert [len(_speakers(splits[s])) for s in SPLITS] == [3, 0, 1]
    assert splits["val"] == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"n_speakers": {"train": 1}, "fractions": {"train": 1.0}}, "exactly one"),
        ({"n_speakers": {"train": 1, "dev": 1}}, "unknown split names \\['dev'\\]"),
        ({"fractions": {"training": 1.0}}, "unknown split names"),
        ({"n_speakers": {"train": -1}}, "non-negative"),
        ({"n_speakers": {"train": 1.5}}, "non-negative integers"),
        ({"n_speakers": {"train": 8, "val": 2, "test": 2}}, "requested 12 speakers .* only 10"),
        ({"fractions": {"train": 0.8, "val": 0.1}}, "sum to 1"),
        ({"fractions": {"train": 1.2, "val": -0.2}}, ">= 0"),
    ],
)
def test_split_errors(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        speaker_splits(_pool(5, 5), **kwargs)


def test_too_few_speakers_for_fractions_and_empty_pool() -> None:
    with pytest.raises(ValueError, match="need at least 3 speakers, the pool has 2"):
        speaker_splits(_pool(1, 1), fractions={"train": 0.8, "val": 0.1, "test": 0.1})
    with pytest.raises(ValueError, match="empty"):
        speaker_splits([], n_speakers={"train": 1})


def test_inconsistent_gender_is_an_error() -> None:
    pool = _pool(2, 0)
    pool[1] = Utterance(pool[1].utt_id, pool[1].speaker, pool[1].path, 1.0, 16000, gender="F")
    with pytest.raises(ValueError, match="inconsistent genders"):
        speaker_splits(pool, n_speakers={"train": 1})


def test_filter_by_duration() -> None:
    pool = _pool(2, 2, per_speaker=5)  # durations 1..5 s
    kept = filter_utterances(pool, min_duration=2.0, max_duration=4.0, max_utts_per_speaker=None, seed=0)
    assert sorted({u.duration for u in kept}) == [2.0, 3.0, 4.0]
    assert len(kept) == 12 and [u.utt_id for u in kept] == sorted(u.utt_id for u in kept)
    assert filter_utterances(
        pool, min_duration=None, max_duration=None, max_utts_per_speaker=None, seed=0
    ) == sorted(pool, key=lambda u: u.utt_id)


def test_filter_caps_utterances_per_speaker_randomly_and_stably() -> None:
    pool = _pool(3, 3, per_speaker=20)
    kept = filter_utterances(pool, min_duration=None, max_duration=None, max_utts_per_speaker=4, seed=11)
    per_speaker = Counter(u.speaker for u in kept)
    assert set(per_speaker.values()) == {4} and len(per_speaker) == 6
    assert {u.duration for u in kept} != {1.0, 2.0, 3.0, 4.0}  # not simply the first four
    shuffled = [pool[i] for i in np.random.default_rng(3).permutation(len(pool))]
    assert (
        filter_utterances(shuffled, min_duration=None, max_duration=None, max_utts_per_speaker=4, seed=11)
        == kept
    )
    # A speaker's subset does not depend on which other speakers are in the pool.
    alone = filter_utterances(
        [u for u in pool if u.speaker == "0000"],
        min_duration=None,
        max_duration=None,
        max_utts_per_speaker=4,
        seed=11,
    )
    assert alone == [u for u in kept if u.speaker == "0000"]
    other = filter_utterances(pool, min_duration=None, max_duration=None, max_utts_per_speaker=4, seed=12)
    assert other != kept


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_duration": -1.0}, ">= 0"),
        ({"min_duration": 3.0, "max_duration": 2.0}, "below min_duration"),
        ({"max_utts_per_speaker": 0}, ">= 1"),
        ({"min_duration": 100.0}, "no utterances left after filtering 6"),
    ],
)
def test_filter_errors(kwargs, message: str) -> None:
    args = {"min_duration": None, "max_duration": None, "max_utts_per_speaker": None, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        filter_utterances(_pool(1, 1), **args)


def test_stratified_splits_is_filter_then_speaker_splits() -> None:
    pool = _pool(6, 6, per_speaker=6)
    settings = {"max_utts_per_speaker": 4, "min_duration": 2.0, "max_duration": 5.0, "seed": 3}
    kept = filter_utterances(pool, **settings)
    expected = speaker_splits(kept, n_speakers={"train": 6, "val": 2, "test": 2}, seed=3)
    got = stratified_splits(pool, n_speakers={"train": 6, "val": 2, "test": 2}, **settings)
    assert got == expected


# --- data/split=reference: the reference study's train-clean-100 split ---------------------------------


def _ids(name: str) -> list[str]:
    return [line.strip() for line in (REFERENCE_DIR / name).read_text().splitlines() if line.strip()]


def _reference_pool(duration: Callable[[str], float] = lambda utt_id: 10.0) -> list[Utterance]:
    """Every utterance of train-clean-100 as the reference saw it (ids rebuilt from chapters.txt)."""
    pool = []
    for line in _ids("chapters.txt"):
        speaker, chapter, n = line.split()
        for i in range(int(n)):
            utt_id = f"{speaker}-{chapter}-{i:04d}"
            pool.append(
                Utterance(
                    utt_id=utt_id,
                    speaker=speaker,
                    path=f"/ls/train-clean-100/{speaker}/{chapter}/{utt_id}.flac",
                    duration=duration(utt_id),
                    sample_rate=16000,
                    gender="F" if int(speaker) % 2 else "M",
                    chapter=chapter,
                    subset="train-clean-100",
                )
            )
    return pool


def _int_speakers(split: list[Utterance]) -> list[int]:
    return sorted(int(s) for s in _speakers(split))


def _varied_duration(utt_id: str) -> float:
    """A deterministic spread of durations over 0.0 .. 5.9 s, with many exactly 3.0 s."""
    _, chapter, index = utt_id.split("-")
    return ((int(index) * 7 + int(chapter)) % 60) / 10


@pytest.fixture(scope="module")
def reference_pool() -> list[Utterance]:
    return _reference_pool()


def test_reference_split_reproduces_the_reference_files(reference_pool: list[Utterance]) -> None:
    assert len(reference_pool) == 28539 and len({u.speaker for u in reference_pool}) == 251
    splits = reference_splits(reference_pool)  # all 10 s long: the 3 s filter drops nothing
    assert _int_speakers(splits["train"]) == [int(s) for s in _ids("train_speakers.txt")]
    assert _int_speakers(splits["test"]) == [int(s) for s in _ids("eval_speakers.txt")]
    assert [u.utt_id for u in splits["val"]] == _ids("train_utt_ids_val.txt")
    # The reference's metadata.json: 22673 train-speaker utterances = 20406 + 2267 holdout; 5866 eval.
    assert [len(splits[s]) for s in SPLITS] == [20406, 2267, 5866]
    # Its procedure sorts int speaker ids; sorting the id strings would give another split.
    by_string = sorted({u.speaker for u in reference_pool})
    random.Random(42).shuffle(by_string)
    assert sorted(int(s) for s in by_string[:200]) != _int_speakers(splits["train"])


def test_reference_split_uses_only_its_subsets_and_any_input_order(reference_pool: list[Utterance]) -> None:
    expected = reference_splits(reference_pool)
    extra = [
        Utterance(
            f"{spk}-1-{i:04d}", str(spk), f"/ls/dev-clean/{spk}/{i}.flac", 10.0, 16000, "M", "1", "dev-clean"
        )
        for spk in (84, 174, 9999)
        for i in range(3)
    ]
    shuffled = list(reversed(reference_pool)) + extra
    random.Random(0).shuffle(shuffled)
    assert reference_splits(shuffled) == expected
    assert reference_splits(reference_pool) == expected  # deterministic
    other = reference_splits(reference_pool, seed=43)
    assert _speakers(other["train"]) != _speakers(expected["train"])


def test_reference_split_min_duration_is_applied_after_the_holdout() -> None:
    pool = _reference_pool(_varied_duration)
    assert {u.duration for u in pool} >= {2.9, 3.0, 3.1}
    unfiltered = reference_splits(pool, min_duration=None)
    splits = reference_splits(pool)  # min_duration 3.0
    for s in SPLITS:
        assert splits[s] == [u for u in unfiltered[s] if u.duration >= 3.0]
        assert all(u.duration >= 3.0 for u in splits[s])
        assert any(u.duration == 3.0 for u in splits[s])  # inclusive bound, as in the reference
    # The holdout is drawn before filtering, so it is the reference's holdout minus its short utterances.
    assert {u.utt_id for u in splits["val"]} <= set(_ids("train_utt_ids_val.txt"))


def test_reference_split_is_speaker_disjoint_between_train_and_test(reference_pool: list[Utterance]) -> None:
    splits = reference_splits(reference_pool)
    train, val, test = (_speakers(splits[s]) for s in SPLITS)
    assert not (train | val) & test
    assert val <= train  # the holdout is utterance-level within the train speakers
    assert not {u.utt_id for u in splits["train"]} & {u.utt_id for u in splits["val"]}
    assert len(train) == 200 and len(test) == 51
    for s in SPLITS:
        assert [u.utt_id for u in splits[s]] == sorted(u.utt_id for u in splits[s])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_train_speakers": 250}, "not enough speakers: the pool has 251, the split needs 301"),
        ({"subsets": ["train-clean-360"]}, "no utterances of subsets \\['train-clean-360'\\]"),
        ({"utt_holdout_frac": 1.0}, "utt_holdout_frac"),
        ({"n_eval_speakers": 0}, ">= 1"),
        ({"min_duration": -1.0}, ">= 0"),
    ],
)
def test_reference_split_errors(reference_pool: list[Utterance], kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        reference_splits(reference_pool, **kwargs)


def test_split_presets_compose_and_call(compose_cfg: Callable, reference_pool: list[Utterance]) -> None:
    cfg = compose_cfg(["data=librispeech", "data/split=reference"])
    assert cfg.data.split._target_ == "latentdyn.data.splits.reference_splits"
    assert list(cfg.data.split.subsets) == ["train-clean-100"]
    assert (cfg.data.split.n_train_speakers, cfg.data.split.n_eval_speakers) == (200, 51)
    assert (cfg.data.split.seed, cfg.data.split.min_duration) == (42, 3.0)
    assert call(cfg.data.split, reference_pool) == reference_splits(reference_pool)

    # The default for both corpora is the stratified split with today's settings.
    cfg = compose_cfg(["data=librispeech"])
    assert cfg.data.split._target_ == "latentdyn.data.splits.stratified_splits"
    assert call(cfg.data.split, reference_pool) == stratified_splits(
        reference_pool,
        n_speakers={"train": 40, "val": 10, "test": 10},
        max_utts_per_speaker=50,
        min_duration=1.0,
        max_duration=20.0,
        seed=0,
    )
    cfg = compose_cfg(["data=synthetic"])
    assert cfg.data.split._target_ == "latentdyn.data.splits.stratified_splits"
    assert cfg.data.split.min_duration is None and cfg.data.split.max_utts_per_speaker is None
    pool = _pool(12, 12)
    expected = speaker_splits(pool, n_speakers={"train": 18, "val": 3, "test": 3}, seed=0)
    assert call(cfg.data.split, pool) == expected
