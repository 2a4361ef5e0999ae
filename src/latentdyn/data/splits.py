"""Speaker-disjoint train/val/test splits, deterministic for a seed.

Two procedures, each a function ``(utts, **settings) -> {split: utterances}`` chosen by the
``_target_`` of the ``data/split`` config group (``hydra.utils.call(cfg.data.split, utts)``):

- :func:`stratified_splits` (``data/split=stratified``, the default for every corpus): duration and
  per-speaker filters, then speaker-disjoint train/val/test stratified by gender;
- :func:`reference_splits` (``data/split=reference``): the reference study's LibriSpeech
  train-clean-100 split (200 train / 51 eval speakers, seed 42, 10 % utterance holdout, >= 3 s).

Results never depend on the order of the input utterances: speakers and utterances are sorted
before any seeded random choice.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from latentdyn.data.corpus import Utterance

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: Gender labels that form their own stratum; anything else is pooled as unknown ("U").
KNOWN_GENDERS = ("M", "F")


def filter_utterances(
    utts: Iterable[Utterance],
    *,
    min_duration: float | None,
    max_duration: float | None,
    max_utts_per_speaker: int | None,
    seed: int,
) -> list[Utterance]:
    """Keep utterances within a duration range and at most ``max_utts_per_speaker`` per speaker.

    Args:
        utts: the pool.
        min_duration, max_duration: inclusive bounds in seconds, or ``None`` for no bound.
        max_utts_per_speaker: cap per speaker, or ``None``; a speaker over the cap keeps a random
            subset drawn from ``default_rng([seed, crc32(speaker)])`` over its utterances sorted
            by ``utt_id``, so the choice depends neither on the input order nor on other speakers.
        seed: seeds the per-speaker subsets.

    Returns:
        The kept utterances sorted by ``utt_id``.

    Raises:
        ValueError: inconsistent bounds, a cap below 1, or nothing left after filtering.
    """
    if min_duration is not None and min_duration < 0:
        raise ValueError(f"min_duration must be >= 0 seconds, got {min_duration}")
    if min_duration is not None and max_duration is not None and max_duration < min_duration:
        raise ValueError(f"max_duration ({max_duration} s) is below min_duration ({min_duration} s)")
    if max_utts_per_speaker is not None and max_utts_per_speaker < 1:
        raise ValueError(f"max_utts_per_speaker must be >= 1, got {max_utts_per_speaker}")
    utts = list(utts)
    kept = [
        u
        for u in utts
        if (min_duration is None or u.duration >= min_duration)
        and (max_duration is None or u.duration <= max_duration)
    ]
    if max_utts_per_speaker is not None:
        by_speaker: dict[str, list[Utterance]] = defaultdict(list)
        for u in kept:
            by_speaker[u.speaker].append(u)
        kept = []
        for speaker, group in by_speaker.items():
            group.sort(key=lambda u: u.utt_id)
            if len(group) > max_utts_per_speaker:
                rng = np.random.default_rng([seed, zlib.crc32(speaker.encode())])
                chosen = rng.choice(len(group), size=max_utts_per_speaker, replace=False)
                group = [group[i] for i in chosen]
            kept.extend(group)
    if not kept:
        raise ValueError(
            f"no utterances left after filtering {len(utts)} (min_duration={min_duration}, "
            f"max_duration={max_duration}, max_utts_per_speaker={max_utts_per_speaker})"
        )
    return sorted(kept, key=lambda u: u.utt_id)


def _speaker_strata(utts: Sequence[Utterance], stratify_by_gender: bool) -> dict[str, list[str]]:
    """Sorted speakers per stratum (``"M"``, ``"F"``, ``"U"``; a single ``"all"`` when not stratifying)."""
    gender_of: dict[str, str] = {}
    for u in utts:
        gender = u.gender if u.gender in KNOWN_GENDERS else "U"
        previous = gender_of.setdefault(u.speaker, gender)
        if previous != gender:
            raise ValueError(f"speaker {u.speaker} has inconsistent genders {previous!r} and {gender!r}")
    strata: dict[str, list[str]] = defaultdict(list)
    for speaker in sorted(gender_of):
        strata[gender_of[speaker] if stratify_by_gender else "all"].append(speaker)
    return dict(sorted(strata.items()))


def _largest_remainder(targets: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to ``total``, each the floor or ceil of ``targets`` (which sum to ``total``)."""
    counts = np.floor(targets).astype(np.int64)
    order = np.argsort(-(targets - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return counts


def _fraction_counts(fractions: Mapping[str, float], n_total: int) -> dict[str, int]:
    """Speakers per split for ``fractions`` of ``n_total``: largest remainder, each positive split >= 1."""
    names = [s for s in SPLITS if s in fractions]
    values = np.array([float(fractions[s]) for s in names])
    if (values < 0).any() or not np.isfinite(values).all():
        raise ValueError(f"fractions must be finite and >= 0, got {dict(fractions)}")
    if not math.isclose(values.sum(), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {dict(fractions)} (sum {values.sum():.6g})")
    n_positive = int((values > 0).sum())
    if n_total < n_positive:
        raise ValueError(
            f"{n_positive} splits with a positive fraction need at least {n_positive} speakers, "
            f"the pool has {n_total}"
        )
    counts = _largest_remainder(values / values.sum() * n_total, n_total)
    for i in np.flatnonzero((values > 0) & (counts == 0)):
        counts[int(np.argmax(counts))] -= 1  # the largest split has >= 2 here, since n_total >= n_positive
        counts[i] = 1
    return {s: int(c) for s, c in zip(names, counts, strict=True)}


def _stratified_counts(split_counts: Sequence[int], stratum_sizes: Sequence[int]) -> np.ndarray:
    """Speakers of each stratum in each split, shape ``(n_splits, n_strata)``.

    The proportional targets are ``T[k, g] = split_counts[k] * N_g / N``. The result rounds every
    entry to the floor or ceil of its target, keeps every row sum equal to ``split_counts[k]`` and
    never uses more speakers of a stratum than it has. Such a rounding always exists (Bacharach
    1966, controlled rounding); with at most 3 splits × 3 strata it is found by enumeration,
    preferring the least squared deviation from the targets (ties: first in enumeration order).
    """
    rows = np.asarray(split_counts, dtype=np.float64)
    sizes = np.asarray(stratum_sizes, dtype=np.int64)
    targets = np.outer(rows, sizes / sizes.sum())
    floor = np.floor(targets + 1e-9).astype(np.int64)
    free = np.argwhere(targets - floor > 1e-9)  # entries that may round either way
    best, best_cost = None, math.inf
    for ups in itertools.product((0, 1), repeat=len(free)):
        counts = floor.copy()
        for (k, g), up in zip(free, ups, strict=True):
            counts[k, g] += up
        if (counts.sum(axis=1) != rows).any() or (counts.sum(axis=0) > sizes).any():
            continue
        cost = float(((counts - targets) ** 2).sum())
        if cost < best_cost - 1e-12:
            best, best_cost = counts, cost
    if best is None:  # unreachable by the theorem above; kept as a guard against a logic error
        raise RuntimeError(
            f"no stratified allocation of {list(split_counts)} over strata {list(stratum_sizes)}"
        )
    return best


def speaker_splits(
    utts: Sequence[Utterance],
    *,
    n_speakers: Mapping[str, int] | None = None,
    fractions: Mapping[str, float] | None = None,
    seed: int = 0,
    stratify_by_gender: bool = True,
) -> dict[str, list[Utterance]]:
    """Split ``utts`` into speaker-disjoint ``train``/``val``/``test`` sets.

    Exactly one of:

    - ``n_speakers``: speakers per split (a missing split gets 0); speakers beyond the total are
      left out, which is how a run is limited to a subset of a large corpus;
    - ``fractions``: share of all speakers per split, summing to 1; every split with a positive
      share gets at least one speaker and all speakers are used.

    With ``stratify_by_gender``, each split's speaker count is allocated across the gender strata
    (``M``, ``F``, and every other label pooled as ``U``) in proportion to the pool, so each
    split's gender ratio mirrors the pool's to within one speaker per stratum. Speakers of a
    stratum are sorted, shuffled with ``default_rng(seed)`` and dealt to the splits in
    :data:`SPLITS` order, so the result depends only on the set of utterances and the seed.

    Returns:
        ``{split: utterances sorted by utt_id}`` for every name in :data:`SPLITS`.

    Raises:
        ValueError: both or neither of ``n_speakers``/``fractions``, unknown split names, negative
            counts, fractions not summing to 1, more speakers asked for than the pool has, an
            empty pool, or a speaker with two genders.
    """
    if (n_speakers is None) == (fractions is None):
        raise ValueError("give exactly one of n_speakers or fractions")
    requested = n_speakers if n_speakers is not None else fractions
    assert requested is not None
    unknown = sorted(set(requested) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split names {unknown}; expected a subset of {list(SPLITS)}")
    if not utts:
        raise ValueError("cannot split an empty pool of utterances")

    strata = _speaker_strata(utts, stratify_by_gender)
    n_total = sum(len(speakers) for speakers in strata.values())
    if n_speakers is not None:
        bad = {s: c for s, c in n_speakers.items() if int(c) != c or c < 0}
        if bad:
            raise ValueError(f"speaker counts must be non-negative integers, got {bad}")
        counts = {s: int(n_speakers.get(s, 0)) for s in SPLITS}
        if sum(counts.values()) > n_total:
            raise ValueError(
                f"requested {sum(counts.values())} speakers ({', '.join(f'{s}={c}' for s, c in counts.items())}) "
                f"but the pool has only {n_total}"
            )
    else:
        assert fractions is not None
        counts = {s: 0 for s in SPLITS} | _fraction_counts(fractions, n_total)

    names = list(strata)
    allocation = _stratified_counts([counts[s] for s in SPLITS], [len(strata[g]) for g in names])
    rng = np.random.default_rng(seed)
    speaker_split: dict[str, str] = {}
    for g, stratum in enumerate(names):
        speakers = list(rng.permutation(strata[stratum]))
        start = 0
        for k, split in enumerate(SPLITS):
            stop = start + int(allocation[k, g])
            speaker_split.update((str(spk), split) for spk in speakers[start:stop])
            start = stop

    out: dict[str, list[Utterance]] = {s: [] for s in SPLITS}
    for u in sorted(utts, key=lambda u: u.utt_id):
        split = speaker_split.get(u.speaker)
        if split is not None:
            out[split].append(u)
    return out


def _plain_mapping(value: Mapping[str, float] | None) -> dict[str, float] | None:
    """A mapping (possibly a DictConfig passed through ``hydra.utils.call``) as a plain dict."""
    return None if value is None else {str(k): v for k, v in value.items()}


def stratified_splits(
    utts: Sequence[Utterance],
    *,
    n_speakers: Mapping[str, int] | None = None,
    fractions: Mapping[str, float] | None = None,
    stratify_by_gender: bool = True,
    max_utts_per_speaker: int | None = None,
    min_duration: float | None = None,
    max_duration: float | None = None,
    seed: int = 0,
) -> dict[str, list[Utterance]]:
    """The default split (``data/split=stratified``): :func:`filter_utterances`, then :func:`speaker_splits`.

    ``seed`` seeds both the per-speaker utterance subsets and the speaker assignment; see those
    functions for every argument and error.
    """
    kept = filter_utterances(
        utts,
        min_duration=min_duration,
        max_duration=max_duration,
        max_utts_per_speaker=max_utts_per_speaker,
        seed=seed,
    )
    return speaker_splits(
        kept,
        n_speakers=_plain_mapping(n_speakers),
        fractions=_plain_mapping(fractions),
        seed=seed,
        stratify_by_gender=stratify_by_gender,
    )


def _speaker_sort_key(speaker: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order (as the reference sorts its ``int`` speaker ids), then the rest."""
    return (0, int(speaker), speaker) if speaker.isdigit() else (1, 0, speaker)


def reference_splits(
    utts: Sequence[Utterance],
    *,
    subsets: Sequence[str] | None = ("train-clean-100",),
    n_train_speakers: int = 200,
    n_eval_speakers: int = 51,
    utt_holdout_frac: float = 0.1,
    min_duration: float | None = 3.0,
    seed: int = 42,
) -> dict[str, list[Utterance]]:
    """The reference study's split (``data/split=reference``), reproduced exactly.

    Reference: github.com/rtavasso/audioEngram ``src/phase0/data/splits.py`` (``create_speaker_splits``,
    ``create_utterance_splits``) with ``configs/phase0.yaml``; its own output lists are the test oracle.

    1. The pool is the utterances of ``subsets`` (``Utterance.subset``; ``None``: all). The reference
       uses LibriSpeech train-clean-100 only, whose 251 speakers are all used by 200 + 51.
    2. Speaker ids sorted *numerically* (the reference sorts ``int`` ids; a string sort gives another
       split), shuffled in place by ``random.Random(seed).shuffle``; the first ``n_train_speakers``
       are train, the next ``n_eval_speakers`` eval (here ``test``). Any further speakers are unused.
    3. All utterances of the train speakers, sorted by ``utt_id``, shuffled by a fresh
       ``random.Random(seed).shuffle``; the first ``int(n * utt_holdout_frac)`` are the reference's
       ``train_utt_ids_val`` (here ``val``, the same speakers as train), the rest ``train``.
    4. Only then are utterances shorter than ``min_duration`` seconds dropped from every split (the
       reference makes its split files over all utterances and applies ``min_duration_sec`` when it
       infers latents and builds frames), so the holdout is exactly the reference's, filtered.

    Returns:
        ``{split: utterances sorted by utt_id}`` for every name in :data:`SPLITS`; ``train`` and
        ``val`` share speakers, ``test`` is speaker-disjoint from both.

    Raises:
        ValueError: bad settings, no utterance in ``subsets``, or fewer speakers than
            ``n_train_speakers + n_eval_speakers``.
    """
    if n_train_speakers < 1 or n_eval_speakers < 1:
        raise ValueError(
            f"n_train_speakers and n_eval_speakers must be >= 1, got {n_train_speakers} and {n_eval_speakers}"
        )
    if not 0.0 <= utt_holdout_frac < 1.0:
        raise ValueError(f"utt_holdout_frac must be in [0, 1), got {utt_holdout_frac}")
    if min_duration is not None and min_duration < 0:
        raise ValueError(f"min_duration must be >= 0 seconds, got {min_duration}")
    wanted = None if subsets is None else {str(s) for s in subsets}
    pool = [u for u in utts if wanted is None or u.subset in wanted]
    if not pool:
        found = sorted({u.subset for u in utts})
        raise ValueError(
            f"no utterances of subsets {sorted(wanted or [])} among {len(utts)} (their subsets: {found}); "
            "the reference split needs LibriSpeech train-clean-100 in data.corpus.subsets"
        )

    speakers = sorted({u.speaker for u in pool}, key=_speaker_sort_key)
    n_needed = n_train_speakers + n_eval_speakers
    if len(speakers) < n_needed:
        raise ValueError(f"not enough speakers: the pool has {len(speakers)}, the split needs {n_needed}")
    if len(speakers) > n_needed:
        log.warning(
            "reference split: %d of %d speakers are left out (the reference pool is train-clean-100's 251)",
            len(speakers) - n_needed,
            len(speakers),
        )
    random.Random(seed).shuffle(speakers)
    train_speakers = set(speakers[:n_train_speakers])
    test_speakers = set(speakers[n_train_speakers:n_needed])

    ordered = sorted(pool, key=lambda u: u.utt_id)
    # The shuffle's permutation depends only on the list's length, so shuffling utterances sorted by
    # utt_id equals the reference's shuffle of the sorted id strings.
    train = [u for u in ordered if u.speaker in train_speakers]
    random.Random(seed).shuffle(train)
    n_val = int(len(train) * utt_holdout_frac)
    parts = {
        "train": train[n_val:],
        "val": train[:n_val],
        "test": [u for u in ordered if u.speaker in test_speakers],
    }

    def keep(u: Utterance) -> bool:
        return min_duration is None or u.duration >= min_duration

    return {s: sorted((u for u in parts[s] if keep(u)), key=lambda u: u.utt_id) for s in SPLITS}
