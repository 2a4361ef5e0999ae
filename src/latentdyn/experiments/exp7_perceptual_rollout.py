"""Exp 7: perceptual rollout evaluation — GT prefix -> L-step model rollout -> GT suffix, decoded to WAV.

For ``n_utterances`` utterances of ``split`` (a seeded choice among those long enough, each cropped to its
first ``max_seconds``) and every ``L`` in ``rollout_lengths``:

1. the prefix ends at frame ``p = round(prefix_seconds * frame_rate)``; the model (a k = 1 dynamics
   checkpoint with ``context_stride == horizon == 1``) rolls forward ``L`` frames from the GT context
   ``z[p-W .. p-1]`` in the latent store's standardised space, each step appending its prediction
   ``z'[t+1] = z'[t] + Δ`` (``predict: mean``, the predictive mean; ``predict: sample``, a draw at
   ``temperature`` seeded by ``seed``) to the context;
2. the rolled-out frames replace GT frames ``[p, p+L)`` of the raw trajectory (GT prefix and suffix stay
   bit-exact raw latents; ``L = 0`` is the GT trajectory itself);
3. the spliced trajectory and the GT are decoded with the store's representation; the distances of the
   spliced signal to the decoded GT are computed over the rolled-out span only, frames ``[p, p+L)`` ->
   samples ``[p·hop, (p+L)·hop)`` at the representation's rate, before any resampling (spans shorter than
   the spectral metrics' minimum get SI-SDR only);
4. both are resampled to ``output_sample_rate`` (48 kHz) with torchaudio's windowed sinc and written.

All rollout lengths of an utterance share one rollout of ``max(L)`` steps (the L-step rollout is its
prefix: the same context gives the same predictions, and a sampled rollout's first L draws are a sample of
the L-step rollout). Outputs: ``audio/<utt>/gt.wav``, ``audio/<utt>/L{L:02d}.wav``, ``manifest.json`` (every
file with its L, utterance, frame and sample spans, distances; the per-utterance reconstruction ceiling,
decoded GT vs original audio at the representation's rate) and ``metrics.json`` (mean distances per L).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from latentdyn.data.latent_store import LatentStore, StoreUtterance
from latentdyn.diagnostics.audio_io import (
    choose_utterances,
    decode_latents,
    destandardize,
    json_distances,
    load_original,
    max_frames,
    mean_distances,
    objective_distances,
    reconstruction_ceiling,
    relative,
    representation_from_store,
    resample_waves,
    safe_name,
    samples_per_frame,
    write_listening_outputs,
    write_wav,
)
from latentdyn.diagnostics.injection import PREDICT
from latentdyn.experiments.common import standardize
from latentdyn.experiments.exp2_injection import dynamics_checkpoint
from latentdyn.experiments.exp3b_synthetic_audio import corpus_audio_paths, utterance_latents
from latentdyn.experiments.phase0 import prepare_latent_store
from latentdyn.models.protocol import DeltaModel
from latentdyn.representations.base import Representation

log = logging.getLogger(__name__)

GT_FILE = "gt"


def rollout_file(length: int) -> str:
    """File stem (and metrics prefix) of the ``L``-step rollout, ``L01``, ``L16``."""
    return f"L{length:02d}"


def frame_by_frame_context(model: DeltaModel) -> int:
    """The context length ``W`` of a model that predicts the next frame from the previous ``W``.

    ValueError unless ``context_stride == horizon == 1``: splicing a rollout into a trajectory frame by
    frame needs one prediction per frame, each appended to a stride-1 context.
    """
    horizon, stride = int(model.horizon), int(model.context_stride)
    if horizon != 1 or stride != 1:
        raise ValueError(
            f"Exp 7 splices rollouts frame by frame and needs a model with horizon == context_stride == 1; "
            f"this one has horizon {horizon} and context_stride {stride} (use a k = 1 checkpoint)"
        )
    return int(model.context)


@torch.no_grad()
def rollout(
    model: DeltaModel,
    context: torch.Tensor,
    steps: int,
    *,
    predict: str = "mean",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Free-running rollout: ``(N, W, D)`` standardised GT context -> ``(N, steps, D)`` predicted frames.

    Frame ``i`` is ``previous frame + Δ_i`` with ``Δ_i`` the predictive mean (``predict="mean"``) or a draw
    at ``temperature`` from ``generator`` (``predict="sample"``) given the last ``W`` frames, GT or
    predicted.
    """
    w = frame_by_frame_context(model)
    if context.dim() != 3 or context.shape[1] != w or context.shape[2] != model.dim:
        raise ValueError(f"context must be (N, {w}, {model.dim}), got {tuple(context.shape)}")
    if predict not in PREDICT:
        raise ValueError(f"predict must be one of {PREDICT}, got {predict!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    window = context.to(torch.float32)
    frames = []
    for _ in range(steps):
        dist = model.predictive(window)
        delta = (
            dist.mean() if predict == "mean" else dist.sample(temperature=temperature, generator=generator)
        )
        frame = (window[:, -1] + delta).to(torch.float32)
        frames.append(frame)
        window = torch.cat([window[:, 1:], frame[:, None]], dim=1)
    return torch.stack(frames, dim=1) if frames else context.new_zeros(context.shape[0], 0, context.shape[2])


def splice(trajectory: torch.Tensor, inserted: torch.Tensor, start: int) -> torch.Tensor:
    """``trajectory`` ``(T, D)`` with frames ``[start, start + L)`` replaced by ``inserted`` ``(L, D)``.

    A new tensor; ``L = 0`` returns an exact copy. ValueError when the span leaves the trajectory.
    """
    length = int(inserted.shape[0])
    if trajectory.dim() != 2 or inserted.dim() != 2 or inserted.shape[1] != trajectory.shape[1]:
        raise ValueError(f"need (T, D) and (L, D), got {tuple(trajectory.shape)} and {tuple(inserted.shape)}")
    if start < 0 or start + length > trajectory.shape[0]:
        raise ValueError(
            f"frames [{start}, {start + length}) are outside a {trajectory.shape[0]}-frame trajectory"
        )
    out = trajectory.clone()
    out[start : start + length] = inserted.to(out.dtype)
    return out


def checkpoint_data_cfg(cfg: DictConfig, run_config: dict[str, Any]) -> DictConfig:
    """This run's config with the checkpoint's ``data`` and ``representation`` (its latent store's)."""
    merged = cfg.copy()
    with open_dict(merged):
        for key in ("data", "representation"):
            if key in run_config:
                merged[key] = OmegaConf.create(run_config[key])
    return merged


def prefix_frames(prefix_seconds: float, frame_rate: float, context: int) -> int:
    """Frames of GT prefix, ``round(prefix_seconds * frame_rate)``; ValueError when shorter than the context."""
    p = round(float(prefix_seconds) * frame_rate)
    if p < context:
        raise ValueError(
            f"prefix_seconds={prefix_seconds} is {p} frames at {frame_rate} Hz, fewer than the model's "
            f"context of {context} frames"
        )
    return p


def _utterance(
    cfg: DictConfig,
    store: LatentStore,
    rep: Representation,
    utt: StoreUtterance,
    predicted: torch.Tensor,
    start: int,
    audio_path: str | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Splice, decode, score and write one utterance; ``predicted`` ``(max L, D)`` standardised frames."""
    run_dir = Path(cfg.run_dir)
    out_dir = run_dir / "audio" / safe_name(utt.utt_id)
    rep_sr, out_sr = int(rep.sample_rate), int(cfg.output_sample_rate)
    hop = samples_per_frame(rep_sr, rep.frame_rate)
    scoring = {"with_stoi": bool(cfg.with_stoi), "with_pesq": bool(cfg.with_pesq)}
    raw = utterance_latents(store, utt, cfg.max_seconds)
    inserted = destandardize(store, predicted)
    lengths = [int(n) for n in cfg.rollout_lengths]
    batch = torch.stack([raw, *(splice(raw, inserted[:n], start) for n in lengths)])
    waves = decode_latents(rep, batch)
    gt = waves[0]
    resampled = resample_waves(waves, rep_sr, out_sr)

    path = out_dir / f"{GT_FILE}.wav"
    entries = [
        {
            "utterance": utt.utt_id,
            "kind": "gt",
            "L": None,
            "path": relative(path, run_dir),
            **write_wav(path, resampled[0], out_sr),
            "n_frames": int(raw.shape[0]),
            "distances": None,
        }
    ]
    for length, wave, wave_out in zip(lengths, waves[1:], resampled[1:], strict=True):
        lo, hi = start * hop, (start + length) * hop
        path = out_dir / f"{rollout_file(length)}.wav"
        entries.append(
            {
                "utterance": utt.utt_id,
                "kind": "rollout",
                "L": length,
                "path": relative(path, run_dir),
                **write_wav(path, wave_out, out_sr),
                "n_frames": int(raw.shape[0]),
                "frame_span": [start, start + length],
                "seconds_span": [start / store.frame_rate, (start + length) / store.frame_rate],
                "scored_sample_span": [lo, hi],
                "scored_sample_rate": rep_sr,
                "distances": json_distances(objective_distances(gt[lo:hi], wave[lo:hi], rep_sr, **scoring)),
            }
        )
    original = load_original(audio_path, rep_sr, gt.shape[-1]) if audio_path else None
    ceiling = json_distances(reconstruction_ceiling(original, gt, rep_sr, hop, **scoring))
    log.info("%s: rollouts %s from frame %d written to %s", utt.utt_id, lengths, start, out_dir)
    return entries, {"utterance": utt.utt_id, "sample_rate": rep_sr, "distances": ceiling}


def run(cfg: DictConfig) -> dict[str, float]:
    """Roll out, splice, decode, score and write every utterance; ``manifest.json`` and ``metrics.json``."""
    from latentdyn.models.dynamics import load_dynamics
    from latentdyn.representations.extract import resolve_device

    lengths = [int(n) for n in cfg.rollout_lengths]
    if not lengths or min(lengths) < 0 or len(set(lengths)) != len(lengths):
        raise ValueError(f"rollout_lengths must be distinct integers >= 0, got {lengths}")
    if cfg.predict not in PREDICT:
        raise ValueError(f"predict must be one of {PREDICT}, got {cfg.predict!r}")
    ckpt = dynamics_checkpoint(str(cfg.checkpoint), Path(cfg.paths.manifest), horizon_k=1)
    log.info("checkpoint: %s", ckpt)
    device = resolve_device(cfg.extract.device)
    model = load_dynamics(ckpt, map_location=device)
    net = model.net
    w = frame_by_frame_context(net)
    data_cfg = checkpoint_data_cfg(cfg, model.run_config)
    store = prepare_latent_store(data_cfg)
    if store.dim != net.dim:
        raise ValueError(
            f"the checkpoint models D={net.dim} latents but its store {store.root} has D={store.dim}"
        )
    start = prefix_frames(cfg.prefix_seconds, store.frame_rate, w)
    need = start + max(lengths)
    kept = max_frames(cfg.max_seconds, store.frame_rate)
    if kept is not None and kept < need:
        raise ValueError(
            f"max_seconds={cfg.max_seconds} keeps {kept} frames; the prefix ({start}) and the longest rollout "
            f"({max(lengths)}) need {need}"
        )
    rep = representation_from_store(store, device)
    utts = choose_utterances(store, cfg.split, int(cfg.n_utterances), int(cfg.seed), min_frames=need)

    contexts = torch.stack(
        [standardize(store, utterance_latents(store, u, cfg.max_seconds)[start - w : start]) for u in utts]
    ).to(device)
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed)) if cfg.predict == "sample" else None
    predicted = rollout(
        net,
        contexts,
        max(lengths),
        predict=cfg.predict,
        temperature=float(cfg.temperature),
        generator=generator,
    ).cpu()

    paths = corpus_audio_paths(data_cfg)
    entries: list[dict[str, Any]] = []
    ceilings: list[dict[str, Any]] = []
    for utt, utt_predicted in zip(utts, predicted, strict=True):
        utt_entries, ceiling = _utterance(cfg, store, rep, utt, utt_predicted, start, paths.get(utt.utt_id))
        entries += utt_entries
        ceilings.append(ceiling)

    per_length = {
        rollout_file(n): mean_distances(e["distances"] for e in entries if e["L"] == n) for n in lengths
    }
    ceiling_mean = mean_distances(c["distances"] for c in ceilings)
    common = {
        "checkpoint": str(ckpt),
        "representation": store.meta["representation"],
        "latent_store": str(store.root),
        "frame_rate": store.frame_rate,
        "representation_sample_rate": int(rep.sample_rate),
        "output_sample_rate": int(cfg.output_sample_rate),
        "context_frames": w,
        "prefix_frames": start,
        "rollout_lengths": lengths,
        "predict": cfg.predict,
        "temperature": float(cfg.temperature),
        "split": cfg.split,
        "max_seconds": cfg.max_seconds,
        "reference": "distances are to the decoded GT latents over the rolled-out span only, "
        "at the representation's sample rate, before resampling",
    }
    run_dir = Path(cfg.run_dir)
    metrics = write_listening_outputs(
        run_dir, common, entries, ceilings, per_length, "lengths", ceiling_mean, len(utts)
    )
    return metrics
