"""The wandb dashboard of a tracked run (``logger=wandb``): one wandb run per job and per sub-run.

:class:`~latentdyn.tracking.run.TrackedRun` opens it when the run starts (:func:`open_dashboard`) and closes
it when the run ends (:meth:`Dashboard.close`). Each wandb run has

- ``group``: the study: the sweep's run id for a job of a multirun, the composite's group for a sub-run (its
  run id, or its sweep's), else the run's own run id (``logger.group`` overrides);
- ``job_type``: the experiment (``logger.job_type``);
- ``config``: the run's resolved config, and for a sweep job its grid values as ``grid/<key>`` entries and tags
  ``key=value`` (the dashboard's parallel-coordinates view plots them against the metrics);
- a stable id made from the run id, so a resumed run (``resume=true``) continues the same wandb run.

Lightning's ``WandbLogger`` logs the training curves into it (:func:`active_wandb_run`, used by
:func:`latentdyn.models.training.job_logger`). When the run completes, its outputs are published: every
``*.png`` as ``wandb.Image`` (``plots/<path>``), ``*.wav`` as ``wandb.Audio`` (``audio/<path>``, at most
:data:`MAX_AUDIO`), every ``*.csv`` as ``wandb.Table`` (``tables/<path>``), each ``per_step.csv`` as one line
chart per metric (``per_step/<dir>/<metric>``, one line per mode or condition), and the key metrics into the
run's summary. Sub-runs' directories are left to their own wandb runs.

Offline unless ``logger.mode`` / ``WANDB_MODE`` says otherwise: the run lands in ``<run_dir>/wandb/`` and
``wandb sync <run_dir>/wandb/offline-run-*`` uploads it. Only rank 0 logs. A dashboard that cannot be opened or
published is logged as a warning; the run's own records do not depend on it. wandb is imported only here, and
only when the run's logger is wandb.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentdyn.tracking.ranks import is_rank_zero

if TYPE_CHECKING:
    from latentdyn.tracking.run import TrackedRun

log = logging.getLogger(__name__)

WANDB_LOGGER = "WandbLogger"
#: At most this many WAV files per run are logged (the rest stay in the run directory).
MAX_AUDIO = 64
#: Rows of a CSV logged as a table (wandb's own limit for logged tables).
MAX_TABLE_ROWS = 10_000
# The run directory's entries that are not outputs to publish: wandb's own, Hydra's, Lightning's logs
# (logs/metrics.csv; the curves are in the run already), TensorBoard's and the checkpoints.
_SKIP_TOP = frozenset({"wandb", ".hydra", "logs", "tensorboard", "checkpoints"})
_TAG_MAX = 64
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
# A listening file's copy at the representation's own rate (diagnostics.audio_io.NATIVE_DIR_FORMAT).
_NATIVE_RATE_DIR = re.compile(r"\d+Hz")


def is_wandb_logger(logger_cfg: Any) -> bool:
    """Whether a ``logger`` config node builds Lightning's WandbLogger."""
    target = logger_cfg.get("_target_") if hasattr(logger_cfg, "get") else None
    return bool(target) and str(target).rsplit(".", 1)[-1] == WANDB_LOGGER


@dataclass
class Dashboard:
    """A tracked run's open wandb run."""

    run: Any
    run_dir: Path
    group: str
    grid: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return str(self.run.id)

    def close(self, metrics: Mapping[str, Any] | None, exit_code: int = 0) -> None:
        """Publish the run directory's outputs and ``metrics`` (unless failed), then finish the wandb run."""
        try:
            if exit_code == 0:
                publish_outputs(self.run, self.run_dir)
                publish_summary(self.run, metrics or {})
        except Exception as exc:  # the dashboard is a view: the run's records stand without it
            log.warning(
                "wandb: could not publish the outputs of %s (%s: %s)", self.run_dir, type(exc).__name__, exc
            )
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as exc:
            log.warning("wandb: could not finish run %s (%s: %s)", self.id, type(exc).__name__, exc)


def active_wandb_run() -> Any | None:
    """The wandb run of the innermost tracked run in progress (None outside one, on ranks > 0, or when its
    logger is not wandb): where Lightning's WandbLogger logs the training curves."""
    from latentdyn.tracking.run import current_run

    run = current_run()
    dashboard = getattr(run, "_dashboard", None) if run is not None else None
    return dashboard.run if dashboard is not None else None


def open_dashboard(run: TrackedRun, parent: TrackedRun | None) -> Dashboard | None:
    """Start ``run``'s wandb run when its config's logger is wandb (rank 0 only); None otherwise or when wandb
    cannot start (logged)."""
    logger_cfg = run.config.get("logger")
    if not is_wandb_logger(logger_cfg) or not is_rank_zero():
        return None
    assert isinstance(logger_cfg, Mapping)
    try:
        return _open(run, parent, logger_cfg)
    except Exception as exc:
        log.warning(
            "wandb: no dashboard for run %s (%s: %s); its records are in %s",
            run.run_id,
            type(exc).__name__,
            exc,
            run.run_dir,
        )
        return None


def _open(run: TrackedRun, parent: TrackedRun | None, logger_cfg: Mapping[str, Any]) -> Dashboard:
    import wandb

    parent_dashboard: Dashboard | None = getattr(parent, "_dashboard", None) if parent is not None else None
    if parent_dashboard is not None:
        study, grid = parent_dashboard.group, dict(parent_dashboard.grid)
    elif run.parent_run_id:
        study, grid = str(run.parent_run_id), {}
    else:
        study, grid = sweep_study(run)
    group = str(logger_cfg.get("group") or study)
    tags = [*(str(t) for t in logger_cfg.get("tags") or []), *grid_tags(grid)]
    config = {**dict(run.config), **{f"grid/{key}": value for key, value in grid.items()}}
    parent_key = parent_dashboard.id if parent_dashboard is not None else ""
    wb_run = wandb.init(
        project=str(logger_cfg.get("project") or "latentdyn"),
        entity=logger_cfg.get("entity") or None,
        name=str(logger_cfg.get("name") or f"{run.experiment}-{run.run_id}"),
        group=group,
        job_type=str(logger_cfg.get("job_type") or run.experiment),
        tags=list(dict.fromkeys(tags)),
        config=config,
        dir=str(run.run_dir),
        mode=str(logger_cfg.get("mode") or "offline"),
        id=stable_id(run.run_id, f"{parent_key}|{group}|{run.tier}|{run.experiment}|{run.run_id}"),
        resume="allow",
        # A composite's run stays open while its sub-runs log into theirs: no global run to replace.
        reinit="create_new",
    )
    # As Lightning's WandbLogger does for a run it starts: training curves against the trainer's step.
    wb_run.define_metric("trainer/global_step")
    wb_run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    log.info("wandb: run %s (group %s, %s mode) in %s", wb_run.id, group, wb_run.settings.mode, run.run_dir)
    return Dashboard(run=wb_run, run_dir=Path(run.run_dir), group=group, grid=grid)


def stable_id(run_id: str, key: str) -> str:
    """A wandb run id for ``run_id`` (readable prefix, hash of ``key``): the same on every attempt of a run."""
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:10]
    readable = _ID_UNSAFE.sub("-", run_id).strip("-")[:40]
    return f"{readable}-{digest}" if readable else digest


def sweep_study(run: TrackedRun) -> tuple[str, dict[str, Any]]:
    """A run's group and grid values: for a job of a Hydra multirun the sweep's run id and the job's values
    of the swept keys, else the run's own id and no grid."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    except ImportError:  # pragma: no cover - hydra is a dependency
        hydra_cfg = None
    if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return str(run.run_id), {}
    sweep_id = str(run.config.get("run_id") or run.run_id)
    overrides = [str(o) for o in hydra_cfg.overrides.task]
    return sweep_id, grid_values(overrides, Path(str(hydra_cfg.sweep.dir)))


def grid_values(overrides: Sequence[str], sweep_dir: Path | None) -> dict[str, Any]:
    """A sweep job's values of the keys the sweep varies (read from the sweep's ``multirun.yaml``); all of the
    job's overrides when the grid cannot be read (another sweeper, no file)."""
    from latentdyn.tracking.sweep import MULTIRUN_NAME, parse_overrides, planned_jobs

    values = parse_overrides(overrides)
    swept: list[str] | None = None
    path = Path(sweep_dir) / MULTIRUN_NAME if sweep_dir is not None else None
    if path is not None and path.is_file():
        try:
            import yaml

            multirun = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            planned = planned_jobs(multirun)
            if planned:
                settings = [parse_overrides(job) for job in planned]
                params = list(
                    parse_overrides(
                        f"{k}=" for k in (multirun["hydra"].get("sweeper") or {}).get("params") or {}
                    )
                )
                swept = [k for k in values if k in params or len({repr(s.get(k)) for s in settings}) > 1]
        except Exception as exc:
            log.info(
                "wandb: the sweep's grid could not be read from %s (%s); tagging every override", path, exc
            )
    keys = swept if swept is not None else list(values)
    return {key: values[key] for key in keys}


def grid_tags(grid: Mapping[str, Any]) -> list[str]:
    """``key=value`` tags (wandb allows 64 characters a tag)."""
    return [f"{key}={value}"[:_TAG_MAX] for key, value in grid.items()]


# -- publishing ---------------------------------------------------------------------------------------------


def output_files(run_dir: Path) -> list[Path]:
    """The run directory's files to publish, sorted: not wandb's, Hydra's, Lightning's logs, TensorBoard's or the
    checkpoints, and not inside a sub-run's directory (one with its own ``run_info.json``)."""
    from latentdyn.tracking.run import RUN_INFO_NAME

    run_dir = Path(run_dir)
    found: list[Path] = []
    for here, dirs, files in os.walk(run_dir):
        at = Path(here)
        dirs[:] = sorted(
            d
            for d in dirs
            if not (at == run_dir and d in _SKIP_TOP)
            and not d.startswith(".")
            and not (at / d / RUN_INFO_NAME).is_file()
        )
        found.extend(at / f for f in sorted(files))
    return found


def _key(kind: str, path: Path, run_dir: Path) -> str:
    return f"{kind}/{path.relative_to(run_dir).with_suffix('').as_posix()}"


def publish_outputs(wb_run: Any, run_dir: Path) -> dict[str, Any]:
    """Log ``run_dir``'s plots, audio, tables and per-step curves to ``wb_run`` in one step; returns what was
    logged, by key."""
    import wandb

    run_dir = Path(run_dir)
    files = output_files(run_dir)
    payload: dict[str, Any] = {}
    for path in (p for p in files if p.suffix.lower() == ".png"):
        payload[_key("plots", path, run_dir)] = wandb.Image(str(path))
    payload.update(_audio(run_dir, [p for p in files if p.suffix.lower() == ".wav"]))
    for path in (p for p in files if p.suffix.lower() == ".csv"):
        columns, rows = read_table(path)
        if not columns:
            continue
        if len(rows) > MAX_TABLE_ROWS:
            log.info("wandb: %s has %d rows; logging the first %d", path, len(rows), MAX_TABLE_ROWS)
            rows = rows[:MAX_TABLE_ROWS]
        payload[_key("tables", path, run_dir)] = wandb.Table(columns=columns, data=rows)
        if path.name == "per_step.csv":
            prefix = path.parent.relative_to(run_dir).as_posix()
            for metric, (xs, ys, keys) in per_step_curves(columns, rows).items():
                key = "/".join(p for p in ("per_step", prefix if prefix != "." else "", metric) if p)
                payload[key] = wandb.plot.line_series(
                    xs=xs, ys=ys, keys=keys, title=metric, xname="step", split_table=True
                )
    if payload:
        wb_run.log(payload)
        log.info("wandb: published %d outputs of %s", len(payload), run_dir)
    return payload


def _audio(run_dir: Path, wavs: list[Path]) -> dict[str, Any]:
    import soundfile as sf
    import wandb

    # Listening files first, their copies at the representation's native rate after.
    wavs = sorted(wavs, key=lambda p: (any(_NATIVE_RATE_DIR.fullmatch(part) for part in p.parent.parts), p))
    if len(wavs) > MAX_AUDIO:
        log.info(
            "wandb: logging %d of the %d WAV files of %s (the rest are in the run directory)",
            MAX_AUDIO,
            len(wavs),
            run_dir,
        )
    out: dict[str, Any] = {}
    for path in wavs[:MAX_AUDIO]:
        try:
            info = sf.info(str(path))
        except Exception as exc:
            log.info("wandb: skipping unreadable %s (%s)", path, exc)
            continue
        caption = f"{path.relative_to(run_dir).as_posix()} · {info.samplerate} Hz · {info.duration:.2f} s"
        out[_key("audio", path, run_dir)] = wandb.Audio(
            str(path), sample_rate=int(info.samplerate), caption=caption
        )
    return out


def _number(text: str) -> float | int | None | str:
    text = text.strip()
    if text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            return text
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_table(path: Path) -> tuple[list[str], list[list[Any]]]:
    """A CSV's header and rows, a column's cells numbers (non-finite: None) when all of them parse as numbers,
    else text (a wandb Table column holds one type)."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        columns = next(reader, [])
        raw = [row + [""] * (len(columns) - len(row)) for row in reader if row]
    parsed = [[_number(cell) for cell in row[: len(columns)]] for row in raw]
    for j in range(len(columns)):
        if any(isinstance(row[j], str) for row in parsed):
            for row, text in zip(parsed, raw, strict=True):
                row[j] = text[j]
    return columns, parsed


def per_step_curves(
    columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> dict[str, tuple[list[list[Any]], list[list[Any]], list[str]]]:
    """The line charts of a ``per_step.csv``, by metric: ``(xs, ys, keys)``, one line per mode / condition.

    Two layouts: tidy (``mode, step, metric, mean, lo, hi``: the ``mean`` of each metric) and wide (``strategy,
    step, <metric>...``: each numeric column). The lines are named by the text columns' values."""
    if "step" not in columns:
        return {}
    index = {name: j for j, name in enumerate(columns)}
    text_cols = [
        c for c in columns if c not in ("step", "metric") and any(isinstance(r[index[c]], str) for r in rows)
    ]
    series: dict[str, dict[str, tuple[list[Any], list[Any]]]] = {}

    def add(metric: str, row: Sequence[Any], value: Any) -> None:
        label = " / ".join(str(row[index[c]]) for c in text_cols) or metric
        xs, ys = series.setdefault(metric, {}).setdefault(label, ([], []))
        xs.append(row[index["step"]])
        ys.append(value if isinstance(value, int | float) else None)

    if "metric" in index and "mean" in index:
        for row in rows:
            add(str(row[index["metric"]]), row, row[index["mean"]])
    else:
        numeric = [c for c in columns if c != "step" and c not in text_cols]
        for row in rows:
            for name in numeric:
                add(name, row, row[index[name]])
    return {
        metric: ([xs for xs, _ in lines.values()], [ys for _, ys in lines.values()], list(lines))
        for metric, lines in series.items()
    }


def publish_summary(wb_run: Any, metrics: Mapping[str, Any]) -> None:
    """The run's key metrics into its wandb summary (the runs table's and parallel coordinates' columns)."""
    for key, value in metrics.items():
        wb_run.summary[str(key)] = value
