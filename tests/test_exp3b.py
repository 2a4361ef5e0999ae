"""Exp 3B: the latent edits (closed forms, norms, sphere uniformity) in raw and standardised space, audio I/O
helpers (cropping, the 48 kHz + native-rate writer), and the pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hydra.utils import instantiate
from scipy import stats

from latentdyn.data.audio import load_audio
from latentdyn.data.latent_store import LatentStore, LatentStoreWriter
from latentdyn.diagnostics.audio_io import (
    choose_utterances,
    crop_frames,
    objective_distances,
    raw_from_edit,
    write_listening_wav,
    write_wav,
)
from latentdyn.diagnostics.audio_metrics import log_mel_distance
from latentdyn.experiments import exp3b_synthetic_audio as exp3b
from latentdyn.experiments.exp3b_synthetic_audio import edited_raw_latents, slow, stationary, wrong_direction


def _trajectory(t: int = 40, d: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.cumsum(torch.randn(t, d, generator=gen), dim=0)


def test_slow_with_alpha_one_reproduces_the_trajectory() -> None:
    z = _trajectory()
    assert torch.allclose(slow(z, 1.0), z, rtol=0, atol=0)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 2.0])
def test_slow_scales_every_delta_by_alpha(alpha: float) -> None:
    z = _trajectory().double()
    edited = slow(z, alpha)
    assert torch.equal(edited[0], z[0])
    torch.testing.assert_close(edited.diff(dim=0), alpha * z.diff(dim=0), rtol=1e-12, atol=1e-12)


def test_stationary_is_constant_at_the_first_frame() -> None:
    z = _trajectory()
    edited = stationary(z)
    assert edited.shape == z.shape
    assert torch.equal(edited, z[:1].expand_as(z))
    assert torch.equal(slow(z, 0.0), edited)


def test_wrong_direction_keeps_step_norms_and_start() -> None:
    z = _trajectory(t=60, d=32)
    edited = wrong_direction(z, torch.Generator().manual_seed(3))
    assert torch.equal(edited[0], z[0])
    true_norms = torch.linalg.vector_norm(z.diff(dim=0), dim=1)
    torch.testing.assert_close(
        torch.linalg.vector_norm(edited.diff(dim=0), dim=1), true_norms, rtol=1e-5, atol=1e-5
    )
    # Not the true directions: the cosine with the true step is near 0 (±1/sqrt(D) each), not 1.
    cos = torch.nn.functional.cosine_similarity(edited.diff(dim=0), z.diff(dim=0), dim=1)
    assert cos.abs().mean() < 0.4


def test_wrong_direction_is_seeded() -> None:
    z = _trajectory()
    a = wrong_direction(z, torch.Generator().manual_seed(1))
    b = wrong_direction(z, torch.Generator().manual_seed(1))
    c = wrong_direction(z, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_wrong_direction_steps_are_uniform_on_the_sphere() -> None:
    # For u uniform on S^{D-1}, (u_i + 1) / 2 ~ Beta((D-1)/2, (D-1)/2) for every coordinate i.
    d, t = 6, 3001
    z = torch.zeros(t, d, dtype=torch.float64)
    z[:, 0] = torch.arange(t, dtype=torch.float64)  # unit steps along e_1
    steps = wrong_direction(z, torch.Generator().manual_seed(0)).diff(dim=0)
    torch.testing.assert_close(torch.linalg.vector_norm(steps, dim=1), torch.ones(t - 1, dtype=torch.float64))
    for i in (0, d - 1):
        p = stats.kstest((steps[:, i].numpy() + 1) / 2, stats.beta((d - 1) / 2, (d - 1) / 2).cdf).pvalue
        assert p > 1e-3, (i, p)


def _tiny_store(root: Path) -> LatentStore:
    rng = np.random.default_rng(0)
    meta = {"representation": "fake", "sample_rate": 16000, "frame_rate": 50.0, "weights": {"source": "none"}}
    with LatentStoreWriter(root, dim=4, meta=meta) as writer:
        for i, (split, n) in enumerate(
            [("train", 30), ("train", 20), ("test", 5), ("test", 12), ("test", 9)]
        ):
            latents = rng.normal(3.0, [0.5, 2.0, 10.0, 1e-3], size=(n, 4))
            writer.add(f"u{i}", "s", split, latents, np.zeros(n))
    return LatentStore(root)


def test_raw_from_edit_is_exact_where_nothing_changes(tmp_path: Path) -> None:
    store = _tiny_store(tmp_path / "store")
    raw = torch.from_numpy(np.array(store.utterance_latents(2), dtype=np.float32))
    z = store.standardize(raw)
    assert torch.equal(raw_from_edit(store, raw, z, z), raw)
    edited = slow(z, 0.5)
    torch.testing.assert_close(raw_from_edit(store, raw, z, edited), store.destandardize(edited))
    # The edit happens in standardised units: a unit standardised step is one train std in raw units.
    step = torch.zeros_like(z)
    step[:, 1] = 1.0
    torch.testing.assert_close(
        raw_from_edit(store, raw, z, z + step) - raw, step * torch.from_numpy(store.std)
    )


def test_choose_utterances_is_seeded_and_respects_min_frames(tmp_path: Path) -> None:
    store = _tiny_store(tmp_path / "store")
    first = choose_utterances(store, "test", 2, seed=0)
    assert first == choose_utterances(store, "test", 2, seed=0)
    assert len(first) == 2 and all(u.split == "test" for u in first)
    assert [u.utt_id for u in choose_utterances(store, "test", 5, seed=0, min_frames=9)] == ["u3", "u4"]
    with pytest.raises(ValueError, match=">= 13 frames"):
        choose_utterances(store, "test", 1, seed=0, min_frames=13)
    assert crop_frames(300, 200) == 200
    assert crop_frames(150, 200) == 150
    assert crop_frames(3, None) == 3
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_frames"):
            crop_frames(10, bad)


def _raw_edits(store: LatentStore, raw: torch.Tensor, space: str, seed: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {e.stem: x for e, x in edited_raw_latents(store, raw, [0.25, 0.5, 0.75], gen, space)}


def test_raw_space_edits_scale_and_keep_raw_deltas(tmp_path: Path) -> None:
    store = _tiny_store(tmp_path / "store")  # train stds 0.5, 2, 10, 1e-3: raw and standardised norms differ
    raw = torch.from_numpy(np.array(store.utterance_latents(3), dtype=np.float32))  # (12, 4)
    edits = _raw_edits(store, raw, "raw")
    assert list(edits) == ["A_stationary", "B_slow_a0.25", "B_slow_a0.5", "B_slow_a0.75", "C_wrong_dir"]
    x = raw.numpy().astype(np.float64)
    dx = np.diff(x, axis=0)
    np.testing.assert_array_equal(
        edits["A_stationary"].numpy(), np.repeat(x[:1], len(x), 0).astype(np.float32)
    )
    for alpha in (0.25, 0.5, 0.75):
        edited = edits[f"B_slow_a{alpha:g}"].numpy().astype(np.float64)
        np.testing.assert_array_equal(edited[0], x[0])
        np.testing.assert_allclose(np.diff(edited, axis=0), alpha * dx, rtol=1e-5, atol=1e-4)
    wrong = edits["C_wrong_dir"].numpy().astype(np.float64)
    np.testing.assert_array_equal(wrong[0], x[0])
    raw_norms = np.linalg.norm(dx, axis=1)
    np.testing.assert_allclose(np.linalg.norm(np.diff(wrong, axis=0), axis=1), raw_norms, rtol=1e-5)
    # Not the standardised norms: those are the raw deltas divided by the train std per dimension.
    std_norms = np.linalg.norm(dx / store.std.astype(np.float64), axis=1)
    assert np.all(np.abs(std_norms - raw_norms) > 0.1 * raw_norms)


def test_standardized_space_edits_keep_standardized_norms(tmp_path: Path) -> None:
    store = _tiny_store(tmp_path / "store")
    raw = torch.from_numpy(np.array(store.utterance_latents(3), dtype=np.float32))
    edits = _raw_edits(store, raw, "standardized")
    mean, std = store.mean.astype(np.float64), store.std.astype(np.float64)
    x = raw.numpy().astype(np.float64)
    wrong_std = (edits["C_wrong_dir"].numpy().astype(np.float64) - mean) / std
    np.testing.assert_allclose(
        np.linalg.norm(np.diff(wrong_std, axis=0), axis=1),
        np.linalg.norm(np.diff((x - mean) / std, axis=0), axis=1),
        rtol=1e-4,
    )
    # A_stationary and B_slow commute with the affine standardisation: the same raw latents in both spaces.
    raw_edits = _raw_edits(store, raw, "raw")
    for key in ("A_stationary", "B_slow_a0.25", "B_slow_a0.5", "B_slow_a0.75"):
        torch.testing.assert_close(edits[key], raw_edits[key], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="edit_space"):
        _raw_edits(store, raw, "whitened")


def _sine(freq: float, sr: int, n: int) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * freq * np.arange(n) / sr)


def test_listening_wav_is_written_at_48k_and_at_the_native_rate(tmp_path: Path) -> None:
    sr, n = 24000, 24000 + 7
    wave = torch.from_numpy(_sine(1000.0, sr, n).astype(np.float32))
    entry = write_listening_wav(tmp_path / "audio" / "u", "gt", wave, sr, 48000, tmp_path)
    assert entry["path"] == "audio/u/gt.wav" and entry["native"]["path"] == "audio/u/24000Hz/gt.wav"
    out, out_sr = sf.read(tmp_path / entry["path"], dtype="float32")
    native, native_sr = sf.read(tmp_path / entry["native"]["path"], dtype="float32")
    assert (out_sr, native_sr) == (48000, 24000) == (entry["sample_rate"], entry["native"]["sample_rate"])
    assert len(out) == math.ceil(n * 48000 / sr) == entry["n_samples"]
    assert len(native) == n == entry["native"]["n_samples"]
    assert entry["duration_s"] == pytest.approx(n / sr, abs=1 / 48000)
    np.testing.assert_array_equal(native, wave.numpy())  # below full scale: gain 1, the samples as they are
    # The 48 kHz file is the same sine sampled at 48 kHz (away from the edges).
    np.testing.assert_allclose(out[2000:-2000], _sine(1000.0, 48000, len(out))[2000:-2000], atol=2e-3)

    # A signal over full scale: one gain for both files, the louder's (the resampler can overshoot).
    loud = write_listening_wav(tmp_path / "audio" / "u", "loud", wave * 8, sr, 48000, tmp_path)
    out, _ = sf.read(tmp_path / loud["path"], dtype="float32")
    native, _ = sf.read(tmp_path / loud["native"]["path"], dtype="float32")
    assert loud["gain"] == loud["native"]["gain"] <= 1 / 4.0
    assert max(np.abs(out).max(), np.abs(native).max()) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(native, wave.numpy() * 8 * loud["gain"], rtol=1e-6)

    # At equal rates there is one file.
    same = write_listening_wav(tmp_path / "audio" / "v", "gt", wave, 48000, 48000, tmp_path)
    assert same["native"]["path"] == same["path"] == "audio/v/gt.wav"
    assert sorted(p.name for p in (tmp_path / "audio" / "v").rglob("*.wav")) == ["gt.wav"]


def test_objective_distances_handle_short_and_empty_spans() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=400)
    est = ref + 0.1 * rng.normal(size=400)
    short = objective_distances(ref, est, 24000)
    assert short["mrstft"] is None and short["stoi"] is None and short["pesq_wb"] is None
    expected = 10 * np.log10(np.sum(ref**2) / np.sum((est - ref) ** 2))
    assert short["si_sdr"] == pytest.approx(expected, abs=0.2)  # SI-SDR's optimal scaling is ~1 here
    assert all(v is None for v in objective_distances(ref[:0], est[:0], 24000).values())


def test_write_wav_limits_the_peak_and_reports_the_gain(tmp_path: Path) -> None:
    wave = torch.linspace(-4.0, 2.0, 1000)
    info = write_wav(tmp_path / "a.wav", wave, 24000)
    data, sr = sf.read(tmp_path / "a.wav", dtype="float32")
    assert sr == 24000 and info["n_samples"] == 1000 and info["gain"] == pytest.approx(0.25)
    np.testing.assert_allclose(data, wave.numpy() * 0.25, rtol=1e-6)
    quiet = write_wav(tmp_path / "b.wav", wave / 8, 24000)
    assert quiet["gain"] == 1.0
    np.testing.assert_array_equal(sf.read(tmp_path / "b.wav", dtype="float32")[0], (wave / 8).numpy())


@pytest.mark.slow
def test_pipeline_writes_decoded_edits_and_manifest(compose_cfg) -> None:
    cfg = compose_cfg(
        [
            "experiment=exp3b_synthetic_audio",
            "debug=smoke",
            "logger=none",
            "n_utterances=2",
            "max_frames=12",
            "alphas=[0.5,1.0]",
        ]
    )
    assert cfg.edit_space == "raw" and cfg.output_sample_rate == 48000
    metrics = exp3b.run(cfg)
    run_dir = Path(cfg.run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    rep = instantiate(cfg.representation)
    hop = round(rep.sample_rate / rep.frame_rate)  # 1920 samples at 24 kHz / 12.5 Hz
    n_frames = 12
    stems = {"gt_decoded", "original", "A_stationary", "B_slow_a0.5", "B_slow_a1", "C_wrong_dir"}

    utts = sorted({e["utterance"] for e in manifest["files"]})
    assert len(utts) == 2 and len(manifest["files"]) == 2 * len(stems)
    assert [c["utterance"] for c in manifest["reconstruction_ceiling"]] == utts
    native_dir = f"{rep.sample_rate}Hz"
    for entry in manifest["files"]:
        info = sf.info(run_dir / entry["path"])  # the listening file, resampled to 48 kHz
        assert info.samplerate == 48000 == entry["sample_rate"]
        assert info.frames == n_frames * hop * 48000 // rep.sample_rate == entry["n_samples"]
        assert entry["duration_s"] == pytest.approx(n_frames / rep.frame_rate)
        native = sf.info(run_dir / entry["native"]["path"])  # the scored signal at the codec's rate
        assert native.samplerate == rep.sample_rate == entry["native"]["sample_rate"]
        assert native.frames == n_frames * hop == entry["native"]["n_samples"]
    for utt in utts:
        assert {p.stem for p in (run_dir / "audio" / utt).glob("*.wav")} == stems
        assert {p.stem for p in (run_dir / "audio" / utt / native_dir).glob("*.wav")} == stems

    from latentdyn.pipeline.store import prepare_latent_store, prepare_splits

    store = prepare_latent_store(cfg)
    utt = next(u for u in store.utterances("test") if u.utt_id == utts[0])
    raw = torch.from_numpy(np.array(store.utterance_latents(utt)[:n_frames], dtype=np.float32))
    by_key = {e["key"]: e for e in manifest["files"] if e["utterance"] == utt.utt_id}

    def read(key: str) -> np.ndarray:
        native = by_key[key]["native"]
        return sf.read(run_dir / native["path"], dtype="float32")[0] / native["gain"]

    # The GT file is the store's latents decoded by the representation of the config (independently built).
    # Griffin-Lim's phase iteration amplifies float rounding (batched vs single decoding, MKL's code paths on
    # AVX-512 vs AVX2) into different waveforms (MR-STFT ~0.5 apart) with the same mel spectrum, so compare
    # log-mel spectra (dB): the GT file is ~0.5 dB from decode(z_true), the decoded stationary edit (the
    # wrong trajectory) ~16 dB, and even a 10 % slow-down (B_slow at alpha = 0.9) ~3 dB.
    expected_gt = rep.decode(raw.T[None])[0, 0].numpy()
    slightly_slow = rep.decode(slow(raw, 0.9).T[None].contiguous())[0, 0].numpy()
    to_gt = log_mel_distance(expected_gt, read("gt_decoded"), rep.sample_rate)
    to_slow = log_mel_distance(expected_gt, slightly_slow, rep.sample_rate)
    assert to_gt < 1.5 and to_gt < 0.5 * to_slow, (to_gt, to_slow)
    assert log_mel_distance(expected_gt, read("A_stationary"), rep.sample_rate) > 3 * to_slow
    # alpha = 1 is the identity edit, bit for bit through decoding (one batch, the same latents).
    np.testing.assert_array_equal(read("B_slow_a1"), read("gt_decoded"))
    assert by_key["B_slow_a1"]["distances"]["mrstft"] == 0.0
    # The original is the corpus file at the representation's rate, cropped to the decoded length.
    path = next(u.path for s in prepare_splits(cfg).values() for u in s if u.utt_id == utt.utt_id)
    np.testing.assert_allclose(
        read("original"), load_audio(path, rep.sample_rate)[: n_frames * hop].numpy(), atol=1e-6
    )
    for key in ("A_stationary", "B_slow_a0.5", "C_wrong_dir"):
        distances = by_key[key]["distances"]
        assert distances["mrstft"] > 0 and distances["log_mel"] > 0, key
        assert distances["pesq_wb"] is None or 1.0 <= distances["pesq_wb"] <= 4.7
    assert by_key["B_slow_a0.5"]["alpha"] == 0.5 and by_key["C_wrong_dir"]["alpha"] is None

    details = json.loads((run_dir / "metrics.json").read_text())
    assert details["edit_space"] == "raw" and details["max_frames"] == 12
    assert set(details["modes"]) == stems - {"gt_decoded", "original"}
    mean_a = np.mean([e["distances"]["mrstft"] for e in manifest["files"] if e["key"] == "A_stationary"])
    assert details["modes"]["A_stationary"]["mrstft"] == pytest.approx(mean_a)
    assert metrics["A_stationary/mrstft"] == pytest.approx(mean_a)
    assert metrics["n_utterances"] == 2.0
    assert metrics["ceiling/mrstft"] > 0 and "C_wrong_dir/si_sdr" in metrics


def test_reference_defaults_and_smoke_overrides(compose_cfg) -> None:
    cfg = compose_cfg(["experiment=exp3b_synthetic_audio"])
    assert (cfg.n_utterances, cfg.max_frames, list(cfg.alphas)) == (10, 200, [0.25, 0.5, 0.75])
    assert cfg.edit_space == "raw" and cfg.output_sample_rate == 48000
    smoke = compose_cfg(["experiment=exp3b_synthetic_audio", "debug=smoke"])
    assert (smoke.n_utterances, smoke.max_frames) == (2, 31)
