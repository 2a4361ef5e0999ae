"""Tier 1 in one command: Exp 1 -> Exp 2 (on Exp 1's checkpoint) -> Exp 3, as tracked sub-runs of one run id.

Each sub-experiment's config is composed from its own experiment file (``exp1_config``, ``exp2_config``,
``exp3_config``) with the command line's other overrides. With ``resume=true`` a sub-run whose
``completed`` line is in the manifest is skipped and its recorded metrics carried into tier1's; crashed or
failed ones run again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import get_method
from omegaconf import DictConfig

from latentdyn.pipeline.composite import (
    completed_runs,
    compose_experiment,
    inherited_overrides,
    run_sub_experiment,
)
from latentdyn.tracking.ranks import shared_path

log = logging.getLogger(__name__)

# Keys that belong to the tier1 job itself and are not passed on to its sub-experiments.
OWN_KEYS = (
    "experiment",
    "run_id",
    "resume",
    "exp1_config",
    "exp2_config",
    "exp3_config",
    "exp2_horizon_k",
    "name",
    "tier",
    "pipeline",
)


def run(cfg: DictConfig) -> dict[str, float]:
    overrides = inherited_overrides(cfg, OWN_KEYS)
    done = completed_runs(Path(cfg.paths.manifest)) if cfg.resume else {}
    key: dict[str, float] = {}

    def step(config_name: str, **values: Any) -> tuple[Path, dict[str, Any]]:
        sub = compose_experiment(config_name, overrides)
        run_id = f"{cfg.run_id}/{sub.name}"
        run_dir = Path(cfg.run_dir) / str(sub.name)
        if run_id in done:
            log.info("resume: sub-run %s already completed, skipped (its metrics carried over)", run_id)
            return run_dir, dict(done[run_id])
        _, metrics = run_sub_experiment(
            cfg, str(sub.name), get_method(sub.pipeline), tier=str(sub.tier), base=sub, **values
        )
        return run_dir, metrics

    exp1_dir, m1 = step(str(cfg.exp1_config))
    pattern = f"*_k{cfg.exp2_horizon_k}_final.ckpt"
    # In a data-parallel job every rank reads the checkpoints rank 0 wrote.
    exp1_dir = shared_path(exp1_dir)
    checkpoints = sorted((exp1_dir / "checkpoints").glob(pattern))
    if len(checkpoints) != 1:
        raise FileNotFoundError(
            f"tier1: expected one Exp 1 checkpoint {pattern} in {exp1_dir / 'checkpoints'} for exp2_horizon_k="
            f"{cfg.exp2_horizon_k}, found {[p.name for p in checkpoints]} (is k={cfg.exp2_horizon_k} in horizons?)"
        )
    _, m2 = step(str(cfg.exp2_config), checkpoint=str(checkpoints[0]), horizon_k=int(cfg.exp2_horizon_k))
    _, m3 = step(str(cfg.exp3_config))
    for prefix, metrics in (("exp1", m1), ("exp2", m2), ("exp3", m3)):
        key.update(
            {f"{prefix}/{k}": v for k, v in metrics.items() if k.endswith(("/dnll", "/state_err_at_K"))}
        )
    return key
