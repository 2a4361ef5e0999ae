"""Semantic distillation of a latent sequence from a frozen WavLM teacher (Exp 9).

The teacher is ``transformers.WavLMModel`` (``microsoft/wavlm-base-plus`` by default, 768-d at 50 Hz from
16 kHz audio). Its target for a crop is the hidden state of transformer layer ``layer`` (7;
``hidden_states[0]`` is the input to the first layer) computed on the crop resampled to 16 kHz, without
gradient, then linearly interpolated in time to the student's T latent frames (:func:`teacher_targets`).
The student is a bias-free linear map of the latents to the teacher's width (:class:`DistillationHead`), and
the loss is the mean over batch and frames of 1 - cos(student, target) (:func:`distillation_loss`).

The teacher's weights come from a local directory (``checkpoint``: ``save_pretrained`` layout, or a weights
file with its ``config.json`` beside it) or the HF hub through its cache; when neither is available the run stops
with how to provide them (:func:`load_wavlm_teacher`). ``pretrained=false`` builds a random teacher from
``config`` (a ``WavLMConfig``'s fields: tests use a tiny one), recorded as ``source: random``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentdyn.representations.weights import (
    WeightsUnavailableError,
    file_provenance,
    hf_hub_cache_dir,
    hf_hub_offline,
    hub_resolves,
    random_provenance,
    resolve_hf_file,
    seeded_init,
)

__all__ = [
    "TEACHER_SAMPLE_RATE",
    "DistillationHead",
    "distillation_loss",
    "load_wavlm_teacher",
    "teacher_targets",
]

#: WavLM's input rate (Hz).
TEACHER_SAMPLE_RATE = 16000
DEFAULT_TEACHER = "microsoft/wavlm-base-plus"


def load_wavlm_teacher(
    name: str = DEFAULT_TEACHER,
    checkpoint: str | None = None,
    pretrained: bool = True,
    config: Mapping[str, Any] | None = None,
    seed: int = 0,
    config_key: str = "vae_gan.teacher",
) -> tuple[nn.Module, dict[str, Any]]:
    """A frozen WavLM teacher (eval mode, no gradients, on CPU, float32) and its weights provenance.

    Args:
        name: HF hub repository of the pretrained teacher.
        checkpoint: a local directory in ``save_pretrained`` layout (``config.json`` and the weights), or a
            weights file (``.safetensors`` or ``.bin``) with a ``config.json`` beside it; used instead of the hub.
        pretrained: false builds a random teacher from ``config`` with ``seed`` (``checkpoint`` must then be unset).
        config: ``WavLMConfig`` fields of the random teacher (default: WavLM base's).
        config_key: the config node named in error messages.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist, or has no ``config.json``.
        ValueError: a ``checkpoint`` with ``pretrained`` false.
        WeightsUnavailableError: pretrained weights asked for, no ``checkpoint``, and the hub cannot supply them.
    """
    from transformers import WavLMConfig, WavLMModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its "some weights were not used" notices concern heads we do not use
    if not pretrained:
        if checkpoint:
            raise ValueError(
                f"{config_key}.checkpoint={checkpoint!r} with {config_key}.pretrained=false: a random teacher "
                "loads no weights; unset one of them"
            )
        with seeded_init(seed):
            model = WavLMModel(WavLMConfig(**dict(config or {})))
        provenance = random_provenance(seed, init="transformers WavLMConfig", config=dict(config or {}))
    elif checkpoint:
        model, provenance = _from_local(
            Path(os.path.expandvars(os.path.expanduser(str(checkpoint)))), config_key
        )
    else:
        model, provenance = _from_hub(name, config_key)
    model.eval().requires_grad_(False)
    return model, provenance


def _from_local(path: Path, config_key: str) -> tuple[nn.Module, dict[str, Any]]:
    """A teacher from a ``save_pretrained`` directory, or from the named weights file and its directory's config."""
    from transformers import WavLMConfig, WavLMModel

    if not path.exists():
        raise FileNotFoundError(f"{config_key}.checkpoint={str(path)!r}: no such file or directory")
    directory = path if path.is_dir() else path.parent
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{config_key}.checkpoint={str(path)!r}: no config.json in {directory} (give a save_pretrained "
            "directory, or a weights file with the model's config.json beside it)"
        )
    if path.is_dir():
        return WavLMModel.from_pretrained(directory), {"source": str(directory.resolve()), "pretrained": True}
    model = WavLMModel(WavLMConfig.from_pretrained(directory))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # Checkpoints of WavLM with a head prefix their encoder's tensors with "wavlm.".
    state = {k.removeprefix("wavlm."): v for k, v in state.items()}
    missing, _ = model.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(
            f"{path} is not a WavLM checkpoint: {len(missing)} weights missing, e.g. {missing[:3]}"
        )
    return model, file_provenance(path)


def teacher_unavailable_message(name: str, cause: str, config_key: str) -> str:
    """The error text when the pretrained teacher cannot be had: how to provide it, and the ways out."""
    offline_advice = " and unset HF_HUB_OFFLINE (it is set now)" if hf_hub_offline() else ""
    return (
        f"pretrained WavLM teacher unavailable: could not get {name!r} from the Hugging Face hub ({cause}).\n"
        "Provide it in one of two ways:\n"
        f"  1. a local copy: {config_key}.checkpoint=/path/to/dir (config.json and the weights, e.g. from\n"
        f"     `huggingface-cli download {name} --local-dir /path/to/dir`)\n"
        f"  2. the HF hub: make huggingface.co reachable{offline_advice}, or pre-download it on a machine that\n"
        f"     can reach it with `huggingface-cli download {name}` and set HF_HOME (or HF_HUB_CACHE) to that\n"
        f"     cache (searched now: {hf_hub_cache_dir()}).\n"
        f"Or train without distillation (vae_gan.loss.distill_weight=0), or with a random teacher\n"
        f"({config_key}.pretrained=false)."
    )


def _from_hub(name: str, config_key: str) -> tuple[nn.Module, dict[str, Any]]:
    from transformers import WavLMModel

    local_only = hf_hub_offline() or not hub_resolves()
    try:
        config_path = resolve_hf_file(name, "config.json", config_key=config_key)
        model = WavLMModel.from_pretrained(name, cache_dir=hf_hub_cache_dir(), local_files_only=local_only)
    # transformers reports a cached config without its weights as an AttributeError (4.57), network and cache
    # misses as OSErrors.
    except (WeightsUnavailableError, OSError, ValueError, AttributeError) as err:
        cause = (
            "not in the local cache and the hub is not reachable"
            if local_only
            else f"{type(err).__name__}: {err}"
        )
        raise WeightsUnavailableError(teacher_unavailable_message(name, cause, config_key)) from err
    provenance: dict[str, Any] = {"source": f"hf:{name}", "pretrained": True}
    if config_path.parent.parent.name == "snapshots":
        provenance["revision"] = config_path.parent.name
    return model, provenance


@torch.no_grad()
def teacher_targets(
    teacher: nn.Module, audio: torch.Tensor, sample_rate: int, layer: int, frames: int
) -> torch.Tensor:
    """The teacher's layer-``layer`` hidden states of ``audio (B, 1, S)`` at ``sample_rate``, resampled to
    16 kHz first, interpolated linearly to ``frames`` steps: ``(B, frames, H)`` float32.

    The teacher runs in its own dtype (half precision on a GPU when loaded so), with autocast off.
    """
    import torchaudio.functional as AF

    n_layers = int(teacher.config.num_hidden_layers)
    if not 0 <= layer <= n_layers:
        raise ValueError(f"teacher layer must be in [0, {n_layers}], got {layer}")
    if audio.dim() != 3 or audio.shape[1] != 1:
        raise ValueError(f"expected audio of shape (B, 1, S), got {tuple(audio.shape)}")
    wave = audio[:, 0].float()
    if int(sample_rate) != TEACHER_SAMPLE_RATE:
        wave = AF.resample(wave, int(sample_rate), TEACHER_SAMPLE_RATE)
    dtype = next(teacher.parameters()).dtype
    # In the teacher's own dtype, outside any autocast (which would mix its fp16 weights with bf16 activations).
    with torch.autocast(device_type=wave.device.type, enabled=False):
        hidden = teacher(wave.to(dtype), output_hidden_states=True).hidden_states[layer]  # (B, T_w, H)
    aligned = F.interpolate(
        hidden.float().transpose(1, 2), size=int(frames), mode="linear", align_corners=False
    )
    return aligned.transpose(1, 2)


class DistillationHead(nn.Module):
    """Bias-free linear map of ``(B, D, T)`` latents to ``(B, T, H)`` teacher-width features."""

    def __init__(self, latent_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(int(latent_dim), int(teacher_dim), bias=False)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.proj(latents.transpose(1, 2).float())


def distillation_loss(student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over batch and frames of 1 - cos(student, target), both ``(B, T, H)``."""
    if student.shape != targets.shape:
        raise ValueError(f"student {tuple(student.shape)} and targets {tuple(targets.shape)} differ in shape")
    return (1 - F.cosine_similarity(student, targets, dim=-1, eps=1e-8)).mean()
