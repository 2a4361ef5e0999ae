"""Exp 3: horizons in seconds map to frames per frame rate; one summary block per representation."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from latentdyn.experiments import exp3_rep_compare
from latentdyn.experiments.exp3_rep_compare import seconds_to_frames


@pytest.mark.parametrize(
    ("seconds", "frame_rate", "frames"),
    [
        (0.08, 12.5, 1),
        (0.08, 75.0, 6),
        (0.32, 12.5, 4),
        (0.32, 75.0, 24),
        (2.56, 12.5, 32),
        (2.56, 75.0, 192),
    ],
)
def test_seconds_map_to_frames(seconds: float, frame_rate: float, frames: int) -> None:
    assert seconds_to_frames(seconds, frame_rate) == frames
    assert frames / frame_rate == pytest.approx(seconds)


def test_seconds_to_frames_rounds_and_rejects_nonpositive(caplog) -> None:
    assert seconds_to_frames(0.1, 12.5) == 1  # 1.25 frames -> 1, with a warning
    assert "using 1" in caplog.text
    with pytest.raises(ValueError, match="positive"):
        seconds_to_frames(0.0, 75.0)


def test_unknown_representation_is_a_clear_error(compose_cfg) -> None:
    cfg = compose_cfg(["experiment=exp3_rep_compare", "debug=smoke", "representations=[nope]"])
    with pytest.raises(ValueError, match="unknown representation 'nope'"):
        exp3_rep_compare.run(cfg)


@pytest.mark.slow
def test_exp3_smoke_summarises_each_representation(compose_cfg) -> None:
    cfg = compose_cfg(
        [
            "experiment=exp3_rep_compare",
            "debug=smoke",
            "logger=none",
            "representations=[mel,encodec]",
            "horizons_in=seconds",
            "horizon_seconds=[0.08]",
            "battery.slices=[all]",
        ]
    )
    metrics = exp3_rep_compare.run(cfg)
    with (Path(cfg.run_dir) / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    for rep, fr, k in (("mel", 12.5, 1), ("encodec", 75.0, 6)):
        battery = [r for r in rows if r["representation"] == rep and r["slice"] == "all"]
        assert {r["predictor"] for r in battery} == {"model", "persistence", "linear"}
        assert all(int(r["horizon_frames"]) == k and float(r["frame_rate"]) == fr for r in battery)
        injection = [r for r in rows if r["representation"] == rep and r["slice"] == "injection"]
        assert {r["mode"] for r in injection} == {"A_teacher", "B_periodic", "C_one_shot", "D_rollout"}
        assert all(int(r["k_steps"]) == cfg.diagnostic.k_steps for r in injection)
        assert f"{rep}/D_rollout/dnll" in metrics and f"{rep}/k{k}/dnll" in metrics
        assert (Path(cfg.run_dir) / rep / "injection" / "per_step.csv").is_file()
    assert (Path(cfg.run_dir) / "injection_diag.json").is_file()


def test_exp3_defaults_follow_the_reference(compose_cfg) -> None:
    """The reference's Exp 3: the Phase 1 MDN, k in {1, 2, 4, 8} frames, W = 8 for both codecs, 15k steps."""
    cfg = compose_cfg(["experiment=exp3_rep_compare"])
    assert cfg.model.head._target_.endswith("GaussianMDNHead") and cfg.model.head.n_components == 8
    assert (cfg.model.backbone.hidden, cfg.model.backbone.layers) == (1024, 2)
    assert cfg.horizons_in == "frames" and list(cfg.horizons) == [1, 2, 4, 8] and cfg.model.context == 8
    assert cfg.trainer.max_steps == 15000 and list(cfg.representations) == ["mimi", "encodec"]
    frames = exp3_rep_compare.horizons_and_context(cfg, 75.0)
    assert frames == ([1, 2, 4, 8], 8)
