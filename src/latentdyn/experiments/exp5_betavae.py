"""Exp 5: can a learned bottleneck make latents easier to model autoregressively?

Method (the reference study's Exp 5). A β-VAE (:mod:`latentdyn.models.betavae`) compresses the run's
representation (the base: Mimi, EnCodec or log-mel) into ``latent_dim`` = 32 dimensions at the base's frame
rate. Four variants differ only in the AR-friendliness weights added to ``recon + 0.01 KL``: none
(``baseline_betavae``), smoothness 0.1 (``betavae_smooth``), predictability 0.01 (``betavae_pred``), both
(``betavae_smooth_pred``). Each variant is trained on 4 s crops of the train speakers' audio (10k steps,
AdamW 1e-4, batch 32), then the whole corpus is encoded with the posterior mean into a latent store, and the
store gets Phase 1: the reference's MDN per horizon k = 1, 2, 4, 8 with the battery and the rollout block,
and the injection diagnostic of the k = 1 model. Reconstruction is scored on eval speakers' utterances with
the deterministic encoding, against the original audio and against the base codec's own reconstruction.

Fixed here (the reference trained on its eval speakers' audio and scored a sampled reconstruction): only the
train split's utterances are cropped for training, and reconstructions decode the posterior mean.

Each variant runs as a tracked sub-run (``<run_dir>/<variant>/``: ``checkpoints/betavae_final.ckpt``,
``phase1/`` with ``metrics.json``, ``tables.csv``, ``injection_diag.json`` and plots, ``recon_metrics.json``,
``samples/``); the run writes ``summary.csv`` (one row per variant) and ``metrics.json``. With
``resume=true`` completed variants are skipped and their metrics carried over.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from latentdyn.pipeline.betavae import COMPARISONS, betavae_reconstructor, betavae_store, train_betavae
from latentdyn.pipeline.common import write_csv_rows
from latentdyn.pipeline.composite import completed_runs, run_sub_experiment
from latentdyn.pipeline.phase1 import phase1_summary_columns, phase1_table_metrics, run_phase1
from latentdyn.pipeline.reconstruction import recon_key_metrics, recon_summary_columns, reconstruction_metrics
from latentdyn.tracking.run import METRICS_NAME, write_json

log = logging.getLogger(__name__)

RECON_NAME = "recon_metrics.json"
#: Per-variant entries that go to the results table of the parent run (the reference's two).
KEY_COLUMNS = ("best_dnll", "recon_mel_l1")
RECON_TABLE_KEYS = ("mel_l1", "mrstft", "si_sdr", "stoi", "pesq_wb")


def variant_names(cfg: DictConfig) -> list[str]:
    """The variants this run trains: ``variant`` when set (one of ``variants``), else all of them."""
    names = [str(n) for n in cfg.variants]
    if cfg.variant is None:
        return names
    if str(cfg.variant) not in names:
        raise ValueError(f"variant={cfg.variant!r} is not one of {names}")
    return [str(cfg.variant)]


def run_variant(cfg: DictConfig) -> dict[str, float]:
    """One variant: train the β-VAE, encode the corpus with it, Phase 1 on its latents, score reconstructions."""
    from latentdyn.models.training import job_logger
    from latentdyn.representations.extract import resolve_device

    run_dir = Path(cfg.run_dir)
    with job_logger(cfg) as logger:
        model, checkpoint = train_betavae(cfg, logger)
        store = betavae_store(cfg, checkpoint)
        metrics = run_phase1(cfg, store, run_dir / "phase1", logger, label=str(store.meta["representation"]))
    recon_cfg = cfg.recon_eval
    model.to(resolve_device(cfg.extract.device))
    recon = reconstruction_metrics(
        cfg,
        betavae_reconstructor(model),
        run_dir,
        n_utterances=int(recon_cfg.n_utterances),
        max_seconds=float(recon_cfg.max_seconds),
        n_samples=int(recon_cfg.n_samples),
    )
    write_json(run_dir / RECON_NAME, recon)
    metrics.update(recon_key_metrics(recon, COMPARISONS))
    details = {
        "checkpoint": str(checkpoint),
        "latent_store": str(store.root),
        "variant": str(cfg.vae.variant),
    }
    write_json(run_dir / METRICS_NAME, {"key_metrics": metrics, **details})
    return table_metrics(metrics)


def table_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A variant's results-table entries: Phase 1's (:func:`phase1_table_metrics`) and the distances of the
    β-VAE's reconstruction to the original (``recon/vs_original/*``) with the ceiling's ``mel_l1``."""
    keep = {f"recon/vs_original/{k}" for k in RECON_TABLE_KEYS} | {"recon/base_codec_vs_original/mel_l1"}
    return phase1_table_metrics(metrics, keep)


def variant_metrics(cfg: DictConfig, name: str) -> dict[str, float]:
    """Every key metric of a completed variant sub-run (its ``metrics.json``), for the summary."""
    path = Path(cfg.run_dir) / name / METRICS_NAME
    return dict(json.loads(path.read_text())["key_metrics"])


def summary_row(cfg: DictConfig, name: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """One ``summary.csv`` row from a variant's key metrics: its weights, Phase 1 ``dnll`` (and ``cos``) per
    horizon with the reference's ``best_dnll`` (the lowest), the injection summaries per mode, and the
    reconstruction distances (``recon_*`` vs the original, ``recon_vs_base_*``, ``base_codec_*`` the ceiling)."""
    params = cfg.variants[name]
    row: dict[str, Any] = {
        "variant": name,
        "beta": float(params.beta),
        "lambda_smooth": float(params.lambda_smooth),
        "lambda_pred": float(params.lambda_pred),
        "latent_dim": int(cfg.latent_dim),
    }
    row.update(phase1_summary_columns(metrics, cfg.horizons, "best_dnll"))
    row.update(recon_summary_columns(metrics))
    return row


def run(cfg: DictConfig) -> dict[str, float]:
    """Train, encode, diagnose and score every chosen variant as a sub-run; write ``summary.csv``."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    names = variant_names(cfg)
    done = completed_runs(Path(cfg.paths.manifest)) if cfg.resume else {}
    rows: list[dict[str, Any]] = []
    for name in names:
        params = cfg.variants[name]
        if f"{cfg.run_id}/{name}" in done:
            log.info("resume: variant %s already completed, skipped (its outputs kept)", name)
        else:
            log.info(
                "variant %s: beta=%g lambda_smooth=%g lambda_pred=%g",
                name,
                params.beta,
                params.lambda_smooth,
                params.lambda_pred,
            )
            run_sub_experiment(
                cfg,
                str(cfg.name),
                run_variant,
                tier=str(cfg.tier),
                label=name,
                **{
                    "vae.variant": name,
                    "vae.beta": float(params.beta),
                    "vae.lambda_smooth": float(params.lambda_smooth),
                    "vae.lambda_pred": float(params.lambda_pred),
                    "variant": name,
                },
            )
        rows.append(summary_row(cfg, name, variant_metrics(cfg, name)))
    write_csv_rows(rows, run_dir / "summary.csv")
    key = {
        f"{row['variant']}/{column}": float(row[column])
        for row in rows
        for column in KEY_COLUMNS
        if column in row and math.isfinite(float(row[column]))
    }
    write_json(run_dir / METRICS_NAME, {"key_metrics": key, "summary": rows, "variants": names})
    log.info("summary: %s", run_dir / "summary.csv")
    return key
