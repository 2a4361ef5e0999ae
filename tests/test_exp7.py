"""Exp 7: splicing, the frame-by-frame rollout (closed forms with stub models: point predictions, raw vs
standardised space, k = 1 only), the reference's start ``T // 3 + W``, and the pipeline on a tiny Exp 1
checkpoint (the decoded latents: GT outside the span, the rollout inside; 48 kHz and native WAVs, manifest
spans, L = 0 identity, checkpoint=latest, refusal of a k = 2 model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from latentdyn.data.latent_store import LatentStore, LatentStoreWriter
from latentdyn.experiments import exp1_vmf
from latentdyn.experiments import exp7_perceptual_rollout as exp7
from latentdyn.experiments.exp7_perceptual_rollout import (
    frame_by_frame_context,
    min_trajectory_frames,
    raw_rollout,
    rollout,
    rollout_start,
    splice,
)
from latentdyn.tracking.manifest import append_record
from tests.conftest import compose_at

SMOKE = ["debug=smoke", "logger=none"]


class _Predictive:
    """Predictive distribution with a fixed median and mean; ``sample`` adds temperature x N(0, 1) to the median."""

    def __init__(self, median: torch.Tensor, mean: torch.Tensor | None = None) -> None:
        self._median = median
        self._mean = median if mean is None else mean

    def median(self) -> torch.Tensor:
        return self._median

    def mean(self) -> torch.Tensor:
        return self._mean

    def sample(self, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self._median.shape, generator=generator)
        return self._median + temperature * noise


class _ScaleModel:
    """Stub DeltaModel: median ``gain * last frame``, mean ``mean_gain * last frame``, so a rollout grows as
    ``(1 + gain)^i`` (median) or ``(1 + mean_gain)^i`` (mean)."""

    def __init__(
        self,
        dim: int,
        context: int,
        gain: float,
        horizon: int = 1,
        context_stride: int = 1,
        horizon_mode: str = "lag",
        mean_gain: float | None = None,
    ) -> None:
        self.dim, self.context, self.gain = dim, context, gain
        self.mean_gain = gain if mean_gain is None else mean_gain
        self.horizon, self.context_stride, self.horizon_mode = horizon, context_stride, horizon_mode
        self.seen: list[torch.Tensor] = []

    def predictive(self, context: torch.Tensor) -> _Predictive:
        self.seen.append(context.clone())
        return _Predictive(self.gain * context[:, -1], self.mean_gain * context[:, -1])


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


def test_median_rollout_feeds_predictions_back() -> None:
    context = torch.randn(3, 4, 6)
    model = _ScaleModel(dim=6, context=4, gain=0.5, mean_gain=-0.25)
    frames = rollout(model, context, 5)  # predict defaults to the median, the reference's rollout step
    expected = torch.stack([context[:, -1] * 1.5 ** (i + 1) for i in range(5)], dim=1)
    torch.testing.assert_close(frames, expected)
    # The context slides: step i sees the GT frames i.. and the first i predictions.
    assert torch.equal(model.seen[2][:, :2], context[:, 2:])
    torch.testing.assert_close(model.seen[2][:, 2:], expected[:, :2])
    assert rollout(model, context, 0).shape == (3, 0, 6)


@pytest.mark.parametrize(("predict", "factor"), [("median", 1.5), ("mean", 0.75)])
def test_predict_chooses_the_median_or_the_mean(predict: str, factor: float) -> None:
    context = torch.randn(2, 3, 4)
    model = _ScaleModel(dim=4, context=3, gain=0.5, mean_gain=-0.25)
    frames = rollout(model, context, 3, predict=predict)
    expected = torch.stack([context[:, -1] * factor ** (i + 1) for i in range(3)], dim=1)
    torch.testing.assert_close(frames, expected)
    with pytest.raises(ValueError, match="predict must be one of"):
        rollout(model, context, 3, predict="mode")


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
def test_stride_models_that_do_not_predict_frame_by_frame_are_refused(horizon: int, stride: int) -> None:
    model = _ScaleModel(
        dim=4, context=3, gain=0.0, horizon=horizon, context_stride=stride, horizon_mode="stride"
    )
    with pytest.raises(ValueError, match="horizon == context_stride == 1"):
        frame_by_frame_context(model)
    with pytest.raises(ValueError, match="horizon == context_stride == 1"):
        rollout(model, torch.zeros(1, 3, 4), 2)


def test_lag_models_need_k_equal_to_one() -> None:
    assert frame_by_frame_context(_ScaleModel(dim=4, context=3, gain=0.0)) == 3
    assert frame_by_frame_context(_ScaleModel(dim=4, context=5, gain=0.0, horizon_mode="stride")) == 5
    lag2 = _ScaleModel(dim=4, context=3, gain=0.0, horizon=2)
    with pytest.raises(ValueError, match="k = 1 model .*horizon 2"):
        frame_by_frame_context(lag2)
    with pytest.raises(ValueError, match="k = 1 model"):
        rollout(lag2, torch.zeros(1, 3, 4), 2)


def test_rollout_start_is_a_third_plus_the_context() -> None:
    assert rollout_start(200, 8) == 74 and rollout_start(31, 4) == 14 and rollout_start(47, 8) == 23
    for w, longest in [(8, 16), (4, 16), (3, 0), (8, 1)]:
        # The shortest T whose span fits, by brute force: T // 3 + W + L <= T.
        brute = next(t for t in range(1, 1000) if t // 3 + w + longest <= t)
        assert min_trajectory_frames(w, longest) == brute
    assert min_trajectory_frames(8, 16) == 35  # 35 // 3 + 8 + 16 = 35


class _RawAffineModel:
    """Stub lag k = 1 model in RAW space: median ``Δ = 0.3 * (mean of the window) - 0.5 * last + b``."""

    def __init__(self, bias: torch.Tensor, context: int = 3) -> None:
        self.dim, self.context, self.horizon, self.context_stride = bias.numel(), context, 1, 1
        self.horizon_mode, self.bias = "lag", bias

    def predictive(self, context: torch.Tensor) -> _Predictive:
        delta = 0.3 * context.mean(dim=1) - 0.5 * context[:, -1] + self.bias
        return _Predictive(delta, delta + 1.0)


class _StandardizedView(_RawAffineModel):
    """The same model seen from the standardised space: de-standardises its context, standardises Δ."""

    def __init__(self, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, context: int = 3) -> None:
        super().__init__(bias, context)
        self.mean, self.std = mean, std

    def predictive(self, context: torch.Tensor) -> _Predictive:
        raw = super().predictive(context * self.std + self.mean)
        return _Predictive(raw.median() / self.std, raw.mean() / self.std)


def _store(root: Path) -> LatentStore:
    rng = np.random.default_rng(0)
    meta = {"representation": "fake", "sample_rate": 16000, "frame_rate": 50.0, "weights": {"source": "none"}}
    with LatentStoreWriter(root, dim=3, meta=meta) as writer:
        for i, (split, n) in enumerate([("train", 40), ("train", 30), ("test", 20)]):
            writer.add(
                f"u{i}", "s", split, rng.normal([5.0, -2.0, 0.0], [0.1, 3.0, 20.0], (n, 3)), np.zeros(n)
            )
    return LatentStore(root)


def test_raw_and_standardized_rollouts_of_the_same_model_agree(tmp_path: Path) -> None:
    store = _store(tmp_path / "store")
    bias = torch.tensor([0.2, -1.0, 3.0])
    mean, std = torch.from_numpy(store.mean), torch.from_numpy(store.std)
    context = torch.from_numpy(np.array(store.utterance_latents(2)[:3], dtype=np.float32))[None]  # (1, 3, 3)
    steps = 6
    # Oracle: the raw-space recursion written out in float64.
    window = context[0].double().numpy()
    expected = []
    for _ in range(steps):
        frame = window[-1] + 0.3 * window.mean(axis=0) - 0.5 * window[-1] + bias.double().numpy()
        expected.append(frame)
        window = np.vstack([window[1:], frame])
    expected = torch.from_numpy(np.stack(expected)).float()[None]

    raw = raw_rollout(_RawAffineModel(bias), store, context, steps, standardized=False)
    std_space = raw_rollout(_StandardizedView(bias, mean, std), store, context, steps, standardized=True)
    torch.testing.assert_close(raw, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(std_space, expected, rtol=1e-5, atol=1e-4)
    # A standardised model fed raw latents (the wrong space) does not give the same frames.
    wrong = raw_rollout(_StandardizedView(bias, mean, std), store, context, steps, standardized=False)
    assert not torch.allclose(wrong, expected, rtol=1e-2, atol=1e-2)


@pytest.fixture(scope="module")
def exp1_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DictConfig, Path]:
    """The tiniest Exp 1 run (k = 1, lag, raw space), registered as completed so checkpoint=latest finds it:
    (root, its config, its checkpoint). The model's quality does not matter here, only its checkpoint."""
    root = tmp_path_factory.mktemp("exp7")
    quick = ["trainer.max_steps=4", "trainer.val_check_interval=4", "battery.slices=[all]"]
    cfg1 = compose_at(root, ["experiment=exp1_vmf", *SMOKE, "horizons=[1]", *quick], root / "exp1")
    exp1_vmf.run(cfg1)
    manifest = Path(cfg1.paths.manifest)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    for status in ("started", "completed"):
        record = {"run_id": "e1", "experiment": "exp1_vmf", "run_dir": cfg1.run_dir, "status": status}
        append_record(manifest, {**record, "time": "2026-01-01T00:00:00"})
    yield root, cfg1, Path(cfg1.run_dir) / "checkpoints" / "vmf_k1_final.ckpt"
    GlobalHydra.instance().clear()


@pytest.mark.slow
def test_pipeline_on_an_exp1_checkpoint(exp1_run: tuple[Path, DictConfig, Path], monkeypatch) -> None:
    root, cfg1, ckpt = exp1_run
    assert cfg1.horizon_mode == "lag" and cfg1.standardize is False

    # Record the latents each decode call receives (the real decoder still runs).
    decoded: list[torch.Tensor] = []
    real_decode = exp7.decode_latents

    def spy(rep, latents):
        decoded.append(latents.clone())
        return real_decode(rep, latents)

    monkeypatch.setattr(exp7, "decode_latents", spy)

    lengths = [0, 1, 2, 4, 8, 16]
    cfg = compose_at(
        root,
        [
            "experiment=exp7_perceptual_rollout",
            *SMOKE,
            "checkpoint=latest",
            "n_utterances=2",
            f"rollout_lengths=[{','.join(map(str, lengths))}]",
        ],
        root / "exp7",
    )
    assert cfg.predict == "median" and cfg.max_frames == 31  # the smoke config's cap (the reference: 200)
    metrics = exp7.run(cfg)
    run_dir = Path(cfg.run_dir)
    manifest_out = json.loads((run_dir / "manifest.json").read_text())
    assert manifest_out["checkpoint"] == str(ckpt)
    w = cfg1.model.context
    hop, n_frames = 1920, 31  # 24 kHz / 12.5 Hz; every smoke utterance (>= 3.5 s) is cropped to 31 frames
    start = n_frames // 3 + w  # the reference's T // 3 + W
    assert manifest_out["context_frames"] == w and manifest_out["model_space"] == "raw"

    files = manifest_out["files"]
    utts = sorted({e["utterance"] for e in files})
    assert len(utts) == 2 and len(files) == 2 * (1 + len(lengths))
    assert [c["utterance"] for c in manifest_out["reconstruction_ceiling"]] == utts
    for entry in files:
        info = sf.info(run_dir / entry["path"])
        assert info.samplerate == 48000 == entry["sample_rate"]
        assert info.frames == n_frames * hop * 2 == entry["n_samples"]  # the whole trajectory, 0 .. T
        native = sf.info(run_dir / entry["native"]["path"])
        assert native.samplerate == 24000 == entry["native"]["sample_rate"]
        assert native.frames == n_frames * hop == entry["native"]["n_samples"]
        assert entry["rollout_start"] == start and entry["n_frames"] == n_frames
    for utt in utts:
        entries = {e["L"]: e for e in files if e["utterance"] == utt}
        assert set(entries) == {None, *lengths}
        assert entries[None]["path"] == f"audio/{utt}/gt.wav"
        assert entries[None]["native"]["path"] == f"audio/{utt}/24000Hz/gt.wav"
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

    # The decoded latents: GT, then per L the GT with frames [start, start + L) replaced by an independent
    # re-computation of the raw-space median rollout, and the GT untouched before and after the span.
    from latentdyn.models.dynamics import load_dynamics
    from latentdyn.pipeline.store import prepare_latent_store

    net = load_dynamics(ckpt).net
    store = prepare_latent_store(cfg)
    assert len(decoded) == len(utts)
    for utt_id, batch in zip(utts, decoded, strict=True):
        utt = next(u for u in store.utterances("test") if u.utt_id == utt_id)
        x = torch.from_numpy(np.array(store.utterance_latents(utt)[:n_frames], dtype=np.float32))
        assert batch.shape == (1 + len(lengths), n_frames, store.dim)
        assert torch.equal(batch[0], x)
        x_hat = x.clone()
        with torch.no_grad():
            for t in range(start, start + max(lengths)):
                x_hat[t] = x_hat[t - 1] + net.predictive(x_hat[None, t - w : t]).median()[0]
        for length, spliced in zip(lengths, batch[1:], strict=True):
            assert torch.equal(spliced[:start], x[:start]) and torch.equal(
                spliced[start + length :], x[start + length :]
            )
            torch.testing.assert_close(spliced[start : start + length], x_hat[start : start + length])


@pytest.mark.slow
def test_k2_checkpoints_are_refused_and_defaults_follow_the_reference(
    exp1_run: tuple[Path, DictConfig, Path], tmp_path: Path
) -> None:
    root, _, ckpt = exp1_run
    cfg = compose_at(root, ["experiment=exp7_perceptual_rollout"], tmp_path / "defaults")
    assert (cfg.n_utterances, cfg.max_frames, list(cfg.rollout_lengths)) == (10, 200, [1, 2, 4, 8, 16])
    assert cfg.predict == "median" and cfg.output_sample_rate == 48000

    # A lag model with k = 2 (the same weights: the horizon does not change the network) is refused before
    # any decoding.
    state = torch.load(ckpt, weights_only=True)
    state["hyper_parameters"]["horizon"] = 2
    bad = tmp_path / "lag_k2.ckpt"
    torch.save(state, bad)
    cfg_bad = compose_at(
        root, ["experiment=exp7_perceptual_rollout", *SMOKE, f"checkpoint={bad}"], tmp_path / "a"
    )
    with pytest.raises(ValueError, match="k = 1 model .*horizon 2"):
        exp7.run(cfg_bad)
    # max_frames too short for T // 3 + W + max(L) <= T.
    cfg_short = compose_at(
        root,
        ["experiment=exp7_perceptual_rollout", *SMOKE, f"checkpoint={ckpt}", "max_frames=20"],
        tmp_path / "b",
    )
    with pytest.raises(ValueError, match="max_frames=20 is too short"):
        exp7.run(cfg_short)
