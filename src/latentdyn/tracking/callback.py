"""Hydra callback that checks and tracks every job of a run or a multirun (registered in
``conf/hydra/default.yaml``).

Before a run (or a sweep) starts it validates the config and claims the run directory
(:mod:`latentdyn.tracking.preflight`); a failed check ends the command with a message naming the key, before
Hydra creates any directory. Job records never depend on ``on_multirun_end``, which Hydra skips when a job
fails; the sweep's aggregate (:mod:`latentdyn.tracking.sweep`) is written there, and by an exit hook when
Hydra skipped it (a failed job, Ctrl-C). ``latentdyn-results --sweep DIR`` writes it for a killed sweep.
"""

from __future__ import annotations

import atexit
import copy
import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from latentdyn.config import STAMP_ENV, utc_stamp
from latentdyn.tracking.preflight import ConfigError, check_run_id, claim_run_dir, overridden_keys, validate
from latentdyn.tracking.ranks import is_rank_zero
from latentdyn.tracking.report import end_of_run
from latentdyn.tracking.run import TrackedRun

log = logging.getLogger(__name__)


def job_config(config: DictConfig) -> dict[str, Any]:
    """The job's config without the ``hydra`` node, resolved to plain containers."""
    job_cfg = copy.deepcopy(config)
    with open_dict(job_cfg):
        job_cfg.pop("hydra", None)
    resolved = OmegaConf.to_container(job_cfg, resolve=True)
    assert isinstance(resolved, dict)
    return resolved


def validate_job(config: DictConfig, hydra_cfg: Any) -> None:
    """Validate a job's config given its Hydra node: the run id, the types of the command line's values
    against the same experiment composed without them, and the value rules. Raises ConfigError."""
    from hydra import compose

    overrides = list(hydra_cfg.overrides.task)
    choices, keys = overridden_keys(overrides, hydra_cfg.runtime.choices.keys())
    baseline = compose(config_name=hydra_cfg.job.config_name, overrides=choices) if keys else None
    validate(config, baseline, keys, hydra_cfg)


def _stop(exc: ConfigError) -> SystemExit:
    # Hydra turns a callback's exceptions into warnings; SystemExit is not an Exception and ends the command.
    return SystemExit(f"latentdyn: {exc}")


class RunTrackingCallback(Callback):
    """Checks the config, claims the run directory and writes the run's record files and manifest lines."""

    def __init__(self) -> None:
        self._run: TrackedRun | None = None
        self._sweep_dir: Path | None = None
        self._set_stamp = False

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("pipeline") is None:
            return
        if not is_rank_zero():
            return  # another process of a data-parallel job: rank 0 checked the config and claimed the dir
        try:
            validate_job(config, config.hydra)
            claimed = claim_run_dir(
                Path(str(config.hydra.run.dir)), str(config.run_id), config.resume, config.overwrite
            )
        except ConfigError as exc:
            raise _stop(exc) from None
        except Exception as exc:  # a check that could not run must not let an unchecked job start
            raise SystemExit(
                f"latentdyn: the config could not be checked: {type(exc).__name__}: {exc}"
            ) from exc
        if claimed != "new":
            log.info("run_id=%s exists: %s", config.run_id, claimed)
        # The processes a data-parallel fit starts (Lightning's launcher re-runs this command) resolve the
        # default run id there: give them ours.
        if STAMP_ENV not in os.environ:
            os.environ[STAMP_ENV] = utc_stamp()
            self._set_stamp = True

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._set_stamp:
            os.environ.pop(STAMP_ENV, None)
            self._set_stamp = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("pipeline") is None:
            return
        try:
            check_run_id(config.run_id)
            claim_run_dir(
                Path(str(config.hydra.sweep.dir)), str(config.run_id), config.resume, config.overwrite
            )
        except ConfigError as exc:
            raise _stop(exc) from None
        self._sweep_dir = Path(str(config.hydra.sweep.dir))
        # Jobs a launcher runs in other processes (joblib) resolve the default run id there: give them ours.
        os.environ[STAMP_ENV] = utc_stamp()
        atexit.register(self._summarise_sweep)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._summarise_sweep()

    def _summarise_sweep(self) -> None:
        """Write the sweep's aggregate once (on_multirun_end, or at exit when Hydra skipped it)."""
        sweep_dir, self._sweep_dir = self._sweep_dir, None
        os.environ.pop(STAMP_ENV, None)
        if sweep_dir is None or not sweep_dir.is_dir():
            return
        from latentdyn.tracking.sweep import format_summary, write_sweep_summary

        try:
            summary = write_sweep_summary(sweep_dir)
        except Exception as exc:  # the jobs' own records are written; say what went wrong and how to redo it
            log.error(
                "could not summarise the sweep %s (%s: %s); run `latentdyn-results --sweep %s`",
                sweep_dir,
                type(exc).__name__,
                exc,
                sweep_dir,
            )
            return
        print("\n" + format_summary(summary), flush=True)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("pipeline") is None:
            return  # no experiment chosen: the app refuses to run, there is nothing to record
        if not is_rank_zero():
            return  # a data-parallel job's other ranks: rank 0 keeps the records
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            try:
                validate_job(config, config.hydra)
            except ConfigError:
                return  # not tracked: the app validates again and fails with the message
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
            # Last on the terminal: the key metrics, where the outputs are, what to run next.
            summary = end_of_run(
                run.experiment, run.run_id, str(run.run_dir), run.metrics, config.get("next")
            )
            print("\n" + summary, flush=True)
        else:
            error = job_return._return_value
            if not isinstance(error, BaseException):
                error = RuntimeError(f"job ended with status {job_return.status}")
            run.fail(error)
