"""Composite experiments: run other experiments' pipelines as tracked sub-runs of one job.

Each sub-run gets its own directory inside the parent's (``<run_dir>/<experiment>/``), its own
``config.yaml``, ``run_info.json``, ``run.log`` and manifest lines, with ``run_id``
``<parent run_id>/<experiment>`` and ``parent_run_id`` set, so the results table lists it like any run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from latentdyn.experiments.common import plain
from latentdyn.tracking.run import tracked_run

log = logging.getLogger(__name__)


def sub_config(parent: DictConfig, experiment: str, tier: str, **values: Any) -> DictConfig:
    """The parent's config for a sub-run of ``experiment``: its own name, tier and run dir, plus ``values``."""
    cfg = OmegaConf.create(plain(parent))
    with open_dict(cfg):
        cfg.name = experiment
        cfg.tier = tier
        cfg.run_dir = str(Path(parent.run_dir) / experiment)
        cfg.run_id = f"{parent.run_id}/{experiment}"
        for key, value in values.items():
            OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def run_sub_experiment(
    parent: DictConfig,
    experiment: str,
    pipeline: Callable[[DictConfig], Mapping[str, Any]],
    tier: str = "tier1",
    **values: Any,
) -> tuple[DictConfig, dict[str, Any]]:
    """Run ``pipeline`` as a tracked sub-run; returns its config and key metrics (exceptions propagate)."""
    cfg = sub_config(parent, experiment, tier, **values)
    log.info("sub-run %s -> %s", cfg.run_id, cfg.run_dir)
    with tracked_run(
        run_dir=Path(cfg.run_dir),
        manifest_path=Path(cfg.paths.manifest),
        run_id=str(cfg.run_id),
        experiment=experiment,
        tier=tier,
        config=plain(cfg),
        parent_run_id=str(parent.run_id),
    ) as run:
        run.result = dict(pipeline(cfg))
    return cfg, dict(run.result)
