"""Which process of a multi-process job this is, read from the environment its launcher sets.

A job trained with ``trainer.strategy=ddp`` runs as several processes: Lightning's launcher starts the
ranks > 0 on one machine (it sets ``LOCAL_RANK``/``NODE_RANK``), torchrun sets ``RANK``, and SLURM (a
``hydra/launcher=submitit_slurm`` job with several tasks) sets ``SLURM_PROCID``. Every rank runs the whole
job; only rank 0 writes the run's files, manifest lines and checkpoints, and logs to wandb.

Imports nothing but the standard library: the tracking callback asks before anything heavy is loaded.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

#: Words of the Lightning strategies that start their processes inside the fit (``ddp_spawn``, ``ddp_fork``,
#: ``ddp_notebook``): those run only the fit in the processes they start and would leave the rest of the job
#: (evaluation, files) without the fit's weights. Our ranks are started before the job runs (Lightning's
#: script launcher, torchrun, SLURM), so that every rank runs the whole job.
_SPAWNING_WORDS = ("spawn", "fork", "notebook")


def spawns_inside_the_fit(strategy: str) -> bool:
    """Whether the strategy named ``strategy`` is one that a latentdyn job cannot run under (see above)."""
    return any(word in strategy for word in _SPAWNING_WORDS)


def global_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's global rank (0 for a single-process job).

    Read from ``RANK`` (torchrun, Lightning's DDP children), else ``SLURM_PROCID`` when SLURM runs several
    tasks, else ``NODE_RANK`` × processes per node + ``LOCAL_RANK`` (Lightning's launcher sets ``LOCAL_RANK`` in
    each process it starts).
    """
    env = os.environ if env is None else env
    if env.get("RANK"):
        return int(env["RANK"])
    if env.get("SLURM_PROCID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"])
    local = int(env.get("LOCAL_RANK") or 0)
    node = int(env.get("NODE_RANK") or 0)
    if node == 0:
        return local
    # Another node of a Lightning-launched job: ranks there are node × processes per node + local rank.
    per_node = int(env.get("LOCAL_WORLD_SIZE") or 0) or int(env.get("WORLD_SIZE") or 1)
    return node * per_node + local


def is_rank_zero(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process writes the job's records (rank 0, or the only process)."""
    return global_rank(env) == 0


#: Name of a rank's private directory inside the run directory (see :func:`rank_scratch_dir`).
_SCRATCH_PREFIX = ".rank"


def rank_scratch_dir(run_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` > 0 of a multi-process job writes what the job writes: ``<run_dir>/.rank<N>``.

    Every rank runs the whole job (the same evaluation on the same weights); its files would race with
    rank 0's, so the other ranks write theirs here and the directory is removed when the job ends well.
    Checkpoints are the exception: all ranks read the ones rank 0 writes (:func:`shared_path`).
    """
    if rank < 1:
        raise ValueError(f"rank 0 writes the run directory itself, got rank {rank}")
    return Path(run_dir) / f"{_SCRATCH_PREFIX}{rank}"


def shared_path(path: Path) -> Path:
    """``path`` with a rank's private directory left out (:func:`rank_scratch_dir`): the location rank 0
    uses, which every rank shares (checkpoints)."""
    parts = [p for p in Path(path).parts if not _is_scratch_name(p)]
    return Path(*parts) if parts else Path(path)


def _is_scratch_name(name: str) -> bool:
    return name.startswith(_SCRATCH_PREFIX) and name[len(_SCRATCH_PREFIX) :].isdigit()


def started_by_lightning(env: Mapping[str, str] | None = None) -> bool:
    """Whether this rank is a process Lightning's DDP launcher started (``LOCAL_RANK`` set by it, and no
    torchrun or SLURM task environment, whose launchers stop their ranks themselves)."""
    env = os.environ if env is None else env
    return "LOCAL_RANK" in env and "RANK" not in env and "SLURM_PROCID" not in env


def stop_when_parent_ends(
    on_parent_end: Callable[[], None], poll_s: float = 2.0, getppid: Callable[[], int] = os.getppid
) -> threading.Thread:
    """Watch, on a daemon thread, the process that started this one; when it ends, call ``on_parent_end``
    (which should end this process: ``os._exit``).

    Rank 0 of a Lightning-launched job may end outside a fit (done, or an error in its evaluation); the
    ranks it started would otherwise go on with work nobody reads, or wait in the next fit's collectives
    until the process group times out (30 min).
    """
    parent = getppid()

    def watch() -> None:
        while getppid() == parent:
            time.sleep(poll_s)
        on_parent_end()

    thread = threading.Thread(target=watch, name="latentdyn-parent-watch", daemon=True)
    thread.start()
    return thread
