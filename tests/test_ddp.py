"""Data-parallel jobs (``trainer.strategy=ddp``): every rank gets its share of each global batch, only rank 0
writes the run's records, the metrics equal a one-process run's, and a killed DDP run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from latentdyn.data.windows import IndexBatchSampler
from latentdyn.tracking.preflight import ConfigError, check_data_parallel
from latentdyn.tracking.ranks import (
    global_rank,
    is_rank_zero,
    rank_scratch_dir,
    shared_path,
    started_by_lightning,
    stop_when_parent_ends,
)
from tests.conftest import manifest_lines, run_cli

# ----------------------------------------------------------------------------------------- batch sharding


def _epoch(sampler: IndexBatchSampler) -> list[np.ndarray]:
    return [np.asarray(b) for b in sampler]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(("n", "batch", "world"), [(20, 6, 2), (23, 8, 3), (17, 4, 4), (9, 9, 2)])
def test_ranks_split_every_global_batch_of_the_one_process_epoch(
    n: int, batch: int, world: int, shuffle: bool
) -> None:
    """Rank r's b-th batch is positions r, r + N, ... of one process's b-th batch: together the ranks see
    exactly that batch, each position once, in equal (±1) shares."""

    def sampler(rank: int, size: int) -> IndexBatchSampler:
        generator = torch.Generator().manual_seed(7) if shuffle else None
        s = IndexBatchSampler(n, batch, shuffle, generator)
        s.shard(rank, size)
        return s

    whole = _epoch(sampler(0, 1))
    shares = [_epoch(sampler(r, world)) for r in range(world)]
    lengths = {len(share) for share in shares}
    assert len(lengths) == 1
    (n_batches,) = lengths
    # A last batch smaller than the world is left out (a rank would get nothing).
    expected = len(whole) - (0 < n % batch < world)
    assert n_batches == expected
    for b in range(n_batches):
        parts = [share[b] for share in shares]
        assert sorted(np.concatenate(parts).tolist()) == sorted(whole[b].tolist())
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        for r, part in enumerate(parts):
            assert part.tolist() == whole[b][r::world].tolist()


def test_a_global_batch_smaller_than_the_world_is_refused() -> None:
    with pytest.raises(ValueError, match="global batch"):
        IndexBatchSampler(10, 2, False).shard(0, 4)
    with pytest.raises(ValueError, match="rank"):
        IndexBatchSampler(10, 4, False).shard(2, 2)


# ---------------------------------------------------------------------------------------------- ranks


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, 0),
        ({"LOCAL_RANK": "0", "WORLD_SIZE": "2"}, 0),
        ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, 1),
        ({"RANK": "3", "LOCAL_RANK": "1"}, 3),
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}, 2),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "LOCAL_RANK": "0"}, 0),
        ({"NODE_RANK": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, 2),
    ],
)
def test_the_rank_comes_from_the_launchers_environment(env: dict[str, str], rank: int) -> None:
    assert global_rank(env) == rank
    assert is_rank_zero(env) == (rank == 0)


def test_other_ranks_write_in_a_private_dir_and_share_the_checkpoints(tmp_path: Path) -> None:
    scratch = rank_scratch_dir(tmp_path / "run", 1)
    assert scratch == tmp_path / "run" / ".rank1"
    assert shared_path(scratch / "exp1_vmf" / "checkpoints") == tmp_path / "run" / "exp1_vmf" / "checkpoints"
    assert shared_path(tmp_path / "run" / ".ranked") == tmp_path / "run" / ".ranked"
    with pytest.raises(ValueError):
        rank_scratch_dir(tmp_path, 0)


# --------------------------------------------------------------------------------------------- preflight


def _cfg(strategy: str, devices: int, mode: str = "RUN", launcher: str = "") -> object:
    return OmegaConf.create(
        {
            "trainer": {"strategy": strategy, "devices": devices},
            "hydra": {"mode": mode, "launcher": {"_target_": launcher}},
        }
    )


def test_ddp_in_a_local_sweep_and_spawning_strategies_are_refused() -> None:
    check_data_parallel(_cfg("ddp", 2))
    check_data_parallel(
        _cfg("ddp", 1, "MULTIRUN", "hydra._internal.core_plugins.basic_launcher.BasicLauncher")
    )
    check_data_parallel(
        _cfg("ddp", 4, "MULTIRUN", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher")
    )
    with pytest.raises(ConfigError, match="submitit_slurm"):
        check_data_parallel(_cfg("ddp", 2, "MULTIRUN", "hydra_plugins.hydra_joblib_launcher.JoblibLauncher"))
    with pytest.raises(ConfigError, match="ddp_spawn"):
        check_data_parallel(_cfg("ddp_spawn", 2))


@pytest.mark.slow
def test_a_local_sweep_of_ddp_jobs_is_refused_before_any_rank_starts(tmp_path: Path) -> None:
    """Hydra puts a RunMode in the job's config: the rule must see it (not only a hand-written string)."""
    proc = run_cli(["-m", *EXP1, *DDP, "seed=0,1"], tmp_path, timeout=300, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "inside a local multirun" in output
    assert "Initializing distributed" not in output


# -------------------------------------------------------------------------------------------- end to end

EXP1 = ["experiment=exp1_vmf", "debug=smoke", "horizons=[1,2]", "trainer.accelerator=cpu", "logger=none"]
DDP = ["trainer.devices=2", "trainer.strategy=ddp"]
COMPARED = ("nll", "nll_baseline", "dnll", "cos", "logmag_r2", "mag_ratio", "mse")


def _key_metrics(run_dir: Path) -> dict[str, float]:
    """The battery's headline metrics of the model at each horizon (``k1/nll``, ...)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())["key_metrics"]
    return {k: v for k, v in metrics.items() if k.split("/")[-1] in COMPARED}


@pytest.mark.slow
def test_exp1_on_two_cpu_processes_matches_one_process(tmp_path: Path) -> None:
    """``trainer.devices=2 trainer.strategy=ddp`` (gloo): the same battery metrics as one process on the
    same global batch; one run in the manifest, rank 0's files only, the other rank's scratch removed."""
    run_cli([*EXP1, "run_id=one"], tmp_path)
    proc = run_cli([*EXP1, *DDP, "run_id=two"], tmp_path)
    assert "rank 0 of 2" in proc.stdout + proc.stderr
    runs = tmp_path / "outputs" / "tier1" / "exp1_vmf"
    one, two = _key_metrics(runs / "one"), _key_metrics(runs / "two")
    assert set(one) == set(two) and len(one) >= 2 * len(COMPARED)
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=2e-3, abs=2e-3), key
    records = [r for r in manifest_lines(tmp_path) if r["run_id"] == "two"]
    assert [r["status"] for r in records] == ["started", "completed"]
    assert not list((runs / "two").glob(".rank*"))
    assert sorted(p.name for p in (runs / "two" / "checkpoints").iterdir()) == [
        "vmf_k1_final.ckpt",
        "vmf_k2_final.ckpt",
    ]


@pytest.mark.slow
def test_a_killed_ddp_run_resumes_to_the_uninterrupted_metrics(tmp_path: Path) -> None:
    """Both ranks killed (SIGKILL to the process group) after k=2's first periodic checkpoint, then rerun
    with ``resume=true`` under DDP: k=1 is not trained again and the metrics equal an uninterrupted DDP
    run's."""
    common = [*EXP1, *DDP, "trainer.max_steps=120", "checkpointing.every_n_steps=10"]
    run_cli([*common, "run_id=whole"], tmp_path)
    run_dir = tmp_path / "outputs" / "tier1" / "exp1_vmf" / "killed"
    last_k2 = run_dir / "checkpoints" / "vmf_k2_last.ckpt"
    env = {**os.environ, "LATENTDYN_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "latentdyn", *common, "run_id=killed"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not last_k2.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert last_k2.exists() and not (run_dir / "checkpoints" / "vmf_k2_final.ckpt").exists()

    run_cli([*common, "run_id=killed", "resume=true"], tmp_path)
    log_text = (run_dir / "run.log").read_text()
    assert "k=1 is already trained" in log_text and "resuming the fit from" in log_text
    whole, resumed = _key_metrics(run_dir.parent / "whole"), _key_metrics(run_dir)
    assert set(whole) == set(resumed) and len(whole) >= 2 * len(COMPARED)
    for key in whole:
        assert resumed[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-5), key


def test_a_rank_lightning_started_stops_when_rank_0_ends() -> None:
    """The watchdog of a Lightning-launched rank acts once its parent process is gone (its parent pid
    changes), and not before."""
    import threading

    parents = iter([100, 100, 100, 1])
    ended = threading.Event()
    stop_when_parent_ends(ended.set, poll_s=0.01, getppid=lambda: next(parents, 1))
    assert ended.wait(5)
    assert next(parents, None) is None  # it kept polling until the change
    assert started_by_lightning({"LOCAL_RANK": "1", "WORLD_SIZE": "2"})
    assert not started_by_lightning({"LOCAL_RANK": "1", "RANK": "1"})
    assert not started_by_lightning({"LOCAL_RANK": "0", "SLURM_PROCID": "0"})
    assert not started_by_lightning({})


@pytest.mark.slow
def test_when_rank_0_fails_between_fits_the_other_rank_stops_with_one_line(tmp_path: Path) -> None:
    """Rank 0 raises outside a fit: the command fails with rank 0's error, and rank 1 (which shares the
    output pipe, so the command returns only once it has ended) stops with one line, not a gloo traceback."""
    proc = run_cli(
        [*EXP1, *DDP, "pipeline=tests.pipelines.rank0_fails_between_fits"], tmp_path, timeout=300, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank 0 fails between its fits" in output
    assert "rank 1 stops: rank 0 ended" in output
    assert "Connection closed by peer" not in output
