"""Exp 9: does an adversarially trained VAE bottleneck inside a real codec give latents a dynamics model can follow?

Method (the reference study's Exp 9). pocket-tts's Mimi (``representation=pocket_mimi``: 32-d latents at
12.5 Hz from 24 kHz audio) gets a ``latent_dim``-d VAE bottleneck on its latent, with a ``dec_proj`` back into
the codec's space (:mod:`latentdyn.models.vae_gan`). With ``init=pretrained`` the codec starts from its
pretrained weights, its encoder frozen and its decoder fine-tuned; with ``init=scratch`` all of it trains from
random weights (the reference's last runs). The generator's loss is reconstruction (waveform L1 +
multi-resolution STFT) + a ramped, per-element KL + the alignment of ``dec_proj(mu)`` with the codec's latent
+ a causal predictability loss on ``mu`` + hinge adversarial and feature-matching losses against EnCodec's
MS-STFT discriminator + distillation of WavLM's layer 7 into ``mu``, each switched on at its configured step.
It trains on 4 s crops of the train speakers (batch 4, 50k steps, two AdamW optimisers at 1e-4), writing
listening samples of held-out utterances at fixed steps.

The trained bottleneck is then a representation (``representation=pocket_vae``): the corpus is encoded with
the posterior mean into a latent store, which gets Phase 1 (the reference's MDN per horizon k = 1, 2, 4, 8 with
the battery and the rollout block, and the injection diagnostic of the k = 1 model), and reconstructions of
eval-speaker utterances are scored against the original and, with ``init=pretrained``, against the codec the
VAE-GAN started from.

Fixed here: the reference trained on its eval speakers' audio and scored reconstructions on them; its
decoder's attention cache held 1/16 of the clip; its ``dec_proj`` bypassed the codec's own 32-d latent space.

Outputs: ``checkpoints/vae_gan_final.ckpt``, ``samples/step_<step>/``, ``phase1/``, ``recon_metrics.json``
(listening files under ``samples/final/``), ``summary.csv`` (one row) and ``metrics.json``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from latentdyn.pipeline.common import write_csv_rows
from latentdyn.pipeline.phase1 import phase1_summary_columns, phase1_table_metrics, run_phase1
from latentdyn.pipeline.reconstruction import recon_key_metrics, recon_summary_columns, reconstruction_metrics
from latentdyn.pipeline.vae_gan import train_vae_gan, vae_gan_reconstructor, vae_gan_store
from latentdyn.tracking.run import METRICS_NAME, write_json

log = logging.getLogger(__name__)

RECON_NAME = "recon_metrics.json"
#: Results-table entries besides the horizons' ``dnll`` / ``cos``: the reference's summary columns.
SUMMARY_RECON = ("l1", "mel_l1", "mrstft", "si_sdr", "stoi", "pesq_wb")


def summary_row(cfg: DictConfig, metrics: dict[str, float]) -> dict[str, Any]:
    """``summary.csv``'s row: the setting, Phase 1 ``dnll``/``cos`` per horizon with the reference's
    ``best_eval_dnll`` (the lowest), the injection summaries per mode (the reference's ``rollout_state_err`` and
    ``rollout_cos`` are ``D_rollout``'s), and the reconstruction distances."""
    row: dict[str, Any] = {
        "experiment": str(cfg.name),
        "init": str(cfg.init),
        "latent_dim": int(cfg.latent_dim),
        "max_steps": int(cfg.max_steps),
    }
    row.update(phase1_summary_columns(metrics, cfg.horizons, "best_eval_dnll"))
    row["rollout_state_err"] = metrics.get("D_rollout/state_err", math.nan)
    row["rollout_cos"] = metrics.get("D_rollout/cos", math.nan)
    row.update(recon_summary_columns(metrics, SUMMARY_RECON))
    return row


def base_codec(cfg: DictConfig, model: Any) -> Any | None:
    """The codec the VAE-GAN started from (``cfg.representation``, as its weights were loaded), to score its
    reconstructions against; None with ``init=scratch`` (it started from random weights)."""
    from hydra.utils import instantiate

    if str(model.hparams.init) != "pretrained":
        return None
    return instantiate(cfg.representation)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train the VAE-GAN, encode the corpus with it, Phase 1 on its latents, score its reconstructions."""
    from latentdyn.models.training import job_logger
    from latentdyn.representations.extract import resolve_device

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with job_logger(cfg) as logger:
        model, checkpoint = train_vae_gan(cfg, logger)
        store = vae_gan_store(cfg, checkpoint)
        metrics = run_phase1(cfg, store, run_dir / "phase1", logger, label=str(store.meta["representation"]))
    recon_cfg = cfg.recon_eval
    device = resolve_device(cfg.extract.device)
    codec = base_codec(cfg, model)
    reconstructor = vae_gan_reconstructor(model.to(device), codec.to(device) if codec is not None else None)
    recon = reconstruction_metrics(
        cfg,
        reconstructor,
        run_dir,
        n_utterances=int(recon_cfg.n_utterances),
        max_seconds=float(recon_cfg.max_seconds),
        n_samples=int(recon_cfg.n_samples),
        samples_dir="samples/final",
    )
    write_json(run_dir / RECON_NAME, recon)
    metrics.update(recon_key_metrics(recon, reconstructor.comparisons))
    row = summary_row(cfg, metrics)
    write_csv_rows([row], run_dir / "summary.csv")
    details = {"checkpoint": str(checkpoint), "latent_store": str(store.root), "init": str(cfg.init)}
    write_json(run_dir / METRICS_NAME, {"key_metrics": metrics, "summary": row, **details})
    log.info("summary: %s", run_dir / "summary.csv")
    return table_metrics(metrics)


def table_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The results-table entries: Phase 1's (:func:`phase1_table_metrics`) and the reconstruction's distances to
    the original, with the starting codec's ``mel_l1`` (the ceiling) when it was scored."""
    keep = {f"recon/vs_original/{k}" for k in SUMMARY_RECON} | {"recon/base_codec_vs_original/mel_l1"}
    return phase1_table_metrics(metrics, keep)
