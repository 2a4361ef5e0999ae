"""One tracked run: its directory's record files and its manifest lines (DESIGN §4).

A :class:`TrackedRun` is driven by the Hydra callback for Hydra jobs and used directly (``tracked_run``)
for sub-runs that a composite experiment starts. Either way the run directory gets ``config.yaml``,
``run_info.json`` and ``run.log``, and the manifest gets ``started`` then ``completed`` / ``failed``.
"""

from __future__ import annotations

import logging
import math
import os
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from latentdyn.errors import user_facing
from latentdyn.jsonio import write_json_atomic, write_text_atomic
from latentdyn.tracking.dashboard import Dashboard, open_dashboard
from latentdyn.tracking.manifest import append_record
from latentdyn.tracking.provenance import git_patch, git_state, invocation, software_versions
from latentdyn.tracking.ranks import is_rank_zero

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
RUN_INFO_NAME = "run_info.json"
RUN_LOG_NAME = "run.log"
# For a run from a checkout with uncommitted changes: `git diff HEAD`, so the run can be reproduced.
PATCH_NAME = "git_diff.patch"
METRICS_NAME = "metrics.json"

_LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"

_active_runs: list[TrackedRun] = []


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """Key metrics as JSON-safe scalars: numbers become floats (non-finite ones ``None``), strings stay."""
    out: dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        if hasattr(value, "item") and callable(value.item):
            value = value.item()
        if isinstance(value, bool) or value is None or isinstance(value, str):
            out[str(key)] = value
        elif isinstance(value, int | float):
            out[str(key)] = float(value) if math.isfinite(value) else None
        else:
            raise TypeError(f"metric {key!r} is not a scalar: {type(value).__name__}")
    return out


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (see :func:`latentdyn.jsonio.write_json_atomic`)."""
    write_json_atomic(path, obj)


@dataclass
class TrackedRun:
    """The record of one run.

    Args:
        run_dir: the run's output directory (created).
        manifest_path: the global ``manifest.jsonl``.
        run_id: unique id of the run (a sub-run's id includes its parent's).
        experiment: experiment name.
        config: the resolved config of the run, as plain containers.
        overrides: command-line overrides that produced it.
        tier: output tier (``phase0``, ``tier1``, ...).
        parent_run_id: for sub-runs, the run that started them.
    """

    run_dir: Path
    manifest_path: Path
    run_id: str
    experiment: str
    config: Mapping[str, Any]
    overrides: list[str] = field(default_factory=list)
    tier: str = ""
    parent_run_id: str | None = None
    weights: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    result: Mapping[str, Any] | None = None
    _info: dict[str, Any] = field(default_factory=dict, init=False)
    _t0: float = field(default=0.0, init=False)
    _log_handler: logging.Handler | None = field(default=None, init=False)
    # The run's wandb run when its logger is wandb (latentdyn.tracking.dashboard).
    _dashboard: Dashboard | None = field(default=None, init=False)

    def start(self) -> None:
        """Create the run directory, write config and run_info, open run.log, append ``started``."""
        self.run_dir = Path(self.run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run_dir / CONFIG_NAME, yaml.safe_dump(dict(self.config), sort_keys=False))
        self._attach_log()
        self._t0 = time.monotonic()
        self._info = {
            "run_id": self.run_id,
            "experiment": self.experiment,
            "tier": self.tier,
            "parent_run_id": self.parent_run_id,
            "status": "started",
            "run_dir": str(self.run_dir),
            "overrides": list(self.overrides),
            "seed": self.config.get("seed"),
            **invocation(),
            **git_state(),
            **self._record_patch(),
            **software_versions(),
            "pid": os.getpid(),
            "start_time": _utc_now(),
            "end_time": None,
            "duration_s": None,
            "metrics": {},
            "weights": self.weights,
            "data": self.data,
            "error": None,
        }
        write_json(self.run_dir / RUN_INFO_NAME, self._info)
        append_record(self.manifest_path, self._manifest_line("started"))
        parent = current_run()
        _active_runs.append(self)
        self._dashboard = open_dashboard(self, parent)
        log.info("run %s (%s) started in %s", self.run_id, self.experiment, self.run_dir)

    def _record_patch(self) -> dict[str, Any]:
        """Write the uncommitted changes next to the run; the run_info fields that point to them."""
        found = git_patch()
        if found is None:
            return {"git_patch": None, "git_untracked": []}
        patch, untracked = found
        write_text_atomic(self.run_dir / PATCH_NAME, patch)
        return {"git_patch": PATCH_NAME, "git_untracked": list(untracked)}

    def record_weights(self, name: str, provenance: Mapping[str, Any]) -> None:
        """Record where a component's weights came from (a pretrained source, or ``"random"``)."""
        self.weights[name] = dict(provenance)
        self._info["weights"] = self.weights
        write_json(self.run_dir / RUN_INFO_NAME, self._info)

    def record_data(self, provenance: Mapping[str, Any]) -> None:
        """Record which corpus and split the run's latents come from (``label``, e.g. ``synthetic/stratified``)."""
        self.data = dict(provenance)
        self._info["data"] = self.data
        write_json(self.run_dir / RUN_INFO_NAME, self._info)

    @property
    def metrics(self) -> dict[str, Any]:
        """The key metrics recorded when the run ended (empty before)."""
        return dict(self._info.get("metrics") or {})

    def complete(self, metrics: Mapping[str, Any] | None) -> None:
        """Mark the run completed with its key metrics (published to its wandb run, if any, with its outputs)."""
        metrics = clean_metrics(metrics)
        self._close_dashboard(metrics, exit_code=0)
        self._finish("completed", metrics, error=None)
        log.info("run %s completed; outputs in %s", self.run_id, self.run_dir)

    def fail(self, exc: BaseException) -> None:
        """Mark the run failed with the error's type, message and traceback (of the user-facing error it
        wraps, if any: see :func:`latentdyn.errors.user_facing`)."""
        exc = user_facing(exc)
        error = {
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": "".join(traceback.format_exception(exc)),
        }
        log.error("run %s failed: %s: %s", self.run_id, error["type"], error["message"])
        self._close_dashboard(None, exit_code=1)
        self._finish("failed", {}, error=error)

    def _close_dashboard(self, metrics: Mapping[str, Any] | None, exit_code: int) -> None:
        dashboard, self._dashboard = self._dashboard, None
        if dashboard is not None:
            dashboard.close(metrics, exit_code=exit_code)

    def _finish(self, status: str, metrics: dict[str, Any], error: dict[str, Any] | None) -> None:
        self._info.update(
            status=status,
            end_time=_utc_now(),
            duration_s=round(time.monotonic() - self._t0, 3),
            metrics=metrics,
            error=error,
            **software_versions(),
        )
        write_json(self.run_dir / RUN_INFO_NAME, self._info)
        line = self._manifest_line(status)
        line["metrics"] = metrics
        line["duration_s"] = self._info["duration_s"]
        if error is not None:
            line["error"] = {"type": error["type"], "message": error["message"]}
        append_record(self.manifest_path, line)
        if self in _active_runs:
            _active_runs.remove(self)
        self._detach_log()

    def _manifest_line(self, status: str) -> dict[str, Any]:
        return {
            "status": status,
            "run_id": self.run_id,
            "experiment": self.experiment,
            "tier": self.tier,
            "parent_run_id": self.parent_run_id,
            "run_dir": str(self.run_dir),
            "time": _utc_now(),
            "host": self._info.get("host"),
            "pid": os.getpid(),
            "weights": self.weights,
            # The list of skipped audio files stays in run_info.json; the manifest keeps its count.
            "data": {k: v for k, v in self.data.items() if k != "bad_files"},
            "git_commit": self._info.get("git_commit"),
        }

    def _attach_log(self) -> None:
        handler = logging.FileHandler(self.run_dir / RUN_LOG_NAME, encoding="utf-8")
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        handler.setLevel(logging.INFO)
        root = logging.getLogger()
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        root.addHandler(handler)
        self._log_handler = handler

    def _detach_log(self) -> None:
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None


def current_run() -> TrackedRun | None:
    """The innermost run in progress in this process, if any."""
    return _active_runs[-1] if _active_runs else None


def record_weights(name: str, provenance: Mapping[str, Any]) -> None:
    """Record weights provenance on every run in progress: the current one and the composite runs it
    belongs to (a no-op outside a tracked run, e.g. in unit tests)."""
    for run in _active_runs:
        run.record_weights(name, provenance)


def record_data(provenance: Mapping[str, Any]) -> None:
    """Record the data provenance on every run in progress (see :func:`record_weights`)."""
    for run in _active_runs:
        run.record_data(provenance)


@contextmanager
def tracked_run(**kwargs: Any) -> Iterator[TrackedRun]:
    """Run a block as a tracked (sub-)run.

    Usage::

        with tracked_run(run_dir=..., manifest_path=..., run_id=..., experiment=..., config=...) as run:
            metrics = pipeline(cfg)
            run.result = metrics

    ``run.result`` becomes the completed line's key metrics; an exception marks the run failed and propagates.
    """
    run = TrackedRun(**kwargs)
    if not is_rank_zero():  # a data-parallel job's other ranks: rank 0 keeps the records
        yield run
        return
    run.start()
    try:
        yield run
    except BaseException as exc:
        run.fail(exc)
        shown = user_facing(exc)
        if shown is not exc:
            raise shown from None
        raise
    run.complete(run.result)
