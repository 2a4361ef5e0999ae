"""Content-addressed artifacts: expensive products shared between runs (DESIGN §5).

An artifact is a directory ``<cache_dir>/<kind>/<key>`` where ``key`` hashes the config that determines
it. It is built in a temporary sibling directory and renamed into place when complete, under a file lock,
so concurrent jobs build it once and nobody ever reads a half-written artifact. ``force=True`` rebuilds
(the old copy is replaced atomically, never deleted while half the new one exists).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock

log = logging.getLogger(__name__)

SPEC_NAME = "artifact.json"

# Artifacts rebuilt by `force` in this process: a composite run asks for the same artifact several times
# and must rebuild it once, not at every request.
_forced_this_process: set[Path] = set()


def spec_key(spec: Mapping[str, Any]) -> str:
    """Stable 16-hex-digit key of a JSON-able spec (key order does not matter)."""
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def artifact_path(cache_dir: Path, kind: str, spec: Mapping[str, Any]) -> Path:
    """Where the artifact of this kind and spec lives (whether or not it is built yet)."""
    return Path(cache_dir) / kind / spec_key(spec)


def is_complete(path: Path) -> bool:
    """An artifact directory is complete once its spec file exists (written last, before the rename)."""
    return (path / SPEC_NAME).is_file()


def built_since(path: Path, since: float) -> bool:
    """Whether the complete artifact at ``path`` finished building at or after ``since`` (Unix seconds)."""
    try:
        record = json.loads((path / SPEC_NAME).read_text())
    except (OSError, ValueError):
        return False
    return float(record.get("built_at_unix", float("-inf"))) >= since


def get_or_build(
    cache_dir: Path,
    kind: str,
    spec: Mapping[str, Any],
    build: Callable[[Path], None],
    *,
    force: bool = False,
) -> Path:
    """Return the artifact directory for ``spec``, building it with ``build(tmp_dir)`` if needed.

    Args:
        cache_dir: root of the artifact cache.
        kind: artifact family (``corpus``, ``splits``, ``latents``, ...), a subdirectory of the cache.
        spec: everything that determines the artifact's content (hashed into its key, saved beside it).
        build: fills an empty directory with the artifact; must not write anywhere else.
        force: rebuild even if a complete artifact exists: once, now. Concurrent forced requests share one
            rebuild (one that finished after a request was made satisfies it).
    """
    final = artifact_path(cache_dir, kind, spec)
    final.parent.mkdir(parents=True, exist_ok=True)
    force = force and final not in _forced_this_process
    requested = time.time()
    if is_complete(final) and not force:
        log.info("artifact %s/%s reused: %s", kind, final.name, final)
        return final
    with FileLock(str(final) + ".lock", timeout=-1):
        if is_complete(final) and (not force or built_since(final, requested)):
            # `force` asks for a rebuild from now on: one a concurrent job finished while we waited counts.
            log.info("artifact %s/%s reused (built by a concurrent job): %s", kind, final.name, final)
            if force:
                _forced_this_process.add(final)
            return final
        tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            log.info("artifact %s/%s building ...", kind, final.name)
            build(tmp)
            record = {
                "kind": kind,
                "key": final.name,
                "spec": spec,
                "built_at": datetime.now(UTC).isoformat(),
                "built_at_unix": time.time(),
                "pid": os.getpid(),
            }
            (tmp / SPEC_NAME).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
            if final.exists():
                trash = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
                final.rename(trash)
                tmp.rename(final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if force:
            _forced_this_process.add(final)
        log.info("artifact %s/%s built: %s", kind, final.name, final)
        return final
