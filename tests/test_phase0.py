"""Phase 0 end to end (synthetic corpus -> splits -> mel latent store) in temporary directories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from latentdyn.data.audio import BadAudioError, load_audio
from latentdyn.data.latent_store import LatentStore
from latentdyn.experiments import phase0
from latentdyn.pipeline import store as store_steps
from latentdyn.representations.energy import frame_log_energy
from latentdyn.representations.mel import MelRepresentation


def test_phase0_builds_a_consistent_store_and_reuses_it(compose_cfg, caplog) -> None:
    caplog.set_level("INFO")
    cfg = compose_cfg(["experiment=phase0", "debug=smoke"])
    metrics = phase0.run(cfg)
    store_dir = next((Path(cfg.paths.cache_dir) / "latents").glob("[0-9a-f]*[0-9a-f]"))
    store = LatentStore(store_dir)
    splits = store_steps.prepare_splits(cfg)

    # Shapes and index consistency.
    assert store.dim == 80 and store.latents.shape == (store.n_frames, 80)
    assert store.frame_rate == 12.5 and store.meta["representation"] == "mel"
    lengths = [u.n_frames for u in store.index]
    rows = sorted((u.start, u.n_frames) for u in store.index)
    assert rows[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(rows, rows[1:], strict=False))
    assert sum(lengths) == store.n_frames
    assert {u.utt_id for u in store.utterances("train")} == {u.utt_id for u in splits["train"]}
    speakers = {s: {u.speaker for u in store.utterances(s)} for s in ("train", "val", "test")}
    assert not (speakers["train"] & speakers["val"]) and not (speakers["train"] & speakers["test"])

    # Latents equal a direct encoding of the audio; energies align with frames.
    rep = MelRepresentation(sample_rate=24000, frame_rate=12.5, n_mels=80)
    utt = splits["val"][0]
    wave = load_audio(utt.path, 24000)
    direct = rep.encode(wave.view(1, 1, -1))[0].T.numpy()
    stored = store.utterance_latents(next(u for u in store.index if u.utt_id == utt.utt_id))
    assert stored.shape == direct.shape
    np.testing.assert_allclose(stored.astype(np.float32), direct, atol=2e-2, rtol=2e-3)

    # Train-split statistics.
    train = np.concatenate([store.utterance_latents(u).astype(np.float64) for u in store.utterances("train")])
    np.testing.assert_allclose(store.mean, train.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(store.std, train.std(0), rtol=1e-3, atol=1e-4)

    # Energy aligned to frames.
    u0 = next(u for u in store.index if u.utt_id == utt.utt_id)
    energy = store.log_energy[u0.start : u0.start + u0.n_frames]
    np.testing.assert_allclose(energy, frame_log_energy(wave, 1920).numpy()[: u0.n_frames], atol=1e-3)

    # Summary metrics.
    assert metrics["train_utterances"] == len(splits["train"])
    assert metrics["bad_files_skipped"] == 0
    assert json.loads((Path(cfg.run_dir) / "metrics.json").read_text())["n_frames"] == store.n_frames
    summary = json.loads((Path(cfg.run_dir) / "summary.json").read_text())
    assert summary["latent_store"] == str(store.root)

    # A second run reuses every artifact.
    caplog.clear()
    phase0.run(cfg)
    assert "building" not in caplog.text
    assert caplog.text.count("reused") >= 2


def _corrupt_one_file(cfg) -> str:
    utts = store_steps.prepare_corpus(cfg)
    victim = store_steps.prepare_splits(cfg)["train"][1]
    assert victim.utt_id in {u.utt_id for u in utts}
    Path(victim.path).write_bytes(b"RIFF\x00\x00garbage, not audio")
    return victim.path


def test_bad_files_are_named_and_skipped(compose_cfg, caplog) -> None:
    cfg = compose_cfg(["experiment=phase0", "debug=smoke"])
    victim = _corrupt_one_file(cfg)
    metrics = phase0.run(cfg)
    assert metrics["bad_files_skipped"] == 1
    summary = json.loads((Path(cfg.run_dir) / "summary.json").read_text())
    assert [b["path"] for b in summary["bad_files"]] == [victim]
    assert victim in caplog.text


def test_bad_file_with_error_policy_fails_naming_the_file(compose_cfg) -> None:
    cfg = compose_cfg(["experiment=phase0", "debug=smoke", "data.on_bad_audio=error"])
    victim = _corrupt_one_file(cfg)
    with pytest.raises(BadAudioError, match=victim.replace(".", r"\.")):
        phase0.run(cfg)


def test_unknown_bad_audio_policy_is_rejected(compose_cfg) -> None:
    cfg = compose_cfg(["experiment=phase0", "debug=smoke", "data.on_bad_audio=ignore"])
    with pytest.raises(ValueError, match="on_bad_audio"):
        phase0.run(cfg)
