"""Resumable, checksummed downloads and safe tar extraction (stdlib only: urllib, hashlib, tarfile).

A download goes to ``<dest>.part`` and is renamed to ``dest`` only once complete and verified, so
``dest`` existing means "complete" (re-verified cheaply when a checksum is given). An interrupted run
resumes with an HTTP ``Range`` request. An archive that fails its checksum is renamed to ``<dest>.bad``
and never extracted. Extraction rejects members that would land outside the target directory and
writes a marker file when done, so a re-run skips it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from filelock import FileLock
from tqdm import tqdm

log = logging.getLogger(__name__)

USER_AGENT = "latentdyn-downloader/1 (+urllib)"
#: Seconds before the first retry after a network error; doubled on each further retry (capped at 60 s).
RETRY_BASE_S = 2.0
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Server answers worth retrying (the rest of 4xx mean the request itself is wrong).
_RETRYABLE_HTTP = {408, 429, 500, 502, 503, 504}
# tarfile's extraction-filter error (Python >= 3.11.4); older Pythons never raise it.
_FILTER_ERROR: type[Exception] = getattr(tarfile, "FilterError", tarfile.TarError)


class ChecksumError(ValueError):
    """A downloaded file's sha256 differs from the expected one."""


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the extraction directory (or is a device file)."""


class IncompleteDownloadError(OSError):
    """The connection closed before the announced number of bytes arrived (the ``.part`` is kept)."""


def normalize_sha256(sha256: str) -> str:
    """Lower-case ``sha256`` and check it is 64 hex digits (raises ValueError otherwise)."""
    value = str(sha256).strip().lower()
    if not _SHA256_RE.match(value):
        raise ValueError(f"not a sha256 (64 hex digits): {sha256!r}")
    return value


def sha256_file(path: Path, *, chunk_size: int = 1 << 20, progress: bool = False) -> str:
    """Hex sha256 of a file, read in ``chunk_size``-byte chunks (constant memory)."""
    path = Path(path)
    digest = hashlib.sha256()
    with (
        path.open("rb") as fh,
        tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"sha256 {path.name}",
            disable=None if progress else True,
        ) as bar,
    ):
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _part_path(dest: Path) -> Path:
    return dest.with_suffix(dest.suffix + ".part")


def _bad_path(dest: Path) -> Path:
    return dest.with_suffix(dest.suffix + ".bad")


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """``(first_byte, total)`` of a ``Content-Range: bytes a-b/total`` (or ``bytes */total``) header."""
    match = re.match(r"^\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*$", header or "")
    if match is None:
        return None, None
    first = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return first, total


def _fetch_to_part(
    url: str, part: Path, *, chunk_size: int, progress: bool, timeout: float, label: str
) -> None:
    """Bring ``part`` up to the full content of ``url``, resuming from its current size.

    Handles ``206`` (append from the current size), ``200`` (the server ignored ``Range``: start over)
    and ``416`` (nothing left to send: the part is complete, or bigger than the file: start over).

    Raises:
        IncompleteDownloadError: fewer bytes than ``Content-Length`` arrived (``part`` keeps them).
        HTTPError, URLError, OSError: from the network.
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as exc:
        if exc.code != 416 or not offset:
            raise
        _, total = _content_range(exc.headers.get("Content-Range"))
        exc.close()
        if total is None or total == offset:
            log.info("%s: already fully downloaded (%d bytes)", label, offset)
            return
        log.warning(
            "%s: partial file (%d bytes) does not fit the remote size %d; starting over", label, offset, total
        )
        part.unlink()
        return _fetch_to_part(
            url, part, chunk_size=chunk_size, progress=progress, timeout=timeout, label=label
        )

    expected: int | None = None
    with response:
        status = getattr(response, "status", None)
        mode = "wb"
        if status == 206:
            first, _ = _content_range(response.headers.get("Content-Range"))
            if first != offset:
                log.warning(
                    "%s: asked for bytes %d- but got Content-Range %r; starting over",
                    label,
                    offset,
                    response.headers.get("Content-Range"),
                )
                restart = True
            else:
                restart, mode = False, "ab"
        else:
            if offset:
                log.info(
                    "%s: server ignored the range request (status %s); restarting from byte 0", label, status
                )
            restart, offset = False, 0
        if not restart:
            expected = _write_body(
                response, part, mode, offset, chunk_size=chunk_size, progress=progress, label=label
            )
    if restart:
        part.unlink()
        return _fetch_to_part(
            url, part, chunk_size=chunk_size, progress=progress, timeout=timeout, label=label
        )
    size = part.stat().st_size
    if expected is not None and size != expected:
        raise IncompleteDownloadError(f"{label}: connection closed at byte {size} of {expected} from {url}")


def _write_body(
    response: http.client.HTTPResponse,
    part: Path,
    mode: str,
    offset: int,
    *,
    chunk_size: int,
    progress: bool,
    label: str,
) -> int | None:
    """Stream the response body into ``part`` (``mode`` "wb" or "ab"); return the expected final size in bytes."""
    length = response.headers.get("Content-Length")
    expected = offset + int(length) if length is not None and length.strip().isdigit() else None
    with (
        part.open(mode) as fh,
        tqdm(
            total=expected,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label,
            disable=None if progress else True,
        ) as bar,
    ):
        while chunk := response.read(chunk_size):
            fh.write(chunk)
            bar.update(len(chunk))
    return expected


def _is_retryable(exc: BaseException) -> bool:
    """Transient network trouble (worth resuming), as opposed to a wrong URL or a local disk error."""
    if isinstance(exc, HTTPError):
        return exc.code in _RETRYABLE_HTTP
    return isinstance(
        exc, URLError | ConnectionError | TimeoutError | http.client.HTTPException | IncompleteDownloadError
    )


def download_file(
    url: str,
    dest: Path,
    *,
    sha256: str | None,
    chunk_size: int = 1 << 20,
    progress: bool = True,
    timeout: float = 60.0,
    retries: int = 3,
) -> Path:
    """Download ``url`` to ``dest``, resuming an interrupted download and verifying its sha256.

    If ``dest`` exists and matches ``sha256`` (or no checksum is given) it is returned without any
    network access; if it exists but does not match, it is renamed to ``<dest>.bad`` and downloaded
    afresh. Bytes go to ``<dest>.part``; an existing part is resumed with ``Range: bytes=N-``. Network
    errors and truncated responses are retried ``retries`` times, each retry resuming where the last
    one stopped. A file lock (``<dest>.lock``) keeps concurrent jobs from writing the same part.

    Args:
        url: http(s) URL.
        dest: final path of the file.
        sha256: expected hex sha256, or ``None`` to skip verification.
        chunk_size: bytes per read.
        progress: show a tqdm bar in bytes (on a terminal).
        timeout: seconds a connect or a read may block.
        retries: how many times a failed transfer is resumed before the error propagates.

    Returns:
        ``dest``.

    Raises:
        ChecksumError: the completed download does not match ``sha256``; it is kept as
            ``<dest>.bad`` and the message names the file and both sums.
        HTTPError, URLError, OSError: the transfer failed ``retries + 1`` times (the ``.part`` is kept,
            so the next call resumes).
    """
    dest = Path(dest)
    expected = normalize_sha256(sha256) if sha256 is not None else None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock", timeout=-1):
        if dest.exists():
            if expected is None:
                return dest
            actual = sha256_file(dest, chunk_size=chunk_size, progress=progress)
            if actual == expected:
                return dest
            bad = _bad_path(dest)
            dest.replace(bad)
            log.warning(
                "%s exists but its sha256 %s is not the expected %s; moved it to %s and downloading again",
                dest,
                actual,
                expected,
                bad,
            )

        part = _part_path(dest)
        for attempt in range(retries + 1):
            try:
                _fetch_to_part(
                    url, part, chunk_size=chunk_size, progress=progress, timeout=timeout, label=dest.name
                )
                break
            except Exception as exc:
                if attempt == retries or not _is_retryable(exc):
                    raise
                wait = min(RETRY_BASE_S * 2**attempt, 60.0)
                have = part.stat().st_size if part.exists() else 0
                log.warning(
                    "%s: %s; retry %d/%d in %.0f s, resuming from byte %d",
                    dest.name,
                    exc,
                    attempt + 1,
                    retries,
                    wait,
                    have,
                )
                time.sleep(wait)

        if expected is not None:
            actual = sha256_file(part, chunk_size=chunk_size, progress=progress)
            if actual != expected:
                bad = _bad_path(dest)
                part.replace(bad)
                raise ChecksumError(
                    f"checksum mismatch for {dest} (from {url}): expected sha256 {expected}, got {actual}. "
                    f"The download was kept as {bad} and not extracted; delete it to download again, "
                    "or correct the expected checksum."
                )
        part.replace(dest)
    return dest


def extraction_marker(archive: Path, dest_dir: Path) -> Path:
    """The file whose presence records that ``archive`` was fully extracted into ``dest_dir``."""
    return Path(dest_dir) / f".{Path(archive).name}.extracted"


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _checked_members(tar: tarfile.TarFile, root: Path, label: str) -> Iterator[tarfile.TarInfo]:
    """Yield ``tar``'s members one by one (streaming), raising UnsafeArchiveError on an unsafe one.

    Unsafe: an absolute name, a ``..`` component, a path that resolves (through links already on
    disk) outside ``root``, a symbolic or hard link whose target is absolute or outside ``root``,
    or a device/FIFO file.
    """
    root_s = os.path.realpath(root)
    for member in tar:
        name = member.name
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in parts:
            raise UnsafeArchiveError(
                f"{label}: member {name!r} has an absolute or '..' path; refusing to extract"
            )
        target = os.path.realpath(os.path.join(root_s, name))
        if not _inside(target, root_s):
            raise UnsafeArchiveError(f"{label}: member {name!r} would be written outside {root_s}")
        if member.issym() or member.islnk():
            link = member.linkname
            if os.path.isabs(link) or link.startswith(("/", "\\")):
                raise UnsafeArchiveError(
                    f"{label}: link {name!r} -> {link!r} is absolute; refusing to extract"
                )
            base = os.path.dirname(os.path.join(root_s, name)) if member.issym() else root_s
            if not _inside(os.path.realpath(os.path.join(base, link)), root_s):
                raise UnsafeArchiveError(f"{label}: link {name!r} -> {link!r} points outside {root_s}")
        if member.isdev():
            raise UnsafeArchiveError(f"{label}: member {name!r} is a device or FIFO; refusing to extract")
        yield member


def extract_tar(archive: Path, dest_dir: Path, *, progress: bool = True) -> None:
    """Extract a (possibly compressed) tar archive into ``dest_dir`` safely, once.

    Members are checked before each is written (see :func:`_checked_members`) and, where Python
    provides it, extracted with tarfile's ``"data"`` filter as a second line of defence. The archive is
    read in a single pass. After success a marker (:func:`extraction_marker`) is written; if it exists
    the call returns at once. A rejected archive raises UnsafeArchiveError with no marker written
    (members before the offending one may already be on disk, all inside ``dest_dir``).
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    marker = extraction_marker(archive, dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(marker) + ".lock", timeout=-1):
        if marker.exists():
            log.info("%s already extracted into %s (marker %s)", archive.name, dest_dir, marker.name)
            return
        root = dest_dir.resolve()
        with (
            tarfile.open(archive, "r:*") as tar,
            tqdm(unit="file", desc=f"extract {archive.name}", disable=None if progress else True) as bar,
        ):
            members = _checked_members(tar, root, archive.name)

            def counted() -> Iterator[tarfile.TarInfo]:
                for member in members:
                    yield member
                    bar.update()

            try:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(root, members=counted(), filter="data")
                else:  # Python < 3.11.4: our own member checks are the only guard
                    tar.extractall(root, members=counted())
            except _FILTER_ERROR as exc:
                raise UnsafeArchiveError(f"{archive.name}: {exc}") from exc
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(json.dumps({"archive": archive.name, "size": archive.stat().st_size}) + "\n")
        tmp.replace(marker)


def download_and_extract(
    url: str,
    archive: Path,
    dest_dir: Path,
    *,
    sha256: str | None,
    progress: bool = True,
    timeout: float = 60.0,
    retries: int = 3,
) -> None:
    """Download ``url`` to ``archive`` (verified) and extract it into ``dest_dir``; skip what is done.

    If ``archive`` was already extracted (its marker exists) nothing is downloaded or hashed. A
    checksum mismatch raises :class:`ChecksumError` before anything is extracted.
    """
    if extraction_marker(archive, dest_dir).exists():
        return
    download_file(url, archive, sha256=sha256, progress=progress, timeout=timeout, retries=retries)
    extract_tar(archive, dest_dir, progress=progress)
