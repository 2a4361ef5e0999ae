"""Latent store: streaming write, memmapped read-back, train-only statistics, bounded memory, validation."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from latentdyn.data.latent_store import STD_FLOOR, LatentStore, LatentStoreWriter, StoreUtterance, store_meta

META = {
    "representation": "fake",
    "sample_rate": 24000,
    "frame_rate": 12.5,
    "weights": {"source": "random", "pretrained": False},
    "extra": {"corpus": "unit-test", "config_hash": "abc123"},
}


def _random_corpus(rng: np.random.Generator, dim: int, n_utts: int) -> list[dict]:
    """Utterances over three splits with per-dimension offsets and scales, as numpy and torch inputs."""
    offsets = rng.uniform(-40, 40, size=dim)
    scales = rng.uniform(0.05, 5.0, size=dim)
    splits = ["train", "val", "test"]
    utts = []
    for i in range(n_utts):
        n = int(rng.integers(1, 90))
        z = (offsets + scales * rng.standard_normal((n, dim))).astype(np.float32)
        energy = rng.uniform(-100, 0, size=n).astype(np.float32)
        if i % 3 == 1:
            z_in, e_in = torch.from_numpy(z), torch.from_numpy(energy)  # tensors are accepted too
        elif i % 3 == 2:
            z_in, e_in = z.astype(np.float64), energy.astype(np.float64)
        else:
            z_in, e_in = z, energy
        utts.append(
            dict(
                utt_id=f"utt{i:03d}",
                speaker=f"spk{i % 5}",
                split=splits[i % 3 if i > 2 else i],
                latents=z_in,
                log_energy=e_in,
                gender="MF"[i % 2],
                z16=z.astype(np.float16),
                energy=energy,
            )
        )
    return utts


def _write(root: Path, utts: list[dict], dim: int) -> dict:
    with LatentStoreWriter(root, dim, META) as writer:
        for u in utts:
            writer.add(
                u["utt_id"], u["speaker"], u["split"], u["latents"], u["log_energy"], gender=u["gender"]
            )
        return writer.close()


def test_round_trip_index_and_stats(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    dim = 24
    utts = _random_corpus(rng, dim, 40)
    meta = _write(tmp_path / "store", utts, dim)
    store = LatentStore(tmp_path / "store")

    n_total = sum(len(u["z16"]) for u in utts)
    assert store.n_frames == n_total == meta["n_frames"] and store.dim == dim
    assert store.latents.shape == (n_total, dim) and store.latents.dtype == np.float16
    assert store.log_energy.shape == (n_total,) and store.log_energy.dtype == np.float32
    assert (tmp_path / "store" / "latents.f16").stat().st_size == n_total * dim * 2

    # Index: row order = write order, contiguous, covering all rows.
    assert [u.utt_id for u in store.index] == [u["utt_id"] for u in utts]
    starts = np.array([u.start for u in store.index])
    lengths = np.array([u.n_frames for u in store.index])
    assert starts[0] == 0 and np.array_equal(starts[1:], np.cumsum(lengths)[:-1])
    assert lengths.sum() == n_total
    for rec, u in zip(store.index, utts, strict=True):
        assert (rec.speaker, rec.split, rec.gender) == (u["speaker"], u["split"], u["gender"])
        np.testing.assert_array_equal(store.utterance_latents(rec), u["z16"])
        np.testing.assert_array_equal(store.utterance_log_energy(rec), u["energy"])
    np.testing.assert_array_equal(store.utterance_latents(5), utts[5]["z16"])
    index_lines = (tmp_path / "store" / "index.jsonl").read_text().splitlines()
    assert len(index_lines) == 40 and json.loads(index_lines[3])["start"] == store.index[3].start

    # Splits.
    assert store.splits == ["test", "train", "val"]
    for split in store.splits:
        expected_rows = np.concatenate(
            [np.arange(r.start, r.start + r.n_frames) for r in store.index if r.split == split]
        )
        rows = store.split_rows(split)
        assert rows.dtype == np.int64 and np.array_equal(rows, expected_rows)
        assert [u.utt_id for u in store.utterances(split)] == [
            u["utt_id"] for u in utts if u["split"] == split
        ]
    assert sum(len(store.split_rows(s)) for s in store.splits) == n_total
    with pytest.raises(ValueError, match="unknown split"):
        store.split_rows("valid")

    # Train-only statistics of the float16 values the store holds, in float64.
    train = np.concatenate([u["z16"] for u in utts if u["split"] == "train"]).astype(np.float64)
    np.testing.assert_allclose(store.stats["mean"], train.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(store.stats["std"], train.std(axis=0), rtol=1e-10)
    np.testing.assert_allclose(store.mean, train.mean(axis=0).astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(store.std, train.std(axis=0).astype(np.float32), rtol=1e-6)
    assert store.mean.dtype == store.std.dtype == np.float32 and store.mean.shape == (dim,)
    everything = np.concatenate([u["z16"] for u in utts]).astype(np.float64)
    assert not np.allclose(store.stats["mean"], everything.mean(axis=0), rtol=1e-3, atol=1e-3)
    assert store.stats["count"] == len(train)

    # Meta and summary.
    for key in (
        "representation",
        "sample_rate",
        "frame_rate",
        "dim",
        "dtype",
        "n_frames",
        "n_utterances",
        "weights",
    ):
        assert key in store.meta
    assert store.meta["dtype"] == "float16" and store.meta["n_utterances"] == 40
    assert store.meta["extra"] == META["extra"] and store.meta["weights"] == META["weights"]
    assert set(store.meta["versions"]) == {"latentdyn", "torch", "numpy"}
    assert store.meta["versions"]["numpy"] == np.__version__
    summary = store.summary()
    assert summary["n_frames"] == n_total and summary["dim"] == dim
    assert summary["hours"] == pytest.approx(n_total / 12.5 / 3600)
    assert summary["train_frames"] == len(train)
    assert summary["val_utterances"] == sum(u["split"] == "val" for u in utts)
    assert sum(summary[f"{s}_frames"] for s in store.splits) == n_total


def test_utterance_latents_is_a_read_only_view(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    _write(tmp_path / "s", _random_corpus(rng, 8, 6), 8)
    store = LatentStore(tmp_path / "s")
    view = store.utterance_latents(store.index[2])
    assert isinstance(view, np.memmap) and np.shares_memory(view, store.latents)
    assert not view.flags.writeable and not store.log_energy.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        view[0, 0] = 1.0


def test_std_floor_for_a_constant_dimension(tmp_path: Path) -> None:
    z = np.zeros((10, 3), dtype=np.float32)
    z[:, 1] = np.arange(10)
    with LatentStoreWriter(tmp_path / "s", 3, META) as writer:
        writer.add("a", "s", "train", z, np.zeros(10))
    store = LatentStore(tmp_path / "s")
    assert store.std[0] == np.float32(STD_FLOOR) and store.std[2] == np.float32(STD_FLOOR)
    assert store.std[1] == pytest.approx(np.arange(10).std())


def test_memory_stays_bounded(tmp_path: Path) -> None:
    """Writing ~200 MB of latents peaks at a small fraction of that in Python/numpy allocations."""
    dim, chunk, n_chunks = 512, 1000, 196
    base = np.random.default_rng(2).standard_normal((chunk, dim), dtype=np.float32)
    energy = np.zeros(chunk, dtype=np.float32)
    total_bytes = dim * chunk * n_chunks * 2
    tracemalloc.start()
    try:
        with LatentStoreWriter(tmp_path / "big", dim, META) as writer:
            for i in range(n_chunks):
                writer.add(f"u{i}", "s", "train" if i % 4 else "val", base + np.float32(i % 7), energy)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total_bytes > 200e6
    assert (tmp_path / "big" / "latents.f16").stat().st_size == total_bytes
    # Per chunk: 2 MB float32 input, 1 MB float16, 4 MB float64 for the statistics (measured peak 7.3 MB);
    # holding the latents in RAM would need the whole 200 MB.
    assert peak < 0.05 * total_bytes, f"peak {peak / 1e6:.1f} MB"
    store = LatentStore(tmp_path / "big")
    assert store.n_frames == chunk * n_chunks
    np.testing.assert_array_equal(
        store.utterance_latents(195), (base + np.float32(195 % 7)).astype(np.float16)
    )
    train_offsets = np.array([i % 7 for i in range(n_chunks) if i % 4], dtype=np.float64)
    expected_mean = base.astype(np.float16).astype(np.float64).mean(axis=0) + train_offsets.mean()
    np.testing.assert_allclose(
        store.stats["mean"], expected_mean, atol=2e-3
    )  # float16 rounding of base + offset


def test_add_rejects_bad_inputs_by_name(tmp_path: Path) -> None:
    writer = LatentStoreWriter(tmp_path / "s", 4, META)
    ok = np.zeros((3, 4), dtype=np.float32)
    e = np.zeros(3)
    with pytest.raises(ValueError, match=r"'bad-d'.*\(T >= 1, 4\)"):
        writer.add("bad-d", "s", "train", np.zeros((3, 5)), e)
    with pytest.raises(ValueError, match="'empty'"):
        writer.add("empty", "s", "train", np.zeros((0, 4)), np.zeros(0))
    nan = ok.copy()
    nan[1, 2] = np.nan
    with pytest.raises(ValueError, match="'has-nan'.*NaN"):
        writer.add("has-nan", "s", "train", nan, e)
    with pytest.raises(ValueError, match="'has-inf'"):
        writer.add("has-inf", "s", "train", torch.full((3, 4), float("inf")), e)
    big = ok.copy()
    big[0, 0] = -70000.0
    with pytest.raises(ValueError, match="'too-big'.*float16"):
        writer.add("too-big", "s", "train", big, e)
    with pytest.raises(ValueError, match="'short-energy'"):
        writer.add("short-energy", "s", "train", ok, np.zeros(2))
    with pytest.raises(ValueError, match="'nan-energy'"):
        writer.add("nan-energy", "s", "train", ok, np.array([0.0, np.nan, 0.0]))
    with pytest.raises(ValueError, match="split"):
        writer.add("no-split", "s", "", ok, e)
    edge = ok.copy()
    edge[0, 0] = 65504.0  # float16's largest finite value is stored exactly
    writer.add("edge", "s", "train", edge, e)
    with pytest.raises(ValueError, match="already added"):
        writer.add("edge", "s", "train", ok, e)
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.add("late", "s", "train", ok, e)
    store = LatentStore(tmp_path / "s")
    assert store.n_frames == 3 and store.latents[0, 0] == np.float16(65504.0)  # rejected adds left no trace


def test_store_level_errors(tmp_path: Path) -> None:
    ok = np.ones((2, 4), dtype=np.float32)
    with pytest.raises(FileNotFoundError, match="not a latent store"):
        LatentStore(tmp_path)
    _write(
        tmp_path / "s",
        [dict(utt_id="a", speaker="s", split="train", latents=ok, log_energy=np.zeros(2), gender="U")],
        4,
    )
    with pytest.raises(FileExistsError):
        LatentStoreWriter(tmp_path / "s", 4, META)

    with pytest.raises(ValueError, match="no frames in split 'train'"):
        with LatentStoreWriter(tmp_path / "no-train", 4, META) as writer:
            writer.add("a", "s", "val", ok, np.zeros(2))
    with pytest.raises(FileNotFoundError):
        LatentStore(tmp_path / "no-train")

    with pytest.raises(RuntimeError, match="boom"):
        with LatentStoreWriter(tmp_path / "aborted", 4, META) as writer:
            writer.add("a", "s", "train", ok, np.zeros(2))
            raise RuntimeError("boom")
    assert not (tmp_path / "aborted" / "meta.json").exists()

    with pytest.raises(ValueError, match="lacks"):
        LatentStoreWriter(tmp_path / "m1", 4, {"representation": "x"})
    with pytest.raises(ValueError, match="computed by the writer"):
        LatentStoreWriter(tmp_path / "m2", 4, {**META, "dim": 4})
    with pytest.raises(TypeError):
        LatentStoreWriter(tmp_path / "m3", 4, {**META, "extra": {"obj": object()}})

    # A truncated array no longer matches meta.json.
    with (tmp_path / "s" / "latents.f16").open("r+b") as fh:
        fh.truncate(8)
    with pytest.raises(ValueError, match="bytes"):
        LatentStore(tmp_path / "s")


def test_store_meta_from_a_representation() -> None:
    rep = SimpleNamespace(
        name="mel", sample_rate=24000, frame_rate=75.0, weights={"source": "none", "pretrained": False}
    )
    meta = store_meta(rep, {"hash": "h"})
    assert meta == {
        "representation": "mel",
        "sample_rate": 24000,
        "frame_rate": 75.0,
        "weights": {"source": "none", "pretrained": False},
        "extra": {"hash": "h"},
    }
    assert StoreUtterance("a", "s", "train", 0, 3).gender == "U"


def test_standardize_uses_the_train_split_statistics(tmp_path: Path) -> None:
    """The one place latents are standardised: (x - mean_train) / std_train, and its exact inverse."""
    rng = np.random.default_rng(3)
    dim = 6
    utts = _random_corpus(rng, dim, 12)
    _write(tmp_path / "store", utts, dim)
    store = LatentStore(tmp_path / "store")
    train = np.concatenate([u["z16"].astype(np.float64) for u in utts if u["split"] == "train"])
    mean, std = train.mean(axis=0), train.std(axis=0)
    x = rng.normal(size=(3, 5, dim)).astype(np.float32)
    z = store.standardize(x)
    assert z.dtype == torch.float32 and z.shape == x.shape
    np.testing.assert_allclose(z.numpy(), (x - mean) / std, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(store.destandardize(z).numpy(), x, rtol=1e-5, atol=1e-5)
    assert torch.equal(store.to_model_space(x, standardized=False), torch.from_numpy(x))
    assert torch.equal(store.to_model_space(x, standardized=True), z)
    torch.testing.assert_close(store.to_raw_space(z, standardized=True), torch.from_numpy(x))
