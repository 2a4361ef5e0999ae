"""Hydra callback that tracks every job of a run or a multirun (registered in ``conf/hydra/default.yaml``).

``on_multirun_end`` is deliberately not used: Hydra skips it when a job fails.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from latentdyn.tracking.run import TrackedRun


def job_config(config: DictConfig) -> dict[str, Any]:
    """The job's config without the ``hydra`` node, resolved to plain containers."""
    job_cfg = copy.deepcopy(config)
    with open_dict(job_cfg):
        job_cfg.pop("hydra", None)
    resolved = OmegaConf.to_container(job_cfg, resolve=True)
    assert isinstance(resolved, dict)
    return resolved


class RunTrackingCallback(Callback):
    """Writes a run's record files and manifest lines around each Hydra job."""

    def __init__(self) -> None:
        self._run: TrackedRun | None = None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("pipeline") is None:
            return  # no experiment chosen: the app refuses to run, there is nothing to record
        hydra_cfg = HydraConfig.get()
        resolved = job_config(config)
        run_id = str(resolved["run_id"])
        if hydra_cfg.mode == RunMode.MULTIRUN:
            run_id = f"{run_id}-{hydra_cfg.job.num}"
        self._run = TrackedRun(
            run_dir=Path(hydra_cfg.runtime.output_dir),
            manifest_path=Path(resolved["paths"]["manifest"]),
            run_id=run_id,
            experiment=str(resolved.get("name")),
            tier=str(resolved.get("tier", "")),
            config=resolved,
            overrides=list(hydra_cfg.overrides.task),
        )
        self._run.start()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        if job_return.status == JobStatus.COMPLETED:
            run.complete(job_return.return_value)
        else:
            error = job_return._return_value
            if not isinstance(error, BaseException):
                error = RuntimeError(f"job ended with status {job_return.status}")
            run.fail(error)
