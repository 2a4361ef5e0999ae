"""Exp 7: perceptual rollout evaluation — GT prefix -> L-step model rollout -> GT suffix, decoded to WAV.

The reference protocol (``tier2_exp7_perceptual_rollout.py``): for ``n_utterances`` utterances of ``split``
(a seeded choice among those long enough; the reference: 10 eval utterances), each cropped to its first
``T = min(n_frames, max_frames)`` frames (the reference: 200), and every ``L`` in ``rollout_lengths``:

1. the rollout starts at frame ``s = T // 3 + W`` (``W``: the model's context); the model (a k = 1 dynamics
   checkpoint: ``horizon_mode=lag`` with horizon 1, or ``stride`` with ``horizon == context_stride == 1``)
   predicts frame ``t`` from the ``W`` frames ending at ``t - 1``, ``x'[t] = x'[t-1] + Δ̂``, starting from the
   GT context ``x[s-W .. s-1]``, each prediction appended to the context; ``Δ̂`` is the point prediction
   ``predict`` (:func:`~latentdyn.models.protocol.point_prediction`: ``median``, the reference's
   ``rollout_mean``; ``mean``; ``sample``, a draw at ``temperature`` seeded by ``seed``);
2. the model works in its own space (raw latents, or the store's train-standardised ones when the checkpoint
   was trained with ``standardize=true``: :meth:`~latentdyn.data.latent_store.LatentStore.to_model_space`); the rolled-out
   frames are mapped back to raw latents and replace GT frames ``[s, s+L)``: the GT prefix and the GT suffix,
   which resumes right after the span with no smoothing, stay bit-exact raw latents (``L = 0`` is the GT);
3. the WHOLE spliced trajectory (frames ``0 .. T``) and the GT are decoded with the store's representation;
   the distances of the spliced signal to the decoded GT are computed over the rolled-out span only, frames
   ``[s, s+L)`` -> samples ``[s·hop, (s+L)·hop)`` at the representation's rate, before any resampling
   (spans shorter than the spectral metrics' minimum get SI-SDR only; the reference computes none);
4. both are written by :func:`~latentdyn.diagnostics.audio_io.write_listening_wav`: resampled to
   ``output_sample_rate`` (48 kHz, the reference's files) and at the representation's own rate.

An utterance is eligible when its longest rollout fits, ``s + max(L) <= T`` (the reference only skips
``T < W + max(L) + 2`` and then drops the lengths that do not fit). All rollout lengths of an utterance share
one rollout of ``max(L)`` steps (the L-step rollout is its prefix: the same context gives the same predictions,
and a sampled rollout's first L draws are a sample of the L-step rollout). Outputs: ``audio/<utt>/gt.wav``,
``audio/<utt>/L{L:02d}.wav`` (and their native-rate copies under ``audio/<utt>/<rate>Hz/``),
``manifest.json`` (every file with its L, utterance, frame and sample spans, distances; the per-utterance
reconstruction ceiling, decoded GT vs original audio at the representation's rate) and ``metrics.json``
(mean distances per L).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from latentdyn.data.latent_store import LatentStore, StoreUtterance
from latentdyn.diagnostics.audio_io import (
    choose_utterances,
    decode_latents,
    json_distances,
    load_original,
    mean_distances,
    objective_distances,
    reconstruction_ceiling,
    representation_from_store,
    safe_name,
    samples_per_frame,
    write_listening_outputs,
    write_listening_wav,
)
from latentdyn.models.protocol import PREDICT, DeltaModel, point_prediction
from latentdyn.pipeline.audio import corpus_audio_paths, utterance_latents
from latentdyn.pipeline.injection import checkpoint_store_cfg, dynamics_checkpoint
from latentdyn.pipeline.store import prepare_latent_store
from latentdyn.representations.base import Representation

log = logging.getLogger(__name__)

GT_FILE = "gt"


def rollout_file(length: int) -> str:
    """File stem (and metrics prefix) of the ``L``-step rollout, ``L01``, ``L16``."""
    return f"L{length:02d}"


def frame_by_frame_context(model: DeltaModel) -> int:
    """The context length ``W`` of a model that predicts ``x[t] - x[t-1]`` from the ``W`` frames ending at ``t-1``.

    That is a k = 1 model: ``horizon_mode=lag`` with horizon 1 (a lag-k model's context ends k frames before
    the predicted frame), or ``horizon_mode=stride`` (also assumed for a model without ``horizon_mode``) with
    ``horizon == context_stride == 1``. ValueError otherwise: a frame-by-frame rollout feeds each prediction
    back as the newest context frame.
    """
    horizon, stride = int(model.horizon), int(model.context_stride)
    mode = getattr(model, "horizon_mode", "stride")
    if horizon != 1 or stride != 1:
        lag = f" (its context ends {horizon} frames before the predicted frame)" if mode == "lag" else ""
        raise ValueError(
            f"Exp 7 rolls out frame by frame and needs a k = 1 model (horizon == context_stride == 1); this "
            f"horizon_mode={mode} model has horizon {horizon}{lag} and context_stride {stride}: use a k = 1 "
            "checkpoint"
        )
    return int(model.context)


@torch.no_grad()
def rollout(
    model: DeltaModel,
    context: torch.Tensor,
    steps: int,
    *,
    predict: str = "median",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Free-running rollout in the model's space: ``(N, W, D)`` GT context -> ``(N, steps, D)`` frames.

    Frame ``i`` is ``previous frame + Δ̂_i``, ``Δ̂_i`` the point prediction ``predict`` (``median``, ``mean``,
    or ``sample``: a draw at ``temperature`` from ``generator``) given the last ``W`` frames, GT or predicted.
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
        delta = point_prediction(model.predictive(window), predict, temperature, generator)
        frame = (window[:, -1] + delta).to(torch.float32)
        frames.append(frame)
        window = torch.cat([window[:, 1:], frame[:, None]], dim=1)
    return torch.stack(frames, dim=1) if frames else context.new_zeros(context.shape[0], 0, context.shape[2])


def raw_rollout(
    model: DeltaModel,
    store: LatentStore,
    raw_context: torch.Tensor,
    steps: int,
    *,
    standardized: bool,
    predict: str = "median",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """:func:`rollout` of raw GT context ``(N, W, D)`` -> raw frames ``(N, steps, D)`` float32 (CPU).

    The context goes to the model's space (``standardized``: the store's train mean/std, else raw latents,
    :meth:`~latentdyn.data.latent_store.LatentStore.to_model_space`) on ``device`` (the model's), and the frames come back
    with :meth:`~latentdyn.data.latent_store.LatentStore.to_raw_space`.
    """
    context = store.to_model_space(raw_context.cpu(), standardized).to(device)
    frames = rollout(model, context, steps, predict=predict, temperature=temperature, generator=generator)
    return store.to_raw_space(frames.cpu(), standardized)


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


def rollout_start(n_frames: int, context: int) -> int:
    """The reference's first rolled-out frame of a ``T = n_frames`` trajectory, ``T // 3 + W``."""
    if n_frames < 1 or context < 1:
        raise ValueError(f"need n_frames >= 1 and context >= 1, got {n_frames} and {context}")
    return int(n_frames) // 3 + int(context)


def min_trajectory_frames(context: int, longest: int) -> int:
    """The shortest ``T`` whose rollout span fits, ``T // 3 + W + longest <= T`` (``T - T // 3`` grows with T)."""
    t = int(context) + int(longest)
    while rollout_start(t, context) + longest > t:
        t += 1
    return t


def _utterance(
    cfg: DictConfig,
    store: LatentStore,
    rep: Representation,
    utt: StoreUtterance,
    raw: torch.Tensor,
    predicted: torch.Tensor,
    start: int,
    audio_path: str | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Splice, decode, score and write one utterance: ``raw`` ``(T, D)`` GT latents, ``predicted``
    ``(max L, D)`` raw rolled-out frames from frame ``start``."""
    run_dir = Path(cfg.run_dir)
    out_dir = run_dir / "audio" / safe_name(utt.utt_id)
    rep_sr, out_sr = int(rep.sample_rate), int(cfg.output_sample_rate)
    hop = samples_per_frame(rep_sr, rep.frame_rate)
    scoring = {"with_stoi": bool(cfg.with_stoi), "with_pesq": bool(cfg.with_pesq)}
    lengths = [int(n) for n in cfg.rollout_lengths]
    n_frames = int(raw.shape[0])
    waves = decode_latents(rep, torch.stack([raw, *(splice(raw, predicted[:n], start) for n in lengths)]))
    gt = waves[0]

    common = {"utterance": utt.utt_id, "n_frames": n_frames, "rollout_start": start}
    entries = [
        {
            **common,
            "kind": "gt",
            "L": None,
            **write_listening_wav(out_dir, GT_FILE, gt, rep_sr, out_sr, run_dir),
            "distances": None,
        }
    ]
    for length, wave in zip(lengths, waves[1:], strict=True):
        lo, hi = start * hop, (start + length) * hop
        entries.append(
            {
                **common,
                "kind": "rollout",
                "L": length,
                **write_listening_wav(out_dir, rollout_file(length), wave, rep_sr, out_sr, run_dir),
                "frame_span": [start, start + length],
                "seconds_span": [start / store.frame_rate, (start + length) / store.frame_rate],
                "scored_sample_span": [lo, hi],
                "scored_sample_rate": rep_sr,
                "distances": json_distances(objective_distances(gt[lo:hi], wave[lo:hi], rep_sr, **scoring)),
            }
        )
    original = load_original(audio_path, rep_sr, gt.shape[-1]) if audio_path else None
    ceiling = json_distances(reconstruction_ceiling(original, gt, rep_sr, hop, **scoring))
    log.info(
        "%s: rollouts %s from frame %d of %d written to %s", utt.utt_id, lengths, start, n_frames, out_dir
    )
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
    standardized = bool(net.standardized)
    data_cfg = checkpoint_store_cfg(cfg, model.run_config)
    store = prepare_latent_store(data_cfg)
    if store.dim != net.dim:
        raise ValueError(
            f"the checkpoint models D={net.dim} latents but its store {store.root} has D={store.dim}"
        )
    need = min_trajectory_frames(w, max(lengths))
    if cfg.max_frames is not None and int(cfg.max_frames) < need:
        raise ValueError(
            f"max_frames={cfg.max_frames} is too short: a rollout from frame T // 3 + W (W = {w}) of "
            f"{max(lengths)} frames needs T >= {need}"
        )
    rep = representation_from_store(store, device)
    utts = choose_utterances(store, cfg.split, int(cfg.n_utterances), int(cfg.seed), min_frames=need)

    trajectories = [utterance_latents(store, u, cfg.max_frames) for u in utts]
    starts = [rollout_start(int(x.shape[0]), w) for x in trajectories]
    contexts = torch.stack([x[s - w : s] for x, s in zip(trajectories, starts, strict=True)])
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed)) if cfg.predict == "sample" else None
    predicted = raw_rollout(
        net,
        store,
        contexts,
        max(lengths),
        standardized=standardized,
        predict=str(cfg.predict),
        temperature=float(cfg.temperature),
        generator=generator,
        device=device,
    )

    paths = corpus_audio_paths(data_cfg)
    entries: list[dict[str, Any]] = []
    ceilings: list[dict[str, Any]] = []
    for utt, raw, utt_predicted, start in zip(utts, trajectories, predicted, starts, strict=True):
        utt_entries, ceiling = _utterance(
            cfg, store, rep, utt, raw, utt_predicted, start, paths.get(utt.utt_id)
        )
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
        "model_space": "standardized" if standardized else "raw",
        "max_frames": cfg.max_frames,
        "rollout_start": "T // 3 + W, T = min(n_frames, max_frames)",
        "rollout_lengths": lengths,
        "predict": cfg.predict,
        "temperature": float(cfg.temperature),
        "split": cfg.split,
        "reference": "distances are to the decoded GT latents over the rolled-out span only, "
        "at the representation's sample rate, before resampling",
    }
    run_dir = Path(cfg.run_dir)
    metrics = write_listening_outputs(
        run_dir, common, entries, ceilings, per_length, "lengths", ceiling_mean, len(utts)
    )
    return metrics
