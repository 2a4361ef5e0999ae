"""Phase 1 battery: the reference's metrics for the predictor baselines and for models, against direct
numpy/scipy computations on a tiny store, in both horizon modes, raw space (the default) and standardised."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import gammaln
from scipy.stats import lognorm, norm

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
    METRICS,
    PREDICTORS,
    TABLES_FILE,
    battery_metrics,
    battery_table,
    fit_baseline_variance,
    run_battery,
    write_battery_table,
)
from latentdyn.models.baselines import DiagonalGaussianBaseline, SphereLogNormalBaseline
from latentdyn.models.protocol import DeltaModel, DeltaPredictive
from tests.conftest import spec_id

META = {"representation": "fake", "sample_rate": 16000, "frame_rate": 50.0, "weights": {"source": "random"}}
DIM = 6
LENGTHS = {"train": [40, 3, 60, 25, 80], "val": [30, 12], "test": [50, 2, 35, 18, 64]}
LAG_SPECS = [WindowSpec(1, 1), WindowSpec(3, 2), WindowSpec(4, 4)]
STRIDE_SPECS = [
    WindowSpec(1, 1, horizon_mode="stride"),
    WindowSpec(4, 2, 2, horizon_mode="stride"),
    WindowSpec(2, 3, 3, horizon_mode="stride"),
]
SPECS = LAG_SPECS + STRIDE_SPECS


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


# ------------------------------------------------------------------------------------------------------------
# Direct (oracle) computations
# ------------------------------------------------------------------------------------------------------------


def rows_in(store: LatentStore, standardize: bool) -> np.ndarray:
    """All rows ``(N, D)`` in float64, raw or standardised with the store's train statistics."""
    z = np.asarray(store.latents, dtype=np.float64)
    return (z - store.mean) / store.std if standardize else z


def prev_rows(store: LatentStore, anchors: np.ndarray, spec: WindowSpec) -> np.ndarray:
    """Row of z[a-s], or a itself at an utterance's first frame (the documented zero-velocity fallback)."""
    starts = np.array([u.start for u in store.index])
    utt_start = starts[np.searchsorted(starts, anchors, side="right") - 1]
    prev = anchors - spec.context_stride
    return np.where(prev >= utt_start, prev, anchors)


def direct_windows(
    store: LatentStore, anchors: np.ndarray, spec: WindowSpec, standardize: bool = False
) -> dict[str, np.ndarray]:
    """``delta`` (the true Δ), ``state`` (the frame Δ starts from), ``target``, and the two last context frames.

    lag: Δ = x[t] - x[t-1] with t = a + k; stride: Δ = z[a+k] - z[a] (a = the anchor, the last context row).
    """
    z = rows_in(store, standardize)
    state_rows = anchors + spec.horizon - 1 if spec.horizon_mode == "lag" else anchors
    target, state = z[anchors + spec.horizon], z[state_rows]
    return dict(
        delta=target - state,
        state=state,
        target=target,
        ctx_last=z[anchors],
        ctx_prev=z[prev_rows(store, anchors, spec)],
    )


def predictor_delta(w: dict[str, np.ndarray], spec: WindowSpec, predictor: str) -> np.ndarray:
    """persistence: 0; linear: the last context velocity, times k/s for a k-frame (stride) delta."""
    if predictor == "persistence":
        return np.zeros_like(w["delta"])
    scale = 1.0 if spec.horizon_mode == "lag" else spec.horizon / spec.context_stride
    return scale * (w["ctx_last"] - w["ctx_prev"])


def point_metrics(w: dict[str, np.ndarray], pred: np.ndarray) -> dict[str, float]:
    """The reference's cos, logmag_r2, mag_ratio (norms floored at 1e-8) and the state-space MSE."""
    delta = w["delta"]
    pn, dn = np.linalg.norm(pred, axis=-1), np.linalg.norm(delta, axis=-1)
    lp, ld = np.log(np.maximum(pn, 1e-8)), np.log(np.maximum(dn, 1e-8))
    return dict(
        cos=float(np.mean((pred * delta).sum(-1) / (np.maximum(pn, 1e-8) * np.maximum(dn, 1e-8)))),
        logmag_r2=float(1.0 - np.sum((lp - ld) ** 2) / np.sum((ld - ld.mean()) ** 2)),
        mag_ratio=float(np.mean(np.maximum(pn, 1e-8) / np.maximum(dn, 1e-8))),
        mse=float(np.mean((w["state"] + pred - w["target"]) ** 2)),
    )


def gaussian_baseline_nll(train_delta: np.ndarray, delta: np.ndarray) -> float:
    """Mean NLL (nats per frame) of the diagonal Gaussian with the train deltas' mean and ddof=1 variance."""
    mean, std = train_delta.mean(0), np.sqrt(train_delta.var(0, ddof=1))
    return float(-norm.logpdf(delta, loc=mean, scale=std).sum(-1).mean())


def sphere_baseline_nll(train_delta: np.ndarray, delta: np.ndarray) -> float:
    """Mean NLL of uniform-direction × LogNormal(‖Δ‖) as a density in R^D (with the polar Jacobian)."""
    log_r = np.log(np.linalg.norm(train_delta, axis=-1))
    m, s = log_r.mean(), log_r.std(ddof=1)
    d = delta.shape[-1]
    log_area = np.log(2.0) + 0.5 * d * np.log(np.pi) - gammaln(0.5 * d)
    r = np.linalg.norm(delta, axis=-1)
    log_p = -log_area + lognorm.logpdf(r, s=s, scale=np.exp(m)) - (d - 1) * np.log(r)
    return float(-log_p.mean())


def row_of(rows: list[dict], slice_name: str, predictor: str) -> dict:
    (row,) = [r for r in rows if r["slice"] == slice_name and r["predictor"] == predictor]
    return row


def assert_metrics(row: dict, expected: dict[str, float], rel: float = 1e-5) -> None:
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(row[key]), key
        else:
            assert row[key] == pytest.approx(value, rel=rel, abs=1e-9), key


# ------------------------------------------------------------------------------------------------------------
# Predictor baselines (persistence, linear)
# ------------------------------------------------------------------------------------------------------------


def expected_predictor_row(
    store: LatentStore,
    spec: WindowSpec,
    predictor: str,
    anchors: np.ndarray,
    train_anchors: np.ndarray,
    standardize: bool = False,
) -> dict[str, float]:
    w = direct_windows(store, anchors, spec, standardize)
    tw = direct_windows(store, train_anchors, spec, standardize)
    pred = predictor_delta(w, spec, predictor)
    sigma2 = float(np.mean((tw["delta"] - predictor_delta(tw, spec, predictor)) ** 2))
    nll = float(-norm.logpdf(w["delta"], loc=pred, scale=math.sqrt(sigma2)).sum(-1).mean())
    nll_b = gaussian_baseline_nll(tw["delta"], w["delta"])
    expected = dict(
        nll=nll, nll_baseline=nll_b, dnll=nll - nll_b, baseline_sigma2=sigma2, n_windows=float(len(anchors))
    )
    expected.update(point_metrics(w, pred))
    if predictor == "persistence":
        # Δ̂ = 0 has no direction; its magnitude ratio is the floor's, 1e-8 / ‖Δ‖ (the reference's).
        expected.update(cos=math.nan, logmag_r2=math.nan)
    return expected


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_predictor_baselines_match_direct_computation(store: LatentStore, spec: WindowSpec) -> None:
    rows = run_battery(None, store, spec, split="test", slices=("all",), max_windows=None, batch_size=17)
    assert [r["predictor"] for r in rows] == ["persistence", "linear"]
    anchors, train_anchors = window_anchors(store, "test", spec), window_anchors(store, "train", spec)
    for predictor in ("persistence", "linear"):
        row = row_of(rows, "all", predictor)
        assert row["split"] == "test" and row["horizon"] == spec.horizon and row["dim"] == DIM
        assert row["horizon_mode"] == spec.horizon_mode and row["context_stride"] == spec.context_stride
        assert_metrics(row, expected_predictor_row(store, spec, predictor, anchors, train_anchors))
    # persistence's MSE is the mean squared true delta (a one-frame delta in lag mode)
    w = direct_windows(store, anchors, spec)
    assert row_of(rows, "all", "persistence")["mse"] == pytest.approx(np.mean(w["delta"] ** 2), rel=1e-5)


@pytest.mark.parametrize("spec", [WindowSpec(3, 2), WindowSpec(2, 3, 3, "stride")], ids=spec_id)
def test_standardized_battery_matches_direct_computation(store: LatentStore, spec: WindowSpec) -> None:
    rows = run_battery(None, store, spec, slices=("all",), max_windows=None, standardize=True)
    raw = run_battery(None, store, spec, slices=("all",), max_windows=None)
    anchors, train_anchors = window_anchors(store, "test", spec), window_anchors(store, "train", spec)
    for predictor in ("persistence", "linear"):
        expected = expected_predictor_row(store, spec, predictor, anchors, train_anchors, standardize=True)
        assert_metrics(row_of(rows, "all", predictor), expected)
        # a different space from the raw default: the metrics do change
        assert row_of(raw, "all", predictor)["mse"] != pytest.approx(expected["mse"], rel=1e-3)


# ------------------------------------------------------------------------------------------------------------
# Model test doubles
# ------------------------------------------------------------------------------------------------------------


class GaussianPredictive:
    """Isotropic Gaussian ``N(mean, σ² I)`` over deltas ``(B, D)``; ``median_offset`` moves only ``median()``,
    so a test can tell which point prediction a diagnostic used."""

    def __init__(self, mean: torch.Tensor, sigma: float, median_offset: torch.Tensor | None = None) -> None:
        self._mean, self.sigma = mean, sigma
        self._median = mean if median_offset is None else mean + median_offset

    def log_prob(self, delta: torch.Tensor) -> torch.Tensor:
        return torch.distributions.Normal(self._mean, self.sigma).log_prob(delta).sum(-1)

    def mean(self) -> torch.Tensor:
        return self._mean

    def median(self) -> torch.Tensor:
        return self._median

    def sample(self, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self._mean.shape, generator=generator)
        return self._mean + temperature * self.sigma * noise

    def direction(self) -> torch.Tensor:
        return self._mean / self._mean.norm(dim=-1, keepdim=True)

    def magnitude(self) -> torch.Tensor:
        return self._mean.norm(dim=-1)


class LookupModel(torch.nn.Module):
    """A model that knows the data: it finds the context's last frame (the anchor row) in the store by exact
    nearest neighbour, in its own space, and predicts ``N(Δ_true + shift, σ²)`` with the true delta of the
    window's horizon mode (lag: ``z[a+k] - z[a+k-1]``; stride: ``z[a+k] - z[a]``). Records whether it was
    called in eval mode."""

    def __init__(
        self,
        store: LatentStore,
        spec: WindowSpec,
        sigma: float,
        shift: np.ndarray | None = None,
        *,
        standardized: bool = False,
        baseline: type = DiagonalGaussianBaseline,
        median_offset: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.context, self.horizon, self.context_stride = spec.context, spec.horizon, spec.context_stride
        self.horizon_mode, self.standardized, self.dim = spec.horizon_mode, standardized, DIM
        self.baseline = baseline
        self.register_buffer("z", torch.from_numpy(rows_in(store, standardized)).float())
        self.shift = torch.zeros(DIM) if shift is None else torch.as_tensor(shift, dtype=torch.float32)
        self.median_offset = None if median_offset is None else torch.as_tensor(median_offset).float()
        self.sigma = sigma
        self.modes: list[bool] = []

    def predictive(self, context: torch.Tensor) -> GaussianPredictive:
        self.modes.append(self.training)
        rows = torch.cdist(context[:, -1].double(), self.z.double()).argmin(dim=1)
        state = rows + self.horizon - 1 if self.horizon_mode == "lag" else rows
        delta = self.z[rows + self.horizon] - self.z[state]
        return GaussianPredictive(delta + self.shift, self.sigma, self.median_offset)


def test_test_doubles_satisfy_the_protocols(store: LatentStore) -> None:
    model = LookupModel(store, WindowSpec(2, 1), 0.5)
    assert isinstance(model, DeltaModel)
    assert isinstance(model.predictive(torch.zeros(3, 2, DIM)), DeltaPredictive)


# ------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", [WindowSpec(3, 1), WindowSpec(2, 4), WindowSpec(2, 4, 2, "stride")], ids=spec_id
)
def test_oracle_model_reaches_the_closed_forms(store: LatentStore, spec: WindowSpec) -> None:
    sigma = 0.37
    model = LookupModel(store, spec, sigma)
    model.train()
    rows = run_battery(model, store, spec, max_windows=None)
    assert [r["predictor"] for r in rows] == list(PREDICTORS) * len(SLICES)
    assert set(model.modes) == {False} and model.training  # evaluated in eval mode, mode restored
    for slice_name in SLICES:
        row = row_of(rows, slice_name, "model")
        anchors = window_anchors(store, "test", spec, slice_name)
        assert row["n_windows"] == len(anchors) > 0
        train = direct_windows(store, window_anchors(store, "train", spec, slice_name), spec)
        nll = 0.5 * DIM * math.log(2 * math.pi * sigma**2)  # the true delta at the mean: nats per frame
        nll_b = gaussian_baseline_nll(train["delta"], direct_windows(store, anchors, spec)["delta"])
        expected = dict(nll=nll, nll_baseline=nll_b, dnll=nll - nll_b, cos=1.0, logmag_r2=1.0, mag_ratio=1.0)
        assert_metrics(row, expected)
        assert row["mse"] == pytest.approx(0.0, abs=1e-10) and math.isnan(row["baseline_sigma2"])
        # every predictor of a slice is scored against the same unconditional baseline
        for predictor in ("persistence", "linear"):
            assert row_of(rows, slice_name, predictor)["nll_baseline"] == row["nll_baseline"]


@pytest.mark.parametrize("standardize", [False, True], ids=["raw", "standardized"])
def test_shifted_model_matches_scipy(store: LatentStore, standardize: bool) -> None:
    spec, sigma = WindowSpec(2, 2), 0.8
    shift = np.linspace(-0.6, 0.9, DIM)
    model = LookupModel(store, spec, sigma, shift, standardized=standardize)
    anchors = window_anchors(store, "test", spec)
    w = direct_windows(store, anchors, spec, standardize)
    tw = direct_windows(store, window_anchors(store, "train", spec), spec, standardize)
    unconditional = DiagonalGaussianBaseline(
        torch.from_numpy(tw["delta"].mean(0)), torch.from_numpy(tw["delta"].var(0, ddof=1))
    )
    ds = WindowDataset(store, anchors, spec, standardize=standardize)
    metrics = battery_metrics(model, iter_batches(ds, 23), unconditional=unconditional)
    assert set(metrics) == set(METRICS)
    pred = w["delta"] + shift
    nll = float(-norm.logpdf(w["delta"], loc=pred, scale=sigma).sum(-1).mean())
    nll_b = gaussian_baseline_nll(tw["delta"], w["delta"])
    expected = dict(nll=nll, nll_baseline=nll_b, dnll=nll - nll_b, n_windows=float(len(anchors)))
    expected.update(point_metrics(w, pred))
    assert_metrics(metrics, expected)
    assert metrics["mse"] == pytest.approx(np.mean(shift**2), rel=1e-5)
    # without an unconditional baseline there is no ΔNLL
    bare = battery_metrics(model, iter_batches(ds, 23))
    assert bare["nll"] == pytest.approx(nll, rel=1e-5) and math.isnan(bare["nll_baseline"])
    assert math.isnan(bare["dnll"])


def test_battery_fits_the_model_heads_baseline_family(store: LatentStore) -> None:
    """A vMF-family model's ΔNLL is against uniform direction × LogNormal ‖Δ‖, fitted on train windows."""
    spec = WindowSpec(3, 1)
    model = LookupModel(store, spec, 0.5, baseline=SphereLogNormalBaseline)
    rows = run_battery(model, store, spec, slices=("all", "utterance_medial"), max_windows=None)
    for slice_name in ("all", "utterance_medial"):
        anchors = window_anchors(store, "test", spec, slice_name)
        train = direct_windows(store, window_anchors(store, "train", spec, slice_name), spec)
        nll_b = sphere_baseline_nll(train["delta"], direct_windows(store, anchors, spec)["delta"])
        for predictor in PREDICTORS:
            row = row_of(rows, slice_name, predictor)
            assert row["nll_baseline"] == pytest.approx(nll_b, rel=1e-5)
            assert row["dnll"] == pytest.approx(row["nll"] - nll_b, rel=1e-5)


def test_point_prediction_is_the_median_unless_asked(store: LatentStore) -> None:
    spec = WindowSpec(2, 1)
    offset = np.linspace(0.2, 0.7, DIM)
    model = LookupModel(store, spec, 0.5, median_offset=offset)
    kwargs = dict(slices=("all",), max_windows=None)
    median = row_of(run_battery(model, store, spec, **kwargs), "all", "model")
    mean = row_of(run_battery(model, store, spec, predict="mean", **kwargs), "all", "model")
    assert median["mse"] == pytest.approx(np.mean(offset**2), rel=1e-5)
    assert mean["mse"] == pytest.approx(0.0, abs=1e-10) and mean["cos"] == pytest.approx(1.0)
    assert median["nll"] == mean["nll"]  # the density does not depend on the point prediction
    sampled = [
        row_of(run_battery(model, store, spec, predict="sample", seed=s, **kwargs), "all", "model")
        for s in (0, 0, 1)
    ]
    assert sampled[0]["mse"] == sampled[1]["mse"] != sampled[2]["mse"]  # seeded draws
    assert sampled[0]["mse"] == pytest.approx(0.25, rel=0.2)  # σ² = 0.25 per dim around the true delta


def test_slices_and_the_window_cap_restrict_the_windows(store: LatentStore) -> None:
    spec = WindowSpec(3, 1)
    kwargs = dict(energy_percentile=60.0, medial_range=(0.3, 0.7))
    rows = run_battery(None, store, spec, max_windows=None, **kwargs)
    counts = {}
    for slice_name in SLICES:
        anchors = window_anchors(store, "test", spec, slice_name, **kwargs)
        train = window_anchors(store, "train", spec, slice_name, **kwargs)
        row = row_of(rows, slice_name, "persistence")
        assert_metrics(
            row, expected_predictor_row(store, spec, "persistence", anchors, train)
        )  # fitted per slice
        counts[slice_name] = len(anchors)
    assert counts["all"] > counts["utterance_medial"] > 0 and counts["all"] > counts["high_energy"] > 0
    capped = run_battery(None, store, spec, slices=("all",), max_windows=40, seed=3)
    subset = subsample_anchors(window_anchors(store, "test", spec), 40, 3)
    train_subset = subsample_anchors(window_anchors(store, "train", spec), 40, 3)
    row = row_of(capped, "all", "linear")
    assert row["n_windows"] == 40
    assert_metrics(row, expected_predictor_row(store, spec, "linear", subset, train_subset))


def test_fit_baseline_variance_and_metric_edge_cases(store: LatentStore) -> None:
    spec = WindowSpec(2, 1)
    ds = WindowDataset(store, window_anchors(store, "train", spec), spec)
    w = direct_windows(store, ds.anchors, spec)
    assert fit_baseline_variance(iter_batches(ds, 64), "linear", spec) == pytest.approx(
        np.mean((w["delta"] - predictor_delta(w, spec, "linear")) ** 2)
    )
    assert math.isnan(fit_baseline_variance([], "linear", spec))
    empty = battery_metrics(None, [], baseline="persistence", spec=spec, baseline_variance=1.0)
    assert empty["n_windows"] == 0 and all(math.isnan(empty[k]) for k in METRICS if k != "n_windows")
    no_density = battery_metrics(None, iter_batches(ds, 64), baseline="linear", spec=spec)
    assert math.isnan(no_density["nll"]) and math.isnan(no_density["dnll"]) and no_density["mse"] > 0
    with pytest.raises(ValueError, match="model or a baseline"):
        battery_metrics(None, [])
    with pytest.raises(ValueError, match="spec"):
        battery_metrics(None, [], baseline="linear")
    with pytest.raises(ValueError, match="baseline"):
        battery_metrics(None, [], baseline="mean")
    with pytest.raises(ValueError, match="horizon"):
        run_battery(LookupModel(store, WindowSpec(2, 2), 1.0), store, spec)
    with pytest.raises(ValueError, match="horizon_mode"):
        run_battery(LookupModel(store, WindowSpec(2, 1, horizon_mode="stride"), 1.0), store, spec)


def test_table_csv_round_trips(store: LatentStore, tmp_path: Path) -> None:
    spec = WindowSpec(2, 1)
    rows = run_battery(
        LookupModel(store, spec, 0.5), store, spec, slices=("all", "high_energy"), max_windows=30
    )
    text = battery_table(rows)
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert len(parsed) == len(rows) == 6
    assert list(parsed[0]) == list(rows[0])
    assert set(METRICS) <= set(parsed[0])
    for row, back in zip(rows, parsed, strict=True):
        for key, value in row.items():
            if isinstance(value, float) and math.isnan(value):
                assert back[key] == "nan"
            elif isinstance(value, float | int):
                assert float(back[key]) == value
            else:
                assert back[key] == value
    assert parsed[0]["horizon"] == "1" and parsed[0]["n_windows"] == "30"
    assert parsed[0]["horizon_mode"] == "lag"
    path = write_battery_table(rows, tmp_path / "run")
    assert path == tmp_path / "run" / TABLES_FILE and path.read_text() == text
