"""Exp 2: the injection diagnostic of a trained dynamics model (the reference's protocol).

From seeded start points of the evaluation split (16 utterances × 8 starts), the model is rolled forward
K = 16 steps in four modes as one batch: GT injected after every step (A_teacher), after steps 4, 8, 12
(B_periodic), after step 1 (C_one_shot) or never (D_rollout); an injection replaces the state frame only. At
every step the true one-frame delta is scored under the current context: NLL and ΔNLL against the model
family's unconditional baseline, cos and magnitude ratio of the point prediction, and the state error before
the step. The latent store is the one the checkpoint was trained on (its embedded data and representation).
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from latentdyn.diagnostics.plots import figure_title
from latentdyn.pipeline.injection import (
    KEY_SUMMARIES,
    dynamics_checkpoint,
    injection_diagnostic,
    store_of_checkpoint,
)
from latentdyn.tracking.run import METRICS_NAME, write_json

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    from latentdyn.models.dynamics import load_dynamics

    ckpt = dynamics_checkpoint(str(cfg.checkpoint), Path(cfg.paths.manifest), int(cfg.horizon_k))
    log.info("checkpoint: %s", ckpt)
    model = load_dynamics(ckpt)
    store = store_of_checkpoint(cfg, model.run_config)
    correction = instantiate(cfg.correction) if cfg.correction.get("_target_") else None
    result = injection_diagnostic(model.net, store, cfg.diagnostic, correction)
    title = figure_title(cfg.name, cfg.run_id, horizon=int(model.horizon))
    paths = result.write(Path(cfg.run_dir), frame_rate=store.frame_rate, title=title)
    write_json(Path(cfg.run_dir) / METRICS_NAME, {"metrics": result.to_metrics(), "checkpoint": str(ckpt)})
    for path in paths:
        log.info("wrote %s", path)
    metrics = {key: value for key, value in result.to_metrics().items() if key.endswith(KEY_SUMMARIES)}
    metrics["horizon_k"] = float(model.horizon)
    return metrics
