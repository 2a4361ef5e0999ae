"""Exp 7: splicing, the frame-by-frame rollout (closed forms with stub models), and the pipeline on a tiny
Exp 1 checkpoint (48 kHz WAVs, manifest spans, L = 0 identity, checkpoint=latest, bad-stride refusal)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from latentdyn.experiments import exp1_vmf
from latentdyn.experiments import exp7_perceptual_rollout as exp7
from latentdyn.experiments.exp7_perceptual_rollout import frame_by_frame_context, rollout, splice
from latentdyn.tracking.manifest import append_record

SMOKE = ["debug=smoke", "logger=none"]


class _Predictive:
    """Predictive distribution whose mean is a fixed delta; ``sample`` adds temperature x N(0, 1)."""

    def __init__(self, delta: torch.Tensor) -> None:
        self.delta = delta

    def mean(self) -> torch.Tensor:
        return self.delta

    def sample(self, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.delta.shape, generator=generator)
        return self.delta + temperature * noise


class _ScaleModel:
    """Stub DeltaModel predicting ``delta = gain * last frame``, so a rollout grows as ``(1 + gain)^i``."""

    def __init__(
        self, dim: int, context: int, gain: float, horizon: int = 1, context_stride: int = 1
    ) -> None:
        self.dim, self.context, self.gain = dim, context, gain
        self.horizon, self.context_stride = horizon, context_stride
        self.seen: list[torch.Tensor] = []

    def predictive(self, context: torch.Tensor) -> _Predictive:
        self.seen.append(context.clone())
        return _Predictive(self.gain * context[:, -1])


def test_splice_at_zero_length_is_the_trajectory() -> None:
    z = torch.randn(20, 5)
    out = splice(z, z[:0], 7)
    assert torch.equal(out, z) and out is not z


def test_splice_replaces_exactly_the_span() -> None:
    z = torch.randn(20, 5)
    inserted = torch.full((4, 5), 9.0)
    out = splice(z, inserted, 7)
    assert torch.equal(out[7:11], inserted)
    assert torch.equal(out[:7], z[:7]) and torch.equal(out[11:], z[11:])
    with pytest.raises(ValueError, match="outside"):
        splice(z, inserted, 17)


def test_mean_rollout_feeds_predictions_back() -> None:
    context = torch.randn(3, 4, 6)
    model = _ScaleModel(dim=6, context=4, gain=0.5)
    frames = rollout(model, context, 5)
    expected = torch.stack([context[:, -1] * 1.5 ** (i + 1) for i in range(5)], dim=1)
    torch.testing.assert_close(frames, expected)
    # The context slides: step i sees the GT frames i.. and the first i predictions.
    assert torch.equal(model.seen[2][:, :2], context[:, 2:])
    torch.testing.assert_close(model.seen[2][:, 2:], expected[:, :2])
    assert rollout(model, context, 0).shape == (3, 0, 6)


def test_sample_rollout_uses_the_temperature_and_the_generator() -> None:
    context = torch.randn(2, 3, 4)
    model = _ScaleModel(dim=4, context=3, gain=0.0)
    first = rollout(
        model, context, 3, predict="sample", temperature=0.5, generator=torch.Generator().manual_seed(1)
    )
    again = rollout(
        model, context, 3, predict="sample", temperature=0.5, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(first, again)
    gen = torch.Generator().manual_seed(1)
    noise = torch.stack([torch.randn(2, 4, generator=gen) for _ in range(3)], dim=1)  # one draw per step
    expected = context[:, -1, None] + 0.5 * torch.cumsum(noise, dim=1)
    torch.testing.assert_close(first, expected)


@pytest.mark.parametrize(("horizon", "stride"), [(1, 2), (2, 2), (2, 1)])
def test_models_that_do_not_predict_frame_by_frame_are_refused(horizon: int, stride: int) -> None:
    model = _ScaleModel(dim=4, context=3, gain=0.0, horizon=horizon, context_stride=stride)
    with pytest.raises(ValueError, match="horizon == context_stride == 1"):
        frame_by_frame_context(model)
    with pytest.raises(ValueError, match="horizon == context_stride == 1"):
        rollout(model, torch.zeros(1, 3, 4), 2)


def test_pipeline_on_an_exp1_checkpoint(compose_cfg, tmp_path: Path) -> None:
    # The tiniest Exp 1 run: the model's quality does not matter here, only its checkpoint.
    quick = ["trainer.max_steps=4", "trainer.val_check_interval=4", "battery.slices=[all]"]
    cfg1 = compose_cfg(["experiment=exp1_vmf", *SMOKE, "horizons=[1]", *quick])
    exp1_vmf.run(cfg1)
    ckpt = Path(cfg1.run_dir) / "checkpoints" / "vmf_k1_final.ckpt"
    # Register the Exp 1 run as completed, so checkpoint=latest finds it through the manifest.
    manifest = Path(cfg1.paths.manifest)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    for status in ("started", "completed"):
        record = {"run_id": "e1", "experiment": "exp1_vmf", "run_dir": cfg1.run_dir, "status": status}
        append_record(manifest, {**record, "time": "2026-01-01T00:00:00"})

    lengths = [0, 1, 2, 4, 8, 16]
    cfg = compose_cfg(
        [
            "experiment=exp7_perceptual_rollout",
            *SMOKE,
            "checkpoint=latest",
            "n_utterances=2",
            "max_seconds=2.5",
            "prefix_seconds=1.0",
            f"rollout_lengths=[{','.join(map(str, lengths))}]",
        ]
    )
    metrics = exp7.run(cfg)
    run_dir = Path(cfg.run_dir)
    manifest_out = json.loads((run_dir / "manifest.json").read_text())
    assert manifest_out["checkpoint"] == str(ckpt)
    hop, n_frames, start = 1920, 31, 12  # 24 kHz / 12.5 Hz; floor(2.5 x 12.5); round(1.0 x 12.5)
    assert manifest_out["prefix_frames"] == start and manifest_out["context_frames"] == cfg1.model.context

    files = manifest_out["files"]
    utts = sorted({e["utterance"] for e in files})
    assert len(utts) == 2 and len(files) == 2 * (1 + len(lengths))
    assert [c["utterance"] for c in manifest_out["reconstruction_ceiling"]] == utts
    for entry in files:
        info = sf.info(run_dir / entry["path"])
        assert info.samplerate == 48000 == entry["sample_rate"]
        assert info.frames == n_frames * hop * 2 == entry["n_samples"]
    for utt in utts:
        entries = {e["L"]: e for e in files if e["utterance"] == utt}
        assert set(entries) == {None, *lengths}
        assert entries[None]["path"] == f"audio/{utt}/gt.wav"
        for length in lengths:
            entry = entries[length]
            assert entry["path"] == f"audio/{utt}/L{length:02d}.wav"
            assert entry["frame_span"] == [start, start + length]
            assert entry["scored_sample_span"] == [start * hop, (start + length) * hop]
        gt = sf.read(run_dir / entries[None]["path"], dtype="float32")[0] / entries[None]["gain"]
        l0 = sf.read(run_dir / entries[0]["path"], dtype="float32")[0] / entries[0]["gain"]
        np.testing.assert_array_equal(l0, gt)  # the L = 0 splice is the GT trajectory
        assert all(v is None for v in entries[0]["distances"].values())
        assert entries[16]["distances"]["mrstft"] > 0 and entries[16]["distances"]["stoi"] is not None
    for length in lengths[1:]:
        assert f"L{length:02d}/mrstft" in metrics and f"L{length:02d}/si_sdr" in metrics
    assert metrics["n_utterances"] == 2.0 and metrics["ceiling/mrstft"] > 0

    # A checkpoint whose context stride is not 1 is refused before any decoding.
    state = torch.load(ckpt, weights_only=False)
    state["hyper_parameters"]["context_stride"] = 2
    bad = tmp_path / "bad_stride.ckpt"
    torch.save(state, bad)
    cfg_bad = compose_cfg(["experiment=exp7_perceptual_rollout", *SMOKE, f"checkpoint={bad}"])
    with pytest.raises(ValueError, match="context_stride 2"):
        exp7.run(cfg_bad)
