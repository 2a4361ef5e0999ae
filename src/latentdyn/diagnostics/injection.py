"""The injection diagnostic (DESIGN §9): roll a dynamics model forward from GT context windows with varying GT.

From a GT segment, the model is rolled forward ``H`` steps of ``k = model.horizon`` frames under four modes:

- ``A_teacher``: the context is reset to GT before every step (teacher forcing, the one-step error);
- ``B_periodic``: GT re-injected every ``period`` steps, free-running in between;
- ``C_one_shot``: free-running with a single GT re-injection at step ``inject_step``;
- ``D_rollout``: pure free-running from the initial GT context.

Geometry (``W = model.context``; ``model.context_stride`` must equal ``k`` so a rollout's own predictions
land exactly on the context grid): a segment has frames ``0 .. L-1`` with ``L >= (W-1)k + 1 + Hk``; the
context of step ``s`` is frames ``p_s - (W-1)k, ..., p_s`` (stride ``k``) with ``p_s = (W-1)k + sk``, and the
model predicts frame ``p_s + k`` as ``last context frame + delta``. Only frames on the stride-``k`` grid are
ever read, so the rollout works on that grid: grid index ``j`` is frame ``jk``, step ``s`` reads grid indices
``s .. s+W-1`` and predicts grid index ``s+W``.

Every mode, start point and sample is one row of a single batch (rows ordered mode-major, then start, then
sample), and each step is one ``model.predictive`` call for the whole batch. Everything is in the
standardised latent space; the caller standardises with the latent store's train mean/std.

Corrections (Langevin, Tweedie) plug in through ``correction``: a map ``(B', D) -> (B', D)`` applied to every
prediction of a *free-running* mode (any mode whose schedule is not GT at every step) before it enters the
context buffer; the corrected frame is what the rollout produced, so it is also the frame the metrics score.
Fully teacher-forced modes (``A_teacher``, or ``B_periodic`` with ``period == 1``) stay uncorrected: they are
the reference the drift is measured against. GT frames are never corrected.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentdyn.diagnostics.manifold import DEFAULT_CHUNK, nearest_neighbour_distance
from latentdyn.models.protocol import DeltaModel

MODES: tuple[str, ...] = ("A_teacher", "B_periodic", "C_one_shot", "D_rollout")
METRICS: tuple[str, ...] = ("mse", "cosine", "nll", "manifold_dist", "norm_ratio")
PREDICT: tuple[str, ...] = ("mean", "sample")
BANDS: tuple[str, ...] = ("percentile", "bootstrap")

Correction = Callable[[torch.Tensor], torch.Tensor]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


@dataclass
class InjectionConfig:
    """Settings of the injection diagnostic (``conf/diagnostic/injection.yaml``); validated on construction.

    Beyond the YAML's fields: ``band`` (``percentile``: the central ``band_level`` range of the per-start
    values; ``bootstrap``: a ``band_level`` bootstrap CI of the mean over starts, ``n_bootstrap``
    resamples) and ``nn_chunk`` (bank rows per nearest-neighbour block, see ``manifold.py``).
    ``n_samples`` and ``temperature`` only matter for ``predict == "sample"``; ``bank_size == 0`` means no bank.
    """

    modes: list[str] = field(default_factory=lambda: list(MODES))
    horizon: int = 32
    n_starts: int = 256
    period: int = 8
    inject_step: int = 16
    predict: str = "mean"
    n_samples: int = 1
    temperature: float = 1.0
    bank_size: int = 20000
    divergence_factor: float = 2.0
    split: str = "test"
    seed: int = 0
    band: str = "percentile"
    band_level: float = 0.9
    n_bootstrap: int = 1000
    nn_chunk: int = DEFAULT_CHUNK

    def __post_init__(self) -> None:
        if isinstance(self.modes, str) or not isinstance(self.modes, Sequence):
            # Hydra passes a ListConfig, which is a Sequence; a bare string is a mistake.
            raise ValueError(f"modes must be a list of mode names from {MODES}, got {self.modes!r}")
        self.modes = [str(m) for m in self.modes]
        if not self.modes:
            raise ValueError(f"modes must not be empty; choose from {MODES}")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"unknown injection mode(s) {unknown}; choose from {MODES}")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes must not repeat, got {self.modes}")
        self.horizon = _check_int("horizon", self.horizon, 1)
        self.n_starts = _check_int("n_starts", self.n_starts, 1)
        self.period = _check_int("period", self.period, 1)
        self.inject_step = _check_int("inject_step", self.inject_step, 0)
        self.n_samples = _check_int("n_samples", self.n_samples, 1)
        self.bank_size = _check_int("bank_size", self.bank_size, 0)
        self.seed = _check_int("seed", self.seed, 0)
        self.n_bootstrap = _check_int("n_bootstrap", self.n_bootstrap, 1)
        self.nn_chunk = _check_int("nn_chunk", self.nn_chunk, 1)
        if self.predict not in PREDICT:
            raise ValueError(f"predict must be one of {PREDICT}, got {self.predict!r}")
        if self.band not in BANDS:
            raise ValueError(f"band must be one of {BANDS}, got {self.band!r}")
        self.temperature = float(self.temperature)
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        self.divergence_factor = float(self.divergence_factor)
        if not math.isfinite(self.divergence_factor) or self.divergence_factor <= 0:
            raise ValueError(f"divergence_factor must be a finite number > 0, got {self.divergence_factor}")
        self.band_level = float(self.band_level)
        if not 0 < self.band_level < 1:
            raise ValueError(f"band_level must lie in (0, 1), got {self.band_level}")
        if not isinstance(self.split, str) or not self.split:
            raise ValueError(f"split must be a non-empty string, got {self.split!r}")

    @property
    def samples_per_start(self) -> int:
        """Rollouts per start point: ``n_samples`` when sampling, 1 for the (deterministic) mean."""
        return self.n_samples if self.predict == "sample" else 1


def injection_schedule(mode: str, horizon: int, period: int, inject_step: int) -> torch.Tensor:
    """``(H,)`` bool: True where the context is (re)set from GT before predicting step ``s`` (``s = 0..H-1``)."""
    steps = torch.arange(horizon)
    if mode == "A_teacher":
        return torch.ones(horizon, dtype=torch.bool)
    if mode == "B_periodic":
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        return steps % period == 0
    if mode == "C_one_shot":
        return (steps == 0) | (steps == inject_step)
    if mode == "D_rollout":
        return steps == 0
    raise ValueError(f"unknown injection mode {mode!r}; choose from {MODES}")


def segment_frames(model: DeltaModel, horizon: int) -> tuple[int, int]:
    """``(window, horizon_frames)`` for ``sample_start_segments``: the context span ``(W-1)k + 1`` and ``Hk``."""
    w, k = _model_geometry(model)
    return (w - 1) * k + 1, horizon * k


def sample_start_segments(
    trajectories: Sequence[np.ndarray | torch.Tensor],
    window: int,
    horizon_frames: int,
    n_starts: int,
    seed: int,
) -> torch.Tensor:
    """GT segments ``(N, window + horizon_frames, D)`` float32 cut from trajectories ``(T_i, D)``.

    Start points are drawn uniformly over all valid positions of all utterances long enough (a seeded numpy
    ``Generator``): without replacement when there are at least ``n_starts`` positions, with replacement
    otherwise. Segments come in corpus order (utterance, then time). Deterministic for a given ``seed``.
    """
    need = _check_int("window", window, 1) + _check_int("horizon_frames", horizon_frames, 0)
    _check_int("n_starts", n_starts, 1)
    lengths = np.array([int(t.shape[0]) for t in trajectories], dtype=np.int64)
    n_valid = np.clip(lengths - need + 1, 0, None)
    total = int(n_valid.sum())
    if total == 0:
        longest = int(lengths.max()) if lengths.size else 0
        raise ValueError(
            f"no utterance is long enough for the injection diagnostic: a segment needs {need} frames "
            f"(window {window} + horizon {horizon_frames}), the longest of {lengths.size} has {longest}"
        )
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(total, size=n_starts, replace=n_starts > total))
    offsets = np.concatenate([[0], np.cumsum(n_valid)])
    utt = np.searchsorted(offsets, flat, side="right") - 1
    starts = flat - offsets[utt]
    segments = []
    for u, t0 in zip(utt.tolist(), starts.tolist(), strict=True):
        piece = trajectories[u][t0 : t0 + need]
        # A copy: pieces are often read-only memmap views of a latent store.
        segments.append(
            piece.clone() if isinstance(piece, torch.Tensor) else torch.from_numpy(np.array(piece))
        )
    return torch.stack(segments).to(torch.float32)


def _model_geometry(model: DeltaModel) -> tuple[int, int]:
    """``(W, k)`` of a model, checking that rollouts can advance on its context grid."""
    for name in ("context", "horizon", "context_stride", "dim"):
        if not hasattr(model, name):
            raise ValueError(
                f"the model lacks `{name}`; it must satisfy latentdyn.models.protocol.DeltaModel"
            )
    w = _check_int("model.context", model.context, 1)
    k = _check_int("model.horizon", model.horizon, 1)
    stride = _check_int("model.context_stride", model.context_stride, 1)
    if stride != k:
        raise ValueError(
            f"rollouts need model.context_stride == model.horizon (got stride {stride}, horizon {k}): a step "
            f"advances {k} frames, so its prediction only lands on the next context grid when the context is "
            f"spaced {k} frames apart"
        )
    return w, k


def _check_predictive_shape(name: str, value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(value.shape) != shape:
        raise ValueError(f"model predictive `{name}` returned shape {tuple(value.shape)}, expected {shape}")
    return value


@dataclass
class InjectionResult:
    """Outcome of ``run_injection``.

    ``per_step``: tidy rows ``{mode, step, metric, mean, lo, hi}`` (band over start points, see the config).
    ``per_start``: metric -> ``(M, N, H)`` float64 arrays (averaged over samples), plus ``divergence_step``
    ``(M, N)`` (``H`` = never diverged). ``summaries``: mode -> metric -> float. ``frames_per_step`` is ``k``.
    """

    modes: list[str]
    per_step: list[dict[str, Any]]
    per_start: dict[str, np.ndarray]
    summaries: dict[str, dict[str, float]]
    config: InjectionConfig
    frames_per_step: int

    def to_metrics(self) -> dict[str, float]:
        """Flat ``{"D_rollout/auc_mse": ...}``; non-finite entries (e.g. no bank) are left out."""
        return {
            f"{mode}/{name}": value
            for mode, metrics in self.summaries.items()
            for name, value in metrics.items()
            if math.isfinite(value)
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``injection_diag.json`` content: config, summaries, curves mode -> metric -> mean/lo/hi."""
        curves: dict[str, dict[str, dict[str, list[float | None]]]] = {}
        for row in self.per_step:
            slot = curves.setdefault(row["mode"], {}).setdefault(
                row["metric"], {"mean": [], "lo": [], "hi": []}
            )
            for key in ("mean", "lo", "hi"):
                slot[key].append(_json_float(row[key]))
        return {
            "config": asdict(self.config),
            "frames_per_step": self.frames_per_step,
            "summaries": {m: {k: _json_float(v) for k, v in s.items()} for m, s in self.summaries.items()},
            "curves": curves,
        }

    def write(self, out_dir: Path, frame_rate: float | None = None) -> list[Path]:
        """Write ``per_step.csv``, ``metrics.json`` (summaries + config) and one PNG per metric; returns the paths.

        ``frame_rate`` (frames/s), if given, adds a seconds axis to the plots.
        """
        from latentdyn.diagnostics.plots import plot_injection_curves

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        csv_path = out_dir / "per_step.csv"
        with csv_path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["mode", "step", "metric", "mean", "lo", "hi"])
            writer.writeheader()
            writer.writerows(self.per_step)
        json_path = out_dir / "metrics.json"
        payload = {
            "summaries": self.to_dict()["summaries"],
            "metrics": self.to_metrics(),
            "config": asdict(self.config),
            "frames_per_step": self.frames_per_step,
        }
        json_path.write_text(json.dumps(payload, indent=2) + "\n")
        pngs = plot_injection_curves(
            self.per_step, out_dir, frame_rate=frame_rate, frames_per_step=self.frames_per_step
        )
        return [csv_path, json_path, *pngs]


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def run_injection(
    model: DeltaModel,
    segments: torch.Tensor,
    cfg: InjectionConfig,
    bank: torch.Tensor | None,
    correction: Correction | None = None,
) -> InjectionResult:
    """Run every mode of ``cfg`` from every GT segment ``(N, L, D)`` in one batch; metrics per step and start.

    ``bank`` ``(M_bank, D)``: real latents for ``manifold_dist`` (NaN when None). ``correction``: see the module
    docstring. The model is called under ``torch.no_grad`` (put it in eval mode first); the correction runs in
    the caller's grad mode, so an autograd-based correction wraps itself in ``torch.enable_grad()``.
    """
    w, k = _model_geometry(model)
    if segments.ndim != 3:
        raise ValueError(f"segments must be (N, L, D), got shape {tuple(segments.shape)}")
    n, length, dim = segments.shape
    if dim != model.dim:
        raise ValueError(f"segments have D={dim} but model.dim={model.dim}")
    horizon = cfg.horizon
    need = (w - 1) * k + 1 + horizon * k
    if length < need:
        raise ValueError(
            f"segments have {length} frames; W={w} context frames at stride k={k} and H={horizon} steps need "
            f"(W-1)k + 1 + Hk = {need}"
        )
    if bank is not None and (bank.ndim != 2 or bank.shape[1] != dim):
        raise ValueError(f"bank must be (M, {dim}), got {tuple(bank.shape)}")
    per_row = _rollout(model, segments[:, :need:k].to(torch.float32), cfg, w, bank, correction)
    n_modes, samples = len(cfg.modes), cfg.samples_per_start
    per_start = {
        name: values.reshape(horizon, n_modes, n, samples).mean(dim=3).permute(1, 2, 0).double().cpu().numpy()
        for name, values in per_row.items()
    }
    per_start["divergence_step"] = _divergence_steps(per_start["mse"], cfg)
    return InjectionResult(
        modes=list(cfg.modes),
        per_step=_per_step_rows(per_start, cfg),
        per_start=per_start,
        summaries=_summaries(per_start, cfg),
        config=cfg,
        frames_per_step=k,
    )


def _rollout(
    model: DeltaModel,
    grid: torch.Tensor,
    cfg: InjectionConfig,
    w: int,
    bank: torch.Tensor | None,
    correction: Correction | None,
) -> dict[str, torch.Tensor]:
    """Batched rollout on the stride-k grid ``(N, W+H, D)``; returns metric -> ``(H, M*N*S)`` per row and step."""
    n, _, dim = grid.shape
    horizon, samples, n_modes = cfg.horizon, cfg.samples_per_start, len(cfg.modes)
    device = grid.device
    rows = n_modes * n * samples
    start_of_row = (torch.arange(rows, device=device) // samples) % n
    mode_of_row = torch.arange(rows, device=device) // (n * samples)
    schedules = torch.stack(
        [injection_schedule(m, horizon, cfg.period, cfg.inject_step) for m in cfg.modes]
    ).to(device)  # (M, H)
    inject = schedules[mode_of_row]  # (rows, H)
    corrected = ~inject.all(dim=1)  # rows of free-running modes
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.predict == "sample" else None

    out = {name: torch.empty(horizon, rows, device=device) for name in METRICS}
    context = grid[start_of_row, :w]  # (rows, W, D)
    for s in range(horizon):
        gt_window = grid[start_of_row, s : s + w]
        context = torch.where(inject[:, s, None, None], gt_window, context)
        last = context[:, -1]
        target = grid[start_of_row, s + w]
        with torch.no_grad():
            dist = model.predictive(context)
            log_prob = _check_predictive_shape("log_prob", dist.log_prob(target - last), (rows,))
            if cfg.predict == "mean":
                delta = _check_predictive_shape("mean", dist.mean(), (rows, dim))
            else:
                delta = _check_predictive_shape(
                    "sample", dist.sample(temperature=cfg.temperature, generator=generator), (rows, dim)
                )
            pred = (last + delta).to(torch.float32)
        if correction is not None and bool(corrected.any()):
            pred = pred.clone()
            pred[corrected] = correction(pred[corrected]).detach().to(torch.float32)
        with torch.no_grad():
            out["mse"][s] = (pred - target).pow(2).mean(dim=1)
            out["cosine"][s] = torch.nn.functional.cosine_similarity(pred, target, dim=1, eps=1e-12)
            out["nll"][s] = -log_prob.to(torch.float32) / dim
            out["norm_ratio"][s] = torch.linalg.vector_norm(pred, dim=1) / torch.linalg.vector_norm(
                target, dim=1
            ).clamp_min(torch.finfo(torch.float32).tiny)
            out["manifold_dist"][s] = (
                nearest_neighbour_distance(pred, bank, chunk=cfg.nn_chunk)
                if bank is not None
                else float("nan")
            )
        context = torch.cat([context[:, 1:], pred[:, None]], dim=1)
    return out


def _divergence_steps(mse: np.ndarray, cfg: InjectionConfig) -> np.ndarray:
    """First step whose (sample-averaged) MSE exceeds ``divergence_factor`` x the reference, per mode and start.

    Reference: the mean ``A_teacher`` MSE at the same step when ``A_teacher`` runs, else the mean (over
    starts) step-0 MSE of the same mode. Starts that never exceed it are censored at ``H``.
    """
    if "A_teacher" in cfg.modes:
        reference = mse[cfg.modes.index("A_teacher")].mean(axis=0)[None, None, :]
    else:
        reference = mse[:, :, :1].mean(axis=1, keepdims=True)
    exceeded = mse > cfg.divergence_factor * reference
    return np.where(exceeded.any(axis=2), exceeded.argmax(axis=2), cfg.horizon).astype(np.float64)


def _band(values: np.ndarray, cfg: InjectionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Lower/upper band ``(H,)`` over start points of ``values`` ``(N, H)``."""
    tail = 100.0 * (1.0 - cfg.band_level) / 2.0
    if cfg.band == "percentile":
        lo, hi = np.percentile(values, [tail, 100.0 - tail], axis=0)
        return lo, hi
    n = values.shape[0]
    rng = np.random.default_rng(cfg.seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=cfg.n_bootstrap)  # (n_bootstrap, N)
    means = counts @ values / n
    lo, hi = np.percentile(means, [tail, 100.0 - tail], axis=0)
    return lo, hi


def _per_step_rows(per_start: dict[str, np.ndarray], cfg: InjectionConfig) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for m, mode in enumerate(cfg.modes):
        for name in METRICS:
            values = per_start[name][m]
            mean = values.mean(axis=0)
            lo, hi = _band(values, cfg) if np.isfinite(values).all() else (mean * np.nan, mean * np.nan)
            for s in range(cfg.horizon):
                rows.append(
                    {
                        "mode": mode,
                        "step": s,
                        "metric": name,
                        "mean": float(mean[s]),
                        "lo": float(lo[s]),
                        "hi": float(hi[s]),
                    }
                )
    return rows


def _summaries(per_start: dict[str, np.ndarray], cfg: InjectionConfig) -> dict[str, dict[str, float]]:
    """Per mode: ``auc_mse`` is the *sum* over steps of the mean MSE (unit width per step), plus end/mean values."""
    out: dict[str, dict[str, float]] = {}
    for m, mode in enumerate(cfg.modes):
        mean = {name: per_start[name][m].mean(axis=0) for name in METRICS}  # (H,) each
        divergence = per_start["divergence_step"][m]
        out[mode] = {
            "auc_mse": float(mean["mse"].sum()),
            "mse_at_H": float(mean["mse"][-1]),
            "nll_mean": float(mean["nll"].mean()),
            "nll_at_H": float(mean["nll"][-1]),
            "cosine_mean": float(mean["cosine"].mean()),
            "cosine_at_H": float(mean["cosine"][-1]),
            "manifold_dist_mean": float(mean["manifold_dist"].mean()),
            "manifold_dist_at_H": float(mean["manifold_dist"][-1]),
            "norm_ratio_at_H": float(mean["norm_ratio"][-1]),
            "divergence_step": float(divergence.mean()),
            "diverged_fraction": float((divergence < cfg.horizon).mean()),
        }
    return out
