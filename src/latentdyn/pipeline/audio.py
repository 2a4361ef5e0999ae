"""Audio steps of the listening experiments: the corpus audio behind a store and an utterance's raw latents."""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from latentdyn.data.latent_store import LatentStore, StoreUtterance
from latentdyn.diagnostics.audio_io import crop_frames
from latentdyn.pipeline.store import prepare_splits


def corpus_audio_paths(cfg: DictConfig) -> dict[str, str]:
    """``utt_id -> audio file`` of every utterance in ``cfg.data``'s splits (the corpus behind a store)."""
    return {u.utt_id: u.path for utts in prepare_splits(cfg).values() for u in utts}


def utterance_latents(store: LatentStore, utt: StoreUtterance, max_frames: int | None) -> torch.Tensor:
    """Raw ``(T, D)`` float32 latents of ``utt``, its first ``T = min(n_frames, max_frames)`` frames (None: all)."""
    n = crop_frames(utt.n_frames, max_frames)
    return torch.from_numpy(np.array(store.utterance_latents(utt)[:n], dtype=np.float32))
