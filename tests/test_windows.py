"""Training windows: anchors and slices against loop oracles, the reference's lag semantics on closed-form
stores, memmap-backed batches, the seeded datamodule."""

from __future__ import annotations

import importlib.abc
import importlib.util
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import latentdyn.data.windows as windows_module
from latentdyn.data.latent_store import LatentStore, LatentStoreWriter
from latentdyn.data.windows import (
    SLICES,
    IndexBatchSampler,
    WindowBatches,
    WindowDataset,
    WindowSpec,
    iter_batches,
    subsample_anchors,
    train_energy_threshold,
    window_anchors,
)
from tests.conftest import spec_id

META = {"representation": "fake", "sample_rate": 16000, "frame_rate": 50.0, "weights": {"source": "random"}}
LENGTHS = {
    "train": [1, 2, 3, 5, 8, 13, 21, 30, 40, 7],
    "val": [1, 4, 9, 17, 25],
    "test": [2, 6, 11, 19, 33, 3],
}
LAG_SPECS = [WindowSpec(1, 1), WindowSpec(3, 2), WindowSpec(4, 1), WindowSpec(2, 4)]
STRIDE_SPECS = [
    WindowSpec(1, 1, horizon_mode="stride"),
    WindowSpec(3, 2, horizon_mode="stride"),
    WindowSpec(4, 1, 2, horizon_mode="stride"),
    WindowSpec(2, 3, 3, horizon_mode="stride"),
]
SPECS = LAG_SPECS + STRIDE_SPECS


def make_store(
    root: Path,
    lengths: dict[str, list[int]] = LENGTHS,
    dim: int = 5,
    seed: int = 0,
    val_energy_shift: float = 0.0,
) -> dict[int, dict]:
    """Write a store with utterances of the given lengths, splits interleaved in row order.

    Returns the written data keyed by start row: ``z`` (float16 as stored), ``energy``, ``split``, ``n``.
    """
    rng = np.random.default_rng(seed)
    offsets, scales = rng.uniform(-20, 20, dim), rng.uniform(0.1, 4.0, dim)
    order = [(s, i) for i in range(max(map(len, lengths.values()))) for s in lengths if i < len(lengths[s])]
    written, row = {}, 0
    with LatentStoreWriter(root, dim, META) as writer:
        for split, i in order:
            n = lengths[split][i]
            z = (offsets + scales * rng.standard_normal((n, dim))).astype(np.float32)
            energy = rng.uniform(-80, -10, n).astype(np.float32) + (
                val_energy_shift if split == "val" else 0.0
            )
            writer.add(f"{split}-{i}", f"spk-{split}-{i % 2}", split, z, energy)
            written[row] = dict(z=z.astype(np.float16), energy=energy, split=split, n=n)
            row += n
    return written


def naive_anchors(
    store: LatentStore, split: str, spec: WindowSpec, medial_range: tuple[float, float] | None = None
) -> np.ndarray:
    """Loop oracle over target frames ``t`` (0-based in the utterance), optionally kept to ``lo <= t/T <= hi``.

    lag (the reference): ``t`` runs over ``max(1, W-1+k) .. T-1`` and the anchor (last context row) is ``t - k``.
    stride: the anchor ``p`` needs its first context frame ``p - (W-1)s >= 0`` and its target ``p + k <= T-1``.
    """
    w, k, s = spec.context, spec.horizon, spec.context_stride
    out = []
    for u in store.utterances(split):
        n = u.n_frames
        if spec.horizon_mode == "lag":
            pairs = [(t - k, t) for t in range(max(1, w - 1 + k), n)]
        else:
            pairs = [(p, p + k) for p in range(n) if p - (w - 1) * s >= 0 and p + k <= n - 1]
        for p, t in pairs:
            if medial_range is None or medial_range[0] <= t / n <= medial_range[1]:
                out.append(u.start + p)
    return np.array(out, dtype=np.int64)


@pytest.fixture(scope="module")
def store_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[LatentStore, dict[int, dict]]:
    root = tmp_path_factory.mktemp("store")
    written = make_store(root, val_energy_shift=100.0)
    return LatentStore(root), written


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_all_slice_matches_loop_oracle_and_closed_form(store_data, spec: WindowSpec, split: str) -> None:
    store, _ = store_data
    anchors = window_anchors(store, split, spec)
    np.testing.assert_array_equal(anchors, naive_anchors(store, split, spec))
    assert anchors.dtype == np.int64
    starts = np.array([u.start for u in store.index])
    for u in store.utterances(split):
        inside = anchors[(anchors >= u.start) & (anchors < u.start + u.n_frames)]
        assert len(inside) == max(u.n_frames - (spec.context - 1) * spec.context_stride - spec.horizon, 0)
    # No window crosses an utterance boundary: its first context row and its target row share an utterance.
    first = anchors - (spec.context - 1) * spec.context_stride
    utt_of = lambda rows: np.searchsorted(starts, rows, side="right") - 1  # noqa: E731
    np.testing.assert_array_equal(utt_of(first), utt_of(anchors + spec.horizon))


def test_short_utterances_yield_no_windows(store_data) -> None:
    store, _ = store_data
    spec = WindowSpec(4, 2, 3, horizon_mode="stride")  # span (4-1)*3 + 2 + 1 = 12 frames
    assert spec.span == 12
    anchors = window_anchors(store, "train", spec)
    long_utts = [u for u in store.utterances("train") if u.n_frames >= 12]
    assert len(anchors) == sum(u.n_frames - 12 + 1 for u in long_utts)
    for u in store.utterances("train"):
        if u.n_frames < 12:
            assert not ((anchors >= u.start) & (anchors < u.start + u.n_frames)).any()


MEDIAL_RANGES = [(0.17, 0.83), (0.0, 1.0), (0.25, 0.75), (0.5, 0.5), (0.3, 0.6)]


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("medial_range", MEDIAL_RANGES, ids=str)
def test_utterance_medial_keeps_target_positions_in_range(
    store_data, spec: WindowSpec, medial_range: tuple[float, float]
) -> None:
    store, _ = store_data
    for split in ("train", "test"):
        anchors = window_anchors(store, split, spec, "utterance_medial", medial_range=medial_range)
        np.testing.assert_array_equal(anchors, naive_anchors(store, split, spec, medial_range))
        if medial_range == (0.0, 1.0):
            np.testing.assert_array_equal(anchors, window_anchors(store, split, spec))


def test_utterance_medial_bounds_are_inclusive_and_default_to_the_reference(store_data) -> None:
    store, _ = store_data
    spec = WindowSpec(2, 1)
    (u,) = [u for u in store.utterances("train") if u.n_frames == 40]
    anchors = window_anchors(store, "train", spec, "utterance_medial", medial_range=(0.25, 0.75))
    targets = anchors[(anchors >= u.start) & (anchors < u.start + 40)] + spec.horizon - u.start
    np.testing.assert_array_equal(targets, np.arange(10, 31))  # t/T = 10/40 and 30/40 are kept
    default = window_anchors(store, "train", spec, "utterance_medial")
    np.testing.assert_array_equal(default, naive_anchors(store, "train", spec, (0.17, 0.83)))


@pytest.mark.parametrize("percentile", [30.0, 50.0, 90.0])
@pytest.mark.parametrize("spec", [WindowSpec(3, 2), WindowSpec(3, 2, 2, "stride")], ids=spec_id)
def test_high_energy_threshold_comes_from_train_only(store_data, percentile: float, spec: WindowSpec) -> None:
    store, written = store_data
    train_energy = np.concatenate([w["energy"] for w in written.values() if w["split"] == "train"])
    threshold = np.percentile(train_energy, percentile)
    assert train_energy_threshold(store, percentile) == pytest.approx(threshold, rel=0, abs=1e-9)
    energy = np.concatenate([written[r]["energy"] for r in sorted(written)])
    for split in ("train", "val", "test"):
        full = naive_anchors(store, split, spec)
        expected = full[energy[full + spec.horizon] > threshold]  # the target frame's energy
        np.testing.assert_array_equal(
            window_anchors(store, split, spec, "high_energy", energy_percentile=percentile), expected
        )
    # val energies sit 100 dB above train's: with the train threshold every val window is "high energy"
    # (a val-own percentile would drop a fraction of them).
    val = window_anchors(store, "val", spec, "high_energy", energy_percentile=percentile)
    np.testing.assert_array_equal(val, naive_anchors(store, "val", spec))
    train = window_anchors(store, "train", spec, "high_energy", energy_percentile=percentile)
    assert 0 < len(train) < len(naive_anchors(store, "train", spec))


def test_anchor_and_spec_arguments_are_validated(store_data) -> None:
    store, _ = store_data
    with pytest.raises(ValueError, match="slice"):
        window_anchors(store, "train", WindowSpec(2, 1), "loud")
    with pytest.raises(ValueError, match="split"):
        window_anchors(store, "dev", WindowSpec(2, 1))
    with pytest.raises(ValueError, match="percentile"):
        window_anchors(store, "train", WindowSpec(2, 1), "high_energy", energy_percentile=120.0)
    for bad_range in [(0.8, 0.2), (-0.1, 0.5), (0.5, 1.2), (0.3,), (0.1, 0.2, 0.3)]:
        with pytest.raises(ValueError, match="medial_range"):
            window_anchors(store, "train", WindowSpec(2, 1), "utterance_medial", medial_range=bad_range)
    for bad in [(0, 1, 1), (2, 0, 1), (2, 1, 0), (2.5, 1, 1)]:
        with pytest.raises(ValueError):
            WindowSpec(*bad, horizon_mode="stride")
    with pytest.raises(ValueError, match="horizon_mode"):
        WindowSpec(2, 1, horizon_mode="delta")


@pytest.mark.parametrize("stride", [2, 3])
def test_lag_mode_rejects_a_strided_context(stride: int) -> None:
    with pytest.raises(ValueError, match="context_stride"):
        WindowSpec(4, 1, stride)
    with pytest.raises(ValueError, match="context_stride"):
        WindowSpec(4, 2, stride, horizon_mode="lag")
    assert WindowSpec(4, 1, stride, horizon_mode="stride").context_stride == stride


def test_spec_defaults_to_lag_and_scales_linear_extrapolation() -> None:
    spec = WindowSpec(8, 4)
    assert spec.horizon_mode == "lag" and spec.context_stride == 1
    assert spec.velocity_scale == 1.0  # a one-frame delta, whatever k
    assert WindowSpec(8, 4, 2, "stride").velocity_scale == 2.0  # k/s context steps
    assert WindowSpec(8, 3, 1, "stride").velocity_scale == 3.0


# ------------------------------------------------------------------------------------------------------------
# The reference's sample (horizon_mode=lag) on closed-form sequences, in raw space
# ------------------------------------------------------------------------------------------------------------

SEQ_LENGTHS = {"train": [30, 1, 2, 3, 4, 5, 12], "test": [25, 6]}


def make_sequence_store(root: Path, value, dim: int = 3) -> LatentStore:
    """A store whose utterances hold ``x[i] = value(i)`` in every dimension (``i`` 0-based in the utterance)."""
    with LatentStoreWriter(root, dim, META) as writer:
        for split, lengths in SEQ_LENGTHS.items():
            for j, n in enumerate(lengths):
                x = np.repeat(np.array([value(i) for i in range(n)], dtype=np.float32)[:, None], dim, 1)
                writer.add(f"{split}-{j}", "spk", split, x, np.zeros(n, dtype=np.float32))
    store = LatentStore(root)
    for u in store.utterances():
        np.testing.assert_array_equal(  # float16 holds these integers exactly
            np.asarray(store.utterance_latents(u))[:, 0], [value(i) for i in range(u.n_frames)]
        )
    return store


@pytest.fixture(scope="module")
def ramp_store(tmp_path_factory: pytest.TempPathFactory) -> LatentStore:
    return make_sequence_store(tmp_path_factory.mktemp("ramp"), lambda i: float(i))


@pytest.fixture(scope="module")
def square_store(tmp_path_factory: pytest.TempPathFactory) -> LatentStore:
    return make_sequence_store(tmp_path_factory.mktemp("square"), lambda i: float(i * i))


def utterance_windows(store: LatentStore, spec: WindowSpec, utt_id: str) -> dict[str, torch.Tensor]:
    """Every window of one utterance, as one batch of the default (raw) dataset."""
    (u,) = [u for u in store.utterances() if u.utt_id == utt_id]
    anchors = window_anchors(store, u.split, spec)
    mine = anchors[(anchors >= u.start) & (anchors < u.start + u.n_frames)]
    return WindowDataset(store, mine, spec).get_batch(np.arange(len(mine)))


def window_with_target(batch: dict[str, torch.Tensor], target: float) -> dict[str, torch.Tensor]:
    """The window of a batch whose target frame holds ``target`` (every dimension)."""
    (i,) = torch.nonzero((batch["target"] == target).all(-1)).flatten().tolist()
    return {k: v[i] for k, v in batch.items()}


def test_reference_sample_at_t10(ramp_store: LatentStore) -> None:
    """x[i] = i, W = 4, k = 1, target frame t = 10: context x[6..9] (mean 7.5), delta x[10] - x[9] = 1."""
    w = window_with_target(utterance_windows(ramp_store, WindowSpec(4, 1), "train-0"), 10.0)
    assert w["context"].mean().item() == 7.5
    np.testing.assert_array_equal(w["context"][:, 0].numpy(), [6, 7, 8, 9])
    assert torch.all(w["target_delta"] == 1.0) and torch.all(w["last"] == 9.0)


@pytest.mark.parametrize(("k", "context_mean"), [(1, 12.5), (2, 11.5), (4, 9.5)])
def test_context_lags_the_target_frame_by_k(ramp_store: LatentStore, k: int, context_mean: float) -> None:
    """At t = 15 the context is the W = 4 frames ending at t - k; the delta stays one frame long."""
    w = window_with_target(utterance_windows(ramp_store, WindowSpec(4, k), "train-0"), 15.0)
    assert w["context"].mean().item() == context_mean
    assert torch.all(w["target_delta"] == 1.0)
    assert torch.all(w["last"] == 14.0) and torch.all(w["target"] == 15.0)


def test_stride_mode_keeps_the_k_frame_delta(ramp_store: LatentStore) -> None:
    spec = WindowSpec(4, 2, 1, horizon_mode="stride")
    w = window_with_target(utterance_windows(ramp_store, spec, "train-0"), 15.0)
    np.testing.assert_array_equal(w["context"][:, 0].numpy(), [10, 11, 12, 13])
    assert torch.all(w["target_delta"] == 2.0) and torch.all(w["last"] == 13.0)


@pytest.mark.parametrize("context", [1, 2, 4])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_lag_windows_of_a_nonlinear_sequence(square_store: LatentStore, context: int, k: int) -> None:
    """x[i] = i²: the delta 2t - 1 names its frame t, so every field is checked against the frame it came from;
    within each utterance the targets are exactly t = max(1, W-1+k) .. T-1, i.e. T - (W-1) - k windows."""
    spec = WindowSpec(context, k)
    for u in square_store.utterances():
        b = utterance_windows(square_store, spec, u.utt_id)
        first_t = max(1, context - 1 + k)
        expected_t = np.arange(first_t, u.n_frames)
        assert len(b["target"]) == len(expected_t) == max(u.n_frames - (context - 1) - k, 0)
        if len(expected_t) == 0:
            continue
        t = (b["target_delta"][:, 0].double().numpy() + 1) / 2  # Δ = t² - (t-1)² = 2t - 1
        np.testing.assert_array_equal(t, expected_t)
        assert torch.all(b["target_delta"] == b["target_delta"][:, :1])  # same in every dimension
        np.testing.assert_array_equal(b["target"][:, 0].numpy(), expected_t**2)
        np.testing.assert_array_equal(b["last"][:, 0].numpy(), (expected_t - 1) ** 2)
        rows = expected_t[:, None] - k - np.arange(context - 1, -1, -1)  # t-k-W+1 .. t-k
        np.testing.assert_array_equal(b["context"][:, :, 0].numpy(), rows**2)
        prev = expected_t - k - 1
        np.testing.assert_array_equal(b["prev"][:, 0].numpy(), np.where(prev >= 0, prev, prev + 1) ** 2)


# ------------------------------------------------------------------------------------------------------------
# Items and batches against a direct computation from the written arrays
# ------------------------------------------------------------------------------------------------------------


def _oracle_window(
    written: dict[int, dict], store: LatentStore, a: int, spec: WindowSpec, standardize: bool
) -> dict[str, np.ndarray]:
    """Direct float64 computation of the window with anchor (last context row) ``a`` from the written arrays."""
    start = max(r for r in written if r <= a)
    z = written[start]["z"].astype(np.float64)
    if standardize:
        z = (z - store.mean.astype(np.float64)) / store.std.astype(np.float64)
    p, s, k = a - start, spec.context_stride, spec.horizon
    rows = [p - (spec.context - 1 - i) * s for i in range(spec.context)]
    state = p + k - 1 if spec.horizon_mode == "lag" else p  # lag: x[t-1]; stride: z[a]
    prev = z[p - s] if p - s >= 0 else z[p]
    return dict(context=z[rows], target_delta=z[p + k] - z[state], last=z[state], target=z[p + k], prev=prev)


@pytest.mark.parametrize("standardize", [False, True], ids=["raw", "standardized"])
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_items_equal_direct_computation(store_data, spec: WindowSpec, standardize: bool) -> None:
    store, written = store_data
    anchors = window_anchors(store, "train", spec)
    ds = WindowDataset(store, anchors, spec, standardize=standardize)
    assert len(ds) == len(anchors)
    for i in range(len(ds)):
        item = ds[i]
        assert item["anchor"] == anchors[i]
        assert item["context"].shape == (spec.context, store.dim) and item["context"].dtype == torch.float32
        for key, value in _oracle_window(written, store, int(anchors[i]), spec, standardize).items():
            np.testing.assert_allclose(item[key].numpy(), value, rtol=1e-5, atol=1e-5, err_msg=key)


def test_items_default_to_the_stored_raw_values(store_data) -> None:
    store, written = store_data
    spec = WindowSpec(2, 2)
    ds = WindowDataset(store, window_anchors(store, "test", spec), spec)
    assert ds.standardize is False
    for i in range(len(ds)):
        a = int(ds.anchors[i])
        start = max(r for r in written if r <= a)
        z, p = written[start]["z"].astype(np.float32), a - start
        np.testing.assert_array_equal(ds[i]["context"].numpy(), z[p - 1 : p + 1])
        np.testing.assert_array_equal(ds[i]["target"].numpy(), z[p + 2])
        np.testing.assert_array_equal(ds[i]["last"].numpy(), z[p + 1])


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_batched_gather_equals_items(store_data, spec: WindowSpec) -> None:
    store, _ = store_data
    ds = WindowDataset(store, window_anchors(store, "train", spec), spec)
    idx = np.random.default_rng(1).permutation(len(ds))[:17]
    batch = ds.get_batch(idx)
    assert set(batch) == {"context", "target_delta", "last", "target", "prev", "anchor"}
    assert batch["context"].shape == (len(idx), spec.context, store.dim)
    for j, i in enumerate(idx):
        item = ds[int(i)]
        for key in ("context", "target_delta", "last", "target", "prev"):
            assert torch.equal(batch[key][j], item[key]), key
        assert int(batch["anchor"][j]) == item["anchor"]
    sequential = list(iter_batches(ds, 6))
    assert [len(b["anchor"]) for b in sequential][:-1] == [6] * (len(sequential) - 1)
    np.testing.assert_array_equal(torch.cat([b["anchor"] for b in sequential]).numpy(), ds.anchors)
    assert torch.equal(WindowBatches(ds)[list(idx)]["context"], batch["context"])


@pytest.mark.parametrize("spec", [WindowSpec(3, 1), WindowSpec(3, 1, horizon_mode="stride")], ids=spec_id)
def test_dataset_rejects_windows_crossing_utterances(store_data, spec: WindowSpec) -> None:
    store, _ = store_data
    u = next(u for u in store.utterances("train") if u.n_frames >= 5)
    with pytest.raises(ValueError, match="cross"):
        WindowDataset(store, np.array([u.start + 1]), spec)  # first context frame before the utterance
    with pytest.raises(ValueError, match="cross"):
        WindowDataset(store, np.array([u.start + u.n_frames - 1]), spec)  # target after it


def test_dataset_keeps_the_memmap_and_pickles_without_the_data(tmp_path: Path) -> None:
    make_store(tmp_path, {"train": [4000, 3000], "test": [50]}, dim=64)
    store = LatentStore(tmp_path)
    spec = WindowSpec(4, 2)
    ds = WindowDataset(store, window_anchors(store, "train", spec), spec, standardize=True)
    assert isinstance(ds.store.latents, np.memmap)
    assert not any(isinstance(v, np.ndarray) and v.size >= store.latents.size for v in vars(ds).values())
    blob = pickle.dumps(ds)
    assert len(blob) < store.latents.nbytes / 4  # anchors (8 B/window) travel, latents (128 B/frame) do not
    clone = pickle.loads(blob)
    assert isinstance(clone.store.latents, np.memmap)
    assert clone.spec == spec and clone.standardize is True
    idx = np.arange(0, len(ds), 97)
    for key, value in ds.get_batch(idx).items():
        assert torch.equal(clone.get_batch(idx)[key], value)


def test_subsample_is_seeded_sorted_and_without_replacement() -> None:
    anchors = np.arange(100, 1100, dtype=np.int64) * 3
    a = subsample_anchors(anchors, 50, seed=7)
    assert len(a) == 50 and len(np.unique(a)) == 50 and np.all(np.diff(a) > 0) and np.isin(a, anchors).all()
    np.testing.assert_array_equal(a, subsample_anchors(anchors, 50, seed=7))
    assert not np.array_equal(a, subsample_anchors(anchors, 50, seed=8))
    assert subsample_anchors(anchors, None, 0) is anchors and subsample_anchors(anchors, 5000, 0) is anchors


def test_index_batch_sampler_partitions_each_epoch() -> None:
    ordered = list(IndexBatchSampler(23, 5, shuffle=False))
    assert len(IndexBatchSampler(23, 5, shuffle=False)) == len(ordered) == 5
    np.testing.assert_array_equal(np.concatenate(ordered), np.arange(23))
    assert [len(b) for b in ordered] == [5, 5, 5, 5, 3] and all(b.dtype == np.int64 for b in ordered)
    sampler = IndexBatchSampler(23, 5, shuffle=True, generator=torch.Generator().manual_seed(0))
    first, second = np.concatenate(list(sampler)), np.concatenate(list(sampler))
    np.testing.assert_array_equal(np.sort(first), np.arange(23))
    np.testing.assert_array_equal(np.sort(second), np.arange(23))
    assert not np.array_equal(first, second)
    replay = IndexBatchSampler(23, 5, shuffle=True, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(np.concatenate(list(replay)), first)
    with pytest.raises(ValueError):
        IndexBatchSampler(3, 0, shuffle=False)


def test_index_batch_sampler_replays_an_epoch_from_its_generator_state() -> None:
    generator = torch.Generator().manual_seed(0)
    sampler = IndexBatchSampler(23, 5, shuffle=True, generator=generator)
    first = list(sampler)
    after_first = generator.get_state()
    replay = IndexBatchSampler(23, 5, shuffle=True, generator=torch.Generator().manual_seed(99))
    replay.resume(sampler.epoch_state, 2)
    rest = list(replay)
    assert len(rest) == 3
    for got, want in zip(rest, first[2:], strict=True):
        np.testing.assert_array_equal(got, want)
    assert torch.equal(replay.generator.get_state(), after_first)  # later epochs follow as before
    np.testing.assert_array_equal(np.concatenate(list(replay)), np.concatenate(list(sampler)))
    ordered = IndexBatchSampler(23, 5, shuffle=False)
    ordered.resume(None, 4)
    np.testing.assert_array_equal(np.concatenate(list(ordered)), np.arange(20, 23))
    with pytest.raises(ValueError, match="start"):
        ordered.resume(None, 6)
    with pytest.raises(ValueError, match="generator"):
        IndexBatchSampler(23, 5, shuffle=True).resume(after_first, 0)
    with pytest.raises(ValueError, match="unshuffled"):
        ordered.resume(after_first, 0)


def test_importing_the_dataset_does_not_import_lightning(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh copy of the module executes with lightning unimportable; only the datamodule needs it."""

    class BlockLightning(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric"):
                raise ImportError(f"blocked {name}")
            return None

    for name in [
        n for n in sys.modules if n.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric")
    ]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [BlockLightning(), *sys.meta_path])
    spec = importlib.util.spec_from_file_location("latentdyn_windows_fresh", windows_module.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert module.WindowDataset is not None and module.WindowSpec(2, 1).span == 3
    with pytest.raises(ImportError, match="blocked lightning"):
        module.LatentWindowDataModule  # noqa: B018


# ------------------------------------------------------------------------------------------------------------
# The datamodule (imports lightning)
# ------------------------------------------------------------------------------------------------------------


def _epoch_anchors(loader) -> list[np.ndarray]:
    return [b["anchor"].numpy().copy() for b in loader]


def _datamodule(root: Path, **kwargs):
    from latentdyn.data.windows import LatentWindowDataModule

    dm = LatentWindowDataModule(root, **{"context": 3, "horizon": 2, "batch_size": 7, **kwargs})
    dm.setup("fit")
    return dm


def test_train_loader_is_seeded_and_covers_each_window_once_per_epoch(store_data) -> None:
    store, _ = store_data
    dm = _datamodule(store.root, seed=3)
    expected = window_anchors(store, "train", WindowSpec(3, 2))
    loader = dm.train_dataloader()
    epochs = [_epoch_anchors(loader), _epoch_anchors(loader)]
    for batches in epochs:
        assert [len(b) for b in batches[:-1]] == [7] * (len(batches) - 1) and 1 <= len(batches[-1]) <= 7
        np.testing.assert_array_equal(np.sort(np.concatenate(batches)), expected)
    assert not np.array_equal(np.concatenate(epochs[0]), np.concatenate(epochs[1]))  # reshuffled
    assert not np.array_equal(np.concatenate(epochs[0]), expected)  # shuffled at all
    again = _datamodule(store.root, seed=3).train_dataloader()
    for batches in epochs:
        np.testing.assert_array_equal(np.concatenate(_epoch_anchors(again)), np.concatenate(batches))
    other = _datamodule(store.root, seed=4).train_dataloader()
    assert not np.array_equal(np.concatenate(_epoch_anchors(other)), np.concatenate(epochs[0]))
    # batch content is the dataset's gather of those anchors; the dataset reads the memmap
    ds = dm.dataset("train")
    assert isinstance(ds.store.latents, np.memmap)
    batch = next(iter(dm.train_dataloader()))
    direct = ds.get_batch(np.searchsorted(ds.anchors, batch["anchor"].numpy()))
    for key, value in direct.items():
        assert torch.equal(batch[key], value), key


def _take(loader, n: int) -> list[np.ndarray]:
    """The anchors of the loader's next ``n`` batches, starting epochs as needed (an epoch in progress goes
    on only after ``load_state_dict``; otherwise each ``iter`` starts a new one)."""
    out: list[np.ndarray] = []
    while len(out) < n:
        for batch in loader:
            out.append(batch["anchor"].numpy().copy())
            if len(out) == n:
                break
    return out


# With workers, a loader left half-read costs ~5 s per worker at shutdown: the slow step runs that case.
@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_train_loader_resumes_where_its_state_says(store_data, tmp_path: Path, num_workers: int) -> None:
    """A loader restored from another's state (through a weights-only checkpoint file) hands out exactly the
    batches the other would have handed out next: mid-epoch, at an epoch's end, twice in a row, with
    workers reading ahead."""
    store, _ = store_data
    per_epoch = len(_datamodule(store.root, seed=3).train_dataloader())
    total = 3 * per_epoch
    reference = _take(_datamodule(store.root, seed=3).train_dataloader(), total)
    stops = [0, 5, per_epoch, per_epoch + 3] if num_workers == 0 else [per_epoch + 3]
    for stop in stops:
        loader = _datamodule(store.root, seed=3, num_workers=num_workers).train_dataloader()
        got = _take(loader, stop)
        for hop in (4, total - stop - 4):  # resume, take a few, resume again from the resumed loader
            path = tmp_path / "state.pt"
            torch.save(loader.state_dict(), path)
            loader = _datamodule(store.root, seed=11, num_workers=num_workers).train_dataloader()
            loader.load_state_dict(torch.load(path, weights_only=True))
            got += _take(loader, hop)
        assert len(got) == total
        for i, (a, b) in enumerate(zip(got, reference, strict=True)):
            np.testing.assert_array_equal(a, b, err_msg=f"stop {stop}, batch {i}")


def test_loader_state_before_iterating_and_between_epochs_starts_the_next_epoch(store_data) -> None:
    store, _ = store_data
    loader = _datamodule(store.root, seed=3).train_dataloader()
    fresh = loader.state_dict()
    assert fresh["batch"] == 0 and torch.equal(fresh["epoch_state"], loader.sampler.generator.get_state())
    first_epoch = _epoch_anchors(loader)
    between = loader.state_dict()
    assert between["batch"] == 0
    assert torch.equal(between["epoch_state"], loader.sampler.generator.get_state())
    restored = _datamodule(store.root, seed=11).train_dataloader()
    restored.load_state_dict(between)
    assert restored.state_dict()["batch"] == 0  # pending until iterated
    second = np.concatenate(_epoch_anchors(restored))
    np.testing.assert_array_equal(second, np.concatenate(_epoch_anchors(loader)))
    assert not np.array_equal(second, np.concatenate(first_epoch))
    with pytest.raises(ValueError, match="not a ResumableBatchLoader state"):
        restored.load_state_dict({"batch": 0})


@pytest.mark.parametrize(
    ("kwargs", "spec", "standardize"),
    [
        ({}, WindowSpec(3, 2), False),
        ({"standardize": True}, WindowSpec(3, 2), True),
        ({"horizon_mode": "stride"}, WindowSpec(3, 2, 1, "stride"), False),
        (
            {"horizon_mode": "stride", "context_stride": 2, "standardize": True},
            WindowSpec(3, 2, 2, "stride"),
            True,
        ),
    ],
    ids=["default", "standardized", "stride", "stride-s2-standardized"],
)
def test_datamodule_passes_horizon_mode_and_standardize_through(
    store_data, kwargs: dict, spec: WindowSpec, standardize: bool
) -> None:
    store, written = store_data
    dm = _datamodule(store.root, **kwargs)
    assert dm.spec == spec and dm.standardize is standardize
    for split in ("train", "val"):
        ds = dm.dataset(split)
        assert ds.spec == spec and ds.standardize is standardize
    batch = next(iter(dm.val_dataloader()))
    for j, a in enumerate(batch["anchor"].tolist()):
        for key, value in _oracle_window(written, store, a, spec, standardize).items():
            np.testing.assert_allclose(batch[key][j].numpy(), value, rtol=1e-5, atol=1e-5, err_msg=key)


def test_datamodule_rejects_a_strided_lag_context_and_an_unknown_slice(store_data) -> None:
    from latentdyn.data.windows import LatentWindowDataModule

    with pytest.raises(ValueError, match="slice"):
        LatentWindowDataModule(store_data[0].root, 2, 1, slice_name="quiet")
    with pytest.raises(ValueError, match="context_stride"):
        LatentWindowDataModule(store_data[0].root, 2, 1, context_stride=2)
    with pytest.raises(ValueError, match="medial_range"):
        LatentWindowDataModule(store_data[0].root, 2, 1, medial_range=(0.9, 0.1))


def test_workers_give_the_same_batches(store_data) -> None:
    store, _ = store_data
    serial = np.concatenate(_epoch_anchors(_datamodule(store.root, seed=5).train_dataloader()))
    parallel = np.concatenate(
        _epoch_anchors(_datamodule(store.root, seed=5, num_workers=2).train_dataloader())
    )
    np.testing.assert_array_equal(parallel, serial)


@pytest.mark.parametrize("slice_name", SLICES)
def test_val_and_test_loaders_are_ordered_and_val_is_capped(store_data, slice_name: str) -> None:
    store, _ = store_data
    spec = WindowSpec(3, 2)
    kwargs = dict(energy_percentile=40.0, medial_range=(0.2, 0.8))
    full_val = window_anchors(store, "val", spec, slice_name, **kwargs)
    dm = _datamodule(store.root, slice_name=slice_name, max_val_windows=5, seed=1, **kwargs)
    val = np.concatenate(_epoch_anchors(dm.val_dataloader()))
    assert len(val) == min(5, len(full_val)) and np.isin(val, full_val).all() and np.all(np.diff(val) > 0)
    np.testing.assert_array_equal(val, np.concatenate(_epoch_anchors(dm.val_dataloader())))
    dm.setup("test")
    np.testing.assert_array_equal(
        np.concatenate(_epoch_anchors(dm.test_dataloader())),
        window_anchors(store, "test", spec, slice_name, **kwargs),
    )
    train = np.sort(np.concatenate(_epoch_anchors(dm.train_dataloader())))
    np.testing.assert_array_equal(train, window_anchors(store, "train", spec, slice_name, **kwargs))
    assert dm.dim == store.dim


def test_lightning_trainer_consumes_the_loaders(store_data) -> None:
    """A Trainer keeps the batch sampler: each training epoch sees every window once, validation runs."""
    import lightning.pytorch as pl

    store, _ = store_data

    class Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(3 * store.dim, store.dim)
            self.seen: list[np.ndarray] = []
            self.val_windows = 0

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["anchor"].numpy().copy())
            return (self.net(batch["context"].flatten(1)) - batch["target_delta"]).square().mean()

        def validation_step(self, batch, batch_idx) -> None:
            self.val_windows += len(batch["anchor"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = _datamodule(store.root, max_val_windows=4)
    probe = Probe()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(probe, datamodule=dm)
    expected = window_anchors(store, "train", WindowSpec(3, 2))
    seen = np.concatenate(probe.seen)
    assert len(seen) == 2 * len(expected)
    for epoch in (seen[: len(expected)], seen[len(expected) :]):
        np.testing.assert_array_equal(np.sort(epoch), expected)
    assert probe.val_windows == 2 * 4
