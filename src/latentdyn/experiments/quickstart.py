"""The offline quickstart: Phase 0 -> Exp 1 (k = 1) -> Exp 2 on the configured data and representation,
then a compact table of those runs (the full one in ``results_table.md``) and the paths of the plots."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import get_method
from omegaconf import DictConfig

from latentdyn.jsonio import write_text_atomic
from latentdyn.pipeline.common import checkpoint_dir
from latentdyn.pipeline.composite import run_sub_experiment
from latentdyn.tracking.manifest import iter_records
from latentdyn.tracking.report import compact_runs
from latentdyn.tracking.results import render_markdown, summarize_runs

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    _, p0 = run_sub_experiment(cfg, "phase0", get_method(cfg.steps.phase0), tier="phase0")
    exp1_cfg, e1 = run_sub_experiment(
        cfg, "exp1_vmf", get_method(cfg.steps.exp1_vmf), horizons=[int(cfg.horizon_k)]
    )
    checkpoint = checkpoint_dir(exp1_cfg) / f"{cfg.model.name}_k{cfg.horizon_k}_final.ckpt"
    exp2_cfg, e2 = run_sub_experiment(
        cfg, "exp2_injection", get_method(cfg.steps.exp2_injection), checkpoint=str(checkpoint)
    )

    runs = [
        r
        for r in summarize_runs(iter_records(Path(cfg.paths.manifest)))
        if r.run_id.startswith(f"{cfg.run_id}/")
    ]
    table = Path(cfg.run_dir) / "results_table.md"
    write_text_atomic(table, render_markdown([r for r in runs if r.status == "completed"], runs))
    print("\n" + compact_runs([r for r in runs if r.status == "completed"]))
    plots = sorted(Path(exp2_cfg.run_dir).glob("*.png"))
    print("Plots:\n" + "\n".join(f"  {p}" for p in plots))
    print(f"Battery table: {Path(exp1_cfg.run_dir) / 'tables.csv'}")
    print(f"Results table: {table}")
    k = int(cfg.horizon_k)
    return {
        "train_frames": p0["train_frames"],
        **{key: e1[key] for key in (f"k{k}/nll", f"k{k}/dnll", f"k{k}/cos") if key in e1},
        **{key: value for key, value in e2.items() if key.endswith(("/dnll", "/state_err_at_K"))},
    }
