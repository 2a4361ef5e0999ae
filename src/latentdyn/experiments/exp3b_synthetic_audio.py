"""Exp 3B: perceptual validation of latent edits — decode GT and synthetically edited trajectories to WAV.

The reference protocol (``tier1_exp3b_synthetic_audio.py``): for ``n_utterances`` utterances of ``split`` (a
seeded choice; the reference: 10 eval utterances), the GT trajectory ``z`` ``(T, D)``, its first
``T = min(n_frames, max_frames)`` frames (the reference: 200, 16 s of Mimi), is edited in ``edit_space`` and
decoded with the store's representation:

* ``A_stationary``: the latent frozen at the first frame, ``z'[t] = z[0]``;
* ``B_slow`` (one file per ``alpha`` in ``alphas``, the reference: 0.25, 0.5, 0.75): every delta scaled by α,
  ``z'[0] = z[0], z'[t+1] = z'[t] + α (z[t+1] - z[t])``, i.e. ``z'[t] = z[0] + α (z[t] - z[0])``;
* ``C_wrong_dir``: true step magnitudes, directions uniform on the sphere,
  ``z'[t+1] = z'[t] + ‖z[t+1] - z[t]‖ u_t`` (seeded by ``seed``, one generator for all utterances).

``edit_space: raw`` (the reference, the default) edits the raw latents, so the norms of ``C_wrong_dir`` are
raw delta norms; ``edit_space: standardized`` edits the latent store's train-standardised latents and maps
them back with :func:`~latentdyn.diagnostics.audio_io.raw_from_edit` (dimensions with a tiny train std then
cannot dominate a step). ``A_stationary`` and ``B_slow`` commute with the affine standardisation (both spaces
give the same raw latents); ``C_wrong_dir`` does not.

Outputs under the run directory (:func:`~latentdyn.diagnostics.audio_io.write_listening_wav`):
``audio/<utt_id>/{gt_decoded,original,A_stationary,B_slow_a<α>,C_wrong_dir}.wav`` resampled to
``output_sample_rate`` (48 kHz, the reference's files) and the same signals at the representation's own rate
under ``audio/<utt_id>/<rate>Hz/``; ``manifest.json`` with one entry per file (utterance, mode, α, both
paths, sample rates, durations, objective distances to the decoded GT computed at the representation's rate)
and the per-utterance reconstruction ceiling (decoded GT vs original audio); ``metrics.json`` with the mean
distances per mode. The reference computes no distances.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
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
    raw_from_edit,
    reconstruction_ceiling,
    representation_from_store,
    safe_name,
    samples_per_frame,
    write_listening_outputs,
    write_listening_wav,
)
from latentdyn.pipeline.audio import corpus_audio_paths, utterance_latents
from latentdyn.pipeline.store import prepare_latent_store
from latentdyn.representations.base import Representation

log = logging.getLogger(__name__)

GT_FILE = "gt_decoded"
ORIGINAL_FILE = "original"
#: Where the edits are made: ``raw`` latents (the reference) or the store's train-``standardized`` ones.
EDIT_SPACES = ("raw", "standardized")


def stationary(z: torch.Tensor) -> torch.Tensor:
    """``A_stationary``: ``(T, D)`` -> ``(T, D)`` with every frame equal to ``z[0]``."""
    _check_trajectory(z)
    return z[:1].expand_as(z).clone()


def slow(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """``B_slow``: deltas scaled by ``alpha``, ``z'[t] = z[0] + α (z[t] - z[0])`` ``(T, D)``.

    The closed form of ``z'[t+1] = z'[t] + α (z[t+1] - z[t])`` (a telescoping sum), computed with
    :func:`torch.lerp`, which returns ``z`` exactly at α = 1 and ``z[0]`` exactly at α = 0 and accumulates
    no rounding along the trajectory.
    """
    _check_trajectory(z)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    return torch.lerp(z[:1].expand_as(z), z, float(alpha))


def wrong_direction(z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``C_wrong_dir``: true step norms, uniformly random directions, ``(T, D)`` -> ``(T, D)``.

    ``z'[0] = z[0]``, ``z'[t+1] = z'[t] + ‖z[t+1] - z[t]‖ u_t`` with ``u_t`` i.i.d. uniform on the unit
    sphere S^{D-1} (a normalised standard Gaussian drawn from ``generator``). The walk is accumulated in
    float64 so the step norms of the float32 result match the true ones to float32 rounding.
    """
    _check_trajectory(z)
    z64 = z.to(torch.float64)
    norms = torch.linalg.vector_norm(z64[1:] - z64[:-1], dim=-1, keepdim=True)  # (T-1, 1)
    gauss = torch.randn(z.shape[0] - 1, z.shape[1], generator=generator, dtype=torch.float64)
    directions = gauss / torch.linalg.vector_norm(gauss, dim=-1, keepdim=True)
    walk = torch.cat([torch.zeros_like(z64[:1]), torch.cumsum(norms * directions, dim=0)])
    return (z64[:1] + walk).to(z.dtype)


def _check_trajectory(z: torch.Tensor) -> None:
    if z.dim() != 2 or z.shape[0] < 1:
        raise ValueError(f"a trajectory must be (T >= 1, D), got {tuple(z.shape)}")


@dataclass(frozen=True)
class Edit:
    """One edited trajectory: its mode, α (B_slow only), file stem and ``(T, D)`` latents in the edit space."""

    mode: str
    alpha: float | None
    stem: str
    latents: torch.Tensor


def slow_stem(alpha: float) -> str:
    """File stem (and metrics key) of a ``B_slow`` edit, e.g. ``B_slow_a0.5``."""
    return f"B_slow_a{alpha:g}"


def synthetic_edits(z: torch.Tensor, alphas: list[float], generator: torch.Generator) -> list[Edit]:
    """All edits of one trajectory ``(T, D)`` (in the edit space), in file order."""
    edits = [Edit("A_stationary", None, "A_stationary", stationary(z))]
    edits += [Edit("B_slow", float(a), slow_stem(float(a)), slow(z, float(a))) for a in alphas]
    edits.append(Edit("C_wrong_dir", None, "C_wrong_dir", wrong_direction(z, generator)))
    return edits


def edited_raw_latents(
    store: LatentStore, raw: torch.Tensor, alphas: list[float], generator: torch.Generator, edit_space: str
) -> list[tuple[Edit, torch.Tensor]]:
    """The edits of the raw trajectory ``raw`` ``(T, D)`` made in ``edit_space``, each with its raw latents.

    ``raw``: edited as they are (the reference). ``standardized``: ``z = standardize(raw)`` is edited and each
    edit mapped back with :func:`raw_from_edit` (bit-exact ``raw`` wherever the edit leaves a frame alone).
    """
    if edit_space == "raw":
        return [(e, e.latents) for e in synthetic_edits(raw, alphas, generator)]
    if edit_space == "standardized":
        z = store.standardize(raw)
        return [(e, raw_from_edit(store, raw, z, e.latents)) for e in synthetic_edits(z, alphas, generator)]
    raise ValueError(f"edit_space must be one of {EDIT_SPACES}, got {edit_space!r}")


def _utterance(
    cfg: DictConfig,
    store: LatentStore,
    rep: Representation,
    utt: StoreUtterance,
    audio_path: str | None,
    generator: torch.Generator,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Decode, write and score one utterance's GT and edits; returns its manifest entries and its ceiling."""
    run_dir = Path(cfg.run_dir)
    out_dir = run_dir / "audio" / safe_name(utt.utt_id)
    hop = samples_per_frame(rep.sample_rate, rep.frame_rate)
    scoring = {"with_stoi": bool(cfg.with_stoi), "with_pesq": bool(cfg.with_pesq)}
    raw = utterance_latents(store, utt, cfg.max_frames)
    edits = edited_raw_latents(store, raw, [float(a) for a in cfg.alphas], generator, str(cfg.edit_space))
    waves = decode_latents(rep, torch.stack([raw, *(latents for _, latents in edits)]))
    gt, sr = waves[0], int(rep.sample_rate)
    n_frames = int(raw.shape[0])

    # The references (decoded GT, original audio) carry no distances; edits are scored against the GT at the
    # representation's rate, before resampling.
    files: list[tuple[str, str, float | None, torch.Tensor, dict[str, float | None] | None]] = [
        ("GT", GT_FILE, None, gt, None)
    ]
    original = load_original(audio_path, sr, gt.shape[-1]) if audio_path else None
    if original is not None:
        files.append(("original", ORIGINAL_FILE, None, original, None))
    for (edit, _), wave in zip(edits, waves[1:], strict=True):
        distances = json_distances(objective_distances(gt, wave, sr, **scoring))
        files.append((edit.mode, edit.stem, edit.alpha, wave, distances))
    entries = []
    for mode, stem, alpha, wave, distances in files:
        written = write_listening_wav(out_dir, stem, wave, sr, int(cfg.output_sample_rate), run_dir)
        fields = {"utterance": utt.utt_id, "mode": mode, "key": stem, "alpha": alpha, "n_frames": n_frames}
        entries.append({**fields, **written, "distances": distances})
    ceiling = json_distances(reconstruction_ceiling(original, gt, sr, hop, **scoring))
    log.info("%s: %d frames decoded to %s", utt.utt_id, n_frames, out_dir)
    return entries, {"utterance": utt.utt_id, "n_frames": n_frames, "distances": ceiling}


def run(cfg: DictConfig) -> dict[str, float]:
    """Decode GT and edited trajectories, write WAVs, ``manifest.json`` and ``metrics.json``."""
    from latentdyn.representations.extract import resolve_device

    alphas = [float(a) for a in cfg.alphas]
    if len({slow_stem(a) for a in alphas}) != len(alphas):
        raise ValueError(f"alphas must be distinct, got {alphas}")
    if cfg.edit_space not in EDIT_SPACES:
        raise ValueError(f"edit_space must be one of {EDIT_SPACES}, got {cfg.edit_space!r}")
    store = prepare_latent_store(cfg)
    rep = representation_from_store(store, resolve_device(cfg.extract.device))
    paths = corpus_audio_paths(cfg)
    utts = choose_utterances(store, cfg.split, int(cfg.n_utterances), int(cfg.seed))
    generator = torch.Generator().manual_seed(int(cfg.seed))
    entries: list[dict[str, Any]] = []
    ceilings: list[dict[str, Any]] = []
    for utt in utts:
        utt_entries, ceiling = _utterance(cfg, store, rep, utt, paths.get(utt.utt_id), generator)
        entries += utt_entries
        ceilings.append(ceiling)

    keys = ["A_stationary", *(slow_stem(a) for a in alphas), "C_wrong_dir"]
    per_mode = {k: mean_distances(e["distances"] for e in entries if e.get("key") == k) for k in keys}
    ceiling_mean = mean_distances(c["distances"] for c in ceilings)
    run_dir = Path(cfg.run_dir)
    common = {
        "representation": store.meta["representation"],
        "sample_rate": int(rep.sample_rate),
        "output_sample_rate": int(cfg.output_sample_rate),
        "frame_rate": store.frame_rate,
        "latent_store": str(store.root),
        "split": cfg.split,
        "max_frames": cfg.max_frames,
        "alphas": alphas,
        "edit_space": str(cfg.edit_space),
        "reference": "distances of every edit are to the decoded GT latents (gt_decoded.wav), at the "
        "representation's sample rate (the native files), before resampling",
    }
    metrics = write_listening_outputs(
        run_dir, common, entries, ceilings, per_mode, "modes", ceiling_mean, len(utts)
    )
    log.info("wrote %d files for %d utterances under %s", len(entries), len(utts), run_dir / "audio")
    return metrics
