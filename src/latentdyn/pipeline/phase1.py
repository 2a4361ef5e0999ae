"""The reference's Phase 1 on one latent store, written to one directory: a dynamics model per horizon with
the battery (and the rollout block), then the injection diagnostic of the k = 1 model. Exp 5 and Exp 9 run
it on each learned representation's store."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from latentdyn.data.latent_store import LatentStore
from latentdyn.diagnostics.battery import write_battery_table
from latentdyn.diagnostics.plots import figure_title
from latentdyn.pipeline.injection import injection_diagnostic, rollout_gap
from latentdyn.pipeline.train import KEY_METRICS, model_battery, train_horizon
from latentdyn.tracking.run import METRICS_NAME, write_json

log = logging.getLogger(__name__)


def phase1_config(cfg: DictConfig, out_dir: Path, store: LatentStore) -> DictConfig:
    """``cfg`` with its outputs (checkpoints, logs) under ``out_dir`` and the representation that made
    ``store`` (so the checkpoints name the latents they were trained on: Exp 2 and Exp 6 rebuild the store from
    them); the fits take ``cfg.trainer``."""
    p_cfg = cfg.copy()
    representation = (store.meta.get("extra") or {}).get("representation_config")
    with open_dict(p_cfg):
        p_cfg.run_dir = str(out_dir)
        if representation is not None:
            p_cfg.representation = representation
    return p_cfg


def run_phase1(cfg: DictConfig, store: LatentStore, out_dir: Path, logger: Any, label: str) -> dict[str, Any]:
    """Phase 1 of ``store`` into ``out_dir``: ``checkpoints/``, ``tables.csv`` (every battery row),
    ``injection_diag.json`` with ``per_step.csv`` and the injection plots, and ``metrics.json``.

    Returns the flat metrics: per horizon ``k{k}/{nll,dnll,cos,...}`` of the model on the training slice (and
    ``k{k}/rollout_gap_nll`` with the rollout block), and ``{mode}/{dnll,cos,mag_ratio,state_err,...}`` of the
    injection diagnostic. ``label`` names the latents in plot titles.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    p_cfg = phase1_config(cfg, out_dir, store)
    rows: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {"latent_store": str(store.root), "horizons": {}}
    models: dict[int, Any] = {}
    for k in (int(h) for h in p_cfg.horizons):
        model, ckpt, fit = train_horizon(p_cfg, store, k, logger)
        models[k] = model
        k_rows = model_battery(p_cfg, model, store)
        rows += k_rows
        details["horizons"][f"k{k}"] = {"checkpoint": str(ckpt), "fit": fit}
        for row in k_rows:
            if row["slice"] == p_cfg.datamodule.slice and row["predictor"] == "model":
                metrics.update({f"k{k}/{m}": float(row[m]) for m in KEY_METRICS if math.isfinite(row[m])})
        if p_cfg.get("rollout_gap") is not None and p_cfg.rollout_gap.enabled:
            gap = rollout_gap(model.net, store, p_cfg.diagnostic, int(p_cfg.rollout_gap.n_utterances))
            details["horizons"][f"k{k}"]["rollout_gap"] = gap
            metrics[f"k{k}/rollout_gap_nll"] = gap["gap_nll"]
    write_battery_table(rows, out_dir)
    one_frame = models[1] if 1 in models else train_horizon(p_cfg, store, 1, logger)[0]
    result = injection_diagnostic(one_frame.net, store, p_cfg.diagnostic)
    title = figure_title(cfg.name, cfg.run_id, horizon=1, extra=f"injection · {label} ({store.dim} dims)")
    result.write(out_dir, frame_rate=store.frame_rate, title=title)
    metrics.update(result.to_metrics())
    write_json(out_dir / METRICS_NAME, {"key_metrics": metrics, **details, "battery": rows})
    log.info("Phase 1 of %s: %s", label, out_dir)
    return metrics


def phase1_table_metrics(
    metrics: dict[str, float], keep: set[str] | frozenset[str] = frozenset()
) -> dict[str, float]:
    """The results-table entries of a Phase 1 run (its ``metrics.json`` has every one): per horizon ``k{k}/dnll``
    and ``cos``, per injection mode ``dnll``, ``cos`` and ``state_err_at_K``, and the keys in ``keep``."""
    out = {}
    for key, value in metrics.items():
        head, _, tail = key.rpartition("/")
        horizon = head.startswith("k") and head[1:].isdigit() and tail in ("dnll", "cos")
        injection = "_" in head and "/" not in head and tail in ("dnll", "cos", "state_err_at_K")
        if horizon or injection or key in keep:
            out[key] = value
    return out


#: Injection summaries per mode in summary tables, as ``{mode}_{summary}``.
INJECTION_COLUMNS = ("dnll", "cos", "state_err")


def phase1_summary_columns(metrics: dict[str, float], horizons: Sequence[int], best: str) -> dict[str, float]:
    """A summary-table row's Phase 1 columns from a run's key metrics: ``k{k}_dnll`` and ``k{k}_cos`` per horizon,
    the lowest finite ``dnll`` as ``best`` (the reference's ``best_dnll`` / ``best_eval_dnll``), and the injection
    modes' ``{mode}_{dnll,cos,state_err}``; NaN where a value is missing."""
    row: dict[str, float] = {}
    for k in (int(h) for h in horizons):
        for m in ("dnll", "cos"):
            row[f"k{k}_{m}"] = metrics.get(f"k{k}/{m}", math.nan)
    finite = [row[f"k{int(k)}_dnll"] for k in horizons if math.isfinite(row[f"k{int(k)}_dnll"])]
    row[best] = min(finite) if finite else math.nan
    modes = sorted({key.split("/")[0] for key in metrics if key.endswith("/state_err_at_K")})
    for mode in modes:
        for m in INJECTION_COLUMNS:
            row[f"{mode}_{m}"] = metrics.get(f"{mode}/{m}", math.nan)
    return row
