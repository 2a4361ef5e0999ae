"""Exp 9's VAE-GAN: a ``latent_dim``-d VAE bottleneck inside pocket-tts's Mimi, trained adversarially (DESIGN §8).

Architecture (:class:`PocketVAE`)::

    audio (B, 1, S) -> Mimi encoder (SEANet, transformer, downsampling)  -> h      (B, 32, T)   12.5 Hz
                    -> 1x1 conv mu_proj, logvar_proj                       -> mu, log sigma^2 (B, D, T)
                    -> z = mu + sigma * eps   (mu during the first ``deterministic_steps`` and when encoding)
                    -> dec_proj: 1x1 conv D -> 256, GELU, 1x1 conv 256 -> 32  -> h_hat  (B, 32, T)
                    -> Mimi decoder (output projection, upsampling, transformer, SEANet) -> audio (B, 1, 1920 T)

``h`` is the codec's own 32-d latent (``encode_to_latent``), so ``dec_proj`` maps back into the space the
pretrained decoder reads. ``init=pretrained`` loads the codec's weights, freezes its encoder side and fine-tunes
its decoder side; ``init=scratch`` starts the whole codec from random weights and trains all of it.

Generator loss at (0-based) step s, every weight and threshold a hyper-parameter::

    recon                                   waveform L1 + multi-resolution STFT (Exp 5's audio loss)
    + kl_weight * ramp(s) * KL / (D T)      ramp 0 before kl_start, then (s - kl_start + 1) / kl_ramp, capped at 1
    + align_weight * L1(dec_proj(mu), h.detach())
    + pred_weight * pred        (s >= pred_start)  causal Conv1d(D, D, k) on mu predicts z_{t+1} - z_t:
                                               alpha (1 - cos) + (1 - alpha) MSE(z_t + delta_hat, z_{t+1})
    + adv_weight * hinge_G + fm_weight * feature matching   (s >= gan_start; see latentdyn.models.gan)
    + distill_weight * (1 - cos(Linear(mu), WavLM layer))   (s >= distill_start; latentdyn.models.wavlm_distill)

The discriminator (EnCodec's MS-STFT) is updated after the generator on the same batch, with the generator's
output before its update, from ``gan_start`` on. Both use AdamW; gradients are clipped per optimiser.

The codec's encoder and decoder run in float32 with autocast off (its streaming state is float32); the
discriminator and the teacher run under the trainer's precision. Only the generator's update counts as a
training step (``trainer.global_step``, ``max_steps``, checkpoints), see :meth:`VAEGANModule.training_step`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from latentdyn.models.betavae import STFT_SIZES, gaussian_kl, multi_resolution_stft_loss
from latentdyn.models.checkpoints import EmbedsRunConfig, load_module_checkpoint
from latentdyn.models.data_parallel import global_batch_randn
from latentdyn.models.gan import (
    FEATURE_MATCHING,
    build_msstft_discriminator,
    discriminator_hinge_loss,
    feature_matching_loss,
    generator_hinge_loss,
)
from latentdyn.models.wavlm_distill import (
    DistillationHead,
    distillation_loss,
    load_wavlm_teacher,
    teacher_targets,
)
from latentdyn.representations.pocket_mimi import decode_from_latent

log = logging.getLogger(__name__)

#: ``init`` choices.
INITS = ("pretrained", "scratch")
#: The codec's encoder side (frozen under ``init=pretrained``) and decoder side, by submodule name.
ENCODER_MODULES = ("encoder", "encoder_transformer", "downsample")
DECODER_MODULES = ("quantizer", "upsample", "decoder_transformer", "decoder")
FINAL_NAME = "vae_gan_final.ckpt"

#: Default loss weights and schedule (the reference's Exp 9; see the module docstring).
DEFAULT_LOSS: dict[str, Any] = {
    "recon_weight": 1.0,
    "kl_weight": 0.1,
    "kl_start": 2000,
    "kl_ramp": 4000,
    "deterministic_steps": 2000,
    "align_weight": 2.0,
    "pred_weight": 1.0,
    "pred_start": 5000,
    "pred_kernel": 6,
    "pred_alpha": 0.5,
    "adv_weight": 1.0,
    "fm_weight": 1.0,
    "fm_normalization": "relative",
    "gan_start": 1000,
    "distill_weight": 1.0,
    "distill_start": 2000,
    "distill_layer": 7,
}


def kl_ramp(step: int, start: int, ramp: int) -> float:
    """The KL weight's multiplier at ``step``: 0 before ``start``, then ``(step - start + 1) / ramp`` up to 1."""
    if step < start:
        return 0.0
    if ramp <= 0:
        return 1.0
    return min(1.0, (step - start + 1) / ramp)


class CausalDeltaPredictor(nn.Module):
    """Causal Conv1d(D, D, k) over ``(B, D, T)`` latents: output t sees frames t - k + 1 .. t (zero-padded on the
    left) and predicts the next step z_{t+1} - z_t."""

    def __init__(self, latent_dim: int, kernel_size: int = 6) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"pred_kernel must be >= 1, got {kernel_size}")
        self.kernel_size = int(kernel_size)
        self.conv = nn.Conv1d(latent_dim, latent_dim, self.kernel_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(z, (self.kernel_size - 1, 0)))


def predictability_loss(z: torch.Tensor, predictor: CausalDeltaPredictor, alpha: float) -> torch.Tensor:
    """``alpha * mean(1 - cos(delta_hat_t, z_{t+1} - z_t)) + (1 - alpha) * MSE(z_t + delta_hat_t, z_{t+1})`` over
    the steps t = k - 1 .. T - 2 whose context is whole; 0 when the crop has none. ``z`` is ``(B, D, T)``."""
    first = predictor.kernel_size - 1
    if z.shape[-1] - 1 <= first:
        return z.new_zeros(())
    delta_hat = predictor(z)[:, :, first:-1]
    current, following = z[:, :, first:-1], z[:, :, first + 1 :]
    cosine = F.cosine_similarity(delta_hat, following - current, dim=1, eps=1e-8)
    return alpha * (1 - cosine).mean() + (1 - alpha) * F.mse_loss(current + delta_hat, following)


class PocketVAE(nn.Module):
    """The generator: a pocket-tts Mimi with a VAE bottleneck on its 32-d latent (see the module docstring).

    Args:
        mimi: the codec network (``pocket_tts.models.mimi.MimiModel``, streaming modules stamped).
        latent_dim: the bottleneck's dimension D.
        dec_hidden_dim: hidden width of ``dec_proj``.
        freeze_encoder: freeze the codec's encoder side (``init=pretrained``).
    """

    def __init__(
        self, mimi: nn.Module, latent_dim: int = 32, dec_hidden_dim: int = 256, freeze_encoder: bool = True
    ):
        super().__init__()
        if latent_dim < 1 or dec_hidden_dim < 1:
            raise ValueError(
                f"dimensions must be positive, got latent_dim={latent_dim}, dec_hidden_dim={dec_hidden_dim}"
            )
        self.mimi = mimi
        self.codec_dim = int(mimi.quantizer.dimension)
        self.latent_dim = int(latent_dim)
        self.mu_proj = nn.Conv1d(self.codec_dim, latent_dim, 1)
        self.logvar_proj = nn.Conv1d(self.codec_dim, latent_dim, 1)
        nn.init.zeros_(self.logvar_proj.weight)
        nn.init.constant_(self.logvar_proj.bias, -2.0)
        self.dec_proj = nn.Sequential(
            nn.Conv1d(latent_dim, dec_hidden_dim, 1), nn.GELU(), nn.Conv1d(dec_hidden_dim, self.codec_dim, 1)
        )
        self.freeze_encoder = bool(freeze_encoder)
        if self.freeze_encoder:
            for name in ENCODER_MODULES:
                getattr(mimi, name).requires_grad_(False)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [p for name in ENCODER_MODULES for p in getattr(self.mimi, name).parameters()]

    def decoder_parameters(self) -> list[nn.Parameter]:
        return [p for name in DECODER_MODULES for p in getattr(self.mimi, name).parameters()]

    def encode_codec(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S)`` audio -> the codec's latents ``h (B, 32, ceil(S / 1920))`` (no gradient when frozen)."""
        with (
            torch.autocast(device_type=wave.device.type, enabled=False),
            torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder),
        ):
            return self.mimi.encode_to_latent(wave.float()).transpose(1, 2)

    def posterior(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codec latents ``(B, 32, T)`` -> mean and log-variance ``(B, D, T)`` of q(z | x)."""
        return self.mu_proj(h), self.logvar_proj(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, D, T)`` bottleneck latents -> ``(B, 1, 1920 T)`` audio through ``dec_proj`` and the decoder."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return decode_from_latent(self.mimi, self.dec_proj(z.float()))


class VAEGANModule(EmbedsRunConfig, pl.LightningModule):
    """Trains a :class:`PocketVAE` against an MS-STFT discriminator with WavLM distillation (manual optimisation).

    Args:
        codec: the pocket-tts Mimi representation's config (``representation=pocket_mimi``'s node), built here;
            its network becomes the generator's codec.
        init: ``pretrained`` (the codec's weights as the config loads them; encoder frozen, decoder trained) or
            ``scratch`` (random weights, everything trained).
        latent_dim, dec_hidden_dim: bottleneck size and ``dec_proj`` width.
        loss: weights and schedule (keys of :data:`DEFAULT_LOSS`).
        discriminator: ``filters`` and ``n_ffts`` of the MS-STFT discriminator.
        teacher: the WavLM teacher (:func:`~latentdyn.models.wavlm_distill.load_wavlm_teacher`'s arguments,
            plus ``half_on_gpu``); not loaded when ``loss.distill_weight`` is 0.
        optimizer, discriminator_optimizer: AdamW ``lr``, ``weight_decay``, ``betas``.
        gradient_clip_val: per-optimiser gradient-norm clip (None or 0: none).
        stft_sizes: FFT sizes of the reconstruction loss.
        build_only: build the architecture only (no weights loaded, no teacher): loading a checkpoint.
        run_config: the producing run's resolved config, embedded in checkpoints.
    """

    def __init__(
        self,
        codec: Mapping[str, Any],
        init: str = "pretrained",
        latent_dim: int = 32,
        dec_hidden_dim: int = 256,
        loss: Mapping[str, Any] | None = None,
        discriminator: Mapping[str, Any] | None = None,
        teacher: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        discriminator_optimizer: Mapping[str, Any] | None = None,
        gradient_clip_val: float | None = 1.0,
        stft_sizes: Sequence[int] = STFT_SIZES,
        build_only: bool = False,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from hydra.utils import instantiate

        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        unknown = set(loss or {}) - set(DEFAULT_LOSS)
        if unknown:
            raise ValueError(
                f"unknown loss settings {sorted(unknown)}; expected keys of {sorted(DEFAULT_LOSS)}"
            )
        self.save_hyperparameters(ignore=["run_config", "build_only"])
        self.automatic_optimization = False
        self.run_config = dict(run_config or {})
        self.loss_cfg = {**DEFAULT_LOSS, **dict(loss or {})}
        for key, value in self.loss_cfg.items():
            if key.endswith(("_weight", "_start", "_steps", "_ramp")) and not value >= 0:
                raise ValueError(f"loss.{key} must be >= 0, got {value}")
        if not 0 <= float(self.loss_cfg["pred_alpha"]) <= 1:
            raise ValueError(f"loss.pred_alpha must be in [0, 1], got {self.loss_cfg['pred_alpha']}")
        if self.loss_cfg["fm_normalization"] not in FEATURE_MATCHING:
            raise ValueError(
                f"loss.fm_normalization must be one of {FEATURE_MATCHING}, got {self.loss_cfg['fm_normalization']!r}"
            )
        codec_cfg = dict(codec)
        if build_only or init == "scratch":
            codec_cfg["pretrained"] = False
        rep = instantiate(codec_cfg)
        self.codec_weights: dict[str, Any] = {**dict(rep.weights), "vae_gan_init": init}
        self.sample_rate = int(rep.sample_rate)
        self.frame_rate = float(rep.frame_rate)
        self.codec_name = str(rep.name)
        self.vae = PocketVAE(
            rep.model.train(), int(latent_dim), int(dec_hidden_dim), freeze_encoder=init == "pretrained"
        )
        disc = {"filters": 32, "n_ffts": list(STFT_SIZES), **dict(discriminator or {})}
        self.discriminator = build_msstft_discriminator(int(disc["filters"]), disc["n_ffts"])
        self.predictor = CausalDeltaPredictor(int(latent_dim), int(self.loss_cfg["pred_kernel"]))
        teacher_cfg = {**dict(teacher or {})}
        self.teacher_half_on_gpu = bool(teacher_cfg.pop("half_on_gpu", True))
        self.teacher_weights: dict[str, Any] | None = None
        teacher_net = None
        if float(self.loss_cfg["distill_weight"]) > 0 and not build_only:
            teacher_net, self.teacher_weights = load_wavlm_teacher(**teacher_cfg)
            teacher_dim = int(teacher_net.config.hidden_size)
        else:
            teacher_dim = self._teacher_dim(teacher_cfg)
        # Not a submodule: the frozen teacher stays out of state_dict and checkpoints.
        object.__setattr__(self, "teacher", teacher_net)
        self.distill_head = DistillationHead(int(latent_dim), teacher_dim)
        self.stft_sizes = tuple(int(n) for n in stft_sizes)

    @staticmethod
    def _teacher_dim(teacher_cfg: Mapping[str, Any]) -> int:
        """The teacher's width without loading it: from its config (a checkpoint's head is resized on load)."""
        config = teacher_cfg.get("config") or {}
        return int(config.get("hidden_size", 768))

    # --- the schedule ----------------------------------------------------------------------------------------
    def loss_weights(self, step: int) -> dict[str, float]:
        """The weight of every generator loss term at (0-based) training step ``step``; 0 when it is off."""
        c = self.loss_cfg
        gan = step >= int(c["gan_start"])
        weights = {
            "recon": float(c["recon_weight"]),
            "kl": float(c["kl_weight"]) * kl_ramp(step, int(c["kl_start"]), int(c["kl_ramp"])),
            "align": float(c["align_weight"]),
            "pred": float(c["pred_weight"]) if step >= int(c["pred_start"]) else 0.0,
            "adv": float(c["adv_weight"]) if gan else 0.0,
            "fm": float(c["fm_weight"]) if gan else 0.0,
            "distill": float(c["distill_weight"]) if step >= int(c["distill_start"]) else 0.0,
        }
        return weights

    def samples_latents(self, step: int) -> bool:
        """Whether the decoder gets a posterior sample at ``step`` (after ``deterministic_steps``) or ``mu``."""
        return step >= int(self.loss_cfg["deterministic_steps"])

    def discriminator_active(self, step: int) -> bool:
        weights = self.loss_weights(step)
        return weights["adv"] > 0 or weights["fm"] > 0

    # --- encoding and decoding (the representation) ----------------------------------------------------------
    @property
    def latent_dim(self) -> int:
        return self.vae.latent_dim

    @torch.no_grad()
    def encode_mean(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S)`` audio -> the posterior means ``(B, D, T)``: the deterministic encoding."""
        mu, _ = self.vae.posterior(self.vae.encode_codec(wave.to(self.device, torch.float32)))
        return mu.float()

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, D, T)`` latents -> ``(B, 1, 1920 T)`` audio."""
        return self.vae.decode(z.to(self.device, torch.float32)).float()

    # --- losses ----------------------------------------------------------------------------------------------
    def generator_terms(
        self, wave: torch.Tensor, step: int, sample: bool | None = None
    ) -> dict[str, torch.Tensor]:
        """Every active generator loss term for crops ``(B, 1, S)`` at ``step``, their weighted ``loss`` and
        the decoded ``audio`` ``(B, 1, S)``; ``sample=None`` follows the schedule (False: decode ``mu``)."""
        weights = self.loss_weights(step)
        h = self.vae.encode_codec(wave)
        mu, logvar = self.vae.posterior(h)
        use_sample = self.samples_latents(step) if sample is None else sample
        # Under DDP each rank takes its rows of the global batch's noise (one process's noise per crop).
        z = mu + (0.5 * logvar).exp() * global_batch_randn(self, mu) if use_sample else mu
        audio = self.vae.decode(z)
        if audio.shape[-1] < wave.shape[-1]:
            raise ValueError(f"the decoder returned {audio.shape[-1]} samples for {wave.shape[-1]}")
        audio = audio[..., : wave.shape[-1]]
        frames = mu.shape[-1]
        terms: dict[str, torch.Tensor] = {
            "recon": multi_resolution_stft_loss(wave[:, 0], audio[:, 0], self.stft_sizes),
            "kl": gaussian_kl(mu.float(), logvar.float()) / (self.latent_dim * frames),
            "align": F.l1_loss(self.vae.dec_proj(mu.float()), h.detach().float()),
        }
        if weights["pred"] > 0:
            terms["pred"] = predictability_loss(
                mu.float(), self.predictor, float(self.loss_cfg["pred_alpha"])
            )
        if weights["adv"] > 0 or weights["fm"] > 0:
            fake_logits, fake_features = self.discriminator(audio)
            if weights["adv"] > 0:
                terms["adv"] = generator_hinge_loss(fake_logits)
            if weights["fm"] > 0:
                with torch.no_grad():
                    _, real_features = self.discriminator(wave)
                terms["fm"] = feature_matching_loss(
                    real_features, fake_features, str(self.loss_cfg["fm_normalization"])
                )
        if weights["distill"] > 0:
            terms["distill"] = self.distillation(wave, mu)
        total = sum(weights[name] * value.float() for name, value in terms.items())
        return {"loss": total, **terms, "audio": audio}

    def distillation(self, wave: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """1 - cos of the projected means against the teacher's layer, aligned to the latents' frames."""
        if self.teacher is None:
            raise RuntimeError("distillation is on (loss.distill_weight > 0) but no teacher is loaded")
        self._teacher_to_device()
        targets = teacher_targets(
            self.teacher, wave, self.sample_rate, int(self.loss_cfg["distill_layer"]), mu.shape[-1]
        )
        return distillation_loss(self.distill_head(mu), targets)

    def _teacher_to_device(self) -> None:
        param = next(self.teacher.parameters())
        half = self.teacher_half_on_gpu and self.device.type == "cuda"
        dtype = torch.float16 if half else torch.float32
        if param.device != self.device or param.dtype != dtype:
            self.teacher.to(self.device, dtype)

    def discriminator_terms(self, wave: torch.Tensor, audio: torch.Tensor) -> dict[str, torch.Tensor]:
        """The discriminator's hinge ``loss`` on real crops and (detached) generated ones, and the mean logits."""
        real_logits, _ = self.discriminator(wave)
        fake_logits, _ = self.discriminator(audio.detach())
        return {
            "loss": discriminator_hinge_loss(real_logits, fake_logits),
            "real_logit": torch.stack([r.mean() for r in real_logits]).mean(),
            "fake_logit": torch.stack([f.mean() for f in fake_logits]).mean(),
        }

    # --- training ----------------------------------------------------------------------------------------------
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        """One generator update, then (from ``gan_start``) one discriminator update on the same batch.

        The discriminator's optimiser is stepped directly rather than through Lightning, which would count it as
        a training step: ``global_step`` (the schedule's step, ``max_steps``, periodic checkpoints) counts
        generator updates only. Hence no fp16 loss scaling (``VAEGANModule`` trains in fp32 or bf16).
        """
        opt_g, opt_d = self.optimizers()
        step = int(self.global_step)
        self.toggle_optimizer(opt_g)
        terms = self.generator_terms(batch, step)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(terms["loss"])
        self._clip(opt_g)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        logged = {f"train/{k}": v.detach() for k, v in terms.items() if k != "audio"}
        logged["train/kl_mult"] = torch.tensor(
            kl_ramp(step, int(self.loss_cfg["kl_start"]), int(self.loss_cfg["kl_ramp"]))
        )
        if self.discriminator_active(step):
            self.toggle_optimizer(opt_d)
            d_terms = self.discriminator_terms(batch, terms["audio"])
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_terms["loss"])
            self._clip(opt_d)
            opt_d.optimizer.step()
            self.untoggle_optimizer(opt_d)
            logged.update({f"train/d_{k}": v.detach() for k, v in d_terms.items()})
        self.log("train/loss", logged.pop("train/loss"), prog_bar=True, batch_size=len(batch))
        self.log_dict(logged, batch_size=len(batch))

    def _clip(self, optimizer: Any) -> None:
        value = self.hparams.gradient_clip_val
        if value:
            self.clip_gradients(optimizer, gradient_clip_val=float(value), gradient_clip_algorithm="norm")

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        """Reconstruction loss of the posterior means on held-out crops (``val/recon``)."""
        h = self.vae.encode_codec(batch)
        mu, _ = self.vae.posterior(h)
        audio = self.vae.decode(mu)[..., : batch.shape[-1]]
        recon = multi_resolution_stft_loss(batch[:, 0], audio[:, 0], self.stft_sizes)
        self.log("val/recon", recon, prog_bar=True, batch_size=len(batch), sync_dist=True)

    def generator_parameters(self) -> list[nn.Parameter]:
        """What the generator's optimiser trains: the VAE (codec parts not frozen), predictor, distillation head."""
        modules = (self.vae, self.predictor, self.distill_head)
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        def adamw(params: list[nn.Parameter], settings: Mapping[str, Any] | None) -> torch.optim.Optimizer:
            opt = {"lr": 1e-4, "weight_decay": 1e-4, "betas": (0.9, 0.999), **dict(settings or {})}
            return torch.optim.AdamW(
                params,
                lr=float(opt["lr"]),
                weight_decay=float(opt["weight_decay"]),
                betas=tuple(opt["betas"]),
            )

        return [
            adamw(self.generator_parameters(), self.hparams.optimizer),
            adamw(list(self.discriminator.parameters()), self.hparams.discriminator_optimizer),
        ]

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["codec_weights"] = copy.deepcopy(self.codec_weights)
        checkpoint["teacher_weights"] = copy.deepcopy(self.teacher_weights)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.codec_weights = dict(checkpoint.get("codec_weights") or self.codec_weights)
        self.teacher_weights = checkpoint.get("teacher_weights")
        head = checkpoint.get("state_dict", {}).get("distill_head.proj.weight")
        if head is not None and tuple(head.shape) != tuple(self.distill_head.proj.weight.shape):
            teacher_dim, latent_dim = head.shape
            self.distill_head = DistillationHead(int(latent_dim), int(teacher_dim))


def load_vae_gan(path: str | Path, map_location: str | torch.device = "cpu") -> VAEGANModule:
    """A trained :class:`VAEGANModule` from its checkpoint, in eval mode, without its teacher; the codec's
    architecture is rebuilt from the recorded config and every weight comes from the checkpoint (no download).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a checkpoint written by latentdyn (or one holding Python objects).
    """
    model = load_module_checkpoint(VAEGANModule, path, "VAE-GAN", map_location, build_only=True)
    if not isinstance(model, VAEGANModule):
        raise ValueError(f"{path} is not a VAE-GAN checkpoint")
    return model
