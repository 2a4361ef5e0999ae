"""LibriSpeech (OpenSLR SLR12): fetch or locate the corpus and index its utterances.

Layout (as in the OpenSLR archives)::

    <root>/LibriSpeech/SPEAKERS.TXT
    <root>/LibriSpeech/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac

With ``download=True`` the archives ``<subset>.tar.gz`` are fetched into ``<root>`` (resumable, sha256
checked) and extracted there; they are kept, so a later run verifies nothing and downloads nothing.
The index (:class:`~latentdyn.data.corpus.Utterance` list) holds absolute paths into ``<root>``: the
audio is never copied into the artifact cache.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from latentdyn.data.audio import (
    BAD_FILES_NAME,
    BadAudioError,
    BadFile,
    check_bad_audio_policy,
    report_bad_file,
    write_bad_files,
)
from latentdyn.data.corpus import Utterance
from latentdyn.data.download import download_and_extract, extraction_marker, normalize_sha256

log = logging.getLogger(__name__)

CORPUS_DIR = "LibriSpeech"
SPEAKERS_FILE = "SPEAKERS.TXT"
DEFAULT_URL_BASE = "https://www.openslr.org/resources/12"

#: sha256 of ``<subset>.tar.gz`` for the seven standard subsets, as published with torchaudio's
#: LibriSpeech dataset (``torchaudio.datasets.librispeech._CHECKSUMS``, which torch.hub checks as sha256).
LIBRISPEECH_SUBSETS: dict[str, str] = {
    "dev-clean": "76f87d090650617fca0cac8f88b9416e0ebf80350acb97b343a85fa903728ab3",
    "dev-other": "12661c48e8c3fe1de2c1caa4c3e135193bfb1811584f11f569dd12645aa84365",
    "test-clean": "39fde525e59672dc6d1551919b1478f724438a95aa55f874b576be21967e6c23",
    "test-other": "d09c181bba5cf717b3dee7d4d592af11a3ee3a09e08ae025c5506f6ebe961c29",
    "train-clean-100": "d4ddd1d5a6ab303066f14971d768ee43278a5f2a0aa43dc716b0e64ecbbbf6e2",
    "train-clean-360": "146a56496217e96c14334a160df97fffedd6e0a04e66b9c5af0d40be3c792ecf",
    "train-other-500": "ddb22f27f96ec163645d53215559df6aa36515f26e01dd70798188350adcb6d2",
}


@dataclass(frozen=True)
class SpeakerInfo:
    """One row of ``SPEAKERS.TXT``: gender (``"M"``, ``"F"`` or ``"U"``), subset, minutes of audio, name."""

    gender: str
    subset: str
    minutes: float | None
    name: str


def read_speakers_txt(path: Path) -> dict[str, SpeakerInfo]:
    """Parse LibriSpeech's ``SPEAKERS.TXT``: ``ID | SEX | SUBSET | MINUTES | NAME`` rows, ``;`` comments.

    Lines are split on ``|`` at most 4 times, so a name containing ``|`` (speaker 60 is ``|CBW|Simon``)
    stays whole. Rows with fewer than 3 fields are skipped with a warning; a sex other than ``M``/``F``
    becomes ``"U"``.
    """
    speakers: dict[str, SpeakerInfo] = {}
    with Path(path).open(encoding="utf-8", errors="replace") as fh:
        for line_no, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line or line.startswith(";"):
                continue
            fields = [f.strip() for f in line.split("|", 4)]
            if len(fields) < 3 or not fields[0]:
                log.warning("%s:%d: malformed speaker row %r skipped", path, line_no, line)
                continue
            sex = fields[1].upper()
            if sex not in ("M", "F"):
                log.warning(
                    "%s:%d: speaker %s has sex %r; recorded as unknown", path, line_no, fields[0], fields[1]
                )
                sex = "U"
            try:
                minutes = float(fields[3]) if len(fields) > 3 else None
            except ValueError:
                minutes = None
            name = fields[4] if len(fields) > 4 else ""
            speakers[fields[0]] = SpeakerInfo(gender=sex, subset=fields[2], minutes=minutes, name=name)
    return speakers


def _sorted_dirs(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir()), key=lambda p: p.name)


def _list_flacs(subset_dir: Path) -> list[tuple[str, str, Path]]:
    """``(speaker, chapter, path)`` of every ``<speaker>/<chapter>/*.flac`` under ``subset_dir``, sorted."""
    found = []
    for speaker_dir in _sorted_dirs(subset_dir):
        for chapter_dir in _sorted_dirs(speaker_dir):
            for path in sorted(chapter_dir.glob("*.flac")):
                found.append((speaker_dir.name, chapter_dir.name, path))
    return found


def _probe(path: Path) -> tuple[int, int]:
    """``(frames, sample_rate)`` from the file header.

    Raises:
        BadAudioError: (stage ``index``) the header is unreadable, or announces no frames or no rate.
    """
    try:
        info = sf.info(str(path))
    except (RuntimeError, OSError, ValueError) as exc:  # soundfile.LibsndfileError is a RuntimeError
        raise BadAudioError(path, f"unreadable ({exc})", "index") from exc
    if info.frames <= 0 or info.samplerate <= 0:
        raise BadAudioError(path, f"empty ({info.frames} frames at {info.samplerate} Hz)", "index")
    return int(info.frames), int(info.samplerate)


def index_librispeech(
    root: Path,
    subsets: list[str],
    speakers: Mapping[str, SpeakerInfo],
    *,
    on_bad_audio: str = "skip",
    progress: bool = True,
) -> tuple[list[Utterance], list[BadFile]]:
    """Index ``root/LibriSpeech/<subset>/<speaker>/<chapter>/*.flac`` for each subset.

    Duration is ``frames / sample_rate`` from the FLAC header (seconds); gender comes from
    ``speakers``; the subset is the directory the file is in. A file whose header is unreadable or
    announces no samples is bad: ``on_bad_audio="skip"`` leaves it out with a warning naming it,
    ``"error"`` raises at the first one. A speaker missing from ``speakers`` gets gender ``"U"`` (one
    warning listing all such speakers).

    Returns:
        Utterances with absolute paths, sorted by ``utt_id`` (the file stem), and the files left out
        (stage ``index``) in listing order.

    Raises:
        BadAudioError: the first bad file, under ``on_bad_audio="error"``.
        ValueError: an unknown policy, two files share an utt_id, or nothing at all was indexed.
    """
    check_bad_audio_policy(on_bad_audio)
    corpus_dir = Path(root).resolve() / CORPUS_DIR
    files = [(subset, *entry) for subset in subsets for entry in _list_flacs(corpus_dir / subset)]
    utterances: list[Utterance] = []
    skipped: list[BadFile] = []
    unknown: set[str] = set()
    subset_mismatch: dict[str, tuple[str, str]] = {}
    per_subset: dict[str, int] = defaultdict(int)
    for subset, speaker, chapter, path in tqdm(
        files, desc="index LibriSpeech", unit="file", disable=None if progress else True
    ):
        try:
            frames, sample_rate = _probe(path)
        except BadAudioError as err:
            bad = BadFile(path=str(path), stage="index", reason=err.reason, utt_id=path.stem)
            report_bad_file(bad, on_bad_audio)
            skipped.append(bad)
            continue
        info = speakers.get(speaker)
        if info is None:
            unknown.add(speaker)
        elif info.subset and info.subset != subset:
            subset_mismatch[speaker] = (info.subset, subset)
        utterances.append(
            Utterance(
                utt_id=path.stem,
                speaker=speaker,
                path=str(path),
                duration=frames / sample_rate,
                sample_rate=sample_rate,
                gender=info.gender if info is not None else "U",
                chapter=chapter,
                subset=subset,
            )
        )
        per_subset[subset] += 1
    if unknown:
        log.warning(
            "%d speaker(s) not in %s, gender recorded as unknown (U): %s",
            len(unknown),
            SPEAKERS_FILE,
            ", ".join(sorted(unknown)),
        )
    if subset_mismatch:
        log.warning(
            "%d speaker(s) found in a different subset than %s lists (listed -> found): %s",
            len(subset_mismatch),
            SPEAKERS_FILE,
            ", ".join(f"{s}: {a} -> {b}" for s, (a, b) in sorted(subset_mismatch.items())),
        )
    for subset in subsets:
        if per_subset[subset] == 0:
            log.warning("no readable .flac files under %s", corpus_dir / subset)
    if not utterances:
        raise ValueError(f"no readable utterances under {corpus_dir} for subsets {subsets}")
    utterances.sort(key=lambda u: u.utt_id)
    for prev, cur in zip(utterances, utterances[1:], strict=False):
        if prev.utt_id == cur.utt_id:
            raise ValueError(f"duplicate utterance id {cur.utt_id}: {prev.path} and {cur.path}")
    return utterances, skipped


@dataclass
class LibriSpeechCorpus:
    """LibriSpeech as a corpus (the protocol of :class:`~latentdyn.data.synthetic.SyntheticCorpus`).

    Attributes:
        root: directory that contains (or will contain) ``LibriSpeech/``; archives are stored here.
        subsets: which subsets to index (the archives ``<subset>.tar.gz``).
        download: fetch missing subsets from ``url_base`` (otherwise a missing subset is an error).
        url_base: where ``<subset>.tar.gz`` lives (an OpenSLR mirror).
        checksums: sha256 per archive name (``"<subset>.tar.gz"``), added to or overriding
            :data:`LIBRISPEECH_SUBSETS`; needed to download a non-standard subset.
        on_bad_audio: a file whose header is unreadable or empty is left out and recorded (``skip``)
            or stops the indexing (``error``); ``data.on_bad_audio`` sets it.
    """

    root: str
    subsets: list[str] = field(default_factory=lambda: ["train-clean-100", "dev-clean", "test-clean"])
    download: bool = False
    url_base: str = DEFAULT_URL_BASE
    checksums: dict[str, str] | None = None
    on_bad_audio: str = "skip"

    def __post_init__(self) -> None:
        self.root = str(self.root)
        check_bad_audio_policy(self.on_bad_audio)
        subsets = [self.subsets] if isinstance(self.subsets, str) else [str(s) for s in self.subsets]
        if not subsets:
            raise ValueError("subsets is empty; name at least one LibriSpeech subset, e.g. dev-clean")
        for subset in subsets:
            if not subset or "/" in subset or "\\" in subset or subset in (".", ".."):
                raise ValueError(f"invalid subset name {subset!r}")
        self.subsets = list(dict.fromkeys(subsets))  # drop repeats, keep order
        self.checksums = (
            {str(k): normalize_sha256(v) for k, v in self.checksums.items()} if self.checksums else None
        )

    @property
    def corpus_dir(self) -> Path:
        """``<root>/LibriSpeech`` (absolute)."""
        return Path(self.root).expanduser().resolve() / CORPUS_DIR

    def archive_path(self, subset: str) -> Path:
        """Where ``<subset>.tar.gz`` is (or will be) stored."""
        return Path(self.root).expanduser().resolve() / f"{subset}.tar.gz"

    def url(self, subset: str) -> str:
        """Download URL of ``<subset>.tar.gz``."""
        return f"{self.url_base.rstrip('/')}/{subset}.tar.gz"

    def sha256(self, subset: str) -> str | None:
        """Expected sha256 of ``<subset>.tar.gz``: ``checksums`` first, then the published values."""
        name = f"{subset}.tar.gz"
        if self.checksums and name in self.checksums:
            return self.checksums[name]
        return LIBRISPEECH_SUBSETS.get(subset)

    def _is_ready(self, subset: str) -> bool:
        """Whether ``subset`` is on disk and complete.

        A subset we extracted is complete once its extraction marker exists. A subset directory
        with no archive or partial download next to it was provided by the user and is taken as is;
        with ``download=False`` any existing directory is taken as is.
        """
        subset_dir = self.corpus_dir / subset
        if not self.download:
            return subset_dir.is_dir()
        archive = self.archive_path(subset)
        marker = extraction_marker(archive, archive.parent)
        if marker.exists() and not subset_dir.is_dir():
            log.warning(
                "%s says %s was extracted but %s is missing; extracting again", marker, archive, subset_dir
            )
            marker.unlink()
        if marker.exists():
            return True
        in_progress = archive.exists() or archive.with_suffix(archive.suffix + ".part").exists()
        return subset_dir.is_dir() and not in_progress

    def _missing_error(self, missing: list[str]) -> FileNotFoundError:
        where = "\n".join(f"  {self.corpus_dir / s}/<speaker>/<chapter>/*.flac" for s in missing)
        urls = "\n".join(f"  {self.url(s)}" for s in missing)
        return FileNotFoundError(
            f"LibriSpeech subset(s) {missing} not found under {self.corpus_dir}; expected\n{where}\n"
            "Either point data.root=PATH at a directory that contains LibriSpeech/<subset>/... and "
            f"LibriSpeech/{SPEAKERS_FILE} (for example where you extracted the OpenSLR archives), "
            "or set data.download=true to download and extract (resumable, sha256-checked) into "
            f"data.root ({self.root}):\n{urls}\n"
            "(data.root and data.download are the data=librispeech config's aliases of "
            "data.corpus.root and data.corpus.download.)"
        )

    def ensure_present(self) -> None:
        """Download and extract missing subsets (if ``download``), else fail with what is missing.

        Raises:
            FileNotFoundError: a subset or ``SPEAKERS.TXT`` is missing and ``download`` is off (the
                message says how to provide it).
            ValueError: a subset to download has no known checksum (nothing is downloaded unverified).
            latentdyn.data.download.ChecksumError: a downloaded archive does not match its checksum
                (it is not extracted).
        """
        missing = [s for s in self.subsets if not self._is_ready(s)]
        if missing and not self.download:
            raise self._missing_error(missing)
        for subset in missing:
            sha = self.sha256(subset)
            if sha is None:
                raise ValueError(
                    f"no sha256 known for {subset}.tar.gz (standard subsets: {sorted(LIBRISPEECH_SUBSETS)}); "
                    f"add it as data.corpus.checksums={{{subset}.tar.gz: <sha256>}} to download it"
                )
            archive = self.archive_path(subset)
            log.info("fetching LibriSpeech %s from %s into %s", subset, self.url(subset), archive.parent)
            download_and_extract(self.url(subset), archive, archive.parent, sha256=sha)
            if not (self.corpus_dir / subset).is_dir():
                raise FileNotFoundError(
                    f"{archive} was extracted but did not contain {CORPUS_DIR}/{subset}/; is it a LibriSpeech archive?"
                )
        if not (self.corpus_dir / SPEAKERS_FILE).is_file():
            raise FileNotFoundError(
                f"{self.corpus_dir / SPEAKERS_FILE} is missing; it gives each speaker's gender (used to "
                "stratify the splits) and ships in every LibriSpeech archive: copy it from one, or use "
                "data.download=true"
            )

    def materialize(self, workdir: Path) -> list[Utterance]:
        """Make sure the subsets are present (downloading if asked), then index them.

        The audio stays under ``root`` and the returned utterances point there with absolute paths,
        sorted by ``utt_id``. ``workdir`` (the corpus artifact's directory) receives only the record of
        the files indexing left out, ``workdir/bad_files.json`` (see :func:`write_bad_files`).

        Raises:
            BadAudioError: the first bad file, when ``on_bad_audio`` is ``error``.
        """
        self.ensure_present()
        speakers = read_speakers_txt(self.corpus_dir / SPEAKERS_FILE)
        utterances, skipped = index_librispeech(
            self.corpus_dir.parent, self.subsets, speakers, on_bad_audio=self.on_bad_audio
        )
        Path(workdir).mkdir(parents=True, exist_ok=True)
        write_bad_files(skipped, Path(workdir) / BAD_FILES_NAME)
        return utterances
