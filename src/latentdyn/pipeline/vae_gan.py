"""Exp 9's steps: train the pocket-tts Mimi VAE-GAN on audio crops of the train speakers (listening samples at
fixed steps), encode the corpus with it (its latent store), and what its reconstructions are scored against."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from latentdyn.data.audio import load_audio
from latentdyn.data.corpus import Utterance
from latentdyn.data.latent_store import LatentStore
from latentdyn.diagnostics.audio_io import write_listening_wav
from latentdyn.pipeline.betavae import crop_datamodule
from latentdyn.pipeline.common import budgeted_trainer, checkpoint_dir, plain
from latentdyn.pipeline.reconstruction import Reconstructor
from latentdyn.pipeline.store import checkpoint_store, prepare_splits
from latentdyn.tracking.run import record_weights

log = logging.getLogger(__name__)

LAST_NAME = "vae_gan_last.ckpt"
#: Where the listening samples written during training go (``<run_dir>/samples/step_<step>/<utt>/``).
SAMPLES_DIR = "samples"
#: The pairs Exp 9 scores when the codec it started from is pretrained: (name, reference, estimate).
COMPARISONS_WITH_CODEC = (
    ("vs_original", "original", "vae_gan"),
    ("vs_base_codec", "base", "vae_gan"),
    ("base_codec_vs_original", "original", "base"),
)
#: Without one (``init=scratch``) the VAE-GAN is scored against the original only.
COMPARISONS_ALONE = (("vs_original", "original", "vae_gan"),)
#: Lightning precisions the VAE-GAN trains in (its discriminator's update is not loss-scaled: no fp16).
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


def vae_gan_precision(value: str) -> str:
    """``auto`` = bf16 autocast on a GPU that has it, else fp32; or one of :data:`PRECISIONS`."""
    if value == "auto":
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    if value not in PRECISIONS:
        raise ValueError(
            f"vae_gan_train.precision={value!r}: the VAE-GAN trains in one of {PRECISIONS} (or auto); fp16 would need "
            "loss scaling for the discriminator's update, which it does not do"
        )
    return value


def build_vae_gan(cfg: DictConfig) -> Any:
    """The :class:`~latentdyn.models.vae_gan.VAEGANModule` ``cfg.vae_gan`` names (``_target_``) around the codec
    ``cfg.representation`` (pocket-tts Mimi), embedding the run's config in its checkpoints."""
    from hydra.utils import instantiate

    return instantiate(
        plain(cfg.vae_gan),
        _recursive_=False,
        _convert_="all",
        codec=plain(cfg.representation),
        run_config=plain(cfg),
    )


def record_vae_gan_weights(model: Any) -> None:
    """Record where the codec's (and the teacher's) weights came from in the run records."""
    record_weights(model.codec_name, model.codec_weights)
    if model.teacher_weights is not None:
        record_weights("wavlm_teacher", model.teacher_weights)


class SampleWriter(Callback):
    """Every ``every_n_steps`` training steps, decode the posterior means of a few held-out utterances and write
    ``samples/step_<step>/<utt>/{original,vae_gan}.wav`` (at ``output_sample_rate`` and the codec's rate)."""

    def __init__(
        self,
        run_dir: Path,
        utterances: list[Utterance],
        every_n_steps: int,
        max_seconds: float,
        output_sample_rate: int,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"samples.every_n_steps must be >= 1, got {every_n_steps}")
        self.run_dir = Path(run_dir)
        self.utterances = utterances
        self.every_n_steps = int(every_n_steps)
        self.max_seconds = float(max_seconds)
        self.output_sample_rate = int(output_sample_rate)
        self._written = -1

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        step = int(trainer.global_step)
        if step % self.every_n_steps == 0 and step != self._written:
            self.write(pl_module, step)

    def write(self, model: Any, step: int) -> Path:
        """Write the samples of ``step``; returns their folder."""
        folder = self.run_dir / SAMPLES_DIR / f"step_{step:06d}"
        was_training = model.training
        model.eval()
        rate = int(model.sample_rate)
        reconstruct = vae_gan_reconstructor(model, None).signals
        for utt in self.utterances:
            wave = load_audio(utt.path, rate)[: int(self.max_seconds * rate)]
            decoded = reconstruct(wave)["vae_gan"][: wave.shape[-1]]
            for stem, signal in (("original", wave), ("vae_gan", decoded)):
                write_listening_wav(
                    folder / utt.utt_id, stem, signal, rate, self.output_sample_rate, self.run_dir
                )
        model.train(was_training)
        self._written = step
        log.info("listening samples at step %d: %s", step, folder)
        return folder


def sample_writer(cfg: DictConfig) -> SampleWriter | None:
    """The :class:`SampleWriter` of ``cfg.samples`` (utterances of the val split, speakers not trained on);
    None when ``samples.n_utterances`` is 0."""
    settings = cfg.samples
    if int(settings.n_utterances) < 1:
        return None
    utterances = [u for u in prepare_splits(cfg)["val"] if u.duration > 0][: int(settings.n_utterances)]
    if not utterances:
        log.warning("no val utterance to write listening samples of")
        return None
    return SampleWriter(
        Path(cfg.run_dir),
        utterances,
        int(settings.every_n_steps),
        float(settings.max_seconds),
        int(cfg.output_sample_rate),
    )


def unused_parameters_strategy(cfg: DictConfig) -> dict[str, Any]:
    """``trainer.strategy=ddp`` as ``ddp_find_unused_parameters_true`` (a Trainer override; none otherwise).

    The module's training step runs two backward passes, the generator's then the discriminator's, each
    leaving the other network's parameters (and, before ``gan_start``, the discriminator's altogether)
    without a gradient, which plain DDP refuses."""
    return {"strategy": "ddp_find_unused_parameters_true"} if cfg.trainer.get("strategy") == "ddp" else {}


def train_vae_gan(cfg: DictConfig, logger: Any) -> tuple[Any, Path]:
    """Train the VAE-GAN for ``cfg.max_steps`` generator steps; returns the model (eval mode, on CPU) and its
    final checkpoint (``checkpoints/vae_gan_final.ckpt``).

    Resumable like every fit (``checkpoints/vae_gan_last.ckpt``); with ``cfg.resume`` a finished fit is loaded
    instead of trained again.
    """
    from latentdyn.models.training import fit, save_final_checkpoint, seed_everything
    from latentdyn.models.vae_gan import FINAL_NAME, load_vae_gan

    final = checkpoint_dir(cfg) / FINAL_NAME
    if cfg.resume and final.is_file():
        log.info("resume: the VAE-GAN is already trained (%s); not training it again", final)
        model = load_vae_gan(final)
        record_vae_gan_weights(model)
        return model, final
    last = checkpoint_dir(cfg) / LAST_NAME
    settings = cfg.vae_gan_train
    precision = vae_gan_precision(str(settings.precision))
    seed_everything(cfg.seed)
    model = build_vae_gan(cfg)
    record_vae_gan_weights(model)
    datamodule = crop_datamodule(cfg, model.sample_rate, settings)
    writer = sample_writer(cfg)
    trainer = budgeted_trainer(
        cfg,
        logger,
        last,
        settings,
        precision=precision,
        # Clipped per optimiser by the module (manual optimisation).
        gradient_clip_val=None,
        **unused_parameters_strategy(cfg),
        callbacks=[writer] if writer is not None else [],
    )
    weights = model.loss_weights(int(cfg.max_steps))
    log.info(
        "training the VAE-GAN (init=%s, D=%d, codec %s) for %d steps; losses at the end: %s",
        model.hparams.init,
        model.latent_dim,
        model.codec_name,
        int(cfg.max_steps),
        ", ".join(f"{k} {v:g}" for k, v in weights.items()),
    )
    fit(trainer, model, last, bool(cfg.resume), datamodule=datamodule)
    save_final_checkpoint(trainer, final, last)
    return model.cpu().eval(), final


def vae_gan_store(cfg: DictConfig, checkpoint: Path) -> LatentStore:
    """The corpus encoded by the VAE-GAN of ``checkpoint`` (``representation=pocket_vae``): a cached store."""
    return checkpoint_store(cfg, "latentdyn.representations.pocket_vae.PocketVAERepresentation", checkpoint)


def vae_gan_reconstructor(model: Any, codec: Any | None) -> Reconstructor:
    """What Exp 9 scores for an utterance: the VAE-GAN's reconstruction from the posterior mean, and, when the
    codec it started from is given (``init=pretrained``), that codec's own reconstruction."""

    def signals(wave: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = wave[None, None]
        out = {"vae_gan": model.decode_latents(model.encode_mean(batch))[0, 0].float().cpu()}
        if codec is not None:
            out["base"] = codec.decode(codec.encode(batch))[0, 0].float().cpu()
        return out

    comparisons = COMPARISONS_WITH_CODEC if codec is not None else COMPARISONS_ALONE
    return Reconstructor(int(model.sample_rate), float(model.frame_rate), signals, comparisons)
