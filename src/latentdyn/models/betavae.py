"""β-VAE bottleneck over a base representation, with the AR-friendliness losses of Exp 5 (DESIGN §8).

Architecture (the reference study's ``ARFriendlyVAE``, generalised from Mimi to any base representation)::

    audio (B, 1, S) -> base.encode (frozen)          -> h     (B, D_base, T)
                    -> 1x1 conv mu_proj, logvar_proj -> mu, log sigma^2 (B, D, T)   (D = latent_dim, 32)
                    -> z = mu + sigma * eps           (training; mu alone when encoding deterministically)
                    -> dec_proj: 1x1 conv D -> 256, GELU, 1x1 conv 256 -> D_base    -> h_hat (B, D_base, T)
                    -> the base decoder                                            -> audio (B, 1, S')

The log-variance conv starts at weight 0, bias -2 (sigma = e^-1 everywhere), so early samples stay near mu.

Reconstruction (``reconstruction``): ``audio`` when the base decodes through a network (Mimi, EnCodec:
``base.decoder_module()``); that decoder is copied into the model and trained with it, and the loss is the
L1 distance of the waveforms plus, for each n_fft in (256, 512, 1024, 2048) with hop n_fft / 4, the L1
distances of the STFT magnitudes and of their logs (floored at 1e-5). ``latent`` when the base has no
trainable decoder (log-mel, decoded by Griffin-Lim): the L1 distance between ``h_hat`` and ``h``.
``auto`` picks ``audio`` when the base has a decoder network, else ``latent``.

Losses: ``recon + beta * KL + lambda_smooth * smooth + lambda_pred * pred`` with

* KL(q(z|x) || N(0, I)) summed over dimensions and frames, averaged over the batch;
* smooth = mean over batch, dimensions and frames of (z_t - z_{t-1})^2;
* pred = MSE between a small MLP's prediction from the W = 8 frames z_{t-W} .. z_{t-1} (flattened, 8 D ->
  256 -> D) and the delta z_t - z_{t-1}; gradients reach the encoder side through z. The MLP has its own
  learning rate (AdamW 1e-3 against 1e-4 for the VAE) and is only built when lambda_pred > 0.

Gradients are clipped per parameter group (the VAE's and the predictor's), as the reference clips each
optimiser. The base representation is not a submodule: its frozen encoder stays out of the checkpoints,
which hold the bottleneck, the trained decoder copy, the predictor and the base's config to rebuild it.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from latentdyn.models.checkpoints import EmbedsRunConfig, refusing_to_load
from latentdyn.models.data_parallel import global_batch_randn

log = logging.getLogger(__name__)

#: FFT sizes of the multi-resolution STFT reconstruction loss (hop = n_fft // 4).
STFT_SIZES: tuple[int, ...] = (256, 512, 1024, 2048)
#: Magnitude floor before the log in the STFT loss.
LOG_MAGNITUDE_FLOOR = 1e-5
#: ``reconstruction`` choices.
RECONSTRUCTIONS = ("auto", "audio", "latent")


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(0, 1)) of ``(B, D, T)`` posteriors, summed over D and T, averaged over B (nats)."""
    kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)
    return kl.sum(dim=(1, 2)).mean()


def smoothness_loss(z: torch.Tensor) -> torch.Tensor:
    """Mean squared frame-to-frame step of ``(B, D, T)`` latents: mean of (z_t - z_{t-1})^2."""
    if z.shape[-1] < 2:
        raise ValueError(f"the smoothness loss needs at least 2 frames, got {tuple(z.shape)}")
    return (z[..., 1:] - z[..., :-1]).square().mean()


def delta_windows(z: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Context windows and next deltas of ``(B, D, T)`` latents, for every ``t`` in ``[window, T)``.

    Returns ``contexts (B * (T - window), window * D)``, the frames ``z_{t-window} .. z_{t-1}`` flattened
    frame-major, and ``targets (B * (T - window), D)`` = ``z_t - z_{t-1}``. Empty when ``T <= window``.
    """
    batch, dim, frames = z.shape
    n = max(0, frames - window)
    if n == 0:
        return z.new_zeros(0, window * dim), z.new_zeros(0, dim)
    frames_first = z.transpose(1, 2)  # (B, T, D)
    contexts = frames_first.unfold(1, window, 1)[:, :n]  # (B, n, D, W): windows starting at 0 .. n-1
    contexts = contexts.transpose(2, 3).reshape(batch * n, window * dim)
    targets = (frames_first[:, window:] - frames_first[:, window - 1 : -1]).reshape(batch * n, dim)
    return contexts, targets


def predictability_loss(z: torch.Tensor, predictor: nn.Module, window: int) -> torch.Tensor:
    """MSE of ``predictor``'s delta from the ``window`` frames before each ``t`` against z_t - z_{t-1}
    (see :func:`delta_windows`); 0 when the crop is not longer than the window."""
    contexts, targets = delta_windows(z, window)
    if targets.shape[0] == 0:
        return z.new_zeros(())
    return F.mse_loss(predictor(contexts), targets)


def stft_magnitude(wave: torch.Tensor, n_fft: int) -> torch.Tensor:
    """``(B, S)`` -> ``(B, n_fft // 2 + 1, frames)`` |STFT| in float32 (Hann window, hop n_fft / 4, centred)."""
    window = torch.hann_window(n_fft, device=wave.device, dtype=torch.float32)
    spec = torch.stft(
        wave.float(), n_fft, hop_length=n_fft // 4, win_length=n_fft, window=window, return_complex=True
    )
    return spec.abs()


def multi_resolution_stft_loss(
    wave: torch.Tensor, estimate: torch.Tensor, sizes: Sequence[int] = STFT_SIZES
) -> torch.Tensor:
    """The audio reconstruction loss of ``(B, S)`` waveforms: L1 of the samples plus, per n_fft in ``sizes``,
    L1 of |STFT| and L1 of log(max(|STFT|, 1e-5)). Computed in float32 (outside any autocast)."""
    if wave.shape != estimate.shape:
        raise ValueError(
            f"waveforms must have one shape, got {tuple(wave.shape)} and {tuple(estimate.shape)}"
        )
    with torch.autocast(device_type=wave.device.type, enabled=False):
        wave, estimate = wave.float(), estimate.float()
        loss = F.l1_loss(estimate, wave)
        for n_fft in sizes:
            mag, mag_hat = stft_magnitude(wave, n_fft), stft_magnitude(estimate, n_fft)
            loss = loss + F.l1_loss(mag_hat, mag)
            loss = loss + F.l1_loss(
                mag_hat.clamp_min(LOG_MAGNITUDE_FLOOR).log(), mag.clamp_min(LOG_MAGNITUDE_FLOOR).log()
            )
    return loss


class LatentPredictor(nn.Module):
    """The predictability loss's MLP: ``(N, window * D)`` flattened context -> ``(N, D)`` next delta."""

    def __init__(self, latent_dim: int, window: int = 8, hidden: int = 256) -> None:
        super().__init__()
        self.window = int(window)
        self.net = nn.Sequential(
            nn.Linear(window * latent_dim, hidden), nn.GELU(), nn.Linear(hidden, latent_dim)
        )

    def forward(self, contexts: torch.Tensor) -> torch.Tensor:
        return self.net(contexts)


class BetaVAE(nn.Module):
    """The trainable part: posterior projections, ``dec_proj`` and (optionally) a decoder network.

    Args:
        base_dim: the base representation's latent dimension D_base.
        latent_dim: the bottleneck's dimension D.
        dec_hidden_dim: hidden width of ``dec_proj``.
        decoder: a network mapping base latents ``(B, D_base, T)`` to audio ``(B, 1, S)``, trained with the
            bottleneck; None when the base decodes without one.
    """

    def __init__(
        self, base_dim: int, latent_dim: int = 32, dec_hidden_dim: int = 256, decoder: nn.Module | None = None
    ) -> None:
        super().__init__()
        if latent_dim < 1 or base_dim < 1 or dec_hidden_dim < 1:
            raise ValueError(f"dimensions must be positive, got {base_dim}, {latent_dim}, {dec_hidden_dim}")
        self.latent_dim = int(latent_dim)
        self.mu_proj = nn.Conv1d(base_dim, latent_dim, 1)
        self.logvar_proj = nn.Conv1d(base_dim, latent_dim, 1)
        nn.init.zeros_(self.logvar_proj.weight)
        nn.init.constant_(self.logvar_proj.bias, -2.0)
        self.dec_proj = nn.Sequential(
            nn.Conv1d(latent_dim, dec_hidden_dim, 1), nn.GELU(), nn.Conv1d(dec_hidden_dim, base_dim, 1)
        )
        self.decoder = decoder

    def posterior(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, D_base, T)`` base latents -> mean and log-variance ``(B, D, T)`` of q(z | x)."""
        return self.mu_proj(h), self.logvar_proj(h)

    @staticmethod
    def sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """A reparameterised draw ``mu + e^(logvar / 2) * eps`` (differentiable in both)."""
        return mu + (0.5 * logvar).exp() * torch.randn_like(mu)

    def to_base(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, D, T)`` bottleneck latents -> ``(B, D_base, T)`` base latents (``dec_proj``)."""
        return self.dec_proj(z)

    def synthesise(self, h: torch.Tensor) -> torch.Tensor:
        """Base latents -> audio through the trained decoder network (ValueError without one)."""
        if self.decoder is None:
            raise ValueError("this β-VAE has no decoder network: decode through the base representation")
        return self.decoder(h)


class BetaVAEModule(EmbedsRunConfig, pl.LightningModule):
    """Trains a :class:`BetaVAE` on audio crops ``(B, 1, S)`` over a frozen base representation.

    Args:
        base: the base representation's config (a ``_target_`` node, e.g. ``representation=mel``'s), built
            here and kept frozen, outside the module's state.
        latent_dim, dec_hidden_dim: bottleneck size and ``dec_proj`` width.
        beta, lambda_smooth, lambda_pred: loss weights (see the module docstring).
        predictor: ``window`` (W, 8), ``hidden`` (256) and ``lr`` (1e-3) of the predictability MLP.
        optimizer: ``lr`` (1e-4) and ``weight_decay`` (1e-4) of AdamW for the VAE (the predictor shares the
            weight decay); the learning rates are constant, as in the reference.
        reconstruction: ``auto``, ``audio`` or ``latent`` (see the module docstring).
        stft_sizes: FFT sizes of the audio reconstruction loss.
        variant: the variant's name, recorded in checkpoints and the representation's provenance.
        run_config: the producing run's resolved config, embedded in checkpoints.
    """

    def __init__(
        self,
        base: Mapping[str, Any],
        latent_dim: int = 32,
        dec_hidden_dim: int = 256,
        beta: float = 0.01,
        lambda_smooth: float = 0.0,
        lambda_pred: float = 0.0,
        predictor: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        reconstruction: str = "auto",
        stft_sizes: Sequence[int] = STFT_SIZES,
        variant: str = "",
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from hydra.utils import instantiate

        if reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {reconstruction!r}")
        for name, value in (("beta", beta), ("lambda_smooth", lambda_smooth), ("lambda_pred", lambda_pred)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.save_hyperparameters(ignore=["run_config"])
        self.run_config = dict(run_config or {})
        base_rep = instantiate(dict(base))
        # Not a submodule: the frozen base stays out of state_dict and checkpoints (see _base_to_device).
        object.__setattr__(self, "base", base_rep)
        has_decoder = callable(getattr(base_rep, "decoder_module", None))
        if reconstruction == "audio" and not has_decoder:
            raise ValueError(
                f"reconstruction=audio needs a base that decodes through a network; {base_rep.name} has none "
                "(use reconstruction=latent or auto)"
            )
        self.reconstruction = (
            reconstruction if reconstruction != "auto" else ("audio" if has_decoder else "latent")
        )
        # ``decoder_module()`` returns the base's decoder as a network of its own (a copy): training it leaves
        # the base codec's decoder, the reconstruction ceiling, unchanged.
        decoder = (
            base_rep.decoder_module().float().train().requires_grad_(True)
            if self.reconstruction == "audio"
            else None
        )
        self.vae = BetaVAE(int(base_rep.dim), int(latent_dim), int(dec_hidden_dim), decoder)
        pred_cfg = {"window": 8, "hidden": 256, "lr": 1e-3, **dict(predictor or {})}
        self.pred_window = int(pred_cfg["window"])
        self.pred_lr = float(pred_cfg["lr"])
        self.predictor = (
            LatentPredictor(int(latent_dim), self.pred_window, int(pred_cfg["hidden"]))
            if lambda_pred > 0
            else None
        )
        self.stft_sizes = tuple(int(n) for n in stft_sizes)

    # --- the base representation -------------------------------------------------------------------------
    @property
    def latent_dim(self) -> int:
        return self.vae.latent_dim

    def _base_to_device(self) -> None:
        base_device = getattr(self.base, "device", None)
        if base_device is None or torch.device(base_device) != self.device:
            self.base.to(self.device)

    def encode_base(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S)`` audio -> the frozen base's latents ``(B, D_base, T)`` (no gradient)."""
        self._base_to_device()
        with torch.no_grad():
            h = self.base.encode(wave)
        return h.clone().float()  # out of inference mode (EnCodec encodes under it), in float32

    # --- encoding and decoding (the β-VAE representation) ------------------------------------------------
    @torch.no_grad()
    def encode_mean(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S)`` audio -> the posterior means ``(B, D, T)``: the deterministic encoding."""
        mu, _ = self.vae.posterior(self.encode_base(wave))
        return mu

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, D, T)`` bottleneck latents -> audio ``(B, 1, S)`` through ``dec_proj`` and the (trained) decoder."""
        self._base_to_device()
        h_hat = self.vae.to_base(z.to(self.device, torch.float32))
        if self.vae.decoder is not None:
            return self.vae.synthesise(h_hat).float()
        return self.base.decode(h_hat)

    # --- training ------------------------------------------------------------------------------------------
    def losses(self, wave: torch.Tensor, sample: bool = True) -> dict[str, torch.Tensor]:
        """Every loss term of a batch of crops ``(B, 1, S)`` and their weighted ``total``; ``sample=False``
        reconstructs from the posterior means (validation)."""
        hp = self.hparams
        h = self.encode_base(wave)
        mu, logvar = self.vae.posterior(h)
        # Under DDP each rank takes its rows of the global batch's noise (one process's noise per crop).
        z = mu + (0.5 * logvar).exp() * global_batch_randn(self, mu) if sample else mu
        h_hat = self.vae.to_base(z)
        if self.reconstruction == "audio":
            estimate = self.vae.synthesise(h_hat)
            if estimate.shape[-1] < wave.shape[-1]:
                raise ValueError(f"the decoder returned {estimate.shape[-1]} samples for {wave.shape[-1]}")
            recon = multi_resolution_stft_loss(wave[:, 0], estimate[:, 0, : wave.shape[-1]], self.stft_sizes)
        else:
            recon = F.l1_loss(h_hat.float(), h)
        kl = gaussian_kl(mu.float(), logvar.float())
        smooth = smoothness_loss(z.float())
        pred = (
            predictability_loss(z, self.predictor, self.pred_window) if self.predictor is not None else None
        )
        total = recon + hp.beta * kl + hp.lambda_smooth * smooth
        out = {"recon": recon, "kl": kl, "smooth": smooth}
        if pred is not None:
            total = total + hp.lambda_pred * pred
            out["pred"] = pred
        return {"loss": total, **out}

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        terms = self.losses(batch, sample=True)
        self.log("train/loss", terms["loss"].detach(), prog_bar=True, batch_size=len(batch))
        self.log_dict(
            {f"train/{k}": v.detach() for k, v in terms.items() if k != "loss"}, batch_size=len(batch)
        )
        return terms["loss"]

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        terms = self.losses(batch, sample=False)
        self.log("val/recon", terms["recon"], prog_bar=True, batch_size=len(batch), sync_dist=True)
        self.log_dict(
            {f"val/{k}": v for k, v in terms.items() if k != "recon"}, batch_size=len(batch), sync_dist=True
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        opt = {"lr": 1e-4, "weight_decay": 1e-4, **dict(self.hparams.optimizer or {})}
        groups = [{"params": [p for p in self.vae.parameters() if p.requires_grad], "lr": float(opt["lr"])}]
        if self.predictor is not None:
            groups.append({"params": list(self.predictor.parameters()), "lr": self.pred_lr})
        return torch.optim.AdamW(groups, weight_decay=float(opt["weight_decay"]))

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Any = None,
    ) -> None:
        """Clip the VAE's and the predictor's gradients separately (the reference clips each optimiser)."""
        if not gradient_clip_val:
            return
        for group in optimizer.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], float(gradient_clip_val))


def load_betavae(path: str | Path, map_location: str | torch.device = "cpu") -> BetaVAEModule:
    """A trained :class:`BetaVAEModule` from its checkpoint, in eval mode (the base is rebuilt from the
    config the checkpoint records, so its weights must be available as when it was trained).

    Only tensors and plain data are unpickled (``weights_only=True``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a β-VAE checkpoint written by latentdyn, or holds other Python objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"β-VAE checkpoint not found: {path}")
    try:
        header = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise refusing_to_load(path, exc) from None
    if "base" not in (header.get("hyper_parameters") or {}):
        raise ValueError(f"{path} is not a β-VAE checkpoint (no base representation recorded)")
    del header
    model = BetaVAEModule.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    return model.eval()
