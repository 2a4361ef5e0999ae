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

Seeds (``seeds``, see :mod:`latentdyn.pipeline.seeds`): each variant's β-VAE (and so its latents and Phase 1) is
trained once per seed. With several seeds each is the sub-run ``<run_dir>/seed<s>/<variant>/`` (run id
``<run_id>/seed<s>/<variant>``, so ``latest:exp5_betavae/<variant>`` names the newest completed seed's and
``latest:exp5_betavae/seed<s>/<variant>`` a given one); ``summary.csv`` holds each metric's mean with
``<col>_ci_low`` / ``<col>_ci_high`` (95 % bootstrap CI across seeds) and ``n_seeds``, ``summary_per_seed.csv``
the per-seed rows, and ``dnll_vs_horizon.png`` and ``injection_ci/<variant>/`` plot the means with their CI
bands. ``resume=true`` skips each completed (variant, seed).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from latentdyn.diagnostics.plots import figure_title
from latentdyn.pipeline.betavae import COMPARISONS, betavae_reconstructor, betavae_store, train_betavae
from latentdyn.pipeline.composite import completed_runs, run_sub_experiment
from latentdyn.pipeline.phase1 import phase1_summary_columns, phase1_table_metrics, run_phase1
from latentdyn.pipeline.reconstruction import recon_key_metrics, recon_summary_columns, reconstruction_metrics
from latentdyn.pipeline.seeds import (
    add_key_metric,
    n_seeds_metric,
    plot_dnll_vs_horizon,
    run_seeds,
    seed_label,
    several,
    write_injection_bands,
    write_summaries,
)
from latentdyn.tracking.run import METRICS_NAME, write_json

log = logging.getLogger(__name__)

RECON_NAME = "recon_metrics.json"
#: Per-variant entries that go to the results table of the parent run (the reference's two).
KEY_COLUMNS = ("best_dnll", "recon_mel_l1")
RECON_TABLE_KEYS = ("mel_l1", "mrstft", "si_sdr", "stoi", "pesq_wb")
# The columns that name a variant in summary.csv (the rest are metrics, averaged over seeds).
SUMMARY_KEYS = ("variant", "beta", "lambda_smooth", "lambda_pred", "latent_dim")


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


def variant_metrics(cfg: DictConfig, label: str) -> dict[str, float]:
    """Every key metric of a completed variant sub-run ``label`` (``<variant>`` or ``seed<s>/<variant>``: its
    ``metrics.json``), for the summary."""
    path = Path(cfg.run_dir) / label / METRICS_NAME
    return dict(json.loads(path.read_text())["key_metrics"])


def variant_metrics_record(cfg: DictConfig, label: str) -> dict[str, Any]:
    """The whole ``metrics.json`` of a variant sub-run ``label`` (its checkpoint, latent store, ...)."""
    return dict(json.loads((Path(cfg.run_dir) / label / METRICS_NAME).read_text()))


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
    seeds = run_seeds(cfg)
    done = completed_runs(Path(cfg.paths.manifest)) if cfg.resume else {}
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        for name in names:
            params = cfg.variants[name]
            label = seed_label(seed, seeds, name)
            if f"{cfg.run_id}/{label}" in done:
                log.info(
                    "resume: variant %s (seed %d) already completed, skipped (its outputs kept)", name, seed
                )
            else:
                log.info(
                    "variant %s, seed %d: beta=%g lambda_smooth=%g lambda_pred=%g",
                    name,
                    seed,
                    params.beta,
                    params.lambda_smooth,
                    params.lambda_pred,
                )
                run_sub_experiment(
                    cfg,
                    str(cfg.name),
                    run_variant,
                    tier=str(cfg.tier),
                    label=label,
                    **{
                        "vae.variant": name,
                        "vae.beta": float(params.beta),
                        "vae.lambda_smooth": float(params.lambda_smooth),
                        "vae.lambda_pred": float(params.lambda_pred),
                        "variant": name,
                        "seed": int(seed),
                        "seeds": None,
                    },
                )
            per_seed.append({"seed": seed, **summary_row(cfg, name, variant_metrics(cfg, label))})
    rows = write_summaries(per_seed, SUMMARY_KEYS, run_dir)
    if several(seeds):
        write_seed_plots(cfg, rows, names, seeds)
    key: dict[str, float] = {}
    for row in rows:
        for column in KEY_COLUMNS:
            add_key_metric(key, f"{row['variant']}/{column}", row, column, seeds)
    n_seeds_metric(key, seeds)
    write_json(
        run_dir / METRICS_NAME,
        {"key_metrics": key, "summary": rows, "variants": names, "seeds": seeds},
    )
    log.info("summary: %s", run_dir / "summary.csv")
    return key


def write_seed_plots(cfg: DictConfig, rows: list[dict[str, Any]], names: list[str], seeds: list[int]) -> None:
    """With several seeds: ``dnll_vs_horizon.png`` (each variant's Phase 1 ΔNLL per horizon, mean and CI band
    across seeds) and ``injection_ci/<variant>/`` (the injection curves' mean and CI band across seeds)."""
    run_dir = Path(cfg.run_dir)
    plot_dnll_vs_horizon(cfg, rows, len(seeds), "Phase 1")
    for name in names:
        phase1 = {seed: run_dir / seed_label(seed, seeds, name) / "phase1" for seed in seeds}
        store = variant_metrics_record(cfg, seed_label(seeds[0], seeds, name)).get("latent_store")
        meta = Path(store) / "meta.json" if store else None
        frame_rate = json.loads(meta.read_text()).get("frame_rate") if meta and meta.is_file() else None
        write_injection_bands(
            run_dir,
            name,
            phase1,
            title=figure_title(
                cfg.name, cfg.run_id, horizon=1, extra=f"injection · {name} · {len(seeds)} seeds"
            ),
            frame_rate=frame_rate,
        )
