"""LibriSpeech indexing, splits, missing-data errors and download, on a tiny tree of FLAC files (offline)."""

from __future__ import annotations

import hashlib
import logging
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hydra.utils import instantiate

from latentdyn.data.audio import read_bad_files
from latentdyn.data.corpus import Utterance
from latentdyn.data.download import ChecksumError
from latentdyn.data.librispeech import LIBRISPEECH_SUBSETS, LibriSpeechCorpus, read_speakers_txt
from latentdyn.data.splits import speaker_splits
from tests.test_download import LoopbackServer

SR = 16000
# speaker -> (sex, subset); 4 F and 4 M over two subsets.
SPEAKERS = {
    "19": ("F", "train-clean-100"),
    "26": ("M", "train-clean-100"),
    "60": ("M", "train-clean-100"),
    "103": ("F", "train-clean-100"),
    "1272": ("M", "dev-clean"),
    "1462": ("F", "dev-clean"),
    "2035": ("F", "dev-clean"),
    "2078": ("M", "dev-clean"),
}
CHAPTERS = ("1001", "2002")
UTTS_PER_CHAPTER = 3


def speakers_txt() -> str:
    """A SPEAKERS.TXT in LibriSpeech's format, including a name containing '|' (as speaker 60's is)."""
    lines = [
        "; Some speakers listed here may not be part of this copy",
        ";ID      |SEX| SUBSET           |MINUTES| NAME",
    ]
    for speaker, (sex, subset) in SPEAKERS.items():
        name = "|CBW|Simon" if speaker == "60" else f"Reader {speaker}"
        lines.append(f"{speaker:<8} | {sex} | {subset:<16} | 25.03 | {name}")
    lines.append("9999     | F | train-other-500  | 30.00 | Not In This Copy")
    return "\n".join(lines) + "\n"


def build_tree(root: Path, subsets: tuple[str, ...] = ("train-clean-100", "dev-clean")) -> dict[str, int]:
    """Write ``root/LibriSpeech/...`` with 0.5-1.5 s FLAC files; returns ``{utt_id: n_samples}``."""
    rng = np.random.default_rng(0)
    corpus = root / "LibriSpeech"
    corpus.mkdir(parents=True)
    (corpus / "SPEAKERS.TXT").write_text(speakers_txt())
    frames: dict[str, int] = {}
    for speaker, (_, subset) in SPEAKERS.items():
        if subset not in subsets:
            continue
        for chapter in CHAPTERS:
            chapter_dir = corpus / subset / speaker / chapter
            chapter_dir.mkdir(parents=True)
            (chapter_dir / f"{speaker}-{chapter}.trans.txt").write_text("not audio\n")
            for u in range(UTTS_PER_CHAPTER):
                n = int(rng.integers(SR // 2, 3 * SR // 2))
                utt_id = f"{speaker}-{chapter}-{u:04d}"
                wave = (0.1 * rng.standard_normal(n)).astype(np.float32)
                sf.write(chapter_dir / f"{utt_id}.flac", wave, SR, format="FLAC", subtype="PCM_16")
                frames[utt_id] = n
    return frames


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    root = tmp_path / "data"
    return root, build_tree(root)


def test_index_fields(tree, tmp_path: Path) -> None:
    root, frames = tree
    corpus = LibriSpeechCorpus(root=str(root), subsets=["train-clean-100", "dev-clean"])
    utts = corpus.materialize(tmp_path / "work")
    assert [u.utt_id for u in utts] == sorted(frames)
    # Nothing is copied into the artifact directory; it gets only the record of the files left out (none).
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["bad_files.json"]
    assert read_bad_files(tmp_path / "work" / "bad_files.json") == []
    for u in utts:
        speaker, chapter, _ = u.utt_id.split("-")
        sex, subset = SPEAKERS[speaker]
        assert (u.speaker, u.chapter, u.gender, u.subset, u.sample_rate) == (
            speaker,
            chapter,
            sex,
            subset,
            SR,
        )
        assert u.duration == frames[u.utt_id] / SR
        assert Path(u.path).is_absolute()
        assert (
            Path(u.path) == (root / "LibriSpeech" / subset / speaker / chapter / f"{u.utt_id}.flac").resolve()
        )
    assert Counter(u.gender for u in utts) == {"F": 24, "M": 24}
    assert corpus.materialize(tmp_path / "work2") == utts  # deterministic


def test_subset_selection_and_speakers_txt_parsing(tree, tmp_path: Path) -> None:
    root, frames = tree
    utts = LibriSpeechCorpus(root=str(root), subsets=["dev-clean"]).materialize(tmp_path)
    assert {u.subset for u in utts} == {"dev-clean"}
    assert len(utts) == 4 * len(CHAPTERS) * UTTS_PER_CHAPTER
    info = read_speakers_txt(root / "LibriSpeech" / "SPEAKERS.TXT")
    assert info["60"].name == "|CBW|Simon" and info["60"].gender == "M" and info["60"].minutes == 25.03
    assert info["9999"].subset == "train-other-500"
    assert set(info) == set(SPEAKERS) | {"9999"}


def test_corrupt_file_is_skipped_with_a_warning(
    tree, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, frames = tree
    bad = root / "LibriSpeech" / "dev-clean" / "1272" / "1001" / "1272-1001-0099.flac"
    bad.write_bytes(b"fLaC this is not a flac stream" * 10)
    empty = root / "LibriSpeech" / "dev-clean" / "1272" / "1001" / "1272-1001-0098.flac"
    sf.write(empty, np.zeros(0, dtype=np.float32), SR, format="FLAC")
    with caplog.at_level(logging.WARNING, logger="latentdyn.data.librispeech"):
        utts = LibriSpeechCorpus(root=str(root), subsets=["train-clean-100", "dev-clean"]).materialize(
            tmp_path
        )
    assert [u.utt_id for u in utts] == sorted(frames)
    assert str(bad) in caplog.text and str(empty) in caplog.text


def test_unknown_speaker_gets_gender_u_with_a_warning(
    tree, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, _ = tree
    chapter = root / "LibriSpeech" / "dev-clean" / "777" / "10"
    chapter.mkdir(parents=True)
    sf.write(chapter / "777-10-0000.flac", np.zeros(SR, dtype=np.float32), SR, format="FLAC")
    with caplog.at_level(logging.WARNING, logger="latentdyn.data.librispeech"):
        utts = LibriSpeechCorpus(root=str(root), subsets=["dev-clean"]).materialize(tmp_path)
    (stranger,) = [u for u in utts if u.speaker == "777"]
    assert stranger.gender == "U" and stranger.duration == 1.0
    assert "777" in caplog.text and "SPEAKERS.TXT" in caplog.text


def test_splits_are_speaker_disjoint_stratified_and_deterministic(tree, tmp_path: Path) -> None:
    root, _ = tree
    utts = LibriSpeechCorpus(root=str(root), subsets=["train-clean-100", "dev-clean"]).materialize(tmp_path)

    def split(pool: list[Utterance], seed: int) -> dict[str, list[Utterance]]:
        return speaker_splits(pool, n_speakers={"train": 4, "val": 2, "test": 2}, seed=seed)

    splits = split(utts, 0)
    speakers = {name: {u.speaker for u in part} for name, part in splits.items()}
    assert speakers["train"].isdisjoint(speakers["val"]) and speakers["train"].isdisjoint(speakers["test"])
    assert speakers["val"].isdisjoint(speakers["test"])
    assert set().union(*speakers.values()) == set(SPEAKERS)
    for name, n in {"train": 4, "val": 2, "test": 2}.items():
        genders = Counter(SPEAKERS[s][0] for s in speakers[name])
        assert genders == {"F": n // 2, "M": n // 2}, (name, genders)
    assert split(list(reversed(utts)), 0) == splits


def test_missing_data_error_says_how_to_provide_it(tmp_path: Path) -> None:
    corpus = LibriSpeechCorpus(root=str(tmp_path / "nowhere"), subsets=["dev-clean"])
    with pytest.raises(FileNotFoundError) as err:
        corpus.materialize(tmp_path)
    message = str(err.value)
    for needle in ("dev-clean", "data.root", "data.download", str(tmp_path / "nowhere" / "LibriSpeech")):
        assert needle in message
    assert not (tmp_path / "nowhere").exists()  # nothing downloaded or created


def test_missing_speakers_txt_is_an_error(tree, tmp_path: Path) -> None:
    root, _ = tree
    (root / "LibriSpeech" / "SPEAKERS.TXT").unlink()
    with pytest.raises(FileNotFoundError, match="SPEAKERS.TXT"):
        LibriSpeechCorpus(root=str(root), subsets=["dev-clean"]).materialize(tmp_path)


def _served_subset(tmp_path: Path, server: LoopbackServer, subset: str) -> tuple[str, dict[str, int]]:
    """Serve ``<subset>.tar.gz`` of a LibriSpeech tree; returns its sha256 and the frames per utterance."""
    src = tmp_path / "src"
    frames = build_tree(src, subsets=(subset,))
    archive = tmp_path / f"{subset}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "LibriSpeech", arcname="LibriSpeech")
    data = archive.read_bytes()
    server.files[f"/resources/12/{subset}.tar.gz"] = data
    return hashlib.sha256(data).hexdigest(), frames


def test_download_extract_and_index(tmp_path: Path) -> None:
    with LoopbackServer() as server:
        sha, frames = _served_subset(tmp_path, server, "dev-clean")
        root = tmp_path / "downloaded"

        def corpus(checksum: str) -> LibriSpeechCorpus:
            return LibriSpeechCorpus(
                root=str(root),
                subsets=["dev-clean"],
                download=True,
                url_base=server.url + "/resources/12/",
                checksums={"dev-clean.tar.gz": checksum},
            )

        wrong = hashlib.sha256(b"no").hexdigest()
        with pytest.raises(ChecksumError, match=wrong):
            corpus(wrong).materialize(tmp_path)
        assert not (root / "LibriSpeech").exists()  # a bad archive is never extracted
        (root / "dev-clean.tar.gz.bad").unlink()

        utts = corpus(sha).materialize(tmp_path)
        assert [u.utt_id for u in utts] == sorted(frames)
        assert all(u.duration == frames[u.utt_id] / SR and u.subset == "dev-clean" for u in utts)
        assert all(Path(u.path).is_relative_to(root.resolve() / "LibriSpeech" / "dev-clean") for u in utts)
        assert {u.gender for u in utts} == {"F", "M"}
        n_requests = len(server.requests)
        assert corpus(sha).materialize(tmp_path) == utts
        assert len(server.requests) == n_requests  # extracted once: no network, no re-download


def test_unknown_subset_without_checksum_refuses_to_download(tmp_path: Path) -> None:
    corpus = LibriSpeechCorpus(
        root=str(tmp_path), subsets=["my-subset"], download=True, url_base="http://127.0.0.1:9"
    )
    with pytest.raises(ValueError, match="checksums"):
        corpus.materialize(tmp_path)


def test_published_checksums_match_torchaudio() -> None:
    librispeech = pytest.importorskip("torchaudio.datasets.librispeech")
    theirs = {
        url.rsplit("/", 1)[1].removesuffix(".tar.gz"): sha for url, sha in librispeech._CHECKSUMS.items()
    }
    assert LIBRISPEECH_SUBSETS == theirs
    assert all(len(sha) == 64 and int(sha, 16) >= 0 for sha in LIBRISPEECH_SUBSETS.values())


def test_config_composes_with_short_aliases(compose_cfg: Callable, tmp_path: Path) -> None:
    cfg = compose_cfg(["data=librispeech", f"data.root={tmp_path / 'ls'}", "data.download=true"])
    corpus = instantiate(cfg.data.corpus)
    assert isinstance(corpus, LibriSpeechCorpus)
    assert corpus.root == str(tmp_path / "ls") and corpus.download is True
    assert corpus.subsets == ["train-clean-100", "dev-clean", "test-clean"]
    assert all(corpus.sha256(s) == LIBRISPEECH_SUBSETS[s] for s in corpus.subsets)
    assert cfg.data.split.n_speakers == {"train": 40, "val": 10, "test": 10}
