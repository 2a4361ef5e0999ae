"""The Hydra application behind ``latentdyn`` and ``python -m latentdyn``.

Imports only Hydra and OmegaConf at module level so that ``--help`` and ``--cfg job`` stay fast; the
experiment's pipeline (and with it torch / lightning) is imported only when a job runs.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import hydra
from hydra.utils import get_method
from omegaconf import DictConfig

from latentdyn.config import conf_dir, register_resolvers
from latentdyn.errors import user_facing

log = logging.getLogger("latentdyn")

register_resolvers()


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
