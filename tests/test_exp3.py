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


def test_exp3_smoke_summarises_each_representation(compose_cfg) -> None:
    cfg = compose_cfg(
        [
            "experiment=exp3_rep_compare",
            "debug=smoke",
            "logger=none",
            "representations=[mel,encodec]",
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
        assert all(int(r["injection_steps"]) == round(2.56 * fr) for r in injection)
        assert f"{rep}/D_rollout/divergence_time_s" in metrics
        assert (Path(cfg.run_dir) / rep / "injection" / "per_step.csv").is_file()
    assert (Path(cfg.run_dir) / "injection_diag.json").is_file()
