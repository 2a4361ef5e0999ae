"""Scoring a learned codec's reconstructions of eval-speaker audio (Exp 5's β-VAE, Exp 9's VAE-GAN).

DESIGN §9: statistics are fitted on train speakers and reconstruction is scored on others, with deterministic
encodes (the posterior mean, not a sample). A :class:`Reconstructor` says what is decoded from an utterance
(the learned codec's audio, and the reference codec's when there is one) and which pairs are scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from latentdyn.data.audio import load_audio
from latentdyn.data.corpus import Utterance
from latentdyn.diagnostics.audio_io import objective_distances, write_listening_wav
from latentdyn.diagnostics.audio_metrics import AUDIO_METRIC_KEYS, align, log_mel_l1, waveform_l1
from latentdyn.pipeline.store import prepare_splits

#: Distances of a reconstruction, in the order of recon_metrics.json: the reference's two, then ours.
RECON_KEYS = ("l1", "mel_l1", *AUDIO_METRIC_KEYS)
#: The comparison whose distances are also written under the reference's own keys (``l1_mean``, ...).
HEADLINE = "vs_original"


@dataclass(frozen=True)
class Reconstructor:
    """What is scored for each utterance.

    Attributes:
        sample_rate: the codec's audio rate (Hz); utterances are loaded at it.
        frame_rate: its latent frame rate (a decoded signal may be up to one frame longer than the original).
        signals: the original ``(S,)`` -> the decoded signals by name (``(S',)`` each, on CPU).
        comparisons: ``(name, reference signal, estimate)`` triples; ``original`` is the original audio.
    """

    sample_rate: int
    frame_rate: float
    signals: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    comparisons: Sequence[tuple[str, str, str]]


def eval_utterances(cfg: DictConfig, n: int, max_seconds: float) -> list[Utterance]:
    """The first ``n`` utterances of the eval split (``cfg.battery.split``, speakers the codec never heard)
    no longer than ``max_seconds``."""
    utts = [u for u in prepare_splits(cfg)[str(cfg.battery.split)] if u.duration <= max_seconds]
    return utts[:n]


def _distances(
    reference: torch.Tensor, estimate: torch.Tensor, rate: int, hop: int
) -> dict[str, float | None]:
    """:data:`RECON_KEYS` of a decoded signal against its reference; their lengths may differ by up to one frame
    (``hop`` samples: a codec pads the last frame, log-mel drops a partial one) and the common prefix is scored."""
    ref, est = align(reference, estimate, rtol=0.0, atol=hop)
    return {
        "l1": waveform_l1(ref, est),
        "mel_l1": log_mel_l1(ref, est, rate),
        **objective_distances(ref, est, rate),
    }


def reconstruction_metrics(
    cfg: DictConfig,
    reconstructor: Reconstructor,
    out_dir: Path,
    n_utterances: int,
    max_seconds: float,
    n_samples: int,
    samples_dir: str = "samples",
) -> dict[str, Any]:
    """Score ``reconstructor``'s decodes of eval-speaker utterances.

    For each utterance, the distances (:data:`RECON_KEYS`) of every comparison. The first ``n_samples``
    utterances are written as listening files ``<samples_dir>/<utt>/{original,<signal>...}.wav`` (at
    ``cfg.output_sample_rate`` and at the codec's rate).

    Returns ``recon_metrics.json``'s content: per comparison the mean and std of each distance over the
    utterances, the per-utterance rows, the sample files, and the reference's own keys (``l1_mean``,
    ``l1_std``, ``mel_distance_mean``, ``mel_distance_std``) of the ``vs_original`` comparison.
    """
    rate = int(reconstructor.sample_rate)
    hop = round(rate / float(reconstructor.frame_rate))
    utts = eval_utterances(cfg, n_utterances, max_seconds)
    if not utts:
        raise ValueError(
            f"no {cfg.battery.split} utterance of at most {max_seconds} s to score reconstructions on"
        )
    rows: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    for i, utt in enumerate(utts):
        wave = load_audio(utt.path, rate)
        signals = {"original": wave, **reconstructor.signals(wave)}
        row: dict[str, Any] = {"utt_id": utt.utt_id, "speaker": utt.speaker}
        for name, ref, est in reconstructor.comparisons:
            row[name] = _distances(signals[ref], signals[est], rate, hop)
        rows.append(row)
        if i < n_samples:
            folder = Path(out_dir) / samples_dir / utt.utt_id
            samples.append(
                {
                    "utt_id": utt.utt_id,
                    **{
                        stem: write_listening_wav(
                            folder, stem, signal, rate, int(cfg.output_sample_rate), out_dir
                        )
                        for stem, signal in signals.items()
                    },
                }
            )
    summary = {name: _summarise([r[name] for r in rows]) for name, _, _ in reconstructor.comparisons}
    headline = summary[HEADLINE]
    return {
        "n_utterances": len(rows),
        "split": str(cfg.battery.split),
        "deterministic": True,
        "sample_rate": rate,
        **summary,
        "l1_mean": headline["l1"]["mean"],
        "l1_std": headline["l1"]["std"],
        "mel_distance_mean": headline["mel_l1"]["mean"],
        "mel_distance_std": headline["mel_l1"]["std"],
        "per_utterance": rows,
        "samples": samples,
    }


def recon_key_metrics(recon: dict[str, Any], comparisons: Sequence[tuple[str, str, str]]) -> dict[str, float]:
    """``recon/<comparison>/<distance>`` means of a ``recon_metrics.json`` (the finite ones)."""
    out = {}
    for comparison, _, _ in comparisons:
        for key in RECON_KEYS:
            value = recon[comparison][key]["mean"]
            if value is not None:
                out[f"recon/{comparison}/{key}"] = float(value)
    return out


#: Summary-table column prefixes of the comparisons: the learned codec vs the original and vs the base codec,
#: and the base codec vs the original (the ceiling).
SUMMARY_PREFIXES = (
    ("vs_original", "recon"),
    ("vs_base_codec", "recon_vs_base"),
    ("base_codec_vs_original", "base_codec"),
)


def recon_summary_columns(metrics: dict[str, float], keys: Sequence[str] = RECON_KEYS) -> dict[str, float]:
    """A summary-table row's reconstruction columns from a run's key metrics (``recon/<comparison>/<key>``):
    ``recon_*``, ``recon_vs_base_*``, ``base_codec_*``; NaN where a comparison was not scored."""
    return {
        f"{prefix}_{key}": metrics.get(f"recon/{comparison}/{key}", math.nan)
        for comparison, prefix in SUMMARY_PREFIXES
        for key in keys
    }


def _summarise(rows: list[dict[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """Per distance: mean and std of the finite values and their count (None when none is finite)."""
    out: dict[str, dict[str, float | None]] = {}
    for key in RECON_KEYS:
        values = [float(r[key]) for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))]
        out[key] = {
            "mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values)) if values else None,
            "n": len(values),
        }
    return out
