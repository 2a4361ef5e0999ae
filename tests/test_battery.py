"""Phase 1 battery: baselines and models against direct numpy/scipy computations on a tiny store."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

from latentdyn.data.latent_store import LatentStore, LatentStoreWriter
from latentdyn.data.windows import (
    SLICES,
    WindowDataset,
    WindowSpec,
    iter_batches,
    subsample_anchors,
    window_anchors,
)
from latentdyn.diagnostics.battery import (
    PREDICTORS,
    TABLES_FILE,
    battery_metrics,
    battery_table,
    fit_baseline_variance,
    run_battery,
    write_battery_table,
)
from latentdyn.models.protocol import DeltaModel, DeltaPredictive

META = {"representation": "fake", "sample_rate": 16000, "frame_rate": 50.0, "weights": {"source": "random"}}
DIM = 6
LENGTHS = {"train": [40, 3, 60, 25, 80], "val": [30, 12], "test": [50, 2, 35, 18, 64]}
SPECS = [WindowSpec(1, 1), WindowSpec(3, 2), WindowSpec(4, 2, 2), WindowSpec(2, 3, 3)]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> LatentStore:
    """Smooth random-walk latents (so linear extrapolation differs from persistence), splits interleaved."""
    root = tmp_path_factory.mktemp("battery_store")
    rng = np.random.default_rng(0)
    offsets, scales = rng.uniform(-10, 10, DIM), rng.uniform(0.2, 3.0, DIM)
    order = [(s, i) for i in range(5) for s in LENGTHS if i < len(LENGTHS[s])]
    with LatentStoreWriter(root, DIM, META) as writer:
        for split, i in order:
            n = LENGTHS[split][i]
            velocity = np.cumsum(rng.standard_normal((n, DIM)), axis=0) * 0.3
            z = offsets + scales * (np.cumsum(velocity, axis=0) * 0.2 + rng.standard_normal((n, DIM)) * 0.3)
            writer.add(
                f"{split}-{i}",
                "spk",
                split,
                z.astype(np.float32),
                rng.uniform(-70, -10, n).astype(np.float32),
            )
    return LatentStore(root)


def standardised(store: LatentStore) -> np.ndarray:
    """All rows ``(N, D)`` standardised, float64 (the direct oracle's view of the store)."""
    return (np.asarray(store.latents, dtype=np.float64) - store.mean) / store.std


def prev_rows(store: LatentStore, anchors: np.ndarray, spec: WindowSpec) -> np.ndarray:
    """Row of z[t-s], or t itself at an utterance's first frame (the documented zero-velocity fallback)."""
    starts = np.array([u.start for u in store.index])
    utt_start = starts[np.searchsorted(starts, anchors, side="right") - 1]
    prev = anchors - spec.context_stride
    return np.where(prev >= utt_start, prev, anchors)


def direct_baseline(store: LatentStore, anchors: np.ndarray, spec: WindowSpec, baseline: str):
    """Direct float64 ``(Δ, Δ̂, z[t], z[t+k])`` per window for a baseline."""
    z = standardised(store)
    last, target = z[anchors], z[anchors + spec.horizon]
    if baseline == "persistence":
        pred = np.zeros_like(last)
    else:
        pred = (spec.horizon / spec.context_stride) * (last - z[prev_rows(store, anchors, spec)])
    return target - last, pred, last, target


def row_of(rows: list[dict], slice_name: str, predictor: str) -> dict:
    (row,) = [r for r in rows if r["slice"] == slice_name and r["predictor"] == predictor]
    return row


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_baselines_match_direct_computation(store: LatentStore, spec: WindowSpec) -> None:
    rows = run_battery(None, store, spec, split="test", slices=("all",), max_windows=None, batch_size=17)
    assert [r["predictor"] for r in rows] == ["persistence", "linear"]
    anchors = window_anchors(store, "test", spec)
    train_anchors = window_anchors(store, "train", spec)
    for baseline in ("persistence", "linear"):
        row = row_of(rows, "all", baseline)
        assert row["n_windows"] == len(anchors) and row["horizon"] == spec.horizon and row["split"] == "test"
        delta, pred, last, target = direct_baseline(store, anchors, spec, baseline)
        assert row["mse"] == pytest.approx(np.mean((last + pred - target) ** 2), rel=1e-5)
        train_delta, train_pred, _, _ = direct_baseline(store, train_anchors, spec, baseline)
        sigma2 = np.mean((train_delta - train_pred) ** 2)
        assert row["baseline_sigma2"] == pytest.approx(sigma2, rel=1e-5)
        nll = -norm.logpdf(delta, loc=pred, scale=math.sqrt(sigma2)).sum(-1) / DIM
        assert row["nll_per_dim"] == pytest.approx(nll.mean(), rel=1e-5)
        if baseline == "persistence":
            assert row["mse"] == pytest.approx(np.mean(delta**2), rel=1e-5)
            assert math.isnan(row["direction_cosine"]) and math.isnan(row["magnitude_log_error"])
        else:
            pn, dn = np.linalg.norm(pred, axis=-1), np.linalg.norm(delta, axis=-1)
            cos = (pred * delta).sum(-1) / (np.maximum(pn, 1e-8) * np.maximum(dn, 1e-8))
            assert row["direction_cosine"] == pytest.approx(cos.mean(), rel=1e-5)
            mag = np.abs(np.log(np.maximum(pn, 1e-8)) - np.log(np.maximum(dn, 1e-8)))
            assert row["magnitude_log_error"] == pytest.approx(mag.mean(), rel=1e-5)


class GaussianPredictive:
    """Isotropic Gaussian ``N(mean, σ² I)`` over deltas ``(B, D)``."""

    def __init__(self, mean: torch.Tensor, sigma: float) -> None:
        self._mean, self.sigma = mean, sigma

    def log_prob(self, delta: torch.Tensor) -> torch.Tensor:
        return torch.distributions.Normal(self._mean, self.sigma).log_prob(delta).sum(-1)

    def mean(self) -> torch.Tensor:
        return self._mean

    def sample(self, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self._mean.shape, generator=generator)
        return self._mean + temperature * self.sigma * noise

    def direction(self) -> torch.Tensor:
        return self._mean / self._mean.norm(dim=-1, keepdim=True)

    def magnitude(self) -> torch.Tensor:
        return self._mean.norm(dim=-1)


class LookupModel(torch.nn.Module):
    """A model that knows the data: it finds the context's last frame in the store (exact nearest neighbour)
    and predicts ``N(Δ_true + shift, σ²)``. Records whether it was called in eval mode."""

    def __init__(
        self, store: LatentStore, spec: WindowSpec, sigma: float, shift: np.ndarray | None = None
    ) -> None:
        super().__init__()
        self.context, self.horizon, self.context_stride, self.dim = (
            spec.context,
            spec.horizon,
            spec.context_stride,
            DIM,
        )
        self.register_buffer("z", torch.from_numpy(standardised(store)).float())
        self.shift = torch.zeros(DIM) if shift is None else torch.as_tensor(shift, dtype=torch.float32)
        self.sigma = sigma
        self.modes: list[bool] = []

    def predictive(self, context: torch.Tensor) -> GaussianPredictive:
        self.modes.append(self.training)
        rows = torch.cdist(context[:, -1].double(), self.z.double()).argmin(dim=1)
        delta = self.z[rows + self.horizon] - self.z[rows]
        return GaussianPredictive(delta + self.shift, self.sigma)


def test_test_doubles_satisfy_the_protocols(store: LatentStore) -> None:
    model = LookupModel(store, WindowSpec(2, 1), 0.5)
    assert isinstance(model, DeltaModel)
    assert isinstance(model.predictive(torch.zeros(3, 2, DIM)), DeltaPredictive)


@pytest.mark.parametrize("spec", [WindowSpec(3, 1), WindowSpec(2, 4, 2)], ids=str)
def test_oracle_model_reaches_the_closed_forms(store: LatentStore, spec: WindowSpec) -> None:
    sigma = 0.37
    model = LookupModel(store, spec, sigma)
    model.train()
    rows = run_battery(model, store, spec, max_windows=None)
    assert [r["predictor"] for r in rows] == list(PREDICTORS) * len(SLICES)
    assert set(model.modes) == {False} and model.training  # evaluated in eval mode, mode restored
    for slice_name in SLICES:
        row = row_of(rows, slice_name, "model")
        assert row["n_windows"] == len(window_anchors(store, "test", spec, slice_name)) > 0
        assert row["nll_per_dim"] == pytest.approx(0.5 * math.log(2 * math.pi * sigma**2) + 0.0, abs=1e-6)
        assert row["direction_cosine"] == pytest.approx(1.0, abs=1e-6)
        assert row["magnitude_log_error"] == pytest.approx(0.0, abs=1e-5)
        assert row["mse"] == pytest.approx(0.0, abs=1e-10)
        assert math.isnan(row["baseline_sigma2"])


def test_shifted_model_matches_scipy(store: LatentStore) -> None:
    spec, sigma = WindowSpec(2, 2), 0.8
    shift = np.linspace(-0.6, 0.9, DIM)
    model = LookupModel(store, spec, sigma, shift)
    anchors = window_anchors(store, "test", spec)
    metrics = battery_metrics(model, iter_batches(WindowDataset(store, anchors, spec), 23))
    delta, _, _, _ = direct_baseline(store, anchors, spec, "persistence")
    pred = delta + shift
    nll = -norm.logpdf(delta, loc=pred, scale=sigma).sum(-1) / DIM
    assert metrics["nll_per_dim"] == pytest.approx(nll.mean(), rel=1e-5)
    assert metrics["mse"] == pytest.approx(np.mean(shift**2), rel=1e-5)
    pn, dn = np.linalg.norm(pred, axis=-1), np.linalg.norm(delta, axis=-1)
    assert metrics["direction_cosine"] == pytest.approx(((pred * delta).sum(-1) / (pn * dn)).mean(), rel=1e-5)
    assert metrics["magnitude_log_error"] == pytest.approx(np.abs(np.log(pn) - np.log(dn)).mean(), rel=1e-5)
    assert metrics["n_windows"] == len(anchors)


def test_slices_and_the_window_cap_restrict_the_windows(store: LatentStore) -> None:
    spec = WindowSpec(3, 1)
    kwargs = dict(energy_percentile=60.0, edge_frames=3)
    rows = run_battery(None, store, spec, max_windows=None, **kwargs)
    counts = {}
    for slice_name in SLICES:
        anchors = window_anchors(store, "test", spec, slice_name, **kwargs)
        delta, _, _, _ = direct_baseline(store, anchors, spec, "persistence")
        row = row_of(rows, slice_name, "persistence")
        assert row["n_windows"] == len(anchors)
        assert row["mse"] == pytest.approx(np.mean(delta**2), rel=1e-5)
        train = window_anchors(store, "train", spec, slice_name, **kwargs)
        train_delta, _, _, _ = direct_baseline(store, train, spec, "persistence")
        assert row["baseline_sigma2"] == pytest.approx(np.mean(train_delta**2), rel=1e-5)  # fitted per slice
        counts[slice_name] = len(anchors)
    assert counts["all"] > counts["utterance_medial"] > 0 and counts["all"] > counts["high_energy"] > 0
    capped = run_battery(None, store, spec, slices=("all",), max_windows=40, seed=3)
    subset = subsample_anchors(window_anchors(store, "test", spec), 40, 3)
    delta, _, _, _ = direct_baseline(store, subset, spec, "persistence")
    assert row_of(capped, "all", "persistence")["n_windows"] == 40
    assert row_of(capped, "all", "persistence")["mse"] == pytest.approx(np.mean(delta**2), rel=1e-5)


def test_fit_baseline_variance_and_metric_edge_cases(store: LatentStore) -> None:
    spec = WindowSpec(2, 1)
    ds = WindowDataset(store, window_anchors(store, "train", spec), spec)
    delta, pred, _, _ = direct_baseline(store, ds.anchors, spec, "linear")
    assert fit_baseline_variance(iter_batches(ds, 64), "linear", spec) == pytest.approx(
        np.mean((delta - pred) ** 2)
    )
    assert math.isnan(fit_baseline_variance([], "linear", spec))
    empty = battery_metrics(None, [], baseline="persistence", spec=spec, baseline_variance=1.0)
    assert empty["n_windows"] == 0 and math.isnan(empty["mse"]) and math.isnan(empty["nll_per_dim"])
    no_density = battery_metrics(None, iter_batches(ds, 64), baseline="linear", spec=spec)
    assert math.isnan(no_density["nll_per_dim"]) and no_density["mse"] > 0
    with pytest.raises(ValueError, match="model or a baseline"):
        battery_metrics(None, [])
    with pytest.raises(ValueError, match="spec"):
        battery_metrics(None, [], baseline="linear")
    with pytest.raises(ValueError, match="baseline"):
        battery_metrics(None, [], baseline="mean")
    with pytest.raises(ValueError, match="horizon"):
        run_battery(LookupModel(store, WindowSpec(2, 2), 1.0), store, spec)


def test_table_csv_round_trips(store: LatentStore, tmp_path: Path) -> None:
    spec = WindowSpec(2, 1)
    rows = run_battery(
        LookupModel(store, spec, 0.5), store, spec, slices=("all", "high_energy"), max_windows=30
    )
    text = battery_table(rows)
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert len(parsed) == len(rows) == 6
    assert list(parsed[0]) == list(rows[0])
    for row, back in zip(rows, parsed, strict=True):
        for key, value in row.items():
            if isinstance(value, float) and math.isnan(value):
                assert back[key] == "nan"
            elif isinstance(value, float | int):
                assert float(back[key]) == value
            else:
                assert back[key] == value
    assert parsed[0]["horizon"] == "1" and parsed[0]["n_windows"] == "30"
    path = write_battery_table(rows, tmp_path / "run")
    assert path == tmp_path / "run" / TABLES_FILE and path.read_text() == text
