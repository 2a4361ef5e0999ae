"""Stage 3's steps (Exp 8, 10, 11): find the latent store, the codebook and the models an experiment builds on,
and turn models into one-step predictors for :mod:`latentdyn.diagnostics.free_rollout`.

Each experiment names what it depends on the way checkpoints are named elsewhere: a path, a run directory,
``latest:EXPERIMENT[/SUB_RUN]``; what it cannot find stops it with the experiment to run first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from latentdyn.data.latent_store import META_FILE, LatentStore
from latentdyn.diagnostics.audio_io import (
    choose_utterances,
    decode_latents,
    json_distances,
    mean_distances,
    objective_distances,
    representation_from_store,
    safe_name,
    write_listening_wav,
)
from latentdyn.diagnostics.free_rollout import (
    Segments,
    free_rollout,
    horizon_summary,
    per_step_rows,
    per_step_values,
    sample_segments,
)
from latentdyn.diagnostics.plots import curves_figure, figure_title, save_figure
from latentdyn.models.protocol import point_prediction
from latentdyn.pipeline.store import prepare_latent_store
from latentdyn.tracking.lookup import latest_run_dir
from latentdyn.tracking.run import METRICS_NAME

#: ``store=run``: the run's own data and representation (a cached latent store).
RUN_STORE = "run"
CODEBOOK_FORMAT = "codebook_K{k}.npy"


def run_directory(value: str, manifest: Path, key: str) -> Path:
    """A run directory from ``latest``-style references (``latest:EXPERIMENT[/SUB_RUN]``) or a path; ``key``
    is the config key ``value`` came from (for messages)."""
    if value.startswith("latest:"):
        return latest_run_dir(manifest, value.split(":", 1)[1], key)
    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{key}={value}: {path} does not exist (pass a run directory or latest:EXPERIMENT[/SUB_RUN])"
        )
    return path


def store_of_run(run_dir: Path) -> LatentStore:
    """The latent store a run recorded in its ``metrics.json`` (``latent_store``)."""
    metrics = Path(run_dir) / METRICS_NAME
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir} has no {METRICS_NAME}: it is not a completed run")
    recorded = json.loads(metrics.read_text()).get("latent_store")
    if not recorded:
        raise ValueError(f"{metrics} names no latent_store: that run did not work on a latent store")
    root = Path(recorded)
    if not (root / META_FILE).is_file():
        raise FileNotFoundError(
            f"the latent store {root} recorded by {run_dir} no longer exists (a cleaned cache?); re-run that "
            "experiment to rebuild it, or pass store=PATH"
        )
    return LatentStore(root)


def resolve_store(cfg: DictConfig, value: str) -> LatentStore:
    """The latent store ``value`` names: ``run`` (this run's data and representation, built or reused), a store
    directory, a run directory or ``latest:EXPERIMENT[/SUB_RUN]`` (the store that run recorded, e.g.
    ``latest:exp5_betavae/baseline_betavae``: that variant's β-VAE latents)."""
    if value == RUN_STORE:
        return prepare_latent_store(cfg)
    path = Path(value).expanduser()
    if (path / META_FILE).is_file():
        return LatentStore(path)
    try:
        run_dir = run_directory(value, Path(cfg.paths.manifest), "store")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}, or store=run for this run's own representation") from None
    return store_of_run(run_dir)


@dataclass
class Codebook:
    """A direction codebook ``(K, D)`` of unit rows, where it came from and the store it was fitted on."""

    vectors: np.ndarray
    source: Path
    store: LatentStore

    @property
    def size(self) -> int:
        return int(self.vectors.shape[0])


def load_codebook(cfg: DictConfig, value: str, size: int) -> Codebook:
    """The size-``size`` direction codebook of an Exp 8 run (``latest:exp8_direction_codebook``, a run
    directory) and the store that run fitted it on; or a ``.npy`` file with ``store=...`` naming its store."""
    path = Path(value).expanduser()
    if path.suffix == ".npy":
        if not path.is_file():
            raise FileNotFoundError(f"codebook file not found: {path}")
        if cfg.get("store") in (None, ""):
            raise ValueError(f"codebook={path} is a file: name the latent store it belongs to with store=...")
        vectors, store = np.load(path), resolve_store(cfg, str(cfg.store))
    else:
        run_dir = run_directory(value, Path(cfg.paths.manifest), "codebook")
        path = run_dir / CODEBOOK_FORMAT.format(k=int(size))
        if not path.is_file():
            found = sorted(p.name for p in run_dir.glob("codebook_K*.npy"))
            raise FileNotFoundError(f"{run_dir} has no {path.name} (codebook_size={size}); it has {found}")
        vectors, store = np.load(path), store_of_run(run_dir)
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != store.dim:
        raise ValueError(f"{path}: a codebook must be (K, {store.dim}), got {vectors.shape}")
    if not np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3):
        raise ValueError(f"{path}: codewords must be unit vectors (a direction codebook)")
    return Codebook(vectors, path, store)


def split_delta_norms(store: LatentStore, split: str) -> np.ndarray:
    """``‖x[t] - x[t-1]‖`` of every one-frame delta within the utterances of ``split`` ``(N,)`` float64, read one
    utterance at a time (a 512-d store of 100 h does not fit in memory as float32 deltas)."""
    parts = [
        np.linalg.norm(np.diff(np.asarray(store.utterance_latents(u), dtype=np.float64), axis=0), axis=1)
        for u in store.utterances(split)
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


@dataclass
class FrameSample:
    """A seeded sample of a split's moving deltas ``(M, D)`` and frames ``(S, D)`` (float32), how many of each
    the split holds, and the norms of all its deltas ``(N,)``."""

    moving: np.ndarray
    states: np.ndarray
    n_moving: int
    n_states: int
    norms: np.ndarray


def sample_split(
    store: LatentStore,
    split: str,
    min_norm: float,
    max_points: int | None,
    seed: int,
    norms: np.ndarray | None = None,
) -> FrameSample:
    """Deltas of norm ≥ ``min_norm`` and frames of ``split``, each kept with probability ``max_points / total``
    (all of them when they number at most ``max_points``; None: all), one utterance at a time. ``norms``: the
    split's :func:`split_delta_norms` when the caller has them already (else they are read here)."""
    norms = split_delta_norms(store, split) if norms is None else norms
    n_moving = int(np.sum(norms >= min_norm))
    n_states = int(sum(u.n_frames for u in store.utterances(split)))
    if n_moving == 0:
        raise ValueError(f"split {split!r} of {store.root} has no delta of norm >= {min_norm:g}")

    def share(total: int) -> float:
        return 1.0 if max_points is None or total <= max_points else float(max_points) / total

    keep_moving, keep_state = share(n_moving), share(n_states)
    rng = np.random.default_rng(seed)
    moving, states = [], []
    for utt in store.utterances(split):
        x = np.asarray(store.utterance_latents(utt), dtype=np.float32)
        deltas = np.diff(x, axis=0)
        chosen = np.linalg.norm(deltas.astype(np.float64), axis=1) >= min_norm
        moving.append(deltas[chosen & (rng.random(len(deltas)) < keep_moving)])
        states.append(x[rng.random(len(x)) < keep_state])
    return FrameSample(np.concatenate(moving), np.concatenate(states), n_moving, n_states, norms)


def direction_ar_stepper(net: Any, strategy: str, top_p: float = 0.9) -> Any:
    """One rollout step of a direction AR net (raw latents): ``m · c_a`` by ``strategy``, from the last
    ``net.context`` frames of the rollout's window."""

    def step(context: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return net(context[:, -net.context :]).step(strategy, top_p, generator)

    return step


def dynamics_stepper(net: Any, store: LatentStore, predict: str) -> Any:
    """One rollout step of a dynamics net in its own space (raw, or the store's standardised latents), taking
    and returning raw latents: the last ``net.context`` frames of the rollout's window are standardised, the
    predicted delta scaled back by the std."""
    std = torch.from_numpy(store.std.astype(np.float32))

    def step(context: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        window = context[:, -net.context :].cpu()
        model_context = store.to_model_space(window, net.standardized).to(context.device)
        delta = point_prediction(net.predictive(model_context), predict, 1.0, generator).to(torch.float32)
        return delta * std.to(delta.device) if net.standardized else delta

    return step


def check_same_store(what: Sequence[tuple[str, Path]], hint: str = "") -> None:
    """ValueError unless every named model was trained on one latent store (``(name, store directory)``)."""
    roots = {str(Path(root).resolve()) for _, root in what}
    if len(roots) > 1:
        detail = "; ".join(f"{name}: {root}" for name, root in what)
        raise ValueError(
            f"these were trained on different latent stores and cannot be compared: {detail}{hint}"
        )


@dataclass
class Condition:
    """A rollout condition: its predictor (raw latents), optional correction and the seed of its draws."""

    name: str
    step: Any
    correction: Any = None
    seed: int = 0


def evaluate_conditions(
    conditions: Sequence[Condition],
    segments: Any,
    k_values: Sequence[int],
    codebook: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """Roll every condition out over the same segments (``K`` = the segments' steps) and summarise it: per
    condition ``per_step`` (one row per step) and ``horizons`` (``{k: summary}`` of the ``k``-step prefix, see
    :func:`~latentdyn.diagnostics.free_rollout.horizon_summary`)."""
    book = None if codebook is None else torch.from_numpy(np.asarray(codebook, dtype=np.float32))
    out: dict[str, dict[str, Any]] = {}
    for condition in conditions:
        generator = torch.Generator().manual_seed(int(condition.seed))
        rollout = free_rollout(condition.step, segments, condition.correction, generator)
        values = per_step_values(rollout, book)
        out[condition.name] = {
            "per_step": per_step_rows(values, rollout.finite),
            "horizons": {int(k): horizon_summary(values, rollout.finite, int(k)) for k in k_values},
        }
    return out


AUDIO_DIR = "rollout_audio"


def rollout_audio(
    cfg: DictConfig, store: LatentStore, conditions: Sequence[Condition], context: int
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float | None]]]:
    """Decoded rollouts (``cfg.audio``): ``n_utterances`` eval utterances (a seeded choice), one seeded start
    ``t`` each; every condition rolls ``max(k)`` steps from the GT context before ``t``; for each ``k`` the
    trajectory ``x[t-pad:t] ++ rollout[:k] ++ x[t+k:t+k+pad]`` is decoded next to the GT ``x[t-pad:t+k+pad]``
    and scored against it over the whole window (log-mel, MR-STFT at the representation's rate). Files:
    ``rollout_audio/<utt>/gt_k{k}.wav`` and ``<condition>_k{k}.wav``. Returns the file records and the mean
    distances per ``<condition>_k{k}``."""
    from latentdyn.representations.extract import resolve_device

    audio = cfg.audio
    ks = sorted(int(k) for k in audio.k_values)
    pad, k_max = int(audio.pad_frames), max(ks)
    lead = max(int(context), pad)
    utts = choose_utterances(
        store, str(cfg.split), int(cfg.n_utterances), int(cfg.seed), min_frames=lead + k_max + pad + 1
    )
    rng = np.random.default_rng(int(cfg.seed) + 1)
    xs = [np.asarray(store.utterance_latents(u), dtype=np.float32) for u in utts]
    starts = [int(rng.integers(lead, len(x) - k_max - pad + 1)) for x in xs]
    segments = Segments(
        torch.from_numpy(np.stack([x[t - context : t + k_max] for x, t in zip(xs, starts, strict=True)])),
        int(context),
        [(u.utt_id, t) for u, t in zip(utts, starts, strict=True)],
    )
    rolled = {
        c.name: free_rollout(c.step, segments, c.correction, torch.Generator().manual_seed(int(c.seed)))
        for c in conditions
    }
    rep = representation_from_store(store, resolve_device(cfg.extract.device))
    rate, out_rate = int(rep.sample_rate), int(cfg.output_sample_rate)
    run_dir = Path(cfg.run_dir)
    entries: list[dict[str, Any]] = []
    for i, (utt, x, t) in enumerate(zip(utts, xs, starts, strict=True)):
        out_dir = run_dir / AUDIO_DIR / safe_name(utt.utt_id)
        for k in ks:
            gt = torch.from_numpy(x[t - pad : t + k + pad])
            names = [n for n, r in rolled.items() if bool(r.finite[i, k - 1])]
            spliced = [torch.cat([gt[:pad], rolled[n].states[i, :k].cpu(), gt[pad + k :]]) for n in names]
            waves = decode_latents(rep, torch.stack([gt, *spliced]))
            common = {"utterance": utt.utt_id, "start": t, "k": k, "pad_frames": pad}
            gt_file = write_listening_wav(out_dir, f"gt_k{k}", waves[0], rate, out_rate, run_dir)
            entries.append({**common, "condition": "gt", **gt_file, "distances": None})
            for name, wave in zip(names, waves[1:], strict=True):
                distances = json_distances(
                    objective_distances(waves[0], wave, rate, with_stoi=False, with_pesq=False)
                )
                written = write_listening_wav(out_dir, f"{name}_k{k}", wave, rate, out_rate, run_dir)
                entries.append({**common, "condition": name, **written, "distances": distances})
            for name in sorted(set(rolled) - set(names)):
                entries.append({**common, "condition": name, "path": None, "distances": None,
                                "note": "the rollout went non-finite: nothing to decode"})  # fmt: skip
    means = {
        f"{c.name}_k{k}": _spectral(
            mean_distances(
                {m: e["distances"][m] for m in ("log_mel", "mrstft")}
                for e in entries
                if e["condition"] == c.name and e["k"] == k and e["distances"] is not None
            )
        )
        for c in conditions
        for k in ks
    }
    return entries, means


def _spectral(distances: dict[str, float | None]) -> dict[str, float | None]:
    """The distances rollout audio is scored with: log-mel and MR-STFT."""
    return {key: distances.get(key) for key in ("log_mel", "mrstft")}


def rollout_segments(cfg: DictConfig, store: Any, context: int) -> Any:
    """The eval rollout segments (``cfg.rollout``): W + max(k) GT frames each, seeded."""
    r = cfg.rollout
    return sample_segments(
        store.trajectories(str(cfg.split)),
        context,
        max(int(k) for k in r.k_values),
        int(r.n_utterances),
        int(r.segments_per_utterance),
        int(cfg.seed),
        r.max_frames,
    )


def rollout_rows(results: dict[str, dict[str, Any]], label: str = "strategy") -> list[dict[str, Any]]:
    """``summary.csv`` rows: one per condition and k, its horizon summary."""
    return [
        {label: name, **summary}
        for name, result in results.items()
        for summary in result["horizons"].values()
    ]


def per_step_csv_rows(results: dict[str, dict[str, Any]], label: str = "strategy") -> list[dict[str, Any]]:
    """``per_step.csv`` rows: one per condition and step."""
    return [{label: name, **row} for name, result in results.items() for row in result["per_step"]]


def plot_state_err(
    cfg: DictConfig,
    results: dict[str, dict[str, Any]],
    path: Path,
    extra: str = "",
    suffix: str | None = None,
) -> None:
    """Final state error vs the number of rollout steps k, one line per condition (log y); conditions named
    ``<base><suffix>`` share their base's colour, dashed."""
    series = {
        name: (list(r["horizons"]), [h["final_state_err"] for h in r["horizons"].values()])
        for name, r in results.items()
    }
    fig = curves_figure(
        series,
        title=figure_title(cfg.name, cfg.run_id, extra=extra or None),
        xlabel="rollout steps k",
        ylabel="state error after k steps ‖x̂ − x‖ (raw latent units)",
        logx_base=2,
        logy=True,
        groups={name: name.removesuffix(suffix) for name in series} if suffix else None,
        dashed=[name for name in series if suffix and name.endswith(suffix)],
    )
    save_figure(fig, path)
