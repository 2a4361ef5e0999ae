"""WavLM distillation: a tiny random teacher, its interpolated targets, the head and loss, and weight loading.

Targets are checked against an independent oracle (resample, the teacher's own hidden states, linear
interpolation with ``align_corners=False`` done in numpy), the loss against numpy's cosine, and loading
against ``save_pretrained`` directories, a hub cache laid out here, and an empty offline hub cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from latentdyn.models.wavlm_distill import (
    DistillationHead,
    distillation_loss,
    load_wavlm_teacher,
    teacher_targets,
)
from latentdyn.representations.weights import WeightsUnavailableError
from tests.test_weights import COMMIT, populate_hf_cache, set_offline_hf_env

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=[16] * 7,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
)
SR = 24000


@pytest.fixture(scope="module")
def teacher() -> tuple[torch.nn.Module, dict]:
    """The tiny random teacher and its provenance (frozen, so shared by the module's tests)."""
    return load_wavlm_teacher(pretrained=False, config=TINY)


def _audio(batch: int = 2, seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(batch, 1, int(SR * seconds), generator=gen)


def _tiny_model(seed: int) -> torch.nn.Module:
    from transformers import WavLMConfig, WavLMModel

    torch.manual_seed(seed)
    return WavLMModel(WavLMConfig(**TINY)).eval()


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


# ------------------------------------------------------------------------------------------- random teacher


def test_random_teacher_is_frozen_in_eval_mode_with_random_provenance(teacher) -> None:
    """pretrained=False: a WavLM of the given config, eval mode, no trainable parameter, source random."""
    model, provenance = teacher
    assert provenance["source"] == "random" and provenance["pretrained"] is False
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert not model.training and all(not m.training for m in model.modules())
    params = list(model.parameters())
    assert params and all(not p.requires_grad for p in params)


def test_random_teacher_weights_depend_on_the_seed_only() -> None:
    """Same seed, same weights whatever the global RNG state; another seed, other weights."""
    torch.manual_seed(123)
    a, _ = load_wavlm_teacher(pretrained=False, config=TINY, seed=3)
    torch.manual_seed(456)
    b, _ = load_wavlm_teacher(pretrained=False, config=TINY, seed=3)
    c, _ = load_wavlm_teacher(pretrained=False, config=TINY, seed=4)
    _assert_same_weights(a, b)
    key = "feature_extractor.conv_layers.0.conv.weight"
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])


# -------------------------------------------------------------------------------------------------- targets


def _oracle_targets(model: torch.nn.Module, audio: torch.Tensor, layer: int, frames: int) -> np.ndarray:
    """Resample 24k -> 16k, the teacher's hidden_states[layer], then numpy linear interpolation at the
    align_corners=False sample positions (i + 0.5) T_w / frames - 0.5 clamped to [0, T_w - 1]."""
    import torchaudio.functional as AF

    wave = AF.resample(audio[:, 0], SR, 16000)
    with torch.no_grad():
        hidden = model(wave, output_hidden_states=True).hidden_states[layer].numpy().astype(np.float64)
    batch, t_w, width = hidden.shape
    pos = np.clip((np.arange(frames) + 0.5) * t_w / frames - 0.5, 0, t_w - 1)
    out = np.empty((batch, frames, width))
    for b in range(batch):
        for c in range(width):
            out[b, :, c] = np.interp(pos, np.arange(t_w), hidden[b, :, c])
    return out


@pytest.mark.parametrize("frames", [5, 13, 49, 50])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_teacher_targets_match_an_independent_oracle(teacher, layer: int, frames: int) -> None:
    """(B, frames, H) float32, equal to resample + hidden_states[layer] + numpy linear interpolation."""
    model, _ = teacher
    audio = _audio(batch=2, seconds=1.0, seed=layer)
    got = teacher_targets(model, audio, SR, layer=layer, frames=frames)
    assert got.shape == (2, frames, 32) and got.dtype == torch.float32
    np.testing.assert_allclose(
        got.numpy(), _oracle_targets(model, audio, layer, frames), rtol=1e-5, atol=1e-5
    )


def test_teacher_targets_at_the_teachers_rate_skip_resampling(teacher) -> None:
    """16 kHz audio goes to the teacher as is: frames = T_w gives the layer's hidden states unchanged."""
    model, _ = teacher
    audio = _audio(batch=1, seconds=0.5, seed=7)
    with torch.no_grad():
        hidden = model(audio[:, 0], output_hidden_states=True).hidden_states[1]
    got = teacher_targets(model, audio, 16000, layer=1, frames=hidden.shape[1])
    torch.testing.assert_close(got, hidden, rtol=1e-6, atol=1e-6)


def test_teacher_targets_carry_no_gradient(teacher) -> None:
    """No gradient flows to the audio: the targets do not require grad even when the audio does."""
    model, _ = teacher
    audio = _audio(batch=1).requires_grad_(True)
    assert not teacher_targets(model, audio, SR, layer=2, frames=13).requires_grad


@pytest.mark.parametrize("layer", [-1, 3, 10])
def test_teacher_targets_reject_a_layer_out_of_range(teacher, layer: int) -> None:
    """layer must be in [0, num_hidden_layers]."""
    with pytest.raises(ValueError, match="layer"):
        teacher_targets(teacher[0], _audio(batch=1), SR, layer=layer, frames=5)


@pytest.mark.parametrize("shape", [(2, 24000), (2, 2, 24000), (1, 1, 1, 24000)])
def test_teacher_targets_reject_audio_not_shaped_b_1_s(teacher, shape: tuple[int, ...]) -> None:
    """Audio must be (B, 1, S)."""
    with pytest.raises(ValueError, match="shape"):
        teacher_targets(teacher[0], torch.zeros(shape), SR, layer=1, frames=5)


# ----------------------------------------------------------------------------------------------- head, loss


def test_distillation_head_is_a_bias_free_linear_map_to_b_t_h() -> None:
    """(B, D, T) -> (B, T, H) with out[b, t] = W z[b, :, t] and no bias."""
    torch.manual_seed(0)
    head = DistillationHead(latent_dim=6, teacher_dim=10)
    assert head.proj.bias is None
    z = np.random.default_rng(0).normal(size=(3, 6, 7)).astype(np.float32)
    got = head(torch.from_numpy(z))
    assert got.shape == (3, 7, 10)
    weight = head.proj.weight.detach().numpy().astype(np.float64)
    expected = np.einsum("hd,bdt->bth", weight, z.astype(np.float64))
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(head(torch.zeros(1, 6, 4))) == 0


def test_distillation_loss_is_mean_one_minus_cosine() -> None:
    """mean over batch and frames of 1 - <s, t> / (|s| |t|), computed in numpy."""
    rng = np.random.default_rng(1)
    student = rng.normal(size=(3, 5, 8))
    targets = rng.normal(size=(3, 5, 8))
    cos = (student * targets).sum(-1) / (np.linalg.norm(student, axis=-1) * np.linalg.norm(targets, axis=-1))
    got = distillation_loss(torch.from_numpy(student), torch.from_numpy(targets))
    assert got.shape == ()
    assert got.item() == pytest.approx(float(np.mean(1 - cos)), rel=1e-10)
    # scale-invariant per frame, 0 for aligned features and 2 for opposite ones
    scales = torch.from_numpy(rng.uniform(0.1, 10, size=(3, 5, 1)))
    assert distillation_loss(torch.from_numpy(targets) * scales, torch.from_numpy(targets)).item() == (
        pytest.approx(0.0, abs=1e-12)
    )
    assert distillation_loss(-torch.from_numpy(targets), torch.from_numpy(targets)).item() == pytest.approx(
        2.0
    )


def test_distillation_loss_rejects_mismatched_shapes() -> None:
    """Student and targets must have the same (B, T, H) shape."""
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(torch.ones(2, 5, 8), torch.ones(2, 6, 8))
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(torch.ones(2, 5, 8), torch.ones(2, 5, 4))


# -------------------------------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A tiny WavLM (seed 11, unlike the random teacher's seed 0) saved with ``save_pretrained``."""
    model = _tiny_model(seed=11)
    directory = tmp_path_factory.mktemp("wavlm_ckpt")
    model.save_pretrained(directory)
    return directory, model


def test_checkpoint_directory_loads_the_saved_weights(saved_teacher) -> None:
    """checkpoint=DIR loads exactly the saved weights, frozen in eval mode; provenance source is DIR."""
    directory, saved = saved_teacher
    model, provenance = load_wavlm_teacher(checkpoint=str(directory))
    _assert_same_weights(model, saved)
    random_model, _ = load_wavlm_teacher(pretrained=False, config=TINY)
    key = "feature_extractor.conv_layers.0.conv.weight"
    assert not torch.equal(model.state_dict()[key], random_model.state_dict()[key])
    assert provenance["source"] == str(directory.resolve()) and provenance["pretrained"] is True
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_a_named_weights_file_is_the_one_loaded(saved_teacher, tmp_path: Path) -> None:
    """checkpoint=FILE loads that file (with the config beside it), even where the directory holds another one
    transformers would prefer; its provenance has the file's sha256."""
    import hashlib
    import shutil

    directory, saved = saved_teacher
    other = tmp_path / "ckpt"
    shutil.copytree(directory, other)
    chosen = other / "chosen.bin"
    torch.save({f"wavlm.{k}": v for k, v in saved.state_dict().items()}, chosen)
    # The directory's own model.safetensors now holds other weights: only the named file gives `saved`.
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in _tiny_model(seed=5).state_dict().items()},
        str(other / "model.safetensors"),
    )
    model, provenance = load_wavlm_teacher(checkpoint=str(chosen))
    _assert_same_weights(model, saved)
    assert provenance["source"] == str(chosen.resolve())
    assert provenance["sha256"] == hashlib.sha256(chosen.read_bytes()).hexdigest()
    (other / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_wavlm_teacher(checkpoint=str(chosen))


def test_a_checkpoint_with_a_random_teacher_is_refused(saved_teacher) -> None:
    directory, _ = saved_teacher
    with pytest.raises(ValueError, match="pretrained=false"):
        load_wavlm_teacher(checkpoint=str(directory), pretrained=False)


def test_missing_checkpoint_raises_file_not_found(tmp_path: Path) -> None:
    """A checkpoint path that does not exist is a FileNotFoundError naming the config key."""
    with pytest.raises(FileNotFoundError, match="vae_gan.teacher.checkpoint"):
        load_wavlm_teacher(checkpoint=str(tmp_path / "nope"))


def test_hub_offline_with_an_empty_cache_says_how_to_provide_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_HUB_OFFLINE=1 and an empty HF cache: WeightsUnavailableError naming the checkpoint key and the
    random-weights way out."""
    set_offline_hf_env(tmp_path / "hf_home", monkeypatch)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    with pytest.raises(WeightsUnavailableError) as info:
        load_wavlm_teacher()
    message = str(info.value)
    assert "vae_gan.teacher.checkpoint" in message
    assert "vae_gan.teacher.pretrained=false" in message and "distill_weight=0" in message
    assert "huggingface-cli download microsoft/wavlm-base-plus" in message
    assert str(tmp_path / "hub_cache") in message


def test_hub_offline_with_config_but_no_weights_cached_is_weights_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, saved_teacher
) -> None:
    """config.json cached but no weights file: still WeightsUnavailableError (not a bare OSError)."""
    directory, _ = saved_teacher
    cache = set_offline_hf_env(tmp_path / "hf_home", monkeypatch)
    populate_hf_cache(cache, "tiny/wavlm", "config.json", directory / "config.json")
    with pytest.raises(WeightsUnavailableError, match="tiny.teacher.pretrained=false"):
        load_wavlm_teacher(name="tiny/wavlm", config_key="tiny.teacher")


def test_hub_offline_loads_a_cached_teacher_with_its_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, saved_teacher
) -> None:
    """Config and weights in the (offline) hub cache: the saved weights, provenance hf:<name> and the commit."""
    directory, saved = saved_teacher
    cache = set_offline_hf_env(tmp_path / "hf_home", monkeypatch)
    for filename in ("config.json", "model.safetensors"):
        populate_hf_cache(cache, "tiny/wavlm", filename, directory / filename)
    model, provenance = load_wavlm_teacher(name="tiny/wavlm")
    _assert_same_weights(model, saved)
    assert provenance == {"source": "hf:tiny/wavlm", "pretrained": True, "revision": COMMIT}
    assert not model.training and not any(p.requires_grad for p in model.parameters())
