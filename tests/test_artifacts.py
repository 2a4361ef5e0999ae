"""Artifacts: built once under concurrency, never read half-written, rebuilt on force."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest

from latentdyn import artifacts

SPEC = {"corpus": {"n": 3}, "version": 1}


def _slow_build(counter: Path):
    def build(tmp: Path) -> None:
        with counter.open("a") as fh:
            fh.write("built\n")
        time.sleep(0.5)
        (tmp / "data.txt").write_text("payload")

    return build


def _worker(cache: str, counter: str, out: str, force: bool = False, barrier=None) -> None:
    if barrier is not None:
        barrier.wait(timeout=60)
    path = artifacts.get_or_build(Path(cache), "corpus", SPEC, _slow_build(Path(counter)), force=force)
    Path(out).write_text((path / "data.txt").read_text())


def test_spec_key_ignores_key_order() -> None:
    assert artifacts.spec_key({"a": 1, "b": [1, 2]}) == artifacts.spec_key({"b": [1, 2], "a": 1})
    assert artifacts.spec_key({"a": 1}) != artifacts.spec_key({"a": 2})


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    counter = tmp_path / "count.txt"
    ctx = mp.get_context("spawn")
    outs = [tmp_path / f"out{i}.txt" for i in range(4)]
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "cache"), str(counter), str(o))) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert counter.read_text().count("built") == 1
    assert all(o.read_text() == "payload" for o in outs)


def test_concurrent_forced_rebuilds_build_once(tmp_path: Path) -> None:
    """Two jobs started together with force=true: one rebuild, not one after the other."""
    counter = tmp_path / "count.txt"
    cache = tmp_path / "cache"
    artifacts.get_or_build(cache, "corpus", SPEC, _slow_build(counter))
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    outs = [tmp_path / f"out{i}.txt" for i in range(2)]
    procs = [
        ctx.Process(target=_worker, args=(str(cache), str(counter), str(o), True, barrier)) for o in outs
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert counter.read_text().count("built") == 2  # the first build and one forced rebuild
    assert all(o.read_text() == "payload" for o in outs)


def test_half_written_artifact_is_never_visible(tmp_path: Path) -> None:
    final = artifacts.artifact_path(tmp_path, "corpus", SPEC)
    seen_during_build: list[bool] = []

    def failing_build(tmp: Path) -> None:
        (tmp / "data.txt").write_text("half")
        seen_during_build.append(final.exists() or artifacts.is_complete(final))
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        artifacts.get_or_build(tmp_path, "corpus", SPEC, failing_build)
    assert seen_during_build == [False]
    assert not final.exists()
    assert not [p for p in final.parent.iterdir() if p.name.startswith(".tmp-")], "temporary dir left behind"
    # A later build succeeds and is complete.
    path = artifacts.get_or_build(tmp_path, "corpus", SPEC, lambda tmp: (tmp / "data.txt").write_text("ok"))
    assert artifacts.is_complete(path) and (path / "data.txt").read_text() == "ok"


def test_reuse_and_force(tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO")
    calls: list[int] = []

    def build(tmp: Path) -> None:
        calls.append(1)
        (tmp / "data.txt").write_text(str(len(calls)))

    spec = {"unique": "reuse-force"}
    p1 = artifacts.get_or_build(tmp_path, "x", spec, build)
    p2 = artifacts.get_or_build(tmp_path, "x", spec, build)
    assert p1 == p2 and len(calls) == 1
    assert "reused" in caplog.text
    p3 = artifacts.get_or_build(tmp_path, "x", spec, build, force=True)
    assert p3 == p1 and len(calls) == 2 and (p3 / "data.txt").read_text() == "2"
    # force rebuilds once per process, not at every request of a composite run
    artifacts.get_or_build(tmp_path, "x", spec, build, force=True)
    assert len(calls) == 2
