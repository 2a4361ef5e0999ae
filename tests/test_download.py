"""Resumable, checksummed downloads and safe extraction, against a loopback HTTP server (no network)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from latentdyn.data import download as dl
from latentdyn.data.download import (
    ChecksumError,
    UnsafeArchiveError,
    download_and_extract,
    download_file,
    extract_tar,
    extraction_marker,
)

TIMEOUT = 5.0


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 serving in-memory files, recording every request.

    Modes (attributes, changeable between requests):
        honour_range: answer ``Range: bytes=N-`` with 206 (or 416 past the end); else always 200.
        truncate_next: the next body is cut after this many bytes (Content-Length still the full size).
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.honour_range = True
        self.truncate_next: int | None = None
        self.requests: list[tuple[str, str | None, int]] = []  # (path, Range header, status)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                body = server.files.get(self.path)
                range_header = self.headers.get("Range")
                if body is None:
                    server.requests.append((self.path, range_header, 404))
                    self.send_error(404)
                    return
                start = 0
                if server.honour_range and range_header and range_header.startswith("bytes="):
                    start = int(range_header[len("bytes=") :].split("-")[0])
                    if start >= len(body):
                        server.requests.append((self.path, range_header, 416))
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                else:
                    status = 200
                server.requests.append((self.path, range_header, status))
                payload = body[start:]
                self.send_response(status)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if server.truncate_next is not None:
                    payload, server.truncate_next = payload[: server.truncate_next], None
                    self.close_connection = True
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with LoopbackServer() as srv:
        yield srv


def make_tarball(members: dict[str, bytes]) -> bytes:
    """A .tar.gz holding regular files ``{name: content}``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


MEMBERS = {
    "pkg/a.txt": b"alpha\n" * 1000,
    "pkg/sub/b.bin": bytes(range(256)) * 300,
}


@pytest.fixture
def tarball(server: LoopbackServer) -> tuple[bytes, str, str]:
    """``(bytes, url, sha256)`` of a small tarball served at ``/data.tar.gz``."""
    data = make_tarball(MEMBERS)
    server.files["/data.tar.gz"] = data
    return data, server.url + "/data.tar.gz", hashlib.sha256(data).hexdigest()


def test_clean_download_verify_extract_and_skip(tmp_path: Path, server: LoopbackServer, tarball) -> None:
    data, url, sha = tarball
    dest = tmp_path / "dl" / "data.tar.gz"
    assert download_file(url, dest, sha256=sha, chunk_size=4096, progress=False, timeout=TIMEOUT) == dest
    assert dest.read_bytes() == data
    assert not dest.with_suffix(".gz.part").exists()
    assert [r[1:] for r in server.requests] == [(None, 200)]

    out = tmp_path / "out"
    extract_tar(dest, out, progress=False)
    for name, content in MEMBERS.items():
        assert (out / name).read_bytes() == content
    assert extraction_marker(dest, out).exists()

    # An existing, verifying file is returned without touching the network.
    download_file(url, dest, sha256=sha.upper(), progress=False, timeout=TIMEOUT)
    assert len(server.requests) == 1
    # The marker makes a re-run skip extraction: a deleted file is not restored.
    (out / "pkg/a.txt").unlink()
    extract_tar(dest, out, progress=False)
    assert not (out / "pkg/a.txt").exists()


def test_resume_partial_download_with_range(tmp_path: Path, server: LoopbackServer, tarball) -> None:
    data, url, sha = tarball
    dest = tmp_path / "data.tar.gz"
    half = len(data) // 2
    dest.with_suffix(".gz.part").write_bytes(data[:half])
    download_file(url, dest, sha256=sha, chunk_size=1000, progress=False, timeout=TIMEOUT)
    assert server.requests == [("/data.tar.gz", f"bytes={half}-", 206)]
    assert dest.read_bytes() == data
    assert not dest.with_suffix(".gz.part").exists()


def test_server_ignoring_range_restarts_from_zero(tmp_path: Path, server: LoopbackServer, tarball) -> None:
    data, url, sha = tarball
    server.honour_range = False
    dest = tmp_path / "data.tar.gz"
    half = len(data) // 2
    dest.with_suffix(".gz.part").write_bytes(data[:half])
    download_file(url, dest, sha256=sha, progress=False, timeout=TIMEOUT)
    assert server.requests == [("/data.tar.gz", f"bytes={half}-", 200)]
    assert dest.read_bytes() == data  # appending the full body to the half would give 1.5x the bytes


def test_complete_part_answered_416_is_verified(tmp_path: Path, server: LoopbackServer, tarball) -> None:
    data, url, sha = tarball
    dest = tmp_path / "data.tar.gz"
    dest.with_suffix(".gz.part").write_bytes(data)
    download_file(url, dest, sha256=sha, progress=False, timeout=TIMEOUT)
    assert [r[2] for r in server.requests] == [416]
    assert dest.read_bytes() == data


def test_dropped_connection_is_resumed_on_retry(
    tmp_path: Path, server: LoopbackServer, tarball, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dl, "RETRY_BASE_S", 0.01)
    data, url, sha = tarball
    cut = len(data) // 3
    server.truncate_next = cut
    dest = tmp_path / "data.tar.gz"
    download_file(url, dest, sha256=sha, progress=False, timeout=TIMEOUT, retries=2)
    assert [r[1:] for r in server.requests] == [(None, 200), (f"bytes={cut}-", 206)]
    assert dest.read_bytes() == data


def test_checksum_mismatch_names_file_and_both_sums_and_extracts_nothing(
    tmp_path: Path, server: LoopbackServer, tarball
) -> None:
    data, url, sha = tarball
    wrong = hashlib.sha256(b"something else").hexdigest()
    archive = tmp_path / "data.tar.gz"
    out = tmp_path / "out"
    keep = tmp_path / "unrelated.txt"
    keep.write_text("mine")
    with pytest.raises(ChecksumError) as err:
        download_and_extract(url, archive, out, sha256=wrong, progress=False, timeout=TIMEOUT)
    message = str(err.value)
    assert str(archive) in message and wrong in message and sha in message
    assert isinstance(err.value, ValueError)
    assert not archive.exists() and not archive.with_suffix(".gz.part").exists()
    assert archive.with_suffix(".gz.bad").read_bytes() == data
    assert not out.exists() or not any(out.iterdir())
    assert keep.read_text() == "mine"


def test_existing_file_with_wrong_sum_is_set_aside_and_fetched_again(
    tmp_path: Path, server: LoopbackServer, tarball
) -> None:
    data, url, sha = tarball
    dest = tmp_path / "data.tar.gz"
    dest.write_bytes(b"corrupted")
    download_file(url, dest, sha256=sha, progress=False, timeout=TIMEOUT)
    assert dest.read_bytes() == data
    assert dest.with_suffix(".gz.bad").read_bytes() == b"corrupted"
    assert len(server.requests) == 1


def test_http_error_propagates_without_retry_for_404(tmp_path: Path, server: LoopbackServer) -> None:
    from urllib.error import HTTPError

    with pytest.raises(HTTPError):
        download_file(server.url + "/missing.tar.gz", tmp_path / "m.tar.gz", sha256=None, timeout=TIMEOUT)
    assert len(server.requests) == 1


def _evil_tar(tmp_path: Path, kind: str) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        ok = tarfile.TarInfo("inside/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        if kind == "dotdot":
            info = tarfile.TarInfo("../evil.txt")
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        elif kind == "absolute":
            info = tarfile.TarInfo(str(tmp_path / "evil.txt"))
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        elif kind == "symlink":
            info = tarfile.TarInfo("inside/link")
            info.type = tarfile.SYMTYPE
            info.linkname = "../../evil.txt"
            tar.addfile(info)
        elif kind == "hardlink":
            info = tarfile.TarInfo("inside/hard")
            info.type = tarfile.LNKTYPE
            info.linkname = "../evil.txt"
            tar.addfile(info)
    path = tmp_path / f"{kind}.tar.gz"
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_unsafe_members_are_rejected(tmp_path: Path, kind: str) -> None:
    archive = _evil_tar(tmp_path, kind)
    out = tmp_path / "a" / "out"
    with pytest.raises(UnsafeArchiveError):
        extract_tar(archive, out, progress=False)
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "a" / "evil.txt").exists()
    assert not (out / "inside" / "link").is_symlink()
    assert not extraction_marker(archive, out).exists()
