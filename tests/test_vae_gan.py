"""Exp 9's VAE-GAN: the pocket-tts Mimi's decoder state, weights loading, the loss schedule, what trains under
each ``init``, the step count of manual optimisation, and the trained model as a representation."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from latentdyn.models.vae_gan import VAEGANModule, kl_ramp, load_vae_gan
from latentdyn.representations.pocket_mimi import (
    PocketMimiRepresentation,
    build_pocket_mimi,
    decode_from_latent,
    decoder_state,
    hub_location,
    pocket_config,
    stamp_state_names,
    steps_per_frame,
)
from latentdyn.representations.weights import WeightsUnavailableError
from tests.test_weights import set_offline_hf_env

CODEC = {"_target_": "latentdyn.representations.pocket_mimi.PocketMimiRepresentation", "pretrained": False}
TINY_TEACHER = {
    "pretrained": False,
    "config": {
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "conv_dim": [8] * 7,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 2,
    },
}
#: Every loss on from step 1 (GAN), 2 (KL ramp, sampling, distillation) and 3 (predictability).
EARLY = {
    "gan_start": 1,
    "kl_start": 2,
    "kl_ramp": 2,
    "deterministic_steps": 2,
    "distill_start": 2,
    "pred_start": 3,
    "distill_layer": 2,
}


@pytest.fixture(scope="module")
def mimi() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_pocket_mimi(pocket_config("english_2026-04")).eval()


def _module(init: str = "pretrained", loss: dict | None = None, distill: bool = True) -> VAEGANModule:
    loss = {**EARLY, **(loss or {})}
    if not distill:
        loss["distill_weight"] = 0.0
    return VAEGANModule(codec=CODEC, init=init, loss=loss, teacher=TINY_TEACHER, discriminator={"filters": 4})


# --- the codec's streaming state ----------------------------------------------------------------------------


def _stateless_decode(mimi: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """The decoder with its transformer attending over the whole clip without a cache (pocket-tts's stateless
    path); the convolutions get the cold-start state they need (its attention caches are unused)."""
    from pocket_tts.modules.stateful_module import init_states

    emb = mimi.quantizer(latents)
    state = init_states(mimi, batch_size=latents.shape[0], sequence_length=1)
    emb = mimi.upsample(emb, state)
    (emb,) = mimi.decoder_transformer(emb, None)
    return mimi.decoder(emb, state)


def test_the_decoder_state_holds_every_transformer_step_of_the_clip(mimi: torch.nn.Module) -> None:
    from pocket_tts.modules.stateful_module import init_states

    frames = 7
    assert steps_per_frame(mimi) == 16
    state = decoder_state(mimi, 2, frames)
    caches = [s["cache"] for s in state.values() if "cache" in s]
    assert caches and all(c.shape[2] >= 16 * frames for c in caches)
    torch.manual_seed(1)
    latents = torch.randn(2, 32, frames)
    with torch.no_grad():
        ours = decode_from_latent(mimi, latents)
        oracle = _stateless_decode(mimi, latents)
        # The reference's cache of T + 8 steps cannot hold the clip (pocket-tts 4 refuses; its ring buffer of
        # old attended over the last steps only).
        with pytest.raises(RuntimeError):
            mimi.decode_from_latent(latents.transpose(1, 2), init_states(mimi, 2, frames + 8))
    assert ours.shape == (2, 1, frames * 1920)
    torch.testing.assert_close(ours, oracle, rtol=1e-4, atol=1e-5)


def test_streaming_modules_are_stamped_with_their_state_keys() -> None:
    from pocket_tts.models.mimi import build_mimi
    from pocket_tts.modules.stateful_module import StatefulModule, init_states

    raw = build_mimi(pocket_config("english_2026-04").mimi)
    latents = torch.zeros(1, 2, 32)
    with pytest.raises(RuntimeError, match="absolute name"):
        raw.decode_from_latent(latents, init_states(raw, 1, 32))
    names = stamp_state_names(raw)
    assert names == list(init_states(raw, 1, 4))
    assert all(m._module_absolute_name == n for n, m in raw.named_modules() if isinstance(m, StatefulModule))
    assert raw.decode_from_latent(latents, init_states(raw, 1, 32)).shape == (1, 1, 2 * 1920)


# --- weights ------------------------------------------------------------------------------------------------


def test_hub_location_parses_pocket_tts_weights_paths() -> None:
    assert hub_location("hf://kyutai/pocket-tts/languages/x/model.safetensors@abc") == (
        "kyutai/pocket-tts",
        "languages/x/model.safetensors",
        "abc",
    )
    assert hub_location("hf://a/b/c.safetensors") == ("a/b", "c.safetensors", None)
    with pytest.raises(ValueError):
        hub_location("/local/file.safetensors")


def test_missing_pretrained_codec_weights_stop_with_how_to_provide_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_offline_hf_env(tmp_path / "hf", monkeypatch)
    with pytest.raises(WeightsUnavailableError) as err:
        PocketMimiRepresentation(pretrained=True)
    message = str(err.value)
    assert "kyutai/pocket-tts" in message and "representation.checkpoint=" in message
    assert "pretrained=false" in message


def _save_bundle(mimi: torch.nn.Module, path: Path, zero_encoder: bool = False) -> Path:
    from safetensors.torch import save_file

    tensors = {f"mimi.{k}": v.clone().contiguous() for k, v in mimi.state_dict().items()}
    if zero_encoder:
        tensors = {k: torch.zeros_like(v) if k.startswith("mimi.encoder.") else v for k, v in tensors.items()}
    tensors["flow_lm.other"] = torch.ones(2)
    save_file(tensors, str(path))
    return path


def test_a_local_checkpoint_loads_and_is_recorded(mimi: torch.nn.Module, tmp_path: Path) -> None:
    path = _save_bundle(mimi, tmp_path / "model.safetensors")
    rep = PocketMimiRepresentation(pretrained=True, checkpoint=str(path))
    for (name, ours), theirs in zip(rep.model.state_dict().items(), mimi.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs, msg=name)
    assert rep.weights["pretrained"] is True and rep.weights["source"] == str(path.resolve())
    assert len(rep.weights["sha256"]) == 64
    wave = torch.randn(1, 1, 5000)
    latents = rep.encode(wave)
    assert latents.shape == (1, 32, 3) and rep.num_frames(5000) == 3
    assert rep.decode(latents).shape == (1, 1, 3 * 1920)


def test_a_bundle_without_an_encoder_is_refused(mimi: torch.nn.Module, tmp_path: Path) -> None:
    path = _save_bundle(mimi, tmp_path / "no_encoder.safetensors", zero_encoder=True)
    with pytest.raises(ValueError, match="encoder weights .* are all zero"):
        PocketMimiRepresentation(pretrained=True, checkpoint=str(path))


def test_random_codec_weights_are_seeded_and_recorded() -> None:
    a, b = (
        PocketMimiRepresentation(pretrained=False, seed=3),
        PocketMimiRepresentation(pretrained=False, seed=3),
    )
    torch.testing.assert_close(next(a.model.parameters()), next(b.model.parameters()))
    assert a.weights["source"] == "random" and a.weights["pretrained"] is False
    with pytest.raises(ValueError, match="no pocket-tts config"):
        PocketMimiRepresentation(config="no_such_config", pretrained=False)


# --- the schedule -------------------------------------------------------------------------------------------


def test_losses_switch_on_at_their_configured_steps() -> None:
    model = VAEGANModule(
        codec=CODEC, teacher=TINY_TEACHER, loss={"distill_layer": 2}, discriminator={"filters": 4}
    )
    w = model.loss_weights
    assert w(0)["kl"] == 0 and w(1999)["kl"] == 0
    assert w(2000)["kl"] == pytest.approx(0.1 / 4000) and w(3999)["kl"] == pytest.approx(0.05)
    assert w(5999)["kl"] == pytest.approx(0.1) and w(10**6)["kl"] == pytest.approx(0.1)
    assert (w(999)["adv"], w(999)["fm"], w(1000)["adv"], w(1000)["fm"]) == (0, 0, 1.0, 1.0)
    assert (w(1999)["distill"], w(2000)["distill"]) == (0, 1.0)
    assert (w(4999)["pred"], w(5000)["pred"]) == (0, 1.0)
    assert (w(0)["recon"], w(0)["align"]) == (1.0, 2.0)
    assert not model.samples_latents(1999) and model.samples_latents(2000)
    assert not model.discriminator_active(999) and model.discriminator_active(1000)
    assert kl_ramp(5, 2, 0) == 1.0


def test_generator_terms_follow_the_schedule() -> None:
    torch.manual_seed(0)
    model = _module()
    wave = 0.1 * torch.randn(2, 1, 12000)
    off = model.generator_terms(wave, 0)
    assert {"recon", "kl", "align"} <= set(off) and not {"adv", "fm", "pred", "distill"} & set(off)
    assert off["audio"].shape == wave.shape
    # Before deterministic_steps the decoder gets mu: two passes decode the same audio.
    torch.testing.assert_close(
        model.generator_terms(wave, 1)["audio"], model.generator_terms(wave, 1)["audio"]
    )
    on = model.generator_terms(wave, 3)
    assert {"adv", "fm", "pred", "distill"} <= set(on)
    weights = model.loss_weights(3)
    total = sum(weights[k] * on[k] for k in weights)
    torch.testing.assert_close(on["loss"], total)
    # From deterministic_steps on, the decoder gets a posterior sample.
    assert not torch.equal(model.generator_terms(wave, 3)["audio"], model.generator_terms(wave, 3)["audio"])


def test_the_kl_term_is_per_element() -> None:
    torch.manual_seed(0)
    model = _module(distill=False)
    wave = 0.1 * torch.randn(2, 1, 19200)
    terms = model.generator_terms(wave, 0)
    mu, logvar = model.vae.posterior(model.vae.encode_codec(wave))
    kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar)
    torch.testing.assert_close(terms["kl"], kl.mean(), rtol=1e-5, atol=1e-7)


# --- training -----------------------------------------------------------------------------------------------


def _fit(model: VAEGANModule, steps: int) -> pl.Trainer:
    torch.manual_seed(0)
    crops = [0.1 * torch.randn(1, 12000) for _ in range(8)]
    loader = torch.utils.data.DataLoader(crops, batch_size=2)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, loader)
    return trainer


def test_pretrained_init_trains_the_decoder_and_leaves_the_encoder() -> None:
    model = _module("pretrained", distill=False)
    encoder = [p.detach().clone() for p in model.vae.encoder_parameters()]
    decoder = [p.detach().clone() for p in model.vae.decoder_parameters()]
    trainer = _fit(model, 2)
    assert trainer.global_step == 2
    assert all(torch.equal(a, b) for a, b in zip(encoder, model.vae.encoder_parameters(), strict=True))
    changed = [not torch.equal(a, b) for a, b in zip(decoder, model.vae.decoder_parameters(), strict=True)]
    assert all(changed)


def test_scratch_init_trains_the_encoder_too() -> None:
    model = _module("scratch", distill=False)
    assert model.codec_weights["source"] == "random" and model.codec_weights["vae_gan_init"] == "scratch"
    encoder = [p.detach().clone() for p in model.vae.encoder_parameters()]
    _fit(model, 1)
    assert any(not torch.equal(a, b) for a, b in zip(encoder, model.vae.encoder_parameters(), strict=True))


def test_global_step_counts_generator_updates_while_the_discriminator_trains() -> None:
    model = _module(distill=False)
    trainer = _fit(model, 3)
    assert trainer.global_step == 3
    opt_g, opt_d = trainer.optimizers
    # The discriminator stepped at steps 1 and 2 (gan_start = 1); the generator at 0, 1, 2.
    d_steps = {float(s["step"]) for s in opt_d.state.values()}
    g_steps = {float(s["step"]) for s in opt_g.state.values()}
    assert d_steps == {2.0} and g_steps == {3.0}


def test_fp16_is_refused_for_the_vae_gan() -> None:
    from latentdyn.pipeline.vae_gan import vae_gan_precision

    with pytest.raises(ValueError, match="fp16"):
        vae_gan_precision("16-mixed")
    assert vae_gan_precision("32-true") == "32-true"


def test_a_checkpoint_is_a_representation_without_downloads(tmp_path: Path) -> None:
    from latentdyn.representations.pocket_vae import PocketVAERepresentation

    model = _module(distill=True)
    trainer = _fit(model, 1)
    path = tmp_path / "checkpoints" / "vae_gan_final.ckpt"
    path.parent.mkdir()
    trainer.save_checkpoint(path)
    loaded = load_vae_gan(path)
    assert loaded.teacher is None and loaded.codec_weights == model.codec_weights
    assert loaded.teacher_weights == model.teacher_weights
    wave = 0.1 * torch.randn(1, 1, 9000)
    torch.testing.assert_close(loaded.encode_mean(wave), model.eval().encode_mean(wave))
    rep = PocketVAERepresentation(checkpoint=str(tmp_path))  # a run directory
    assert (rep.dim, rep.sample_rate, rep.frame_rate) == (32, 24000, 12.5)
    assert rep.weights["kind"] == "vae_gan" and rep.weights["codec"]["source"] == "random"
    latents = rep.encode(wave)
    assert latents.shape == (1, 32, rep.num_frames(9000)) == (1, 32, 5)
    assert rep.decode(latents).shape == (1, 1, 5 * 1920)
    with pytest.raises(ValueError, match="needs representation.checkpoint"):
        PocketVAERepresentation()


def test_importing_pocket_tts_through_latentdyn_keeps_torchs_thread_count() -> None:
    """pocket-tts sets torch's intra-op threads to 1 when imported; the representation module undoes it."""
    import subprocess
    import sys

    code = (
        "import torch; torch.set_num_threads(2)\n"
        "import latentdyn.representations.pocket_mimi\n"
        "import pocket_tts.models.mimi\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "2"


@pytest.mark.parametrize(
    ("loss", "match"),
    [
        ({"kl_weight": -0.1}, "kl_weight"),
        ({"gan_start": -1}, "gan_start"),
        ({"pred_alpha": 1.5}, "pred_alpha"),
        ({"fm_normalization": "l2"}, "fm_normalization"),
        ({"kl_warmup": 5}, "unknown loss settings"),
    ],
)
def test_bad_loss_settings_are_refused_by_name(loss: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        VAEGANModule(codec=CODEC, loss={**loss, "distill_weight": 0.0}, discriminator={"filters": 4})
