"""Phase 0: corpus -> speaker-disjoint splits -> latent store (each a cached artifact), and a summary of sizes.

``summary.json`` lists every audio file the data left out (``bad_files``: path, stage, reason; the count is
``bad_files_skipped``), whether this run built the artifacts or reused them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from latentdyn.data.corpus import total_hours
from latentdyn.pipeline.store import bad_files, prepare_latent_store, prepare_splits
from latentdyn.tracking.run import METRICS_NAME, write_json

log = logging.getLogger(__name__)

# Summary entries that go to the results table; summary.json and metrics.json have them all.
KEY_METRICS = (
    "dim",
    "train_utterances",
    "val_utterances",
    "test_utterances",
    "train_frames",
    "val_frames",
    "test_frames",
    "hours_audio",
    "bad_files_skipped",
)


def run(cfg: DictConfig) -> dict[str, float]:
    """Build (or reuse) Phase 0 artifacts and report their sizes."""
    # The store first: it loads the representation's weights before any corpus work, so missing weights
    # end the run at once instead of after a LibriSpeech download.
    store = prepare_latent_store(cfg)
    splits = prepare_splits(cfg)
    skipped = bad_files(store)  # prepare_latent_store has warned with their count
    for bad in skipped:
        log.info("bad audio file skipped at %s: %s (%s)", bad.stage, bad.path, bad.reason)
    metrics: dict[str, float] = dict(store.summary())
    metrics["hours_audio"] = round(sum(total_hours(u) for u in splits.values()), 6)
    metrics["bad_files_skipped"] = float(len(skipped))
    run_dir = Path(cfg.run_dir)
    write_json(run_dir / METRICS_NAME, metrics)
    write_json(
        run_dir / "summary.json",
        {
            "metrics": metrics,
            "latent_store": str(store.root),
            "bad_files": [b.to_dict() for b in skipped],
            "meta": store.meta,
        },
    )
    log.info("latent store: %s (%d frames x %d dims)", store.root, store.n_frames, store.dim)
    return {key: metrics[key] for key in KEY_METRICS}
