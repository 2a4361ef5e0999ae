"""The utterance index shared by every corpus (synthetic, LibriSpeech).

An index is a JSON-lines file, one utterance per line (audiocraft-style manifest), so it can be
read, grepped and diffed without the package.

A corpus (synthetic, LibriSpeech) has ``materialize(workdir) -> list[Utterance]``, where ``workdir`` is
its artifact's directory. A corpus that reads audio files and can leave some out (LibriSpeech's
indexing, under ``data.on_bad_audio=skip``) also writes their record there,
``workdir/bad_files.json`` (:func:`latentdyn.data.audio.write_bad_files`); one that writes none skipped
nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class Utterance:
    """One audio file of a corpus.

    Attributes:
        utt_id: corpus-unique id (LibriSpeech style ``speaker-chapter-utterance``).
        speaker: speaker id.
        path: absolute path to the audio file.
        duration: seconds.
        sample_rate: Hz of the file on disk (resampling happens at load time).
        gender: ``"M"``, ``"F"`` or ``"U"`` (unknown).
        chapter: LibriSpeech chapter id, or ``""``.
        subset: corpus subset (``train-clean-100``, ``synthetic``, ...), or ``""``.
    """

    utt_id: str
    speaker: str
    path: str
    duration: float
    sample_rate: int
    gender: str = "U"
    chapter: str = ""
    subset: str = ""


_FIELDS = tuple(f.name for f in fields(Utterance))


def write_index(utterances: Iterable[Utterance], path: Path, *, relative_to: Path | None = None) -> None:
    """Write an utterance index as JSON lines (one object per utterance), atomically.

    With ``relative_to``, audio paths under that directory are stored relative to the index's own
    directory, so a corpus generated in a temporary directory stays valid after it is renamed.
    """
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as fh:
        for utt in utterances:
            row = asdict(utt)
            if relative_to is not None and Path(utt.path).is_relative_to(relative_to):
                row["path"] = os.path.relpath(utt.path, path.parent)
            fh.write(json.dumps(row, sort_keys=True) + "\n")
    tmp.replace(path)


def read_index(path: Path) -> list[Utterance]:
    """Read an index written by :func:`write_index`; relative audio paths resolve against the index's directory.

    Unknown keys are an error, not ignored.
    """
    path = Path(path)
    utts: list[Utterance] = []
    with path.open() as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            unknown = set(row) - set(_FIELDS)
            if unknown:
                raise ValueError(f"{path}:{line_no}: unknown index fields {sorted(unknown)}")
            row["path"] = str((path.parent / row["path"]).resolve())
            utts.append(Utterance(**row))
    return utts


def total_hours(utterances: Sequence[Utterance]) -> float:
    """Total audio duration in hours."""
    return sum(u.duration for u in utterances) / 3600.0
