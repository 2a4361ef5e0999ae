"""The extraction engine: padding invariance, resumable shards, bad files, deterministic store order.

Everything runs on tiny synthetic audio written with soundfile at 8 kHz, with the mel representation and a
small causal convolution "codec" that counts its ``encode`` calls (and can be told to fail on the n-th,
to simulate a job killed mid-extraction).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from filelock import FileLock

from latentdyn.data.audio import BadAudioError, load_audio
from latentdyn.data.corpus import Utterance
from latentdyn.data.latent_store import LatentStore, LatentStoreWriter, store_meta
from latentdyn.representations.energy import frame_log_energy
from latentdyn.representations.extract import (
    PRIVATE_SHARD_DIR,
    aligned_log_energy,
    encode_padded,
    extract_to_store,
    length_buckets,
    plan_shards,
)
from latentdyn.representations.mel import MelRepresentation

SR = 8000
HOP = 80  # 100 frames per second at 8 kHz
STORE_FILES = ("latents.f16", "log_energy.f32", "index.jsonl", "stats.json", "meta.json")


class Killed(RuntimeError):
    """Raised by :class:`CausalConvCodec` to simulate a job killed in the middle of an extraction."""


class CausalConvCodec(torch.nn.Module):
    """A causal strided convolution satisfying the representation protocol: ``(B, 1, S) -> (B, 4, S // 80)``.

    Frame ``t`` sees samples ``[(t - 1) * 80, (t + 1) * 80)`` (zeros before the start), so it depends only on
    samples before the end of its own hop: right padding cannot change it.
    """

    name = "fake_causal"
    sample_rate = SR
    frame_rate = SR / HOP
    dim = 4

    def __init__(self, fail_on_call: int | None = None) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(1, self.dim, kernel_size=2 * HOP, stride=HOP)
        with torch.no_grad():
            weights = torch.randn(self.conv.weight.shape, generator=torch.Generator().manual_seed(7))
            self.conv.weight.copy_(weights * 0.2)
            self.conv.bias.zero_()
        self.weights = {"source": "random", "pretrained": False, "seed": 7}
        self.calls = 0
        self.fail_on_call = fail_on_call

    def num_frames(self, num_samples: int) -> int:
        return int(num_samples) // HOP

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise Killed(f"simulated kill at encode call {self.calls}")
        return self.conv(F.pad(wave, (HOP, 0)))


class GlobalNormCodec(CausalConvCodec):
    """Negative control: subtracts each output's mean over all (padded) frames, so padding leaks into every frame."""

    name = "fake_global_norm"

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        z = super().encode(wave)
        return z - z.mean(dim=-1, keepdim=True)


def _mel() -> MelRepresentation:
    return MelRepresentation(sample_rate=SR, frame_rate=SR / HOP, n_mels=16)


def _tone(n: int, seed: int) -> np.ndarray:
    """``n`` samples of a noisy, amplitude-modulated tone in ``[-0.8, 0.8]``."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    wave = np.sin(2 * np.pi * rng.uniform(100, 900) * t) * (0.5 + 0.4 * np.sin(2 * np.pi * 3 * t))
    wave += 0.05 * rng.standard_normal(n)
    return (0.8 * wave / np.abs(wave).max()).astype(np.float32)


def _utterance(root: Path, utt_id: str, speaker: str, n: int, seed: int) -> Utterance:
    path = root / f"{utt_id}.wav"
    sf.write(path, _tone(n, seed), SR, subtype="FLOAT")
    gender = "M" if int(speaker[1:]) % 2 == 0 else "F"
    return Utterance(utt_id, speaker, str(path), n / SR, SR, gender=gender)


def _corpus(root: Path, n_utts: int = 12) -> dict[str, list[Utterance]]:
    """Three splits of utterances whose durations (0.3-1.4 s) are not in utterance-id order."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lengths = rng.permutation(np.linspace(0.3 * SR, 1.4 * SR, n_utts).astype(int))
    splits: dict[str, list[Utterance]] = {"train": [], "val": [], "test": []}
    names = ["train"] * (n_utts - 4) + ["val", "val", "test", "test"]
    for i, (split, n) in enumerate(zip(names, lengths, strict=True)):
        speaker = f"s{i % 4 if split == 'train' else 4 + i % 2 + 2 * (split == 'test')}"
        splits[split].append(_utterance(root, f"{speaker}-0-{i:03d}", speaker, int(n), seed=i))
    return splits


def _extract(rep, splits, store_dir: Path, **kw) -> list:
    kw = {"batch_seconds": 2.0, "num_workers": 0, "progress": False, **kw}
    with LatentStoreWriter(store_dir, dim=rep.dim, meta=store_meta(rep)) as writer:
        return extract_to_store(rep, splits, writer, **kw)


def _store_bytes(store_dir: Path) -> dict[str, bytes]:
    return {name: (store_dir / name).read_bytes() for name in STORE_FILES}


# ------------------------------------------------------------------------------------- padding invariance


def _padded_vs_alone(rep, lengths: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    waves = [torch.from_numpy(_tone(n, seed=n)) for n in lengths]
    batch = torch.zeros(len(waves), 1, max(lengths))
    for i, w in enumerate(waves):
        batch[i, 0, : w.shape[0]] = w
    padded = encode_padded(rep, batch, lengths)
    alone = [encode_padded(rep, w.view(1, 1, -1), [w.shape[0]])[0] for w in waves]
    return list(zip(padded, alone, strict=True))


LENGTHS = [1234, 4000, 8000, 5555]


def test_mel_padded_batch_matches_unpadded() -> None:
    """Mel treats audio beyond the end as zeros, so zero padding changes no frame, near the tail or not.

    Stated tolerance: 1e-5 nats of log-mel power (values span about -11.5..5) for every frame, which only
    allows float rounding in the batched kernels; measured difference: exactly 0.
    """
    rep = _mel()
    window_frames = -(-rep.n_fft // HOP)  # frames whose window can reach past the signal's end
    for padded, alone in _padded_vs_alone(rep, LENGTHS):
        assert padded.shape == alone.shape and padded.shape[1] == 16
        far, tail = slice(0, -window_frames), slice(-window_frames, None)
        np.testing.assert_allclose(padded[far], alone[far], rtol=0, atol=1e-5)
        np.testing.assert_allclose(padded[tail], alone[tail], rtol=0, atol=1e-5)


def test_causal_codec_padded_batch_matches_unpadded_and_a_noncausal_one_does_not() -> None:
    for padded, alone in _padded_vs_alone(CausalConvCodec(), LENGTHS):
        assert padded.shape == alone.shape == (padded.shape[0], 4)
        np.testing.assert_allclose(padded, alone, rtol=0, atol=1e-6)
    # The comparison does detect padding leaking into frames: a global normalisation over time fails it.
    diffs = [np.abs(p - a).max() for p, a in _padded_vs_alone(GlobalNormCodec(), LENGTHS)]
    assert max(diffs) > 1e-3


def test_crop_length_and_short_encoder_output_is_an_error() -> None:
    rep = CausalConvCodec()
    wave = torch.zeros(2, 1, 1000)
    wave[0, 0, :250] = 0.5
    out = encode_padded(rep, wave, [250, 1000])
    assert [z.shape[0] for z in out] == [3, 12]

    class Truncating(CausalConvCodec):
        def encode(self, wave: torch.Tensor) -> torch.Tensor:
            return super().encode(wave)[..., :-1]

    with pytest.raises(RuntimeError, match="fewer than num_frames"):
        encode_padded(Truncating(), wave, [250, 1000])


def test_aligned_log_energy_crops_pads_and_floors() -> None:
    energy = np.array([-10.0, -20.0, -30.0], dtype=np.float32)
    np.testing.assert_array_equal(aligned_log_energy(energy, 2), [-10.0, -20.0])
    np.testing.assert_array_equal(aligned_log_energy(energy, 5), [-10.0, -20.0, -30.0, -30.0, -30.0])
    np.testing.assert_array_equal(aligned_log_energy(np.zeros(0, np.float32), 2), [-100.0, -100.0])


def test_length_buckets_sorted_bounded_and_complete(tmp_path: Path) -> None:
    splits = _corpus(tmp_path / "audio")
    items = [(s, u) for s, us in splits.items() for u in us]
    batches = list(length_buckets(items, 2.0))
    flat = [u for b in batches for _, u in b]
    assert sorted(u.utt_id for u in flat) == sorted(u.utt_id for _, u in items)
    assert [u.duration for u in flat] == sorted(u.duration for u in flat)
    for b in batches:
        assert len(b) == 1 or max(u.duration for _, u in b) * len(b) <= 2.0
    plan = plan_shards(items, batch_seconds=2.0, shard_seconds=3.0, settings={})
    assert plan.shards[0][0] == 0 and plan.shards[-1][1] == len(batches)
    assert all(a[1] == b[0] for a, b in zip(plan.shards, plan.shards[1:], strict=False))
    assert all(plan.shard_seconds(k) >= 3.0 for k in range(len(plan.shards) - 1))
    assert plan_shards(items, batch_seconds=2.0, shard_seconds=3.0, settings={"x": 1}).fingerprint != (
        plan.fingerprint
    )


# ------------------------------------------------------------------------------------------- the store


def test_store_order_and_content_do_not_depend_on_bucketing(tmp_path: Path) -> None:
    splits = _corpus(tmp_path / "audio")
    rep = _mel()
    _extract(rep, splits, tmp_path / "small", batch_seconds=0.5)  # one utterance per batch: no padding
    _extract(rep, splits, tmp_path / "large", batch_seconds=60.0, num_workers=1)  # one padded batch
    small, large = LatentStore(tmp_path / "small"), LatentStore(tmp_path / "large")

    expected = sorted((s, u.utt_id) for s, us in splits.items() for u in us)
    assert [(u.split, u.utt_id) for u in small.index] == expected
    items = [(s, u) for s, us in splits.items() for u in us]
    bucket_order = [(s, u.utt_id) for b in length_buckets(items, 60.0) for s, u in b]
    assert bucket_order != expected  # the store order really is not the processing order
    assert (tmp_path / "small/index.jsonl").read_bytes() == (tmp_path / "large/index.jsonl").read_bytes()
    np.testing.assert_array_equal(small.log_energy, large.log_energy)
    np.testing.assert_allclose(small.latents.astype(np.float32), large.latents.astype(np.float32), atol=1e-5)

    # Each utterance equals a direct encoding of its file; energies are its hop-chunk energies.
    for utt in small.index:
        source = next(u for u in splits[utt.split] if u.utt_id == utt.utt_id)
        wave = load_audio(source.path, SR)
        direct = rep.encode(wave.view(1, 1, -1))[0].T.numpy()
        np.testing.assert_array_equal(small.utterance_latents(utt), direct.astype(np.float16))
        np.testing.assert_array_equal(small.utterance_log_energy(utt), frame_log_energy(wave, HOP).numpy())
        assert utt.speaker == source.speaker and utt.gender == source.gender


def test_private_shards_are_removed_and_writer_closed(tmp_path: Path) -> None:
    splits = _corpus(tmp_path / "audio", n_utts=6)
    store_dir = tmp_path / "store"
    with LatentStoreWriter(store_dir, dim=4, meta=store_meta(CausalConvCodec())) as writer:
        bad = extract_to_store(
            CausalConvCodec(), splits, writer, batch_seconds=2.0, num_workers=0, progress=False
        )
        assert LatentStore(store_dir).n_frames > 0  # complete before the caller's `with` ends
    assert bad == []
    assert not (store_dir / PRIVATE_SHARD_DIR).exists()
    assert sorted(p.name for p in store_dir.iterdir()) == sorted(STORE_FILES)


# ----------------------------------------------------------------------------------------------- resume


def _shards_done(shard_dir: Path) -> list[int]:
    return sorted(json.loads(p.read_text())["shard"] for p in shard_dir.glob("shard-*.json"))


def test_resume_after_kill_skips_finished_shards_and_gives_the_same_store(tmp_path: Path) -> None:
    splits = _corpus(tmp_path / "audio")
    kw = {"batch_seconds": 1.5, "shard_seconds": 2.0, "num_workers": 1}
    items = [(s, u) for s, us in splits.items() for u in us]
    plan = plan_shards(items, batch_seconds=1.5, shard_seconds=2.0, settings={})
    n_batches = len(plan.batches)
    assert len(plan.shards) >= 4
    first_two = plan.shards[1][1]  # batches in shards 0 and 1

    reference = CausalConvCodec()
    _extract(reference, splits, tmp_path / "reference", **kw)
    assert reference.calls == n_batches

    shard_dir = tmp_path / "cache" / "key.shards"
    killed = CausalConvCodec(fail_on_call=first_two + 1)
    with pytest.raises(Killed):
        _extract(killed, splits, tmp_path / "killed", shard_dir=shard_dir, **kw)
    assert _shards_done(shard_dir) == [0, 1]

    resumed = CausalConvCodec()
    _extract(resumed, splits, tmp_path / "resumed", shard_dir=shard_dir, **kw)
    assert resumed.calls == n_batches - first_two  # finished shards were not recomputed
    assert _store_bytes(tmp_path / "resumed") == _store_bytes(tmp_path / "reference")
    assert not shard_dir.exists()  # deleted once the store is complete


def test_incomplete_or_foreign_shards_are_recomputed(tmp_path: Path) -> None:
    splits = _corpus(tmp_path / "audio")
    kw = {"batch_seconds": 1.5, "shard_seconds": 2.0}
    items = [(s, u) for s, us in splits.items() for u in us]
    plan = plan_shards(items, batch_seconds=1.5, shard_seconds=2.0, settings={})
    shard_dir = tmp_path / "shards"
    reference = CausalConvCodec()
    _extract(reference, splits, tmp_path / "reference", **kw)

    with pytest.raises(Killed):
        _extract(
            CausalConvCodec(fail_on_call=plan.shards[1][1] + 1),
            splits,
            tmp_path / "a",
            shard_dir=shard_dir,
            **kw,
        )
    latents_0 = shard_dir / "shard-000000.latents.npy"
    latents_0.write_bytes(latents_0.read_bytes()[:-8])  # a damaged shard 0
    resumed = CausalConvCodec()
    _extract(resumed, splits, tmp_path / "b", shard_dir=shard_dir, **kw)
    assert resumed.calls == len(plan.batches) - (plan.shards[1][1] - plan.shards[1][0])
    assert _store_bytes(tmp_path / "b") == _store_bytes(tmp_path / "reference")

    # Shards from another plan (here: other batches) are discarded, never mixed in.
    with pytest.raises(Killed):
        _extract(
            CausalConvCodec(fail_on_call=plan.shards[1][1] + 1),
            splits,
            tmp_path / "c",
            shard_dir=shard_dir,
            **kw,
        )
    other = CausalConvCodec()
    _extract(other, splits, tmp_path / "d", shard_dir=shard_dir, batch_seconds=0.5, shard_seconds=2.0)
    assert other.calls == len(items)
    d, ref = LatentStore(tmp_path / "d"), LatentStore(tmp_path / "reference")
    np.testing.assert_allclose(
        d.latents.astype(np.float32), ref.latents.astype(np.float32), rtol=1e-3, atol=1e-6
    )

    # resume=False discards shards of the very same plan.
    with pytest.raises(Killed):
        _extract(
            CausalConvCodec(fail_on_call=plan.shards[1][1] + 1),
            splits,
            tmp_path / "e",
            shard_dir=shard_dir,
            **kw,
        )
    fresh = CausalConvCodec()
    _extract(fresh, splits, tmp_path / "f", shard_dir=shard_dir, resume=False, **kw)
    assert fresh.calls == len(plan.batches)


# -------------------------------------------------------------------------------------------- bad audio


def _with_bad_files(root: Path) -> tuple[dict[str, list[Utterance]], dict[str, str]]:
    splits = _corpus(root, n_utts=8)
    garbage = _utterance(root, "s0-0-900", "s0", 4000, seed=900)
    Path(garbage.path).write_bytes(b"RIFF\x00\x00garbage, not audio")
    silent = _utterance(root, "s1-0-901", "s1", 4000, seed=901)
    sf.write(silent.path, np.zeros(4000, np.float32), SR, subtype="FLOAT")
    short = _utterance(root, "s2-0-902", "s2", HOP // 2, seed=902)  # readable, but under one frame
    missing = Utterance("s3-0-903", "s3", str(root / "nowhere.wav"), 0.5, SR)
    splits["train"] += [garbage, silent, short, missing]
    expected = {
        garbage.path: "unreadable",
        silent.path: "silent",
        short.path: "shorter than one latent frame",
        missing.path: "no such file",
    }
    return splits, expected


def test_bad_files_are_named_skipped_and_returned(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    splits, expected = _with_bad_files(tmp_path / "audio")
    bad = _extract(CausalConvCodec(), splits, tmp_path / "store", num_workers=2)
    assert {b.path for b in bad} == set(expected)
    for b in bad:
        assert expected[b.path] in b.reason
        assert b.path in caplog.text
    assert [b.utt_id for b in bad] == sorted(b.utt_id for b in bad)  # store order (all in train)
    store = LatentStore(tmp_path / "store")
    good = {u.utt_id for us in splits.values() for u in us} - {b.utt_id for b in bad}
    assert {u.utt_id for u in store.index} == good


def test_error_policy_raises_naming_the_file(tmp_path: Path) -> None:
    splits = _corpus(tmp_path / "audio", n_utts=6)
    victim = splits["train"][1]
    Path(victim.path).write_bytes(b"not a wav file at all")
    with pytest.raises(BadAudioError, match=victim.path.replace(".", r"\.")):
        _extract(CausalConvCodec(), splits, tmp_path / "store", on_bad_audio="error", num_workers=1)


def test_every_file_bad_is_an_error(tmp_path: Path) -> None:
    utt = Utterance("s0-0-000", "s0", str(tmp_path / "missing.wav"), 1.0, SR)
    with pytest.raises(BadAudioError, match="every one of the 1 audio files is bad"):
        _extract(CausalConvCodec(), {"train": [utt]}, tmp_path / "store")


# ------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"precision": "bf16"}, "needs a CUDA device"),
        ({"precision": "fp16"}, "needs a CUDA device"),
        ({"precision": "fp64"}, "precision must be one of"),
        ({"on_bad_audio": "ignore"}, "on_bad_audio"),
        ({"batch_seconds": 0.0}, "batch_seconds"),
        ({"shard_seconds": -1.0}, "shard_seconds"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_bad_settings_are_rejected(tmp_path: Path, kw: dict, message: str) -> None:
    splits = _corpus(tmp_path / "audio", n_utts=5)
    rep = CausalConvCodec()
    with pytest.raises(ValueError, match=message):
        _extract(rep, splits, tmp_path / "store", device="cpu", **kw)
    assert rep.calls == 0


def test_duplicate_utterance_ids_are_rejected_before_encoding(tmp_path: Path) -> None:
    splits = _corpus(tmp_path / "audio", n_utts=5)
    splits["val"].append(splits["train"][0])
    rep = CausalConvCodec()
    with pytest.raises(ValueError, match="appears twice"):
        _extract(rep, splits, tmp_path / "store")
    assert rep.calls == 0


def test_latents_a_float16_store_cannot_hold_are_an_error_naming_the_utterance(tmp_path: Path) -> None:
    class Exploding(CausalConvCodec):
        def encode(self, wave: torch.Tensor) -> torch.Tensor:
            return super().encode(wave) * 1e6  # beyond float16's ±65504

    splits = _corpus(tmp_path / "audio", n_utts=5)
    with pytest.raises(ValueError, match=r"utterance '.*': \|latent\| reaches .* beyond float16"):
        _extract(Exploding(), splits, tmp_path / "store")


def test_a_shard_dir_in_use_is_refused(tmp_path: Path) -> None:
    splits = _corpus(tmp_path / "audio", n_utts=5)
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    rep = CausalConvCodec()
    with FileLock(str(shard_dir / ".lock")), pytest.raises(RuntimeError, match="another extraction"):
        _extract(rep, splits, tmp_path / "store", shard_dir=shard_dir, device="auto")
    assert rep.calls == 0
