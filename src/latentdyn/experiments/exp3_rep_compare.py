"""Exp 3: do some representations roll out better than others? Mimi vs EnCodec (and log-mel).

For each representation: its Phase 0 latent store (cached), a Phase 1 model (the reference's MDN) per
horizon k with the battery, and the injection diagnostic of its k = 1 model. As in the reference, horizons
and the context are in frames (``horizons: [1, 2, 4, 8]``, W = 8 for both codecs, so a Mimi frame spans 80 ms
and an EnCodec frame 13 ms); ``horizons_in=seconds`` instead converts ``horizon_seconds`` and
``context_seconds`` to frames at each frame rate, so both codecs see the same wall-clock spans. ΔNLL against
each representation's own baseline makes the NLLs comparable across dimensions and scales.

Seeds (``seeds``, see :mod:`latentdyn.pipeline.seeds`): each representation's models are trained and diagnosed
once per seed from its one latent store. With several seeds its outputs go to ``seed<s>/<representation>/``,
``summary.csv`` holds one row per representation x horizon x slice x predictor (and injection mode) with each
metric's mean, ``<col>_ci_low`` / ``<col>_ci_high`` (95 % bootstrap CI across seeds) and ``n_seeds``,
``summary_per_seed.csv`` the per-seed rows (``seed``), ``injection_diag.json`` maps representation ->
``seed<s>`` -> diagnostic, and ``dnll_vs_horizon.png`` and ``injection_ci/<representation>/`` plot the means with
their CI bands.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from latentdyn.config import conf_dir
from latentdyn.diagnostics.plots import figure_title
from latentdyn.pipeline.composite import command_line_overrides, group_config, unused_group_overrides
from latentdyn.pipeline.injection import injection_diagnostic
from latentdyn.pipeline.seeds import (
    add_key_metric,
    ci_series,
    n_seeds_metric,
    plot_ci_curves,
    run_seeds,
    seed_config,
    seed_label,
    several,
    write_injection_bands,
    write_summaries,
)
from latentdyn.pipeline.store import prepare_latent_store
from latentdyn.pipeline.train import model_battery, train_horizon
from latentdyn.tracking.run import METRICS_NAME, write_json

log = logging.getLogger(__name__)

# Per-mode injection summaries in summary.csv.
INJECTION_COLUMNS = ("nll", "nll_baseline", "dnll", "cos", "mag_ratio", "state_err", "state_err_at_K")
# The columns that name a summary row (the rest are metrics, averaged over seeds).
SUMMARY_KEYS = (
    "representation",
    "frame_rate",
    "dim",
    "context_frames",
    "horizon_frames",
    "horizon_s",
    "split",
    "slice",
    "predictor",
    "horizon",
    "context",
    "context_stride",
    "horizon_mode",
    "mode",
    "k_steps",
)


def seconds_to_frames(seconds: float, frame_rate: float, what: str = "horizon") -> int:
    """Whole frames covering ``seconds`` at ``frame_rate``; at least 1. Logs when rounding changes the span."""
    if seconds <= 0:
        raise ValueError(f"{what} must be positive seconds, got {seconds}")
    frames = max(1, round(seconds * frame_rate))
    if not math.isclose(frames / frame_rate, seconds, rel_tol=1e-6):
        log.warning(
            "%s %.4g s is %.3g frames at %g Hz; using %d (%.4g s)",
            what,
            seconds,
            seconds * frame_rate,
            frame_rate,
            frames,
            frames / frame_rate,
        )
    return frames


def check_representations(names: Sequence[str]) -> None:
    """Each of ``names`` is a file of the ``representation`` config group, or ValueError listing them."""
    available = sorted(p.stem for p in (conf_dir() / "representation").glob("*.yaml"))
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(
            f"unknown representation {unknown[0]!r} in exp3 representations; available: {available}"
        )


def representation_config(cfg: DictConfig, name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``cfg`` with ``representation`` replaced by the config group's ``<name>`` node, with the command line's
    ``representation.*`` ``overrides`` applied where that node has the key (interpolations resolve against
    ``cfg``, so ``pretrained: ${pretrained}`` follows the run), and outputs under ``<run_dir>/<name>``."""
    check_representations([name])
    rep_cfg = cfg.copy()
    with open_dict(rep_cfg):
        rep_cfg.representation = group_config("representation", name, overrides)
        rep_cfg.run_dir = str(Path(cfg.run_dir) / name)
    return rep_cfg


HORIZON_UNITS = ("frames", "seconds")


def horizons_and_context(cfg: DictConfig, frame_rate: float) -> tuple[list[int], int]:
    """The horizons k and the context W in frames at ``frame_rate`` (see the module docstring)."""
    if cfg.horizons_in == "frames":
        return [int(k) for k in cfg.horizons], int(cfg.model.context)
    if cfg.horizons_in == "seconds":
        horizons = [seconds_to_frames(float(s), frame_rate) for s in cfg.horizon_seconds]
        return list(dict.fromkeys(horizons)), seconds_to_frames(cfg.context_seconds, frame_rate, "context")
    raise ValueError(f"horizons_in must be one of {HORIZON_UNITS}, got {cfg.horizons_in!r}")


def compare_one(
    cfg: DictConfig, name: str, logger: Any, overrides: Sequence[str] = (), note: str = ""
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Phase 0, Phase 1 and the injection diagnostic of one representation; summary rows and its diagnostic
    (``note`` is added to plot titles, e.g. the seed)."""
    rep_cfg = representation_config(cfg, name, overrides)
    store = prepare_latent_store(rep_cfg)
    fr = float(store.frame_rate)
    horizons, context = horizons_and_context(cfg, fr)
    with open_dict(rep_cfg):
        rep_cfg.model.context = context
    identity = {"representation": name, "frame_rate": fr, "dim": store.dim, "context_frames": context}
    rows: list[dict[str, Any]] = []
    models: dict[int, Any] = {}
    for k in horizons:
        model, _, _ = train_horizon(rep_cfg, store, k, logger)
        models[k] = model
        for row in model_battery(rep_cfg, model, store):
            rows.append({**identity, "horizon_frames": k, "horizon_s": k / fr, **row})
    one_frame = models[1] if 1 in models else train_horizon(rep_cfg, store, 1, logger)[0]
    result = injection_diagnostic(one_frame.net, store, rep_cfg.diagnostic)
    title = figure_title(
        cfg.name, cfg.run_id, horizon=int(one_frame.horizon), extra=f"injection · {name}{note}"
    )
    result.write(Path(rep_cfg.run_dir) / "injection", frame_rate=fr, title=title)
    diag = result.to_dict()
    diag["frame_rate"] = fr
    for mode in result.modes:
        summary = result.mode_summary(mode)
        rows.append(
            {
                **identity,
                "predictor": "model",
                "slice": "injection",
                "mode": mode,
                "horizon_frames": 1,
                "k_steps": result.config.k_steps,
                **{key: summary[key] for key in INJECTION_COLUMNS},
            }
        )
    return rows, diag


def run(cfg: DictConfig) -> dict[str, float]:
    from latentdyn.models.training import job_logger

    run_dir = Path(cfg.run_dir)
    names = [str(name) for name in cfg.representations]
    check_representations(names)
    overrides = command_line_overrides()
    unused = unused_group_overrides("representation", names, overrides)
    if unused:
        raise ValueError(f"{', '.join(unused)}: no compared representation ({', '.join(names)}) has this key")
    seeds = run_seeds(cfg)
    per_seed: list[dict[str, Any]] = []
    diagnostics: dict[str, Any] = {}
    with job_logger(cfg) as logger:
        # Each representation's store is built once (a cached artifact); each seed trains its own models.
        for seed in seeds:
            s_cfg = seed_config(cfg, seed, run_dir / seed_label(seed, seeds))
            note = f" · seed {seed}" if several(seeds) else ""
            for name in names:
                rep_rows, diag = compare_one(s_cfg, name, logger, overrides, note)
                per_seed += [{"seed": seed, **row} for row in rep_rows]
                if several(seeds):
                    diagnostics.setdefault(name, {})[f"seed{seed}"] = diag
                else:
                    diagnostics[name] = diag
    rows = write_summaries(per_seed, SUMMARY_KEYS, run_dir)
    write_json(run_dir / "injection_diag.json", diagnostics)
    if several(seeds):
        write_seed_plots(cfg, rows, names, diagnostics, seeds)
    key: dict[str, float] = {}
    for row in rows:
        rep = row["representation"]
        if row["slice"] == "injection" and row["mode"] == "D_rollout":
            add_key_metric(key, f"{rep}/D_rollout/dnll", row, "dnll", seeds)
            add_key_metric(key, f"{rep}/D_rollout/state_err_at_K", row, "state_err_at_K", seeds)
        elif row.get("slice") == "all" and row["predictor"] == "model":
            add_key_metric(key, f"{rep}/k{row['horizon_frames']}/dnll", row, "dnll", seeds)
    n_seeds_metric(key, seeds)
    write_json(run_dir / METRICS_NAME, key)
    return key


def write_seed_plots(
    cfg: DictConfig,
    rows: list[dict[str, Any]],
    names: list[str],
    diagnostics: dict[str, Any],
    seeds: list[int],
) -> None:
    """With several seeds: ``dnll_vs_horizon.png`` (each representation's model ΔNLL on the ``all`` slice per
    horizon, mean and CI band across seeds) and ``injection_ci/<representation>/`` (the injection curves' mean
    and CI band across seeds)."""
    run_dir = Path(cfg.run_dir)
    in_seconds = cfg.horizons_in == "seconds"
    series = {}
    for name in names:
        model_rows = sorted(
            (
                r
                for r in rows
                if r["representation"] == name and r["slice"] == "all" and r["predictor"] == "model"
            ),
            key=lambda r: float(r["horizon_frames"]),
        )
        xs = [float(r["horizon_s"] if in_seconds else r["horizon_frames"]) for r in model_rows]
        series[name] = (xs, ci_series(model_rows, "dnll"))
    plot_ci_curves(
        series,
        run_dir / "dnll_vs_horizon.png",
        title=figure_title(cfg.name, cfg.run_id, extra="model ΔNLL, slice all"),
        xlabel="horizon (s)" if in_seconds else "horizon k (context lag, frames)",
        ylabel="ΔNLL vs baseline (nats/frame)",
        n_seeds=len(seeds),
        logx_base=None if in_seconds else 2,
    )
    for name in names:
        frame_rate = diagnostics[name][f"seed{seeds[0]}"].get("frame_rate")
        write_injection_bands(
            run_dir,
            name,
            {seed: run_dir / seed_label(seed, seeds, name) / "injection" for seed in seeds},
            title=figure_title(
                cfg.name, cfg.run_id, horizon=1, extra=f"injection · {name} · {len(seeds)} seeds"
            ),
            frame_rate=frame_rate,
        )
