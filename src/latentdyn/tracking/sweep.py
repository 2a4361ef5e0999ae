"""Summaries of a Hydra multirun (``latentdyn -m experiment=NAME key=a,b ...``): one table and one heat map.

A sweep directory ``<multirun_dir>/<experiment>/<run_id>/`` holds one numbered job directory per job (``0/``,
``1/``, ...), each with the ``config.yaml`` and ``run_info.json`` of :class:`latentdyn.tracking.run.TrackedRun`,
and Hydra's ``multirun.yaml`` (the composed config, with ``hydra.sweeper.params`` and
``hydra.overrides.task``). :func:`write_sweep_summary` writes next to them

- ``sweep_results.json``: every job (completed, failed, crashed, never tracked, never started) with its
  settings, metrics and error;
- ``summary.csv``: one row per job, completed jobs ranked by the experiment's ``sweep_summary.rank_by``;
- ``heatmap.png``: the grid of swept settings coloured by ``sweep_summary.heatmap.metric``.

A sweep whose jobs vary ``seed`` (``latentdyn -m experiment=NAME key=a,b seed=0,1,2``, or ``seed`` in
``hydra.sweeper.params``) is summarised per setting, as the experiments that run ``seeds`` in one job are
(:mod:`latentdyn.pipeline.seeds`, DESIGN §9): the jobs are grouped by their values of the other swept keys, and

- ``summary.csv`` has one row per setting: each metric's mean over the setting's completed seeds under its own
  name, ``<metric>_ci_low`` / ``<metric>_ci_high`` (the 95 % percentile bootstrap CI of the mean,
  :func:`latentdyn.statistics.mean_and_ci`), ``n_seeds`` (the completed ones), and the seeds that did not
  complete (``incomplete``, with their status and error); settings ranked by the means of ``rank_by``;
- ``summary_per_seed.csv`` is the one-row-per-job table (what ``summary.csv`` is for a sweep without a seed
  axis); ``sweep_results.json`` adds the settings (``groups``) to its jobs; the heat map plots the means.

A sweep without a seed axis is summarised exactly as before.

How to summarise is the experiment's business: its config's top-level ``sweep_summary`` node::

    sweep_summary:
      rank_by: [D_corrected/state_err_at_K, D_corrected/dnll]   # ascending; ties by the next
      columns: [D_rollout/state_err_at_K, ...]                  # default: every metric seen
      heatmap: {metric: corrected_vs_rollout/state_err_at_K_pct, center: 0.0}   # center null: sequential

Imports nothing heavy at module level (``latentdyn-results`` imports it); matplotlib only to draw, and
Hydra's override parser only to plan the grid.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
import re
import socket
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from latentdyn.jsonio import write_bytes_atomic, write_csv_atomic, write_json_atomic
from latentdyn.tracking.results import process_alive
from latentdyn.tracking.run import CONFIG_NAME, RUN_INFO_NAME

log = logging.getLogger(__name__)

MULTIRUN_NAME = "multirun.yaml"
RESULTS_NAME = "sweep_results.json"
CSV_NAME = "summary.csv"
#: A seed-swept sweep's per-job table (its summary.csv then holds one row per setting).
PER_SEED_CSV_NAME = "summary_per_seed.csv"
#: The swept key whose values are repeats of one setting, not settings.
SEED_KEY = "seed"
CONFIDENCE = 0.95
N_RESAMPLES = 10_000
# latentdyn.statistics' names of a mean's CI bounds (not imported here: it loads numpy).
CI_LOW = "_ci_low"
CI_HIGH = "_ci_high"
N_SEEDS = "n_seeds"
HEATMAP_NAME = "heatmap.png"
SPEC_KEY = "sweep_summary"

# Job statuses: run_info's completed/failed; started becomes crashed (or running, process alive on this
# host); no (readable) run_info: unknown; planned by the sweeper but no job directory: not_started.
STATUSES = ("completed", "failed", "crashed", "running", "unknown", "not_started")
# Table order after the ranked and unranked completed jobs.
_STATUS_GROUP = {"completed": 1, "failed": 2, "crashed": 3, "running": 3, "unknown": 4, "not_started": 5}
# Heat-map labels of cells with no value.
_CELL_LABEL = {"failed": "failed", "crashed": "crashed", "running": "running"}
_MISSING_LABEL = "—"

_JOB_DIR = re.compile(r"[0-9]+")
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][+-]?[0-9]+)?")


@dataclass
class JobRecord:
    """One job of a sweep.

    ``settings`` maps each swept key the job sets to its value (the override's text, numbers as int/float);
    ``metrics`` are run_info's key metrics; ``error`` is ``"Type: message"`` for a failed job; ``rank`` is
    its place among the completed jobs by ``rank_by`` (1 = best), ``None`` when unranked.
    """

    job: int
    run_id: str | None
    status: str
    settings: dict[str, Any]
    metrics: dict[str, Any]
    run_dir: str | None
    duration_s: float | None
    error: str | None
    rank: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "rank": self.rank,
            "run_id": self.run_id,
            "status": self.status,
            "settings": dict(self.settings),
            "metrics": dict(self.metrics),
            "run_dir": self.run_dir,
            "duration_s": self.duration_s,
            "error": self.error,
        }


@dataclass
class SummarySpec:
    """The experiment's ``sweep_summary`` node: ranking metrics, table columns (None: every metric seen),
    heat-map metric (None: the first ranking metric, else no heat map) and its colour-map centre."""

    rank_by: list[str] = field(default_factory=list)
    columns: list[str] | None = None
    heatmap_metric: str | None = None
    heatmap_center: float | None = None
    #: The experiment's own aggregate: ``_target_`` (``fn(sweep_dir, jobs, settings) -> written paths``) and
    #: its settings (the node's other keys).
    aggregate: dict[str, Any] | None = None


@dataclass
class Sweep:
    """What a sweep directory holds: its jobs (by job number), swept keys and summary spec."""

    sweep_dir: Path
    experiment: str
    jobs: list[JobRecord]
    swept_keys: list[str]
    spec: SummarySpec


@dataclass
class SettingGroup:
    """One setting of a sweep with a seed axis: the jobs sharing the values of every swept key but ``seed``.

    ``metrics`` holds, for each metric, the mean over the completed jobs (``m``) and the bounds of its 95 %
    bootstrap CI (``m_ci_low``, ``m_ci_high``); a metric some completed job lacks (or has non-finite) is
    absent, as a completed job lacking a metric has no value for it. ``rank``: place among the settings by the
    means of ``rank_by`` (1 = best), None when unranked.
    """

    settings: dict[str, Any]
    jobs: list[JobRecord]
    metrics: dict[str, float] = field(default_factory=dict)
    rank: int | None = None

    @property
    def completed(self) -> list[JobRecord]:
        return [job for job in self.jobs if job.status == "completed"]

    @property
    def n_seeds(self) -> int:
        """The completed jobs (seeds) the means are over."""
        return len(self.completed)

    @property
    def seeds(self) -> list[Any]:
        """The completed jobs' seeds, by job number."""
        return [job.settings.get(SEED_KEY) for job in self.completed]

    @property
    def incomplete(self) -> list[JobRecord]:
        """The jobs with no result (failed, crashed, running, unknown, not started), by job number."""
        return [job for job in self.jobs if job.status != "completed"]

    @property
    def status(self) -> str:
        """``completed`` (every seed), ``partial`` (some), else the most telling status of its jobs."""
        if not self.incomplete:
            return "completed"
        if self.completed:
            return "partial"
        return min((job.status for job in self.jobs), key=lambda s: (_STATUS_GROUP.get(s, 4), s))

    def mean(self, metric: str) -> float | None:
        return self.metrics.get(metric)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "settings": dict(self.settings),
            "status": self.status,
            "n_seeds": self.n_seeds,
            "seeds": self.seeds,
            "jobs": [job.job for job in self.jobs],
            "metrics": dict(self.metrics),
            "incomplete": [
                {"job": j.job, "seed": j.settings.get(SEED_KEY), "status": j.status, "error": j.error}
                for j in self.incomplete
            ],
        }


@dataclass
class SweepSummary:
    """What :func:`write_sweep_summary` wrote: the jobs in table order, counts per status, the best job."""

    sweep_dir: Path
    experiment: str
    jobs: list[JobRecord]
    swept_keys: list[str]
    rank_by: list[str]
    columns: list[str]
    counts: dict[str, int]
    best: JobRecord | None
    results_path: Path
    csv_path: Path
    heatmap_path: Path | None
    heatmap_note: str | None = None
    #: Files the experiment's own aggregate wrote (``sweep_summary.aggregate``).
    extra_paths: list[Path] = field(default_factory=list)
    #: A sweep with a seed axis: its settings (jobs grouped by every swept key but ``seed``) in table order,
    #: the keys that tell them apart, the best setting and the per-job table (``csv_path`` then holds the
    #: settings); None, [], None, None without a seed axis.
    groups: list[SettingGroup] | None = None
    group_keys: list[str] = field(default_factory=list)
    best_group: SettingGroup | None = None
    per_seed_csv_path: Path | None = None


# --- reading a sweep directory ---------------------------------------------------------------------------


def job_dirs(sweep_dir: Path) -> list[tuple[int, Path]]:
    """The numbered job directories of a sweep, by job number (other entries are ignored)."""
    found = []
    for entry in Path(sweep_dir).iterdir():
        if _JOB_DIR.fullmatch(entry.name) and entry.is_dir():
            found.append((int(entry.name), entry))
    return sorted(found)


def parse_value(text: str) -> Any:
    """An override's value as int or float when it is a plain number (``3``, ``0.1``, ``1e-3``), else the
    text itself (``none``, ``[1,2]``, ``inf``: only plain decimal literals become numbers)."""
    text = text.strip()
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def parse_overrides(overrides: Iterable[Any]) -> dict[str, Any]:
    """``["a.b=1", "+c=x"]`` -> ``{"a.b": 1, "c": "x"}``: key (without Hydra's ``+``/``++``/``~``
    prefix) to parsed value; entries without ``=`` are skipped; a repeated key keeps its last value."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        key = key.strip().lstrip("+~")
        if sep and key:
            out[key] = parse_value(value)
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s (%s): the job is listed as unknown", path, exc)
        return None
    return data if isinstance(data, dict) else None


def _read_yaml(path: Path) -> Any:
    """A YAML file's content, or None (with a warning unless the file is absent)."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, yaml.YAMLError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None


def _number(value: Any) -> float | None:
    """A metric as a finite float, or None (missing, non-finite, text, bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _status(info: Mapping[str, Any] | None) -> str:
    if info is None:
        return "unknown"
    status = str(info.get("status"))
    if status in ("completed", "failed"):
        return status
    if status == "started":
        return "running" if _alive_elsewhere(info.get("host"), info.get("pid")) else "crashed"
    return "unknown"


def _alive_elsewhere(host: Any, pid: Any) -> bool:
    """Whether a started job's process still runs, this process excepted: a summary is written between or
    after a sweep's jobs (``on_multirun_end``, the exit hook), so a job of this very process that started
    and never ended was interrupted (Ctrl-C, SystemExit skip Hydra's ``on_job_end``), not running."""
    try:
        own = host == socket.gethostname() and int(pid) == os.getpid()
    except (TypeError, ValueError):
        own = False
    return not own and process_alive(host, pid)


def _error_text(error: Any) -> str | None:
    if not error:
        return None
    if isinstance(error, Mapping):
        return f"{error.get('type', 'Error')}: {error.get('message', '')}"
    return str(error)


def read_spec(node: Any) -> SummarySpec:
    """A ``sweep_summary`` node as a :class:`SummarySpec` (absent or malformed parts take their defaults)."""
    if not isinstance(node, Mapping):
        return SummarySpec()

    def names(value: Any, what: str) -> list[str] | None:
        if value is None:
            return None
        if isinstance(value, str):
            return [value]
        if isinstance(value, Sequence):
            return [str(v) for v in value]
        log.warning("sweep_summary.%s must be a list of metric names, got %r: ignored", what, value)
        return None

    heatmap = node.get("heatmap")
    metric, center = None, None
    if isinstance(heatmap, Mapping):
        metric = None if heatmap.get("metric") is None else str(heatmap["metric"])
        center = _number(heatmap.get("center"))
        if heatmap.get("center") is not None and center is None:
            log.warning("sweep_summary.heatmap.center must be a number, got %r: ignored", heatmap["center"])
    elif isinstance(heatmap, str):
        metric = heatmap
    aggregate = node.get("aggregate")
    if aggregate is not None and not (isinstance(aggregate, Mapping) and aggregate.get("_target_")):
        log.warning("sweep_summary.aggregate must be a node with a _target_, got %r: ignored", aggregate)
        aggregate = None
    return SummarySpec(
        rank_by=names(node.get("rank_by"), "rank_by") or [],
        columns=names(node.get("columns"), "columns"),
        heatmap_metric=metric,
        heatmap_center=center,
        aggregate=dict(aggregate) if aggregate is not None else None,
    )


def planned_jobs(multirun: Mapping[str, Any]) -> list[list[str]] | None:
    """The override lists, in job order, that Hydra's basic sweeper runs for this ``multirun.yaml``.

    Hydra's rule (``BasicSweeper.sweep``): the ``hydra.sweeper.params`` come first, then the command line's
    task overrides; a key given again replaces its earlier values (so a command-line value narrows a
    param's grid, comma-separated values sweep) but keeps its place; the jobs are the cartesian product.
    None when another sweeper ran the sweep (its jobs are not a grid). Raises on overrides that cannot
    be parsed.
    """
    hydra_node = multirun.get("hydra")
    if not isinstance(hydra_node, Mapping):
        raise ValueError("no `hydra` node")
    sweeper = hydra_node.get("sweeper") or {}
    target = str(sweeper.get("_target_") or "BasicSweeper")
    if not target.endswith("BasicSweeper"):
        log.info("sweep by %s: no planned grid", target)
        return None
    params = sweeper.get("params") or {}
    task = (hydra_node.get("overrides") or {}).get("task") or []
    arguments = [f"{key}={value}" for key, value in params.items()] + [str(item) for item in task]
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser
    except ImportError:
        return _simple_grid(arguments)
    parsed = OverridesParser.create().parse_overrides(arguments)
    (batch,) = BasicSweeper.split_arguments(parsed, None)
    return [list(job) for job in batch]


def _simple_grid(arguments: Sequence[str]) -> list[list[str]]:
    """The basic sweeper's grid without Hydra's parser: values split at commas (no quoting, no ranges)."""
    choices: dict[str, list[str]] = {}
    for argument in arguments:
        key, _, value = argument.partition("=")
        choices[key] = [f"{key}={v}" for v in value.split(",")]
    return [list(job) for job in itertools.product(*choices.values())]


def _swept_keys(settings: Sequence[Mapping[str, Any]], param_keys: Sequence[str]) -> list[str]:
    """Keys whose value differs between jobs (a key some jobs lack counts as differing), after the sweeper
    params' keys; in param order, then first-seen order."""
    missing = object()
    seen: list[str] = []
    for entry in settings:
        seen.extend(k for k in entry if k not in seen)
    differing = [k for k in seen if len({_hashable(s.get(k, missing)) for s in settings}) > 1]
    return list(dict.fromkeys([*param_keys, *differing]))


def _hashable(value: Any) -> Any:
    return value if isinstance(value, int | float | str | type(None)) else repr(value)


def _node(doc: Mapping[str, Any], *keys: str) -> Mapping[str, Any]:
    """``doc[k1][k2]...`` when every level is a mapping, else an empty mapping."""
    for key in keys:
        doc = doc.get(key) if isinstance(doc, Mapping) else None  # type: ignore[assignment]
    return doc if isinstance(doc, Mapping) else {}


def _job_overrides(job_dir: Path, info: Mapping[str, Any] | None) -> list[Any] | None:
    """A job's overrides: run_info's, else Hydra's own record of them (``.hydra/overrides.yaml``)."""
    if info is not None and isinstance(info.get("overrides"), list):
        return list(info["overrides"])
    recorded = _read_yaml(job_dir / ".hydra" / "overrides.yaml")
    return list(recorded) if isinstance(recorded, list) else None


def load_sweep(sweep_dir: Path) -> Sweep:
    """Read a sweep directory: every job directory, plus the planned jobs no directory matches
    (``not_started``, numbered as Hydra would number them). Never fails on a malformed ``multirun.yaml``
    (the planned jobs are then left out, with a warning)."""
    sweep_dir = Path(sweep_dir).resolve()
    multirun = _read_yaml(sweep_dir / MULTIRUN_NAME)
    multirun = multirun if isinstance(multirun, Mapping) else {}
    params = _node(multirun, "hydra", "sweeper", "params")
    param_keys = list(parse_overrides(f"{k}=" for k in params))
    planned: list[list[str]] | None = None
    if multirun:
        try:
            planned = planned_jobs(multirun)
        except Exception as exc:  # a sweep summary must not fail on Hydra's bookkeeping
            log.warning("cannot plan the jobs of %s (%s): not-started jobs are not listed", sweep_dir, exc)

    raw: list[tuple[int, Path, dict[str, Any] | None, dict[str, Any]]] = []
    spec_node, experiment = None, None
    for num, path in job_dirs(sweep_dir):
        info = _read_json(path / RUN_INFO_NAME)
        overrides = _job_overrides(path, info)
        if overrides is None and planned is not None and num < len(planned):
            overrides = planned[num]  # an untracked job: Hydra numbers jobs in grid order
        raw.append((num, path, info, parse_overrides(overrides or [])))
        if experiment is None and info is not None and info.get("experiment"):
            experiment = str(info["experiment"])
        if spec_node is None or experiment is None:
            config = _read_yaml(path / CONFIG_NAME)
            config = config if isinstance(config, Mapping) else {}
            spec_node = spec_node if spec_node is not None else config.get(SPEC_KEY)
            experiment = experiment or (str(config["name"]) if config.get("name") else None)
    spec_node = spec_node if spec_node is not None else multirun.get(SPEC_KEY)
    name = multirun.get("name")
    experiment = experiment or (str(name) if name and "${" not in str(name) else sweep_dir.parent.name)

    planned_settings = [parse_overrides(job) for job in planned or []]
    swept = _swept_keys([entry[3] for entry in raw] + planned_settings, param_keys)

    def restrict(overrides: Mapping[str, Any]) -> dict[str, Any]:
        return {k: overrides[k] for k in swept if k in overrides}

    jobs: list[JobRecord] = []
    for num, path, info, overrides in raw:
        info_ = info or {}
        jobs.append(
            JobRecord(
                job=num,
                run_id=None if info_.get("run_id") is None else str(info_["run_id"]),
                status=_status(info),
                settings=restrict(overrides),
                metrics=dict(info_.get("metrics") or {}),
                run_dir=str(path),
                duration_s=_number(info_.get("duration_s")),
                error=_error_text(info_.get("error")),
            )
        )
    present = {_settings_key(job.settings, swept) for job in jobs}
    for num, overrides in enumerate(planned_settings):
        settings = restrict(overrides)
        if _settings_key(settings, swept) not in present:
            jobs.append(JobRecord(num, None, "not_started", settings, {}, None, None, None))
    jobs.sort(key=lambda job: (job.job, job.status == "not_started"))
    return Sweep(sweep_dir, experiment, jobs, swept, read_spec(spec_node))


def _settings_key(settings: Mapping[str, Any], keys: Sequence[str]) -> tuple[Any, ...]:
    return tuple((k, _hashable(settings.get(k))) for k in keys)


def collect_sweep(sweep_dir: Path) -> list[JobRecord]:
    """Every job of a sweep (see :func:`load_sweep`), by job number."""
    return load_sweep(sweep_dir).jobs


# --- ranking and tables ----------------------------------------------------------------------------------


def rank_jobs(jobs: Sequence[JobRecord], rank_by: Sequence[str]) -> list[JobRecord]:
    """Set each job's rank and return the jobs in table order.

    Completed jobs with every ``rank_by`` metric (finite numbers) are ranked ascending by them in turn
    (ties by the next metric, then job number); then completed jobs lacking one, failed, crashed/running,
    unknown and not-started jobs, each by job number. No ``rank_by``: nothing is ranked.
    """

    def ranking(job: JobRecord) -> tuple[float, ...] | None:
        if job.status != "completed" or not rank_by:
            return None
        values = tuple(_number(job.metrics.get(m)) for m in rank_by)
        return None if any(v is None for v in values) else values  # type: ignore[return-value]

    ranked = sorted(((r, j) for j in jobs if (r := ranking(j)) is not None), key=lambda p: (p[0], p[1].job))
    for place, (_, job) in enumerate(ranked, start=1):
        job.rank = place
    rest = [job for job in jobs if ranking(job) is None]
    for job in rest:
        job.rank = None
    rest.sort(key=lambda job: (_STATUS_GROUP.get(job.status, 4), job.job))
    return [job for _, job in ranked] + rest


def metric_columns(jobs: Sequence[JobRecord], spec: SummarySpec) -> list[str]:
    """The spec's columns, or every metric seen (first-seen order, by job number)."""
    if spec.columns is not None:
        return list(spec.columns)
    seen: list[str] = []
    for job in sorted(jobs, key=lambda j: j.job):
        seen.extend(k for k in job.metrics if k not in seen)
    return seen


def _csv_columns(swept: Sequence[str], columns: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(["rank", "job", "status", *swept, *columns, "duration_s", "error", "run_dir"]))


def _row(job: JobRecord, swept: Sequence[str], columns: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"rank": job.rank, "job": job.job, "status": job.status}
    row.update({k: job.settings.get(k) for k in swept})
    row.update({m: job.metrics.get(m) for m in columns})
    row.update(duration_s=job.duration_s, error=job.error, run_dir=job.run_dir)
    return row


# --- a seed axis: one row per setting ---------------------------------------------------------------------


def has_seed_axis(jobs: Sequence[JobRecord], swept_keys: Sequence[str]) -> bool:
    """Whether the sweep's jobs (planned ones included) take more than one value of ``seed``."""
    return SEED_KEY in swept_keys and len({_hashable(job.settings.get(SEED_KEY)) for job in jobs}) > 1


def _is_bound(name: str, names: Sequence[str] | set[str]) -> bool:
    """Whether ``name`` is the CI bound of another metric in ``names`` (or a job's own ``n_seeds``)."""
    if name == N_SEEDS:
        return True
    return any(name.endswith(suffix) and name[: -len(suffix)] in names for suffix in (CI_LOW, CI_HIGH))


def group_by_setting(
    jobs: Sequence[JobRecord], swept_keys: Sequence[str]
) -> tuple[list[str], list[SettingGroup]]:
    """The jobs grouped by their values of every swept key but ``seed`` (those keys, and the groups in the
    order of their first job), each group with its metrics' means over its completed jobs and their 95 %
    percentile bootstrap CIs (:func:`latentdyn.statistics.mean_and_ci`, 10 000 resamples, deterministic).

    A metric counts only when every completed job of the group has it as a finite number (else the group has
    no value for it, as a completed job lacking one has none). The jobs' own CI bounds and ``n_seeds`` (a job
    that ran several ``seeds`` itself) are not averaged: the group's bounds are across the sweep's seeds.
    """
    from latentdyn.statistics import mean_and_ci

    keys = [k for k in swept_keys if k != SEED_KEY]
    groups: dict[tuple[Any, ...], SettingGroup] = {}
    for job in sorted(jobs, key=lambda j: j.job):
        ident = _settings_key(job.settings, keys)
        if ident not in groups:
            groups[ident] = SettingGroup({k: job.settings[k] for k in keys if k in job.settings}, [])
        groups[ident].jobs.append(job)
    for group in groups.values():
        done = group.completed
        seeds = [_hashable(seed) for seed in group.seeds]
        if len(set(seeds)) != len(seeds):
            log.warning(
                "sweep setting %s: a seed repeats among the completed jobs %s (seeds %s): each job counts",
                _settings_text(group.settings) or "(no other key)",
                [job.job for job in done],
                group.seeds,
            )
        names: list[str] = []
        for job in done:
            names.extend(m for m in job.metrics if m not in names)
        for name in names:
            if _is_bound(name, names):
                continue
            values = [_number(job.metrics.get(name)) for job in done]
            if any(value is None for value in values):
                continue
            mean, low, high = mean_and_ci(values, CONFIDENCE, N_RESAMPLES, seed=0)  # type: ignore[arg-type]
            group.metrics.update({name: mean, name + CI_LOW: low, name + CI_HIGH: high})
    return keys, list(groups.values())


def rank_groups(groups: Sequence[SettingGroup], rank_by: Sequence[str]) -> list[SettingGroup]:
    """Set each setting's rank and return the settings in table order, as :func:`rank_jobs` does jobs:
    settings with a completed job and every ``rank_by`` mean, ascending by those means in turn (ties by the
    next, then first job number); then settings with completed jobs but a mean missing, then those with none
    (failed, crashed/running, unknown, not started), each by first job number."""

    def ranking(group: SettingGroup) -> tuple[float, ...] | None:
        if not group.completed or not rank_by:
            return None
        values = tuple(group.mean(m) for m in rank_by)
        return None if any(v is None for v in values) else values  # type: ignore[return-value]

    ranked = sorted(
        ((r, g) for g in groups if (r := ranking(g)) is not None), key=lambda p: (p[0], p[1].jobs[0].job)
    )
    for place, (_, group) in enumerate(ranked, start=1):
        group.rank = place
    rest = [group for group in groups if ranking(group) is None]
    for group in rest:
        group.rank = None
    rest.sort(key=lambda g: (1 if g.completed else _STATUS_GROUP.get(g.status, 4), g.jobs[0].job))
    return [group for _, group in ranked] + rest


def _group_metric_columns(columns: Sequence[str]) -> list[str]:
    """The table's metric columns for settings: the jobs' columns but their own CI bounds and ``n_seeds``."""
    return [c for c in columns if not _is_bound(c, set(columns))]


def _group_csv_columns(keys: Sequence[str], columns: Sequence[str]) -> list[str]:
    metrics = [c + suffix for c in _group_metric_columns(columns) for suffix in ("", CI_LOW, CI_HIGH)]
    return list(dict.fromkeys(["rank", *keys, "status", N_SEEDS, "seeds", *metrics, "jobs", "incomplete"]))


def _incomplete_text(job: JobRecord, error: bool = True) -> str:
    text = f"seed={_fmt(job.settings.get(SEED_KEY))} (job {job.job}): {job.status}"
    return f"{text}: {job.error}" if error and job.error else text


def _group_row(group: SettingGroup, keys: Sequence[str], columns: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"rank": group.rank, **{k: group.settings.get(k) for k in keys}}
    row.update(status=group.status, n_seeds=group.n_seeds, seeds=" ".join(_fmt(s) for s in group.seeds))
    for column in _group_metric_columns(columns):
        for suffix in ("", CI_LOW, CI_HIGH):
            row[column + suffix] = group.metrics.get(column + suffix)
    row["jobs"] = " ".join(str(job.job) for job in group.jobs)
    row["incomplete"] = "; ".join(_incomplete_text(job) for job in group.incomplete)
    return row


def _ci_text(group: SettingGroup, metric: str) -> str:
    """``mean [low, high]`` of a setting's metric, empty when it has none."""
    mean, low, high = (group.metrics.get(metric + suffix) for suffix in ("", CI_LOW, CI_HIGH))
    if mean is None:
        return ""
    return f"{_fmt(mean)} [{_fmt(low)}, {_fmt(high)}]" if low is not None and high is not None else _fmt(mean)


def setting_records(groups: Sequence[SettingGroup]) -> list[JobRecord]:
    """The settings as job records for the heat map: each one's means, completed when a seed completed."""
    return [
        JobRecord(
            job=group.jobs[0].job,
            run_id=None,
            status="completed" if group.completed else group.status,
            settings=dict(group.settings),
            metrics=dict(group.metrics),
            run_dir=None,
            duration_s=None,
            error=None,
        )
        for group in groups
    ]


def write_sweep_summary(sweep_dir: Path) -> SweepSummary:
    """Write ``sweep_results.json``, ``summary.csv`` and ``heatmap.png`` (when some completed job has the
    heat-map metric) into ``sweep_dir``, each atomically; return what was written. With a seed axis
    (:func:`has_seed_axis`) ``summary.csv`` holds the settings (means and CIs over seeds),
    ``summary_per_seed.csv`` the jobs, and the heat map the means."""
    sweep = load_sweep(sweep_dir)
    jobs = rank_jobs(sweep.jobs, sweep.spec.rank_by)
    columns = metric_columns(jobs, sweep.spec)
    counts = dict(Counter(job.status for job in jobs))
    counts = {s: counts[s] for s in sorted(counts, key=lambda s: (STATUSES + (s,)).index(s))}
    best = jobs[0] if jobs and jobs[0].rank == 1 else None
    groups: list[SettingGroup] | None = None
    group_keys: list[str] = []
    if has_seed_axis(jobs, sweep.swept_keys):
        group_keys, groups = group_by_setting(jobs, sweep.swept_keys)
        groups = rank_groups(groups, sweep.spec.rank_by)
        several = sorted({j.job for j in jobs if (_number(j.metrics.get(N_SEEDS)) or 0) > 1})
        if several:
            log.warning(
                "sweep %s varies seed, but jobs %s ran several seeds themselves (`seeds` overrides `seed`): "
                "their repeats may be the same runs; sweep `seed=...` with `seeds=null`",
                sweep.sweep_dir,
                several,
            )
    best_group = groups[0] if groups and groups[0].rank == 1 else None

    # Only a metric the experiment names: a sweep of an experiment without `sweep_summary` gets no heat map.
    metric = sweep.spec.heatmap_metric or (sweep.spec.rank_by or [None])[0]
    cells, cell_keys = (jobs, sweep.swept_keys) if groups is None else (setting_records(groups), group_keys)
    heatmap_path: Path | None = sweep.sweep_dir / HEATMAP_NAME
    note = None
    if metric is None:
        heatmap_path, note = None, "the experiment names no sweep_summary metric to plot"
    elif not any(job.status == "completed" and _number(job.metrics.get(metric)) is not None for job in cells):
        heatmap_path, note = None, f"no completed job has the metric {metric}"
    else:
        try:
            plot_heatmap(
                sweep,
                metric,
                sweep.spec.heatmap_center,
                heatmap_path,
                jobs=cells,
                keys=cell_keys,
                over_seeds=groups is not None,
            )
        except Exception as exc:  # the tables matter more than the figure
            log.warning("heat map of %s not drawn: %s: %s", sweep.sweep_dir, type(exc).__name__, exc)
            heatmap_path, note = None, f"drawing failed ({type(exc).__name__}: {exc})"
    if note is not None:
        log.info("sweep %s: heat map skipped: %s", sweep.sweep_dir, note)

    csv_path = sweep.sweep_dir / CSV_NAME
    per_job_csv = csv_path if groups is None else sweep.sweep_dir / PER_SEED_CSV_NAME
    write_csv_atomic(
        per_job_csv,
        _csv_columns(sweep.swept_keys, columns),
        [_row(j, sweep.swept_keys, columns) for j in jobs],
    )
    if groups is not None:
        write_csv_atomic(
            csv_path,
            _group_csv_columns(group_keys, columns),
            [_group_row(g, group_keys, columns) for g in groups],
        )
    results: dict[str, Any] = {
        "sweep_dir": str(sweep.sweep_dir),
        "experiment": sweep.experiment,
        "n_jobs": len(jobs),
        "counts": counts,
        "swept_keys": sweep.swept_keys,
        "rank_by": sweep.spec.rank_by,
        "columns": columns,
        "heatmap": {
            "metric": metric,
            "center": sweep.spec.heatmap_center,
            "file": heatmap_path and HEATMAP_NAME,
            "note": note,
        },
        "best_job": None if best is None else best.job,
        "jobs": [job.as_dict() for job in jobs],
    }
    if groups is not None:
        results.update(
            seed_key=SEED_KEY,
            group_keys=group_keys,
            confidence=CONFIDENCE,
            n_groups=len(groups),
            best_group=None if best_group is None else best_group.as_dict(),
            groups=[group.as_dict() for group in groups],
        )
    results_path = sweep.sweep_dir / RESULTS_NAME
    write_json_atomic(results_path, results)
    extra = run_aggregate(sweep.spec.aggregate, sweep.sweep_dir, jobs)
    return SweepSummary(
        sweep_dir=sweep.sweep_dir,
        experiment=sweep.experiment,
        jobs=jobs,
        swept_keys=sweep.swept_keys,
        rank_by=sweep.spec.rank_by,
        columns=columns,
        counts=counts,
        best=best,
        results_path=results_path,
        csv_path=csv_path,
        heatmap_path=heatmap_path,
        heatmap_note=note,
        extra_paths=extra,
        groups=groups,
        group_keys=group_keys,
        best_group=best_group,
        per_seed_csv_path=None if groups is None else per_job_csv,
    )


def run_aggregate(node: Mapping[str, Any] | None, sweep_dir: Path, jobs: Sequence[JobRecord]) -> list[Path]:
    """Call the experiment's own aggregate (``sweep_summary.aggregate``) and return the files it wrote; a
    failure is logged, not raised: the generic tables are written already."""
    if not node:
        return []
    from hydra.utils import get_method

    settings = {k: v for k, v in node.items() if k != "_target_"}
    try:
        return [Path(p) for p in get_method(str(node["_target_"]))(sweep_dir, list(jobs), settings)]
    except Exception as exc:
        log.error(
            "sweep %s: the aggregate %s failed: %s: %s", sweep_dir, node["_target_"], type(exc).__name__, exc
        )
        return []


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _settings_text(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in settings.items())


def format_summary(summary: SweepSummary, max_rows: int = 10) -> str:
    """A short markdown report for the terminal: counts, the first ``max_rows`` table rows (settings and
    metric columns), the best job and the files written. With a seed axis the rows are the settings, each
    metric ``mean [low, high]`` over their completed seeds (:func:`format_groups`)."""
    if summary.groups is not None:
        return format_groups(summary, max_rows)
    counts = ", ".join(f"{n} {status}" for status, n in summary.counts.items())
    lines = [
        f"## {summary.experiment} · sweep {summary.sweep_dir.name}: {len(summary.jobs)} jobs ({counts})",
        "",
    ]
    columns = ["rank", "job", "status", *summary.swept_keys, *summary.columns]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join(" --- " for _ in columns) + "|")
    for job in summary.jobs[:max_rows]:
        row = _row(job, summary.swept_keys, summary.columns)
        cells = (_fmt(row.get(c)).replace("|", "\\|").replace("\n", " ") for c in columns)
        lines.append("| " + " | ".join(cells) + " |")
    if len(summary.jobs) > max_rows:
        lines.append(f"\n({len(summary.jobs) - max_rows} more rows in {summary.csv_path.name})")
    lines.append("")
    if summary.best is not None:
        scores = ", ".join(f"{m}={_fmt(summary.best.metrics.get(m))}" for m in summary.rank_by)
        lines.append(f"best: job {summary.best.job} ({_settings_text(summary.best.settings)}): {scores}")
    elif summary.rank_by:
        lines.append(f"best: none (no completed job has all of {', '.join(summary.rank_by)})")
    written = [summary.results_path.name, summary.csv_path.name]
    if summary.heatmap_path is not None:
        written.append(summary.heatmap_path.name)
    written += [p.name for p in summary.extra_paths]
    lines.append(f"wrote {', '.join(written)} in {summary.sweep_dir}")
    if summary.heatmap_note:
        lines.append(f"heat map skipped: {summary.heatmap_note}")
    return "\n".join(lines)


def _written(summary: SweepSummary) -> list[str]:
    written = [summary.results_path.name, summary.csv_path.name]
    if summary.per_seed_csv_path is not None:
        written.append(summary.per_seed_csv_path.name)
    if summary.heatmap_path is not None:
        written.append(summary.heatmap_path.name)
    return written + [p.name for p in summary.extra_paths]


def format_groups(summary: SweepSummary, max_rows: int = 10) -> str:
    """:func:`format_summary` of a sweep with a seed axis: one row per setting (rank, the other swept keys,
    ``n_seeds``, each metric ``mean [low, high]``, the seeds without a result), the best setting."""
    groups = summary.groups or []
    counts = ", ".join(f"{n} {status}" for status, n in summary.counts.items())
    seeds = sorted(
        {_hashable(j.settings.get(SEED_KEY)) for j in summary.jobs}, key=lambda v: (str(type(v)), v)
    )
    seed_text = ", ".join(_fmt(s) for s in seeds)
    lines = [
        f"## {summary.experiment} · sweep {summary.sweep_dir.name}: {len(summary.jobs)} jobs ({counts}) = "
        f"{len(groups)} settings × seeds {{{seed_text}}}",
        "",
    ]
    metrics = _group_metric_columns(summary.columns)
    columns = ["rank", *summary.group_keys, N_SEEDS, *metrics, "incomplete"]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join(" --- " for _ in columns) + "|")
    for group in groups[:max_rows]:
        cells = [_fmt(group.rank), *(_fmt(group.settings.get(k)) for k in summary.group_keys)]
        cells += [str(group.n_seeds), *(_ci_text(group, m) for m in metrics)]
        cells.append(", ".join(_incomplete_text(job, error=False) for job in group.incomplete))
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    if len(groups) > max_rows:
        lines.append(f"\n({len(groups) - max_rows} more settings in {summary.csv_path.name})")
    lines.append("")
    confidence = f"{CONFIDENCE * 100:g} %"
    lines.append(
        f"mean [{confidence} bootstrap CI] over each setting's completed seeds; one row per job in "
        f"{PER_SEED_CSV_NAME}"
    )
    best = summary.best_group
    if best is not None:
        scores = ", ".join(f"{m}={_ci_text(best, m)}" for m in summary.rank_by)
        where = _settings_text(best.settings) or "the only setting"
        n = best.n_seeds
        lines.append(f"best: {where} ({n} seed{'s' if n != 1 else ''}): {scores}")
    elif summary.rank_by:
        lines.append(f"best: none (no setting has a mean of each of {', '.join(summary.rank_by)})")
    failed = [job for group in groups for job in group.incomplete if job.status in ("failed", "crashed")]
    if failed:
        lines.append(f"failed seeds (left out of the means, listed in {summary.csv_path.name}):")
        for job in failed:
            error = f": {job.error.splitlines()[0]}" if job.error else ""
            lines.append(f"- job {job.job} ({_settings_text(job.settings)}): {job.status}{error}")
    lines.append(f"wrote {', '.join(_written(summary))} in {summary.sweep_dir}")
    if summary.heatmap_note:
        lines.append(f"heat map skipped: {summary.heatmap_note}")
    return "\n".join(lines)


def main_sweep(sweep_dir: Path) -> int:
    """``latentdyn-results --sweep DIR``: write the summary of a sweep and print it; 1 when DIR is not a
    sweep directory (no numbered job subdirectories)."""
    import sys

    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        print(f"latentdyn-results: {sweep_dir} is not a directory", file=sys.stderr)
        return 1
    if not job_dirs(sweep_dir):
        print(
            f"latentdyn-results: {sweep_dir} has no job directories (0/, 1/, ...): not a sweep directory",
            file=sys.stderr,
        )
        return 1
    print(format_summary(write_sweep_summary(sweep_dir)))
    return 0


# --- heat map --------------------------------------------------------------------------------------------


def _axis_values(jobs: Sequence[JobRecord], key: str) -> list[Any]:
    """The values a swept key takes, numbers ascending (else first-seen order); None (unset) last."""
    values: list[Any] = []
    for job in jobs:
        value = job.settings.get(key)
        if value is not None and _hashable(value) not in [_hashable(v) for v in values]:
            values.append(value)
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        values.sort()
    if any(key not in job.settings for job in jobs):
        values.append(None)
    return values


def _tick(value: Any) -> str:
    if value is None:
        return "(unset)"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _cell(jobs: Sequence[JobRecord], metric: str) -> tuple[float | None, str]:
    """A cell's value and label: the first completed job with the metric, else the most telling status."""
    for job in jobs:
        value = _number(job.metrics.get(metric)) if job.status == "completed" else None
        if value is not None:
            return value, f"{value:.3g}"
    for status in ("failed", "crashed", "running"):
        if any(job.status == status for job in jobs):
            return None, _CELL_LABEL[status]
    return None, _MISSING_LABEL


@dataclass
class HeatmapPanel:
    """One panel of the heat map: its title (``key=value, ...`` of the keys before the last two, empty when
    there are none), the y and x axes' keys (None: no such axis) and values, and per cell (``[iy][ix]``) the
    metric value (None: grey) and its label."""

    title: str
    y_key: str | None
    y_values: list[Any]
    x_key: str | None
    x_values: list[Any]
    values: list[list[float | None]]
    labels: list[list[str]]


def heatmap_panels(jobs: Sequence[JobRecord], swept_keys: Sequence[str], metric: str) -> list[HeatmapPanel]:
    """The heat map's panels: the last two swept keys are a panel's y and x axes (one key: x only, a single
    row); each combination of the keys before them that some job has is a panel."""
    panel_keys, axis_keys = list(swept_keys[:-2]), list(swept_keys[-2:])
    y_key = axis_keys[0] if len(axis_keys) == 2 else None
    x_key = axis_keys[-1] if axis_keys else None
    y_values = _axis_values(jobs, y_key) if y_key else [None]
    x_values = _axis_values(jobs, x_key) if x_key else [None]

    def matches(job: JobRecord, key: str | None, value: Any) -> bool:
        return key is None or _hashable(job.settings.get(key)) == _hashable(value)

    panels = []
    for combo in itertools.product(*(_axis_values(jobs, k) for k in panel_keys)):
        members = [j for j in jobs if all(matches(j, k, v) for k, v in zip(panel_keys, combo, strict=True))]
        if not members:
            continue
        values: list[list[float | None]] = []
        labels: list[list[str]] = []
        for yv in y_values:
            cells = [
                _cell([j for j in members if matches(j, y_key, yv) and matches(j, x_key, xv)], metric)
                for xv in x_values
            ]
            values.append([value for value, _ in cells])
            labels.append([label for _, label in cells])
        title = ", ".join(f"{k}={_tick(v)}" for k, v in zip(panel_keys, combo, strict=True))
        panels.append(HeatmapPanel(title, y_key, y_values, x_key, x_values, values, labels))
    return panels


def plot_heatmap(
    sweep: Sweep,
    metric: str,
    center: float | None,
    path: Path,
    *,
    jobs: Sequence[JobRecord] | None = None,
    keys: Sequence[str] | None = None,
    over_seeds: bool = False,
) -> Path:
    """Draw the sweep's grid coloured by ``metric`` to ``path`` (PNG), panels as :func:`heatmap_panels` of
    ``jobs`` over ``keys`` (default: the sweep's jobs and swept keys; a seed axis passes its settings' means
    over the other keys, ``over_seeds``: the colour bar says so).

    Cells without a value are grey, labelled failed/crashed/running/—; the others carry their value (3
    significant digits). With ``center`` the colour map diverges around it (limits symmetric about the
    centre, so values all on one side still read as such), else it is sequential.
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import Normalize, TwoSlopeNorm
    from matplotlib.figure import Figure

    panels = heatmap_panels(
        sweep.jobs if jobs is None else jobs, sweep.swept_keys if keys is None else keys, metric
    )
    grids = [np.array(p.values, dtype=float) for p in panels]  # None -> nan
    finite = np.concatenate([g[np.isfinite(g)] for g in grids])
    if finite.size == 0:
        raise ValueError(f"no job has a value of {metric}")
    if center is not None:
        half = float(np.max(np.abs(finite - center))) or (abs(center) * 0.05 or 1.0)
        norm: Normalize = TwoSlopeNorm(vcenter=center, vmin=center - half, vmax=center + half)
        cmap = colormaps["RdBu_r"].with_extremes(bad="lightgrey")
    else:
        norm = Normalize(vmin=float(finite.min()), vmax=float(finite.max()))
        cmap = colormaps["viridis"].with_extremes(bad="lightgrey")

    first = panels[0]
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    width = max(3.2, 0.9 * len(first.x_values) + 1.8)
    height = max(2.2, 0.55 * len(first.y_values) + 1.4)
    fig = Figure(figsize=(width * ncols + 1.2, height * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for ax, panel, grid in zip(axes.flat, panels, grids, strict=False):
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, origin="lower", aspect="auto")
        for iy, ix in itertools.product(range(grid.shape[0]), range(grid.shape[1])):
            value = grid[iy, ix]
            shade = cmap(norm(value)) if np.isfinite(value) else (0.83, 0.83, 0.83, 1.0)
            dark = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] < 0.5
            colour = "white" if dark else "black"
            ax.text(ix, iy, panel.labels[iy][ix], ha="center", va="center", fontsize=8, color=colour)
        ax.set_xticks(range(len(panel.x_values)), [_tick(v) for v in panel.x_values] if panel.x_key else [""])
        ax.set_yticks(range(len(panel.y_values)), [_tick(v) for v in panel.y_values] if panel.y_key else [""])
        if panel.x_key:
            ax.set_xlabel(panel.x_key)
        if panel.y_key:
            ax.set_ylabel(panel.y_key)
        if panel.title:
            ax.set_title(panel.title, fontsize=9)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_axis_off()
    centred = "" if center is None else f"\n(centred on {center:g})"
    mean = " (mean over seeds)" if over_seeds else ""
    fig.colorbar(image, ax=axes, label=f"{metric}{mean}{centred}", shrink=0.9)
    title = f"{sweep.experiment} · sweep {sweep.sweep_dir.name} · {metric}"
    fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Title": title})
    write_bytes_atomic(Path(path), buf.getvalue())
    return Path(path)
