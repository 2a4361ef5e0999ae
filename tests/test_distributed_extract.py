"""Distributed Phase 0 extraction: workers split the shards by rank, share one shard directory without wiping
each other's shards, and the store is assembled once, the same byte for byte as a single process's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from latentdyn.data.latent_store import LatentStoreWriter, store_meta
from latentdyn.pipeline import store as store_steps
from latentdyn.representations import extract as ex
from latentdyn.representations.extract import (
    ShardsPending,
    Worker,
    assemble_store,
    encode_worker_shards,
    extract_to_store,
    missing_shards,
    resolve_worker,
    wait_for_shards,
)
from tests.conftest import REPO_ROOT, compose_at
from tests.test_extract import _corpus, _mel

#: The variables a launcher sets; cleared so the tests see only what they set themselves.
LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_MAX",
    "SLURM_ARRAY_TASK_STEP",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
)
#: Every file of a built latent store artifact.
STORE_FILES = (
    "latents.f16",
    "log_energy.f32",
    "index.jsonl",
    "stats.json",
    "meta.json",
    "bad_files.json",
    "artifact.json",
)
#: The only fields that legitimately differ between two builds of one store: when and by which process its
#: artifact record was written (artifact.json). meta.json, stats.json and the arrays hold no timestamps.
BUILD_FIELDS = ("built_at", "built_at_unix", "pid")
#: Phase 0 on the smoke corpus (18 utterances of 3.5-4.5 s) in shards of >= 10 s: 6 shards.
OVERRIDES = ["experiment=phase0", "debug=smoke", "extract.shard_seconds=10", "extract.num_workers=0"]


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ------------------------------------------------------------------------------- identity and assignment


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7, 9])
def test_ranks_partition_the_shards_round_robin(world_size: int) -> None:
    n_shards = 7
    shares = [Worker(rank, world_size).shards(n_shards) for rank in range(world_size)]
    assert sorted(k for share in shares for k in share) == list(range(n_shards))  # each shard exactly once
    for rank, share in enumerate(shares):
        assert share == [k for k in range(n_shards) if k % world_size == rank]
        assert all(Worker(rank, world_size).owner(k) == rank for k in share)
    assert Worker(1, 3).shards(7) == [1, 4]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (0, 1, "default")),
        ({"RANK": "3", "WORLD_SIZE": "4"}, (3, 4, "torchrun")),
        ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, (1, 2, "torchrun")),
        ({"WORLD_SIZE": "2"}, (0, 1, "default")),  # a rank is needed too
        (
            {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "5"},
            (2, 5, "slurm-array"),
        ),
        (
            {
                "SLURM_ARRAY_TASK_ID": "14",
                "SLURM_ARRAY_TASK_MIN": "10",
                "SLURM_ARRAY_TASK_STEP": "2",
                "SLURM_ARRAY_TASK_COUNT": "3",
            },
            (2, 3, "slurm-array"),
        ),
        (  # an array task is one worker even when its job step has one task
            {
                "SLURM_ARRAY_TASK_ID": "1",
                "SLURM_ARRAY_TASK_COUNT": "2",
                "SLURM_PROCID": "0",
                "SLURM_NTASKS": "1",
            },
            (1, 2, "slurm-array"),
        ),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "6"}, (5, 6, "slurm-tasks")),
    ],
)
def test_worker_identity_comes_from_the_launcher_environment(no_launcher, env, expected) -> None:
    for name, value in env.items():
        no_launcher.setenv(name, value)
    worker = resolve_worker()
    assert (worker.rank, worker.world_size, worker.source) == expected


def test_configured_identity_wins_and_is_validated(no_launcher) -> None:
    no_launcher.setenv("RANK", "1")
    no_launcher.setenv("WORLD_SIZE", "2")
    assert resolve_worker(0, 3) == Worker(0, 3, "config")
    assert resolve_worker(None, 3) == Worker(1, 3, "torchrun+config")
    for rank, world_size in [(2, 2), (-1, 2), (0, 0), (5, None)]:
        with pytest.raises(
            ValueError, match=r"extract\.rank=.* and extract\.world_size=.*0 <= extract\.rank"
        ):
            resolve_worker(rank, world_size)
    no_launcher.setenv("RANK", "2")  # a launcher environment that does not add up is refused too
    with pytest.raises(ValueError, match=r"from torchrun.*SLURM_ARRAY_TASK_ID"):
        resolve_worker()


def test_pipeline_reads_the_identity_from_config(compose_cfg, no_launcher) -> None:
    no_launcher.setenv("SLURM_PROCID", "1")
    no_launcher.setenv("SLURM_NTASKS", "4")
    assert store_steps.extract_worker(compose_cfg(["debug=smoke"])) == Worker(1, 4, "slurm-tasks")
    cfg = compose_cfg(["debug=smoke", "extract.rank=2", "extract.world_size=3"])
    assert store_steps.extract_worker(cfg) == Worker(2, 3, "config")
    with pytest.raises(ValueError, match="extract.rank=3 and extract.world_size=3"):
        store_steps.extract_worker(compose_cfg(["debug=smoke", "extract.rank=3", "extract.world_size=3"]))


# ------------------------------------------------------------------------------------ the shared directory


def _files(shard_dir: Path) -> dict[str, tuple[int, int]]:
    """Shard files by name with (inode, mtime_ns): a rewritten or deleted file shows."""
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(shard_dir.glob("shard-*"))
        if p.is_file()
    }


def test_a_worker_never_wipes_another_workers_shards(tmp_path: Path) -> None:
    splits = _corpus(tmp_path / "audio", n_utts=12)
    kw = {"batch_seconds": 1.5, "shard_seconds": 2.0, "num_workers": 0, "progress": False}
    shard_dir = tmp_path / "key.shards"
    rank0 = encode_worker_shards(_mel(), splits, shard_dir, Worker(0, 2), **kw)
    n = len(rank0.shards)
    assert n >= 4
    assert missing_shards(shard_dir, rank0, 16) == Worker(1, 2).shards(n)  # rank 0 wrote only its own
    before = _files(shard_dir)

    # Rank 1 joins the same plan: rank 0's shards stay untouched, rank 1 adds its own.
    rank1 = encode_worker_shards(_mel(), splits, shard_dir, Worker(1, 2), **kw)
    assert rank1.fingerprint == rank0.fingerprint
    after = _files(shard_dir)
    assert {name: after[name] for name in before} == before
    assert missing_shards(shard_dir, rank1, 16) == []

    # A worker of another plan cannot wipe the directory while a worker of this one holds it ...
    held = ex._join_shard_dir(shard_dir, rank0.fingerprint, Worker(0, 2))
    try:
        with pytest.raises(RuntimeError, match="in use by an extraction of another plan"):
            encode_worker_shards(_mel(), splits, shard_dir, Worker(0, 2), **{**kw, "batch_seconds": 0.5})
        # ... and neither can a single-process extraction (which discards shards when resume is off).
        with (
            pytest.raises(RuntimeError, match="another extraction"),
            LatentStoreWriter(tmp_path / "store", dim=16, meta=store_meta(_mel())) as writer,
        ):
            extract_to_store(_mel(), splits, writer, shard_dir=shard_dir, resume=False, **kw)
    finally:
        held.close()
    assert _files(shard_dir) == after
    assert json.loads((shard_dir / "plan.json").read_text())["fingerprint"] == rank0.fingerprint

    # Stale shards of an old plan that nobody is using are still discarded.
    other = encode_worker_shards(_mel(), splits, shard_dir, Worker(0, 2), **{**kw, "batch_seconds": 0.5})
    assert other.fingerprint != rank0.fingerprint
    assert missing_shards(shard_dir, rank0, 16) == list(range(n))


def test_any_number_of_workers_assemble_the_same_store(tmp_path: Path) -> None:
    splits = _corpus(tmp_path / "audio", n_utts=12)
    kw = {"batch_seconds": 1.5, "shard_seconds": 2.0, "num_workers": 0, "progress": False}

    def store_bytes(root: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}

    with LatentStoreWriter(tmp_path / "single", dim=16, meta=store_meta(_mel())) as writer:
        extract_to_store(_mel(), splits, writer, **kw)
    reference = store_bytes(tmp_path / "single")
    for world_size in (2, 3):
        shard_dir = tmp_path / f"w{world_size}.shards"
        for rank in reversed(range(world_size)):  # the order in which workers run does not matter
            plan = encode_worker_shards(_mel(), splits, shard_dir, Worker(rank, world_size), **kw)
        with LatentStoreWriter(tmp_path / f"w{world_size}", dim=16, meta=store_meta(_mel())) as writer:
            assemble_store(plan, shard_dir, writer, progress=False)
        assert store_bytes(tmp_path / f"w{world_size}") == reference
        ex.release_shard_dir(shard_dir)
        assert not shard_dir.exists()


def test_waiting_names_the_missing_shards_and_times_out(tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO")
    splits = _corpus(tmp_path / "audio", n_utts=12)
    kw = {"batch_seconds": 1.5, "shard_seconds": 2.0, "num_workers": 0, "progress": False}
    shard_dir = tmp_path / "key.shards"
    worker = Worker(0, 3)
    plan = encode_worker_shards(_mel(), splits, shard_dir, worker, **kw)
    others = [k for k in range(len(plan.shards)) if k % 3]
    with pytest.raises(TimeoutError, match=rf"shards {re.escape(str(others))} of .*rank\(s\) \[1, 2\]"):
        wait_for_shards(shard_dir, plan, 16, worker, timeout_s=0.3, poll_s=0.05)
    assert f"rank 0 of 3: waiting for {len(others)} of {len(plan.shards)} shards" in caplog.text
    assert wait_for_shards(shard_dir, plan, 16, worker, timeout_s=5, poll_s=0.05, done=lambda: True) is False
    for rank in (1, 2):
        encode_worker_shards(_mel(), splits, shard_dir, Worker(rank, 3), **kw)
    assert wait_for_shards(shard_dir, plan, 16, worker, timeout_s=5, poll_s=0.05) is True


# ----------------------------------------------------------------------------------------- the pipeline


def _store_files(store_dir: Path) -> dict[str, bytes | dict]:
    files: dict[str, bytes | dict] = {name: (store_dir / name).read_bytes() for name in STORE_FILES}
    record = json.loads(files.pop("artifact.json"))
    files["artifact.json"] = {k: v for k, v in record.items() if k not in BUILD_FIELDS}
    return files


@pytest.mark.slow
def test_leaving_workers_hand_the_store_to_the_last_one(tmp_path: Path, no_launcher, caplog) -> None:
    caplog.set_level("INFO")
    single = compose_at(tmp_path / "single", OVERRIDES, tmp_path / "single" / "run")
    reference = store_steps.prepare_latent_store(single)

    root = tmp_path / "dist"
    leave = [*OVERRIDES, "extract.world_size=2", "extract.assemble=leave"]
    cfg1 = compose_at(root, [*leave, "extract.rank=1"], root / "run1")
    with pytest.raises(ShardsPending, match=r"rank 1 of 2: .* shards \[0, 2, 4\] of 6 \(rank\(s\) \[0\]\)"):
        store_steps.prepare_latent_store(cfg1)
    store_path = store_steps.latent_store_path(cfg1)
    assert not store_path.exists()
    shard_dir = store_path.parent / f"{store_path.name}.shards"
    assert sorted(int(p.name[6:12]) for p in shard_dir.glob("shard-*.json")) == [1, 3, 5]

    caplog.clear()
    store = store_steps.prepare_latent_store(compose_at(root, [*leave, "extract.rank=0"], root / "run0"))
    assert "rank 0 of 2: assembling the latent store" in caplog.text
    assert "encoding 3 of the 6 shards" in caplog.text
    assert Path(store.root) == store_path
    assert _store_files(store_path) == _store_files(Path(reference.root))
    assert not shard_dir.exists()

    # A late worker finds the store and reuses it; force cannot be coordinated between workers.
    assert store_steps.prepare_latent_store(cfg1).root == store.root
    with pytest.raises(ValueError, match="force=true cannot rebuild the latent store with distributed"):
        store_steps.prepare_latent_store(
            compose_at(root, [*leave, "extract.rank=1", "force=true"], root / "r")
        )


_CHILD = """
import json, logging, sys
from pathlib import Path
from tests.conftest import compose_at
from latentdyn.pipeline.store import prepare_latent_store

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
root, run_dir, *overrides = sys.argv[1:]
store = prepare_latent_store(compose_at(Path(root), overrides, Path(run_dir)))
print("STORE=" + json.dumps(str(store.root)), flush=True)
"""


@pytest.mark.slow
def test_two_processes_build_the_same_store_as_one(tmp_path: Path, no_launcher) -> None:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    root = tmp_path / "dist"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CHILD,
                str(root),
                str(root / f"run{rank}"),
                *OVERRIDES,
                f"extract.rank={rank}",
                "extract.world_size=2",
                "extract.poll_s=0.2",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
        outputs.append(out)

    # Each process encoded only its own shards; exactly one assembled the store; both returned it.
    assert "rank 0 of 2 (from config): encoding 3 of the 6 shards" in outputs[0]
    assert "rank 1 of 2 (from config): encoding 3 of the 6 shards" in outputs[1]
    assert sum("assembling the latent store" in out for out in outputs) == 1
    roots = {json.loads(out.split("STORE=")[1].splitlines()[0]) for out in outputs}
    assert len(roots) == 1
    dist_store = Path(roots.pop())
    assert not (dist_store.parent / f"{dist_store.name}.shards").exists()

    # The same files as one process's extraction into another cache: byte for byte, but for when and by
    # which process the artifact record was written.
    single = store_steps.prepare_latent_store(compose_at(tmp_path / "single", OVERRIDES, tmp_path / "run"))
    assert Path(single.root).name == dist_store.name  # the same artifact key
    assert _store_files(dist_store) == _store_files(Path(single.root))
