"""Exp 10: can an AR model over a discrete direction codebook and a continuous magnitude roll out stably?

Method (the reference study's Exp 10). The direction codebook of an Exp 8 run (K = 256 by default) fixes the
directions; :class:`~latentdyn.models.direction_ar.DirectionARModule` predicts, from the W = 8 previous raw
frames, logits over the K codewords (target: the codeword nearest in cosine to the true delta) and a LogNormal
over the delta's norm; loss CE + magnitude NLL, AdamW 3e-4, 20k steps, on the train speakers of the store the
codebook was fitted on. Evaluation on the eval speakers:

* teacher-forced: top-1 / top-5 accuracy of the nearest codeword, CE and magnitude NLL (nats per frame);
* free-running rollouts from 20 utterances × 5 seeded starts, k ≤ 16 steps, with ``argmax`` (most probable
  codeword, median magnitude: deterministic), ``categorical`` and ``top_p`` (p = 0.9) sampling: per step the
  state error before the step (Exp 2's convention) and after it, cos of the step to the true delta, and the
  direction accuracy; per k the error after k steps (:mod:`latentdyn.diagnostics.free_rollout`). From the
  first step the context holds the predicted frame (the reference appended the GT frame after step 1);
* argmax rollouts spliced into GT, decoded and compared with the decoded GT (``rollout_audio/``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from latentdyn.models.direction_ar import STRATEGIES
from latentdyn.pipeline.common import write_csv_rows
from latentdyn.pipeline.direction_ar import teacher_forced, train_direction_ar
from latentdyn.pipeline.stage3 import (
    AUDIO_DIR,
    Condition,
    direction_ar_stepper,
    evaluate_conditions,
    load_codebook,
    per_step_csv_rows,
    plot_state_err,
    rollout_audio,
    rollout_rows,
    rollout_segments,
)
from latentdyn.tracking.run import METRICS_NAME, write_json

log = logging.getLogger(__name__)

PLOT_NAME = "state_err_vs_k.png"


def run(cfg: DictConfig) -> dict[str, float]:
    from latentdyn.models.training import job_logger

    run_dir = Path(cfg.run_dir)
    strategies = [str(s) for s in cfg.rollout.strategies]
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        raise ValueError(f"rollout.strategies must be among {STRATEGIES}, got {unknown}")
    codebook = load_codebook(cfg, str(cfg.codebook), int(cfg.codebook_size))
    store = codebook.store
    log.info("codebook %s (K=%d) on %s", codebook.source, codebook.size, store.root)
    with job_logger(cfg) as logger:
        model, ckpt, training = train_direction_ar(cfg, codebook, logger)

    tf = teacher_forced(model, store, str(cfg.split), cfg.teacher_forced.max_windows, int(cfg.seed))
    write_json(run_dir / "teacher_forced_metrics.json", tf)
    log.info(
        "teacher-forced on %s: top-1 %.3f, top-5 %.3f, CE %.3f nats",
        cfg.split,
        tf["top1"],
        tf["top5"],
        tf["ce"],
    )

    top_p = float(cfg.rollout.top_p)
    conditions = [
        Condition(s, direction_ar_stepper(model.net, s, top_p), None, int(cfg.seed)) for s in strategies
    ]
    segments = rollout_segments(cfg, store, model.context)
    results = evaluate_conditions(conditions, segments, list(cfg.rollout.k_values), codebook.vectors)
    write_json(
        run_dir / "rollout_metrics.json",
        {"n_segments": len(segments.starts), "starts": segments.starts, "strategies": results},
    )
    write_csv_rows(per_step_csv_rows(results), run_dir / "per_step.csv")
    plot_state_err(cfg, results, run_dir / PLOT_NAME, extra=f"direction AR K={codebook.size}")

    rows = [{"strategy": "teacher_forced", **{f"tf_{k}": v for k, v in tf.items()}}, *rollout_rows(results)]
    audio_means: dict[str, Any] = {}
    if not cfg.skip_audio and int(cfg.n_utterances) > 0:
        chosen = [c for c in conditions if c.name in {str(s) for s in cfg.audio.strategies}]
        entries, audio_means = rollout_audio(cfg, store, chosen, model.context)
        write_json(run_dir / AUDIO_DIR / "manifest.json", {"files": entries})
        rows += [{"strategy": f"audio_{name}", **d} for name, d in audio_means.items()]
    write_csv_rows(rows, run_dir / "summary.csv")

    key: dict[str, float] = {f"tf/{k}": float(tf[k]) for k in ("top1", "top5", "ce", "mag_nll")}
    for name, result in results.items():
        for k, h in result["horizons"].items():
            if h["final_state_err"] is not None:
                key[f"{name}/state_err_k{k}"] = float(h["final_state_err"])
    for name, d in audio_means.items():
        if d.get("log_mel") is not None:
            key[f"audio/{name}/log_mel"] = float(d["log_mel"])
    write_json(
        run_dir / METRICS_NAME,
        {
            "key_metrics": key,
            "checkpoint": str(ckpt),
            "codebook": str(codebook.source),
            "codebook_size": codebook.size,
            "latent_store": str(store.root),
            "training": training,
            "teacher_forced": tf,
            "audio": audio_means,
        },
    )
    return table_metrics(key, [int(k) for k in cfg.rollout.k_values])


def table_metrics(key: dict[str, float], k_values: list[int]) -> dict[str, float]:
    """The results-table entries (``metrics.json`` has every one): the teacher-forced scores, each strategy's
    state error after 4 steps and after the longest rollout, and the decoded rollouts' log-mel distances."""
    shown = {f"_k{k}" for k in (4, max(k_values))}
    return {
        name: value
        for name, value in key.items()
        if name.startswith(("tf/", "audio/")) or any(name.endswith(f"/state_err{k}") for k in shown)
    }
