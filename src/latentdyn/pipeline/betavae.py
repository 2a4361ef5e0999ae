"""Exp 5's steps: train a β-VAE over the run's representation on audio crops of the train speakers, encode the
corpus with it (its latent store), and score its reconstructions of eval-speaker audio."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, open_dict

from latentdyn import artifacts
from latentdyn.data.audio import BAD_FILES_NAME, load_audio, read_bad_files
from latentdyn.data.audio_cache import AudioCache
from latentdyn.data.corpus import Utterance
from latentdyn.data.latent_store import LatentStore
from latentdyn.diagnostics.audio_io import objective_distances, write_listening_wav
from latentdyn.diagnostics.audio_metrics import AUDIO_METRIC_KEYS, align, log_mel_l1, waveform_l1
from latentdyn.pipeline.common import budgeted_trainer, checkpoint_dir, plain
from latentdyn.pipeline.store import prepare_latent_store, prepare_splits, splits_spec
from latentdyn.tracking.run import record_weights

log = logging.getLogger(__name__)

FINAL_NAME = "betavae_final.ckpt"
LAST_NAME = "betavae_last.ckpt"
#: Distances of a reconstruction, in the order of recon_metrics.json: the reference's two, then ours.
RECON_KEYS = ("l1", "mel_l1", *AUDIO_METRIC_KEYS)
#: The pairs scored: (name, reference signal, estimate).
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


def crop_datamodule(cfg: DictConfig, sample_rate: int) -> Any:
    """Random audio crops of the train split (centred ones of val for validation), ``cfg.vae_train``; from the
    audio cache (``vae_train.audio_cache``, default) or read and resampled per crop."""
    from latentdyn.data.audio_crops import AudioCropDataModule, default_crop_workers

    train = cfg.vae_train
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
    store_cfg = cfg.copy()
    with open_dict(store_cfg):
        store_cfg.representation = {
            "_target_": "latentdyn.representations.betavae.BetaVAERepresentation",
            "checkpoint": str(Path(checkpoint).resolve()),
        }
    return prepare_latent_store(store_cfg)


def eval_utterances(cfg: DictConfig, n: int, max_seconds: float) -> list[Utterance]:
    """The first ``n`` utterances of the eval split (``cfg.battery.split``, speakers the β-VAE never heard)
    no longer than ``max_seconds``."""
    utts = [u for u in prepare_splits(cfg)[str(cfg.battery.split)] if u.duration <= max_seconds]
    return utts[:n]


def _signals(model: Any, utt: Utterance) -> dict[str, torch.Tensor]:
    """The original audio of ``utt`` at the model's rate, its base-codec reconstruction and its β-VAE one
    (deterministic: the posterior mean), each ``(S,)`` on CPU."""
    rate = int(model.base.sample_rate)
    wave = load_audio(utt.path, rate)
    batch = wave[None, None].to(model.device)
    with torch.no_grad():
        base = model.base.decode(model.encode_base(batch))
        vae = model.decode_latents(model.encode_mean(batch))
    return {"original": wave, "base": base[0, 0].float().cpu(), "betavae": vae[0, 0].float().cpu()}


def _distances(
    reference: torch.Tensor, estimate: torch.Tensor, rate: int, hop: int
) -> dict[str, float | None]:
    """:data:`RECON_KEYS` of a decoded signal against its reference; their lengths may differ by up to one frame
    (``hop`` samples: a codec pads the last frame, log-mel drops a partial one) and the common prefix is scored."""
    ref, est = align(reference, estimate, rtol=0.0, atol=hop)
    return {
        "l1": waveform_l1(ref, est),
        "mel_l1": log_mel_l1(ref, est, rate),
        **objective_distances(ref, est, rate),
    }


def reconstruction_metrics(
    cfg: DictConfig, model: Any, out_dir: Path, n_utterances: int, max_seconds: float, n_samples: int
) -> dict[str, Any]:
    """Score the β-VAE's deterministic reconstructions of eval-speaker utterances (DESIGN §9: statistics fitted
    on train speakers, reconstruction scored on others, ``mu`` not a sample).

    For each utterance: the distances (:data:`RECON_KEYS`) of the β-VAE's audio to the original
    (``vs_original``) and to the base codec's own reconstruction (``vs_base_codec``), and of the base codec's
    to the original (``base_codec_vs_original``, the ceiling). The first ``n_samples`` utterances are written
    as listening files ``samples/<utt>/{original,base,betavae}.wav`` (48 kHz, and at the model's rate).

    Returns ``recon_metrics.json``'s content: per comparison the mean and std of each distance over the
    utterances, the per-utterance rows, the sample files, and the reference's own keys (``l1_mean``,
    ``l1_std``, ``mel_distance_mean``, ``mel_distance_std``: β-VAE vs original).
    """
    rate = int(model.base.sample_rate)
    hop = round(rate / float(model.base.frame_rate))
    utts = eval_utterances(cfg, n_utterances, max_seconds)
    if not utts:
        raise ValueError(
            f"no {cfg.battery.split} utterance of at most {max_seconds} s to score reconstructions on"
        )
    rows: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    for i, utt in enumerate(utts):
        signals = _signals(model, utt)
        row: dict[str, Any] = {"utt_id": utt.utt_id, "speaker": utt.speaker}
        for name, ref, est in COMPARISONS:
            row[name] = _distances(signals[ref], signals[est], rate, hop)
        rows.append(row)
        if i < n_samples:
            folder = Path(out_dir) / "samples" / utt.utt_id
            samples.append(
                {
                    "utt_id": utt.utt_id,
                    **{
                        stem: write_listening_wav(
                            folder, stem, wave, rate, int(cfg.output_sample_rate), out_dir
                        )
                        for stem, wave in signals.items()
                    },
                }
            )
    summary = {name: _summarise([r[name] for r in rows]) for name, _, _ in COMPARISONS}
    vs_original = summary["vs_original"]
    return {
        "n_utterances": len(rows),
        "split": str(cfg.battery.split),
        "deterministic": True,
        "sample_rate": rate,
        **summary,
        "l1_mean": vs_original["l1"]["mean"],
        "l1_std": vs_original["l1"]["std"],
        "mel_distance_mean": vs_original["mel_l1"]["mean"],
        "mel_distance_std": vs_original["mel_l1"]["std"],
        "per_utterance": rows,
        "samples": samples,
    }


def _summarise(rows: list[dict[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """Per distance: mean and std of the finite values and their count (None when none is finite)."""
    out: dict[str, dict[str, float | None]] = {}
    for key in RECON_KEYS:
        values = [float(r[key]) for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))]
        out[key] = {
            "mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values)) if values else None,
            "n": len(values),
        }
    return out
