"""The global, append-only run manifest (``outputs/manifest.jsonl``).

One JSON object per line; a run appends a ``started`` line when it starts and a ``completed`` or ``failed``
line when it ends. A process killed mid-run leaves only ``started`` (a *crashed* run). Appends are atomic
under concurrent writers: an exclusive file lock around a single ``write`` of the whole line, then flush and
fsync before the lock is released.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"


def _lock_for(path: Path) -> FileLock:
    return FileLock(str(path) + ".lock", timeout=120)


def append_record(manifest_path: Path, record: Mapping[str, Any]) -> None:
    """Append one record as a JSON line, atomically with respect to other writers."""
    manifest_path = Path(manifest_path)
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, default=str) + "\n"
    with _lock_for(manifest_path):
        with manifest_path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


def iter_records(manifest_path: Path) -> Iterator[dict[str, Any]]:
    """Yield the manifest's records in order; a malformed line is logged by line number and skipped."""
    manifest_path = Path(manifest_path)
    if not manifest_path.exists():
        return
    with manifest_path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                log.warning("%s:%d: malformed manifest line skipped (%s)", manifest_path, line_no, err)
