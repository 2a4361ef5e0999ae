"""Exp 5's steps: train a β-VAE over the run's representation on audio crops of the train speakers, encode the
corpus with it (its latent store), and score its reconstructions of eval-speaker audio."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from latentdyn import artifacts
from latentdyn.data.audio import BAD_FILES_NAME, read_bad_files
from latentdyn.data.audio_cache import AudioCache
from latentdyn.data.corpus import Utterance
from latentdyn.data.latent_store import LatentStore
from latentdyn.pipeline.common import budgeted_trainer, checkpoint_dir, plain
from latentdyn.pipeline.reconstruction import Reconstructor
from latentdyn.pipeline.store import checkpoint_store, prepare_splits, splits_spec
from latentdyn.tracking.run import record_weights

log = logging.getLogger(__name__)

FINAL_NAME = "betavae_final.ckpt"
LAST_NAME = "betavae_last.ckpt"
#: The pairs Exp 5 scores: (name, reference signal, estimate).
COMPARISONS = (
    ("vs_original", "original", "betavae"),
    ("vs_base_codec", "base", "betavae"),
    ("base_codec_vs_original", "original", "base"),
)


def training_precision(value: str) -> str:
    """Lightning precision of the β-VAE's training: ``auto`` = bf16 autocast on a GPU that has it, fp16
    autocast (with loss scaling) on one that does not, full fp32 on CPU; anything else is passed as is."""
    if value != "auto":
        return value
    if not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def build_betavae(cfg: DictConfig) -> Any:
    """The :class:`~latentdyn.models.betavae.BetaVAEModule` ``cfg.vae`` names (``_target_``), over the run's
    representation (``cfg.representation``, the base), embedding the run's config in its checkpoints."""
    from hydra.utils import instantiate

    return instantiate(
        plain(cfg.vae),
        _recursive_=False,
        _convert_="all",
        base=plain(cfg.representation),
        run_config=plain(cfg),
    )


AUDIO_CACHE_VERSION = 1


def prepare_audio_cache(cfg: DictConfig, splits: dict[str, list[Utterance]], sample_rate: int) -> AudioCache:
    """The train and val splits' audio decoded at ``sample_rate`` (artifact ``audio``; see
    :mod:`latentdyn.data.audio_cache`), built once and shared by every run that crops them."""
    from latentdyn.data.audio_cache import write_audio_cache

    names = ("train", "val")
    spec = {
        "version": AUDIO_CACHE_VERSION,
        "splits": splits_spec(cfg),
        "names": list(names),
        "sample_rate": int(sample_rate),
        "on_bad_audio": cfg.data.on_bad_audio,
    }

    def build(tmp: Path) -> None:
        write_audio_cache([u for n in names for u in splits[n]], sample_rate, tmp, cfg.data.on_bad_audio)

    path = artifacts.get_or_build(Path(cfg.paths.cache_dir), "audio", spec, build, force=cfg.force)
    skipped = read_bad_files(path / BAD_FILES_NAME)
    if skipped:
        log.warning(
            "%d bad audio files left out of the training audio; the list is in %s",
            len(skipped),
            path / BAD_FILES_NAME,
        )
    return AudioCache(path)


def crop_datamodule(cfg: DictConfig, sample_rate: int, settings: DictConfig | None = None) -> Any:
    """Random audio crops of the train split (centred ones of val for validation) as ``settings`` says
    (``cfg.vae_train`` by default: ``crop_seconds``, ``batch_size``, ``num_workers``, ...); from the
    audio cache (``vae_train.audio_cache``, default) or read and resampled per crop."""
    from latentdyn.data.audio_crops import AudioCropDataModule, default_crop_workers

    train = cfg.vae_train if settings is None else settings
    splits = {name: utts for name, utts in prepare_splits(cfg).items() if name in ("train", "val")}
    cache = prepare_audio_cache(cfg, splits, sample_rate) if train.get("audio_cache", True) else None
    workers = train.num_workers
    if workers is None:
        workers = default_crop_workers(cache is not None, torch.cuda.is_available())
    return AudioCropDataModule(
        splits,
        sample_rate=int(sample_rate),
        crop_seconds=float(train.crop_seconds),
        batch_size=int(train.batch_size),
        num_workers=int(workers),
        seed=int(cfg.seed),
        max_val_crops=train.max_val_crops,
        cache=cache,
    )


def train_betavae(cfg: DictConfig, logger: Any) -> tuple[Any, Path]:
    """Train the β-VAE for ``cfg.max_steps`` steps; returns the model (eval mode) and its final checkpoint.

    Resumable like every fit (``checkpoints/betavae_last.ckpt`` every ``checkpointing.every_n_steps``); with
    ``cfg.resume`` a finished fit (its ``betavae_final.ckpt``) is loaded instead of trained again.
    """
    from latentdyn.models.betavae import load_betavae
    from latentdyn.models.training import fit, save_final_checkpoint, seed_everything

    final = checkpoint_dir(cfg) / FINAL_NAME
    if cfg.resume and final.is_file():
        log.info("resume: the β-VAE is already trained (%s); not training it again", final)
        model = load_betavae(final)
        record_weights(model.base.name, model.base.weights)
        return model, final
    last = checkpoint_dir(cfg) / LAST_NAME
    seed_everything(cfg.seed)
    model = build_betavae(cfg)
    record_weights(model.base.name, model.base.weights)
    datamodule = crop_datamodule(cfg, model.base.sample_rate)
    trainer = budgeted_trainer(
        cfg, logger, last, cfg.vae_train, precision=training_precision(str(cfg.vae_train.precision))
    )
    log.info(
        "training the β-VAE (%s reconstruction, D=%d, beta=%g, lambda_smooth=%g, lambda_pred=%g) over %s for %d steps",
        model.reconstruction,
        model.latent_dim,
        model.hparams.beta,
        model.hparams.lambda_smooth,
        model.hparams.lambda_pred,
        model.base.name,
        int(cfg.max_steps),
    )
    fit(trainer, model, last, bool(cfg.resume), datamodule=datamodule)
    save_final_checkpoint(trainer, final, last)
    return model.eval(), final


def betavae_store(cfg: DictConfig, checkpoint: Path) -> LatentStore:
    """The corpus encoded by the β-VAE of ``checkpoint`` (``representation=betavae``): a cached latent store."""
    return checkpoint_store(cfg, "latentdyn.representations.betavae.BetaVAERepresentation", checkpoint)


def betavae_reconstructor(model: Any) -> Reconstructor:
    """What Exp 5 scores for an utterance: its β-VAE's reconstruction (deterministic: the posterior mean) and the
    base codec's own, against the original and each other (:data:`COMPARISONS`)."""

    def signals(wave: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = wave[None, None].to(model.device)
        with torch.no_grad():
            base = model.base.decode(model.encode_base(batch))
            vae = model.decode_latents(model.encode_mean(batch))
        return {"base": base[0, 0].float().cpu(), "betavae": vae[0, 0].float().cpu()}

    return Reconstructor(int(model.base.sample_rate), float(model.base.frame_rate), signals, COMPARISONS)
