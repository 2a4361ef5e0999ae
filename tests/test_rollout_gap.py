"""Exp 1's rollout block (the reference's): free-running whole utterances against teacher forcing, on a closed
form: a damped linear extrapolator on ramp trajectories."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from latentdyn.data.latent_store import LatentStore, LatentStoreWriter
from latentdyn.models.baselines import DiagonalGaussianBaseline
from latentdyn.models.heads import MDNPredictive
from latentdyn.pipeline.injection import rollout_gap

DIM, SIGMA, DAMPING = 3, 0.5, 0.5
META = {"representation": "fake", "sample_rate": 16000, "frame_rate": 12.5, "weights": {"source": "random"}}


class DampedExtrapolator:
    """A lag-1 model predicting N(DAMPING · (c[-1] - c[-2]), SIGMA² I) from its context c (W = 2)."""

    dim, context, horizon, context_stride = DIM, 2, 1, 1
    horizon_mode, standardized, baseline = "lag", False, DiagonalGaussianBaseline

    def predictive(self, context: torch.Tensor) -> MDNPredictive:
        b = context.shape[0]
        mean = DAMPING * (context[:, -1] - context[:, -2])
        scales = torch.full((b, 1, DIM), SIGMA)
        return MDNPredictive(torch.zeros(b, 1), mean[:, None], scales)


def _ramp_store(root: Path, lengths: dict[str, list[int]]) -> LatentStore:
    rng = np.random.default_rng(0)
    with LatentStoreWriter(root, DIM, META) as writer:
        for split, ns in lengths.items():
            for i, n in enumerate(ns):
                ramp = (np.arange(n, dtype=np.float32)[:, None] + rng.integers(0, 50)) * np.ones(
                    DIM, np.float32
                )
                writer.add(f"{split}-{i}", f"spk-{split}", split, ramp, np.zeros(n, np.float32))
    return LatentStore(root)


def test_rollout_gap_of_a_damped_extrapolator_matches_the_closed_form(tmp_path: Path) -> None:
    lengths = {"train": [30, 30], "val": [20], "test": [12, 17, 9]}
    store = _ramp_store(tmp_path / "store", lengths)
    diag = OmegaConf.create(
        {
            "_target_": "latentdyn.diagnostics.injection.InjectionConfig",
            "split": "test",
            "max_frames": 15,
            "bank_size": 0,
            "baseline_max_windows": None,
            "seed": 3,
        }
    )
    gap = rollout_gap(DampedExtrapolator(), store, diag, n_utterances=10)

    # Every test utterance is used, cropped to 15 frames, rolled from t0 = W + k - 1 = 2 to its end.
    steps = [min(n, 15) - 2 for n in lengths["test"]]
    assert gap["n_utterances"] == 3 and gap["n_frames"] == sum(steps)
    # The true delta is 1 in every dim. Teacher forcing predicts 0.5; the free run halves its own velocity each
    # step, predicting 0.5^s at step s: NLL_s = D (½ log 2πσ² + r_s² / 2σ²) with r_s the residual.
    const = DIM * 0.5 * math.log(2 * math.pi * SIGMA**2)
    teacher = const + DIM * 0.25 / (2 * SIGMA**2)
    rollout = [const + DIM * (1 - 0.5**s) ** 2 / (2 * SIGMA**2) for n in steps for s in range(1, n + 1)]
    assert gap["teacher_nll"] == pytest.approx(teacher, rel=1e-5)
    assert gap["rollout_nll"] == pytest.approx(float(np.mean(rollout)), rel=1e-5)
    assert gap["gap_nll"] == pytest.approx(float(np.mean(rollout)) - teacher, rel=1e-5)
    assert gap["gap_nll"] > 0
    assert gap["rollout_dnll"] - gap["teacher_dnll"] == pytest.approx(gap["gap_nll"], rel=1e-6)


def test_rollout_gap_needs_a_long_enough_utterance(tmp_path: Path) -> None:
    store = _ramp_store(tmp_path / "store", {"train": [30], "val": [10], "test": [2]})
    diag = OmegaConf.create({"_target_": "latentdyn.diagnostics.injection.InjectionConfig", "bank_size": 0})
    with pytest.raises(ValueError, match="long enough"):
        rollout_gap(DampedExtrapolator(), store, diag, n_utterances=4)
