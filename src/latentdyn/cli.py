"""The Hydra application behind ``latentdyn`` and ``python -m latentdyn``.

Imports only Hydra and OmegaConf at module level so that ``--help`` and ``--cfg job`` stay fast; the
experiment's pipeline (and with it torch / lightning) is imported only when a job runs.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

import hydra
from hydra.utils import get_method
from omegaconf import DictConfig

from latentdyn.config import conf_dir, register_resolvers
from latentdyn.errors import user_facing
from latentdyn.tracking.ranks import is_rank_zero

log = logging.getLogger("latentdyn")

register_resolvers()

# conf/hydra/launcher/ holds complete copies of the launcher plugins' options under the plugins' own names
# (`hydra/launcher=submitit_slurm`), which Hydra 1.3 checks against the plugin's schema and warns about.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")


def available_experiments() -> list[str]:
    """Names of the experiment configs shipped in ``conf/experiment``, in natural order (``exp2`` before
    ``exp10``: the study's order, in which each experiment's inputs come first)."""

    def natural(name: str) -> list[Any]:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

    return sorted((p.stem for p in (conf_dir() / "experiment").glob("*.yaml")), key=natural)


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """Dispatch to the pipeline the experiment config names (``pipeline: module.function``)."""
    if cfg.get("pipeline") is None:
        raise ValueError(
            "no experiment chosen: run `latentdyn experiment=NAME`; available: "
            + ", ".join(available_experiments())
        )
    pipeline = get_method(cfg.pipeline)
    metrics = pipeline(cfg)
    return dict(metrics or {})


def _raise_if_invalid(cfg: DictConfig) -> None:
    """Raise the validation error of this job's config, if it has one (a multirun job is checked here)."""
    from hydra.core.hydra_config import HydraConfig

    from latentdyn.tracking.callback import validate_job
    from latentdyn.tracking.preflight import ConfigError

    try:
        validate_job(cfg, HydraConfig.get())
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def run_other_rank(cfg: DictConfig) -> dict[str, Any]:
    """Rank > 0 of a data-parallel job: the same job, writing into a private directory.

    Lightning's DDP launcher (or SLURM's tasks) runs this command once per rank; each rank takes part in
    every fit and runs the rest of the job on the same weights. Rank 0 keeps the run's records and files;
    this rank writes its own into ``<run_dir>/.rank<N>/`` (removed when the job ends well), logs warnings
    only, and reads the checkpoints rank 0 writes.
    """
    import os
    import shutil
    from pathlib import Path

    from omegaconf import open_dict

    from latentdyn.tracking.ranks import (
        global_rank,
        rank_scratch_dir,
        started_by_lightning,
        stop_when_parent_ends,
    )

    rank = global_rank()
    scratch = rank_scratch_dir(Path(cfg.run_dir), rank)
    launched = started_by_lightning()
    parent = os.getppid()
    if launched:
        stop_when_parent_ends(lambda: _end_with_rank_zero(scratch))
    with open_dict(cfg):
        cfg.run_dir = str(scratch)
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    for handler in root.handlers:  # records propagated from loggers with their own level (lightning's)
        handler.setLevel(logging.WARNING)
    try:
        metrics = run_pipeline(cfg)
    except Exception as exc:
        # A collective that broke because rank 0 is gone: rank 0's own error says why.
        if launched and _parent_ends(parent):
            log.error("rank %d stops: rank 0 ended (%s)", rank, type(exc).__name__)
            os._exit(1)
        raise
    shutil.rmtree(scratch, ignore_errors=True)
    return metrics


def _parent_ends(parent: int, wait_s: float = 5.0) -> bool:
    """Whether the process ``parent`` that started this one ends within ``wait_s`` (a dying rank 0 closes its
    connections, failing this rank's collectives, a moment before this process is handed to a new parent)."""
    import os
    import time

    deadline = time.monotonic() + wait_s
    while os.getppid() == parent:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _end_with_rank_zero(scratch: Any) -> None:
    """Rank 0 has ended: end this rank now, cleanly (its scratch removed) when rank 0's run completed."""
    import json
    import os
    import shutil

    from latentdyn.tracking.run import RUN_INFO_NAME

    try:
        status = json.loads((scratch.parent / RUN_INFO_NAME).read_text()).get("status")
    except (OSError, ValueError):
        status = None
    if status == "completed":
        shutil.rmtree(scratch, ignore_errors=True)
        os._exit(0)
    log.error("rank 0 ended without completing the run (status %s); this rank stops too", status)
    os._exit(1)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured experiment as one tracked job."""
    # Hydra turns callback exceptions into warnings; an untracked run must not pass silently.
    from latentdyn.tracking.run import current_run

    if cfg.get("pipeline") is None:
        raise SystemExit(
            "latentdyn: no experiment chosen. Run `latentdyn experiment=NAME`; available: "
            + ", ".join(available_experiments())
            + "\nStart with `latentdyn experiment=quickstart`; `latentdyn --help` lists every option."
        )
    if not is_rank_zero():
        return run_other_rank(cfg)
    if current_run() is None:
        _raise_if_invalid(cfg)
        raise RuntimeError(
            "run tracking did not start (see the warning above); refusing to run an untracked job"
        )
    try:
        return run_pipeline(cfg)
    except Exception as exc:
        shown = user_facing(exc)
        if shown is exc:
            raise
        raise shown from None
