"""Exp 8: do the frame-to-frame directions of a latent trajectory fall into a practical codebook?

Method (the reference study's Exp 8, the discrete-direction pivot's feasibility test). On the train speakers'
frames of a latent store (by default the latest Exp 5 β-VAE variant's 32-d latents), one-frame deltas
``Δ = x[t] - x[t-1]`` are taken within each utterance; deltas below 0.01 × the median norm are dropped (their
direction is noise) and the rest normalised to unit directions. For each codebook size K (64, 256, 1024):

* ``direction``: spherical k-means on the unit directions (faiss, cosine objective, unit centroids; seeded);
* ``raw_delta``: k-means on the raw deltas (a codeword is a whole step, magnitude included);
* ``state``: k-means on the frames themselves (VQ of states, no dynamics).

Scored on the eval speakers (never seen by k-means): the angular error between each moving delta and its
codeword (mean and median, degrees), codebook usage (utilisation: codewords with ≥ 0.1 % of the assignments;
entropy / log K; perplexity e^H), the state VQ's quantisation error, and the share of near-zero deltas at
{0.001, 0.01, 0.1, 0.5} × the train median norm. Open loop, 10 eval utterances are rebuilt from their first
frame through each codebook with the true magnitudes and choices (``x += ‖Δ‖·c`` for directions, ``x += c`` for
raw deltas, ``x = c`` for states), decoded with the store's representation and compared with ``decode(z_true)``
(log-mel and MR-STFT distances); the drift ``‖x̂[t] - x[t]‖`` gets a least-squares slope per frame.

Go criterion (the reference's notes): mean angular error below 30° at some K ≤ 1024.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

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
from latentdyn.diagnostics.plots import curves_figure, figure_title, save_figure
from latentdyn.jsonio import write_npy_atomic
from latentdyn.models.codebook import (
    KINDS,
    angular_error_deg,
    assign_cosine,
    assign_l2,
    divergence,
    divergence_slope,
    fit_kmeans,
    near_zero_fractions,
    quantised_trajectory,
    unit_rows,
    usage_stats,
)
from latentdyn.pipeline.audio import utterance_latents
from latentdyn.pipeline.common import write_csv_rows
from latentdyn.pipeline.stage3 import CODEBOOK_FORMAT, resolve_store, sample_split, split_delta_norms
from latentdyn.tracking.run import METRICS_NAME, write_json

log = logging.getLogger(__name__)

TRAIN = "train"
PLOT_NAME = "angle_error_vs_K.png"
AUDIO_DIR = "recon_audio"
#: File of each kind's codebook (the direction codebook is the one Exp 10 reads).
FILES = {
    "direction": CODEBOOK_FORMAT,
    "raw_delta": "codebook_raw_delta_K{k}.npy",
    "state": "codebook_state_K{k}.npy",
}


#: What each kind's k-means fits (a key of the train data) and whether it is spherical.
FITS = {"direction": ("units", True), "raw_delta": ("moving", False), "state": ("states", False)}


def fit_codebook(kind: str, k: int, data: dict[str, np.ndarray], cfg: DictConfig) -> np.ndarray:
    """The size-``k`` codebook of ``kind`` on the train data (``units``, ``moving``, ``states``)."""
    key, spherical = FITS[kind]
    if k > len(data[key]):
        raise ValueError(f"K={k} exceeds the {len(data[key])} {key} to fit: use smaller kmeans.sizes")
    return fit_kmeans(
        data[key], k, spherical=spherical, seed=int(cfg.seed), n_iter=int(cfg.kmeans.n_iter),
        n_init=int(cfg.kmeans.n_init),
    )  # fmt: skip


def eval_metrics(
    kind: str, codebook: np.ndarray, data: dict[str, np.ndarray], min_share: float
) -> dict[str, float]:
    """Angular error (degrees) of the eval speakers' moving deltas to their codewords (direction, raw delta),
    the state VQ's quantisation error, and usage statistics of the eval assignments."""
    out: dict[str, float] = {}
    if kind == "state":
        index = assign_l2(data["states"], codebook)
        error = np.linalg.norm(data["states"] - codebook[index], axis=1)
        out.update(quant_err_mean=float(error.mean()), quant_err_median=float(np.median(error)))
    else:
        moving = data["moving"]
        index = assign_cosine(moving, codebook) if kind == "direction" else assign_l2(moving, codebook)
        angle = angular_error_deg(moving, codebook[index])
        out.update(
            angle_mean_deg=float(angle.mean()),
            angle_median_deg=float(np.median(angle)),
            angle_p95_deg=float(np.percentile(angle, 95)),
        )
        if kind == "raw_delta":
            gap = np.abs(np.linalg.norm(moving, axis=1) - np.linalg.norm(codebook[index], axis=1))
            out["magnitude_abs_err"] = float(gap.mean())
    out.update(usage_stats(index, len(codebook), min_share))
    return out


def open_loop(
    cfg: DictConfig,
    store: Any,
    rep: Any,
    codebooks: dict[tuple[str, int], np.ndarray],
    min_norm: float,
) -> tuple[dict[tuple[str, int], dict[str, float | None]], list[dict[str, Any]]]:
    """Rebuild ``recon.n_utterances`` eval utterances through every codebook, decode them next to the GT and
    score them; returns per (kind, K) the mean distances and drift, and one record per utterance."""
    recon = cfg.recon
    utts = choose_utterances(store, str(cfg.split), int(recon.n_utterances), int(cfg.seed), min_frames=3)
    run_dir = Path(cfg.run_dir)
    rows: dict[tuple[str, int], list[dict[str, float | None]]] = {key: [] for key in codebooks}
    records = []
    for utt in utts:
        x = utterance_latents(store, utt, recon.max_frames).numpy()
        rebuilt = {key: quantised_trajectory(key[0], x, book, min_norm) for key, book in codebooks.items()}
        waves = decode_latents(rep, torch.from_numpy(np.stack([x, *rebuilt.values()])).to(rep.device))
        out_dir = run_dir / AUDIO_DIR / safe_name(utt.utt_id)
        rate, out_rate = int(rep.sample_rate), int(cfg.output_sample_rate)
        write_listening_wav(out_dir, "gt", waves[0], rate, out_rate, run_dir)
        record: dict[str, Any] = {"utterance": utt.utt_id, "n_frames": int(x.shape[0]), "codebooks": {}}
        for (key, traj), wave in zip(rebuilt.items(), waves[1:], strict=True):
            drift = divergence(traj, x)
            distances = json_distances(
                objective_distances(waves[0], wave, rate, with_stoi=False, with_pesq=False)
            )
            scores = {
                "log_mel": distances["log_mel"],
                "mrstft": distances["mrstft"],
                "drift_mean": float(drift.mean()),
                "drift_final": float(drift[-1]),
                "drift_slope": divergence_slope(drift),
            }
            rows[key].append(scores)
            write_listening_wav(out_dir, f"{key[0]}_K{key[1]}", wave, rate, out_rate, run_dir)
            record["codebooks"][f"{key[0]}_K{key[1]}"] = scores
        records.append(record)
        log.info(
            "open loop: %s (%d frames) rebuilt through %d codebooks", utt.utt_id, x.shape[0], len(rebuilt)
        )
    means = {key: _mean_scores(values) for key, values in rows.items()}
    return means, records


def _mean_scores(rows: list[dict[str, float | None]]) -> dict[str, float | None]:
    out = mean_distances({k: v for k, v in row.items() if k in ("log_mel", "mrstft")} for row in rows)
    for key in ("drift_mean", "drift_final", "drift_slope"):
        out[key] = float(np.mean([row[key] for row in rows])) if rows else None
    return {k: out.get(k) for k in ("log_mel", "mrstft", "drift_mean", "drift_final", "drift_slope")}


def go_decision(rows: list[dict[str, Any]], max_angle: float, max_k: int) -> dict[str, Any]:
    """The reference's go criterion: some direction codebook with K ≤ ``max_k`` has a mean angular error below
    ``max_angle`` degrees on the eval speakers. Returns ``go``, the smallest such K and the best angle."""
    candidates = [r for r in rows if r["kind"] == "direction" and r["K"] <= max_k]
    passing = sorted(r["K"] for r in candidates if r["angle_mean_deg"] < max_angle)
    best = min((r["angle_mean_deg"] for r in candidates), default=math.nan)
    return {
        "go": bool(passing),
        "smallest_passing_K": passing[0] if passing else None,
        "best_angle_mean_deg": best,
        "criterion": f"mean angular error < {max_angle:g} deg at some K <= {max_k}",
    }


def run(cfg: DictConfig) -> dict[str, float]:
    run_dir = Path(cfg.run_dir)
    store = resolve_store(cfg, str(cfg.store))
    log.info("latent store: %s (D=%d, %s)", store.root, store.dim, store.meta.get("representation"))
    sizes = [int(k) for k in cfg.kmeans.sizes]
    kinds = [str(k) for k in cfg.kmeans.kinds]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not sizes or min(sizes) < 1:
        raise ValueError(
            f"kmeans.kinds must be among {KINDS} and kmeans.sizes positive, got {kinds}, {sizes}"
        )

    train_norms = split_delta_norms(store, TRAIN)
    median = float(np.median(train_norms))
    min_norm = float(cfg.kmeans.near_zero_factor) * median
    max_points = None if cfg.kmeans.max_points is None else int(cfg.kmeans.max_points)
    train = sample_split(store, TRAIN, min_norm, max_points, int(cfg.seed), norms=train_norms)
    evaluation = sample_split(store, str(cfg.split), min_norm, max_points, int(cfg.seed) + 1)
    train_data = {"units": unit_rows(train.moving), "moving": train.moving, "states": train.states}
    eval_data = {"moving": evaluation.moving, "states": evaluation.states}
    log.info(
        "train: %d deltas (%d moving, median norm %.4g; %d sampled); eval (%s): %d moving deltas (%d sampled)",
        len(train_norms), train.n_moving, median, len(train.moving), cfg.split, evaluation.n_moving,
        len(evaluation.moving),
    )  # fmt: skip

    codebooks: dict[tuple[str, int], np.ndarray] = {}
    rows: list[dict[str, Any]] = []
    for k in sizes:
        for kind in kinds:
            if k > len(train_data["states" if kind == "state" else "moving"]):
                raise ValueError(f"K={k} exceeds the {kind} training points: use smaller codebook.sizes")
            book = fit_codebook(kind, k, train_data, cfg)
            write_npy_atomic(run_dir / FILES[kind].format(k=k), book)
            codebooks[(kind, k)] = book
            metrics = eval_metrics(kind, book, eval_data, float(cfg.kmeans.utilisation_min_share))
            rows.append({"kind": kind, "K": k, **metrics})
            log.info("K=%d %s: %s", k, kind, _brief(metrics))

    recon_means: dict[tuple[str, int], dict[str, float | None]] = {}
    records: list[dict[str, Any]] = []
    if int(cfg.recon.n_utterances) > 0:
        from latentdyn.representations.extract import resolve_device

        rep = representation_from_store(store, resolve_device(cfg.extract.device))
        recon_means, records = open_loop(cfg, store, rep, codebooks, min_norm)
    for row in rows:
        row.update({f"recon_{k}": v for k, v in recon_means.get((row["kind"], row["K"]), {}).items()})
    write_csv_rows(rows, run_dir / "summary.csv")

    near_zero = near_zero_fractions(
        evaluation.norms, median, [float(f) for f in cfg.kmeans.near_zero_factors]
    )
    decision = go_decision(rows, float(cfg.go.max_angle_deg), int(cfg.go.max_K))
    _plot(cfg, rows, store)
    key = {f"{r['kind']}_K{r['K']}/{m}": float(r[m]) for r in rows for m in _KEY if r.get(m) is not None}
    key.update({f"near_zero/{k.removeprefix('near_zero_')}": v for k, v in near_zero.items()})
    key["go"] = float(decision["go"])
    write_json(
        run_dir / METRICS_NAME,
        {
            "key_metrics": key,
            "latent_store": str(store.root),
            "representation": store.meta.get("representation"),
            "dim": store.dim,
            "magnitude": {
                "train_median": median,
                "near_zero_threshold": min_norm,
                "train_deltas": int(len(train_norms)),
                "train_moving": train.n_moving,
                "train_moving_sampled": int(len(train.moving)),
                "eval_moving": evaluation.n_moving,
                "eval_moving_sampled": int(len(evaluation.moving)),
            },
            "near_zero_fractions": near_zero,
            "codebooks": rows,
            "go": decision,
            "recon_utterances": records,
            "files": {f"{kind}_K{k}": FILES[kind].format(k=k) for kind, k in codebooks},
        },
    )
    verdict = "GO" if decision["go"] else "NO GO"
    log.info(
        "%s: %s (best direction angle %.1f deg)",
        verdict,
        decision["criterion"],
        decision["best_angle_mean_deg"],
    )
    return key


_KEY = ("angle_mean_deg", "utilisation", "perplexity", "quant_err_mean", "recon_log_mel", "recon_drift_slope")


def _brief(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in _KEY or k == "angle_median_deg")


def _plot(cfg: DictConfig, rows: list[dict[str, Any]], store: Any) -> None:
    series = {}
    for kind in ("direction", "raw_delta"):
        mine = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["K"])
        if mine:
            series[kind] = ([r["K"] for r in mine], [r["angle_mean_deg"] for r in mine])
    if not series:
        return
    fig = curves_figure(
        series,
        title=figure_title(cfg.name, cfg.run_id, extra=str(store.meta.get("representation", ""))),
        xlabel="codebook size K",
        ylabel="mean angular error on eval speakers (deg)",
        logx_base=2,
        reference=(float(cfg.go.max_angle_deg), f"go: < {float(cfg.go.max_angle_deg):g} deg"),
    )
    save_figure(fig, Path(cfg.run_dir) / PLOT_NAME)
