"""The injection diagnostic (DESIGN §9, the reference's protocol): free-running rollouts with GT injected at
different rates, scored step by step by the one-step likelihood of the true delta.

From each start ``t0`` the model is rolled forward ``K = k_steps`` steps. At step ``s = 1..K`` (frame
``t = t0 + s - 1``) the model reads its context, the W frames ending at ``t - k`` of the *believed* trajectory
(GT before ``t0``, the rollout's own states from ``t0`` on), and is scored on the **true** one-frame delta
``Δ = x[t] - x[t-1]``:

* ``nll`` = ``-log p(Δ | context)`` (nats per frame), ``nll_baseline`` under the unconditional baseline,
  ``dnll`` = their difference;
* ``cos`` = ``cos(Δ̂, Δ)`` and ``mag_ratio`` = ``‖Δ̂‖ / ‖Δ‖`` of the point prediction Δ̂ (``predict``);
* ``state_err`` = ``‖x̂[t-1] - x[t-1]‖``, the believed state's error *before* the step, in the model's space;
* extra keys: ``state_err_raw``, the same error in raw latent units (``raw_scale`` per dimension: the store's
  std for a standardised model; for a centred, unwhitened PCA projection the inverse transform is an isometry,
  so its raw-space error is this one and variants share one scale); ``mse`` = ``‖x̂'[t] - x[t]‖² / D`` and
  ``manifold_dist`` (to the nearest train latent in a bank) of the step's prediction ``x̂'[t] = x̂[t-1] + Δ̂``
  (corrected, before any injection replaces it).

The state then advances ``x̂[t] = x̂[t-1] + Δ̂`` (a correction, when given, maps it toward the data manifold:
``correction(x̂[t], context)`` with the window the step was predicted from), unless
GT is *injected after step s*: ``A_teacher`` after every step, ``B_periodic`` after ``inject_after_periodic``
(4, 8, 12), ``C_one_shot`` after ``inject_after_one_shot`` (1), ``D_rollout`` never. An injection replaces the
state frame only (``reset=frame``, the reference): the window keeps sliding one frame a step, so older
predicted frames stay in it; ``reset=context`` resets the whole believed history to GT.

Geometry: a *segment* of one start holds frames ``t0-k-W+1 .. t0+K-1`` (``L = W + k - 1 + K``), origin ``o =
W + k - 1`` (= ``t0``). A model with ``horizon_mode=stride`` (and ``context_stride == horizon``) predicts
``z[t+k] - z[t]`` from a stride-k context, which is the lag-1 model on every k-th frame: its segments are cut
from trajectories subsampled by k and rolled with lag 1 (a step then spans k frames).

Every mode, start point and sample is one row of a single batch (rows ordered mode-major, then start, then
sample), and each step is one ``model.predictive`` call for the whole batch. Everything is in the model's
space (raw, or standardised when it was trained so). Fully teacher-forced rows are never corrected.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentdyn.diagnostics.manifold import DEFAULT_CHUNK, nearest_neighbour_distance
from latentdyn.jsonio import write_csv_atomic, write_json_atomic
from latentdyn.models.baselines import Baseline
from latentdyn.models.geometry import RolloutGeometry, check_int, rollout_geometry
from latentdyn.models.protocol import PREDICT, DeltaModel, point_prediction

MODES: tuple[str, ...] = ("A_teacher", "B_periodic", "C_one_shot", "D_rollout")
#: The reference's per-step metrics, then our extra keys.
METRICS: tuple[str, ...] = (
    "nll",
    "nll_baseline",
    "dnll",
    "cos",
    "mag_ratio",
    "state_err",
    "state_err_raw",
    "mse",
    "manifold_dist",
)
RESETS: tuple[str, ...] = ("frame", "context")
BANDS: tuple[str, ...] = ("percentile", "bootstrap")
DIAG_FILE = "injection_diag.json"
NORM_FLOOR = 1e-8

#: ``correction(states (R, D), contexts (R, W, D)) -> (R, D)``: see :mod:`latentdyn.diagnostics.corrections`.
Correction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_steps(name: str, steps: Any, k_steps: int) -> list[int]:
    if isinstance(steps, str) or not isinstance(steps, Sequence):
        raise ValueError(f"{name} must be a list of 1-based step numbers, got {steps!r}")
    out = [check_int(f"{name}[]", s, 1) for s in steps]
    late = [s for s in out if s > k_steps]
    if late:
        raise ValueError(f"{name} has steps {late} beyond k_steps={k_steps}")
    return sorted(set(out))


@dataclass
class InjectionConfig:
    """Settings of the injection diagnostic (``conf/diagnostic/injection.yaml``); validated on construction.

    Start points: ``n_utterances`` utterances of ``split`` (a seeded shuffle; utterances too short are passed
    over), each cropped to its first ``max_frames`` frames, ``starts_per_utterance`` seeded starts each.
    ``band``: how per-step bands over start points are drawn in ``per_step.csv`` and the plots
    (``percentile``: the central ``band_level`` range; ``bootstrap``: a CI of the mean). ``bank_size == 0``:
    no manifold bank. ``n_samples`` and ``temperature`` only matter for ``predict == "sample"``.
    """

    modes: list[str] = field(default_factory=lambda: list(MODES))
    k_steps: int = 16
    n_utterances: int = 16
    starts_per_utterance: int = 8
    max_frames: int = 2000
    inject_after_periodic: list[int] = field(default_factory=lambda: [4, 8, 12])
    inject_after_one_shot: list[int] = field(default_factory=lambda: [1])
    reset: str = "frame"
    predict: str = "median"
    n_samples: int = 1
    temperature: float = 1.0
    bank_size: int = 20000
    baseline_max_windows: int | None = 200000
    split: str = "test"
    seed: int = 42
    band: str = "percentile"
    band_level: float = 0.9
    n_bootstrap: int = 1000
    nn_chunk: int = DEFAULT_CHUNK

    def __post_init__(self) -> None:
        if isinstance(self.modes, str) or not isinstance(self.modes, Sequence):
            raise ValueError(f"modes must be a list of mode names from {MODES}, got {self.modes!r}")
        self.modes = [str(m) for m in self.modes]
        if not self.modes:
            raise ValueError(f"modes must not be empty; choose from {MODES}")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"unknown injection mode(s) {unknown}; choose from {MODES}")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes must not repeat, got {self.modes}")
        self.k_steps = check_int("k_steps", self.k_steps, 1)
        self.n_utterances = check_int("n_utterances", self.n_utterances, 1)
        self.starts_per_utterance = check_int("starts_per_utterance", self.starts_per_utterance, 1)
        self.max_frames = check_int("max_frames", self.max_frames, 2)
        self.inject_after_periodic = _check_steps(
            "inject_after_periodic", self.inject_after_periodic, self.k_steps
        )
        self.inject_after_one_shot = _check_steps(
            "inject_after_one_shot", self.inject_after_one_shot, self.k_steps
        )
        if self.reset not in RESETS:
            raise ValueError(f"reset must be one of {RESETS}, got {self.reset!r}")
        if self.predict not in PREDICT:
            raise ValueError(f"predict must be one of {PREDICT}, got {self.predict!r}")
        self.n_samples = check_int("n_samples", self.n_samples, 1)
        self.bank_size = check_int("bank_size", self.bank_size, 0)
        if self.baseline_max_windows is not None:
            self.baseline_max_windows = check_int("baseline_max_windows", self.baseline_max_windows, 1)
        self.seed = check_int("seed", self.seed, 0)
        self.n_bootstrap = check_int("n_bootstrap", self.n_bootstrap, 1)
        self.nn_chunk = check_int("nn_chunk", self.nn_chunk, 1)
        if self.band not in BANDS:
            raise ValueError(f"band must be one of {BANDS}, got {self.band!r}")
        self.temperature = float(self.temperature)
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        self.band_level = float(self.band_level)
        if not 0 < self.band_level < 1:
            raise ValueError(f"band_level must lie in (0, 1), got {self.band_level}")
        if not isinstance(self.split, str) or not self.split:
            raise ValueError(f"split must be a non-empty string, got {self.split!r}")

    @property
    def samples_per_start(self) -> int:
        """Rollouts per start point: ``n_samples`` when sampling, 1 for a deterministic point prediction."""
        return self.n_samples if self.predict == "sample" else 1

    def inject_after(self, mode: str) -> torch.Tensor:
        """``(K,)`` bool: True where GT is injected after step ``s`` (index ``s - 1``)."""
        steps = {
            "A_teacher": range(1, self.k_steps + 1),
            "B_periodic": self.inject_after_periodic,
            "C_one_shot": self.inject_after_one_shot,
            "D_rollout": (),
        }
        if mode not in steps:
            raise ValueError(f"unknown injection mode {mode!r}; choose from {MODES}")
        out = torch.zeros(self.k_steps, dtype=torch.bool)
        for s in steps[mode]:
            out[s - 1] = True
        return out


def utterance_order(n_utterances: int, cfg: InjectionConfig) -> list[int]:
    """The seeded order (a ``seed + 123`` shuffle, as the reference's) in which the diagnostic visits a split's
    ``n_utterances`` utterances."""
    return np.random.default_rng(cfg.seed + 123).permutation(n_utterances).tolist()


@dataclass
class StartPoints:
    """GT segments ``(N, L, D)`` float32 of the chosen starts, and where they come from."""

    segments: torch.Tensor
    utterances: list[str]
    starts: list[tuple[str, int]]


def sample_starts(
    trajectories: Sequence[tuple[str, np.ndarray | torch.Tensor]],
    geometry: RolloutGeometry,
    cfg: InjectionConfig,
) -> StartPoints:
    """The reference's start points: a seeded shuffle of the utterances (``seed + 123``), each cropped to
    ``max_frames`` frames (after subsampling), the first ``n_utterances`` long enough to hold a segment, and
    ``starts_per_utterance`` distinct starts ``t0`` in ``[W + k - 1, T - K - 1)`` each (``numpy`` generator
    seeded with ``seed``, drawn utterance after utterance). ``trajectories``: ``(utt_id, (T, D))`` pairs."""
    k_steps, origin = cfg.k_steps, geometry.origin
    rng = np.random.default_rng(cfg.seed)
    segments: list[torch.Tensor] = []
    used: list[str] = []
    starts: list[tuple[str, int]] = []
    for i in utterance_order(len(trajectories), cfg):
        utt_id, traj = trajectories[i]
        x = traj[:: geometry.subsample][: cfg.max_frames]
        first, stop = origin, int(x.shape[0]) - k_steps - 1
        if stop <= first:
            continue
        t0s = np.sort(
            rng.choice(
                np.arange(first, stop), size=min(cfg.starts_per_utterance, stop - first), replace=False
            )
        )
        for t0 in t0s.tolist():
            piece = x[t0 - origin : t0 + k_steps]
            segments.append(
                piece.clone() if isinstance(piece, torch.Tensor) else torch.from_numpy(np.array(piece))
            )
            starts.append((utt_id, int(t0) * geometry.subsample))
        used.append(utt_id)
        if len(used) == cfg.n_utterances:
            break
    if not segments:
        longest = max((int(t.shape[0]) for _, t in trajectories), default=0)
        raise ValueError(
            f"no utterance is long enough for the injection diagnostic: a start needs W + k + K + 1 = "
            f"{origin + k_steps + 2} frames (after subsampling by {geometry.subsample}); the longest of "
            f"{len(trajectories)} has {longest}"
        )
    return StartPoints(torch.stack(segments).to(torch.float32), used, starts)


@dataclass
class InjectionResult:
    """Outcome of :func:`run_injection`.

    ``per_start``: metric -> ``(M, N, K)`` float64 (averaged over samples). ``per_step``: tidy rows ``{mode,
    step, metric, mean, lo, hi}`` (steps 1-based, band over start points). ``frames_per_step``: frames a step
    spans (k for a stride model, else 1).
    """

    modes: list[str]
    per_start: dict[str, np.ndarray]
    per_step: list[dict[str, Any]]
    config: InjectionConfig
    window_size: int
    horizon_k: int
    frames_per_step: int
    n_utterances: int

    def mode_summary(self, mode: str) -> dict[str, float]:
        """Overall means over steps and starts of every metric, plus ``state_err_at_K``."""
        m = self.modes.index(mode)
        out = {name: float(self.per_start[name][m].mean()) for name in METRICS}
        out["state_err_at_K"] = float(self.per_start["state_err"][m][:, -1].mean())
        out["state_err_raw_at_K"] = float(self.per_start["state_err_raw"][m][:, -1].mean())
        return out

    def to_metrics(self) -> dict[str, float]:
        """Flat ``{"D_rollout/dnll": ...}``; non-finite entries (e.g. no bank) are left out."""
        return {
            f"{mode}/{name}": value
            for mode in self.modes
            for name, value in self.mode_summary(mode).items()
            if math.isfinite(value)
        }

    def to_dict(self) -> dict[str, Any]:
        """``injection_diag.json``: the reference's schema (``n_utterances, horizon_k, window_size, k_steps,
        modes.<MODE>.{n, nll, nll_baseline, dnll, cos, mag_ratio, state_err, per_step[{step, n, ...}]}``), with
        our extra metrics as extra keys and the settings under ``config``."""
        modes: dict[str, Any] = {}
        for m, mode in enumerate(self.modes):
            n_starts = self.per_start["nll"].shape[1]
            steps = [
                {
                    "step": s + 1,
                    "n": n_starts,
                    **{name: _json_float(self.per_start[name][m][:, s].mean()) for name in METRICS},
                }
                for s in range(self.config.k_steps)
            ]
            summary = {k: _json_float(v) for k, v in self.mode_summary(mode).items()}
            modes[mode] = {"n": n_starts * self.config.k_steps, **summary, "per_step": steps}
        return {
            "n_utterances": self.n_utterances,
            "horizon_k": self.horizon_k,
            "window_size": self.window_size,
            "k_steps": self.config.k_steps,
            "frames_per_step": self.frames_per_step,
            "reset": self.config.reset,
            "predict": self.config.predict,
            "modes": modes,
            "config": asdict(self.config),
        }

    def write(self, out_dir: Path, frame_rate: float | None = None, *, title: str) -> list[Path]:
        """Write ``injection_diag.json``, ``per_step.csv`` and one PNG per metric; returns the paths.

        ``title`` (see :func:`~latentdyn.diagnostics.plots.figure_title`) heads every plot; ``frame_rate``
        (frames/s), if given, adds a seconds axis to the plots.
        """
        from latentdyn.diagnostics.plots import band_label, plot_injection_curves

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = out_dir / DIAG_FILE
        write_json_atomic(json_path, self.to_dict())
        csv_path = out_dir / "per_step.csv"
        write_csv_atomic(csv_path, ["mode", "step", "metric", "mean", "lo", "hi"], self.per_step)
        band = band_label(
            self.config.band, self.config.band_level, self.per_start["nll"].shape[1], self.config.n_bootstrap
        )
        pngs = plot_injection_curves(
            self.per_step,
            out_dir,
            title=title,
            band=band,
            frame_rate=frame_rate,
            frames_per_step=self.frames_per_step,
        )
        return [json_path, csv_path, *pngs]


def _json_float(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def run_injection(
    model: DeltaModel,
    segments: torch.Tensor,
    cfg: InjectionConfig,
    baseline: Baseline,
    bank: torch.Tensor | None = None,
    correction: Correction | None = None,
    n_utterances: int = 0,
    raw_scale: torch.Tensor | None = None,
) -> InjectionResult:
    """Run every mode of ``cfg`` from every GT segment ``(N, L, D)`` (from :func:`sample_starts`) in one batch.

    ``baseline``: the fitted unconditional baseline (``log_prob``) for ``nll_baseline``. ``bank`` ``(M, D)``: real
    latents for ``manifold_dist`` (NaN when None). ``correction``: applied to every free-running state before
    it enters the trajectory, with the context window it was predicted from. ``raw_scale`` ``(D,)``: per-dimension factor from the model's space to raw
    latent units for ``state_err_raw`` (None: the model works on raw latents). The model is called under
    ``torch.no_grad`` (put it in eval mode first); the correction runs in the caller's grad mode, so an
    autograd-based correction wraps itself in ``enable_grad``.
    """
    geometry = rollout_geometry(model)
    if segments.ndim != 3:
        raise ValueError(f"segments must be (N, L, D), got shape {tuple(segments.shape)}")
    n, length, dim = segments.shape
    if dim != model.dim:
        raise ValueError(f"segments have D={dim} but model.dim={model.dim}")
    need = geometry.segment_length(cfg.k_steps)
    if length != need:
        raise ValueError(f"segments have {length} frames; W + k - 1 + K = {need} are needed")
    if bank is not None and (bank.ndim != 2 or bank.shape[1] != dim):
        raise ValueError(f"bank must be (M, {dim}), got {tuple(bank.shape)}")
    scale = (
        torch.ones(dim) if raw_scale is None else torch.as_tensor(raw_scale, dtype=torch.float32).reshape(dim)
    )
    per_row = _rollout(
        model,
        segments.to(torch.float32),
        cfg,
        geometry,
        baseline,
        bank,
        correction,
        scale.to(segments.device),
    )
    n_modes, samples = len(cfg.modes), cfg.samples_per_start
    per_start = {
        name: values.reshape(cfg.k_steps, n_modes, n, samples)
        .mean(dim=3)
        .permute(1, 2, 0)
        .double()
        .cpu()
        .numpy()
        for name, values in per_row.items()
    }
    return InjectionResult(
        modes=list(cfg.modes),
        per_start=per_start,
        per_step=_per_step_rows(per_start, cfg, cfg.modes),
        config=cfg,
        window_size=geometry.window,
        horizon_k=int(model.horizon),
        frames_per_step=geometry.subsample,
        n_utterances=int(n_utterances),
    )


def _rollout(
    model: DeltaModel,
    gt: torch.Tensor,
    cfg: InjectionConfig,
    geometry: RolloutGeometry,
    baseline: Baseline,
    bank: torch.Tensor | None,
    correction: Correction | None,
    raw_scale: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Batched rollout of segments ``(N, L, D)``; returns metric -> ``(K, M*N*S)`` per step and row."""
    n, _, dim = gt.shape
    w, lag, origin = geometry.window, geometry.lag, geometry.origin
    samples, n_modes, k_steps = cfg.samples_per_start, len(cfg.modes), cfg.k_steps
    device = gt.device
    rows = n_modes * n * samples
    start_of_row = (torch.arange(rows, device=device) // samples) % n
    mode_of_row = torch.arange(rows, device=device) // (n * samples)
    inject = torch.stack([cfg.inject_after(m) for m in cfg.modes]).to(device)[mode_of_row]  # (rows, K)
    free_running = ~inject.all(dim=1)
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.predict == "sample" else None

    truth = gt[start_of_row]  # (rows, L, D)
    states = truth.clone()  # the believed trajectory: GT before t0, the rollout's states from t0 on
    out = {name: torch.empty(k_steps, rows, device=device) for name in METRICS}
    for s in range(k_steps):
        i = origin + s  # frame t = t0 + s (step s + 1)
        context = states[:, i - lag - w + 1 : i - lag + 1]
        x_prev, true_delta = states[:, i - 1], truth[:, i] - truth[:, i - 1]
        with torch.no_grad():
            dist = model.predictive(context)
            log_prob = dist.log_prob(true_delta).to(torch.float32)
            delta = point_prediction(dist, cfg.predict, cfg.temperature, generator).to(torch.float32)
            predicted = x_prev + delta
        if correction is not None and bool(free_running.any()):
            predicted = predicted.clone()
            predicted[free_running] = (
                correction(predicted[free_running], context[free_running]).detach().to(torch.float32)
            )
        with torch.no_grad():
            nll_baseline = -baseline.log_prob(true_delta).to(torch.float32)
            pred_norm = torch.linalg.vector_norm(delta, dim=1).clamp_min(NORM_FLOOR)
            true_norm = torch.linalg.vector_norm(true_delta, dim=1).clamp_min(NORM_FLOOR)
            out["nll"][s] = -log_prob
            out["nll_baseline"][s] = nll_baseline
            out["dnll"][s] = -log_prob - nll_baseline
            out["cos"][s] = (delta * true_delta).sum(1) / (pred_norm * true_norm)
            out["mag_ratio"][s] = pred_norm / true_norm
            out["state_err"][s] = torch.linalg.vector_norm(x_prev - truth[:, i - 1], dim=1)
            out["state_err_raw"][s] = torch.linalg.vector_norm((x_prev - truth[:, i - 1]) * raw_scale, dim=1)
            # The prediction itself (before any injection replaces it) against GT and the data manifold.
            out["mse"][s] = (predicted - truth[:, i]).pow(2).mean(dim=1)
            out["manifold_dist"][s] = (
                nearest_neighbour_distance(predicted, bank, chunk=cfg.nn_chunk)
                if bank is not None
                else float("nan")
            )
        states[:, i] = torch.where(inject[:, s, None], truth[:, i], predicted)
        if cfg.reset == "context":
            reset_rows = inject[:, s]
            states[reset_rows, : i + 1] = truth[reset_rows, : i + 1]
    return out


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


def _per_step_rows(
    per_start: dict[str, np.ndarray], cfg: InjectionConfig, modes: Sequence[str]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for m, mode in enumerate(modes):
        for name in METRICS:
            values = per_start[name][m]
            mean = values.mean(axis=0)
            lo, hi = _band(values, cfg) if np.isfinite(values).all() else (mean * np.nan, mean * np.nan)
            for s in range(cfg.k_steps):
                rows.append(
                    {
                        "mode": mode,
                        "step": s + 1,
                        "metric": name,
                        "mean": float(mean[s]),
                        "lo": float(lo[s]),
                        "hi": float(hi[s]),
                    }
                )
    return rows


def merge_modes(parts: Sequence[tuple[str, InjectionResult, str]]) -> InjectionResult:
    """One result whose modes are ``(name, result, mode)`` triples: mode ``mode`` of ``result``, renamed ``name``
    (Exp 6 puts the uncorrected ``D_rollout`` and the corrected run's ``D_rollout``, as ``D_corrected``, side by
    side). The results must come from the same start points and settings (the first one's are kept)."""
    if not parts:
        raise ValueError("merge_modes needs at least one (name, result, mode) triple")
    names = [name for name, _, _ in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"mode names must not repeat, got {names}")
    first = parts[0][1]
    shape = first.per_start["nll"].shape[1:]
    for name, result, _ in parts:
        if result.per_start["nll"].shape[1:] != shape or result.window_size != first.window_size:
            raise ValueError(f"mode {name!r} comes from other start points or geometry than {names[0]!r}")
    per_start = {
        metric: np.stack([result.per_start[metric][result.modes.index(mode)] for _, result, mode in parts])
        for metric in first.per_start
    }
    return dataclasses.replace(
        first,
        modes=names,
        per_start=per_start,
        per_step=_per_step_rows(per_start, first.config, names),
    )
