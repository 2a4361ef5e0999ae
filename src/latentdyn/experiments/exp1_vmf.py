"""Exp 1: a direction/magnitude (vMF x LogNormal) dynamics model per horizon k, and the Phase 1 battery.

For each k in ``horizons``: train on the configured window slice of the train split (the next one-frame delta
from the W frames ending k frames earlier), save ``checkpoints/<model>_k{k}_final.ckpt``, then evaluate the
battery on every slice of the evaluation split: NLL, ΔNLL against the unconditional baseline of the model's
family (uniform direction x LogNormal norm), cos and magnitude ratio of the point prediction, log-magnitude
R², with persistence (Δ = 0) and linear extrapolation as extra rows. The reference's rollout block then
free-runs whole test utterances and reports the gap between the NLL under the rollout's own context and under
teacher forcing (``rollout_gap``). ``model=gaussian_mdn`` gives the mixture-density model, same outputs.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from latentdyn.diagnostics.battery import write_battery_table
from latentdyn.pipeline.injection import rollout_gap
from latentdyn.pipeline.store import prepare_latent_store
from latentdyn.pipeline.train import KEY_METRICS, model_battery, train_horizon
from latentdyn.tracking.run import METRICS_NAME, write_json

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train per horizon, run the battery, write checkpoints, ``metrics.json`` and ``tables.csv``."""
    from latentdyn.models.training import job_logger

    store = prepare_latent_store(cfg)
    run_dir = Path(cfg.run_dir)
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {"latent_store": str(store.root), "slice": cfg.datamodule.slice, "horizons": {}}
    key: dict[str, float] = {}
    with job_logger(cfg) as logger:
        for k in cfg.horizons:
            model, ckpt, fit = train_horizon(cfg, store, int(k), logger)
            k_rows = model_battery(cfg, model, store)
            rows += k_rows
            details["horizons"][f"k{k}"] = {"checkpoint": str(ckpt), "fit": fit, "battery": k_rows}
            if cfg.rollout_gap.enabled:
                gap = rollout_gap(model.net, store, cfg.diagnostic, int(cfg.rollout_gap.n_utterances))
                details["horizons"][f"k{k}"]["rollout_gap"] = gap
                key.update(
                    {f"k{k}/rollout_gap_nll": gap["gap_nll"], f"k{k}/rollout_dnll": gap["rollout_dnll"]}
                )
            for row in k_rows:
                if row["slice"] != cfg.datamodule.slice:
                    continue
                prefix = f"k{k}/" if row["predictor"] == "model" else f"k{k}/{row['predictor']}_"
                key.update({prefix + m: float(row[m]) for m in KEY_METRICS if math.isfinite(row[m])})
        if logger is not None:
            logger.log_metrics({f"battery/{name}": value for name, value in key.items()})
    write_battery_table(rows, run_dir)
    write_json(run_dir / METRICS_NAME, {"key_metrics": key, **details})
    log.info("battery table: %s", run_dir / "tables.csv")
    return key
