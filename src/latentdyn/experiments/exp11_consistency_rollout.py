"""Exp 11: does a one-step Tweedie denoiser keep direction-AR and MDN rollouts on the data manifold?

Method (the reference study's Exp 11). The Exp 6 score model ``s(z, σ)`` of the latent frames (unconditional,
D = 32, H = 512, 4 layers, AdamW 1e-4, batch 512, 20k steps, raw latents; a cached artifact) serves as a
one-step denoiser: after each rollout step the new state becomes ``z + σ² s(z, σ)``, Tweedie's posterior mean
of a clean frame if ``z`` were a clean frame plus N(0, σ²) noise. Six conditions roll out from the same eval
segments as Exp 10 (20 utterances × 5 starts, k ≤ 16 steps): the Exp 10 direction AR with ``argmax`` (median
magnitude) and ``categorical`` sampling, and the Exp 5 MDN (mixture mean, the store's Phase 1 model at k = 1),
each as is and with the denoiser (``<condition>_tweedie``). A row whose state turns non-finite stops and counts
in the condition's NaN share.

One job runs one σ (``sigma``); ``latentdyn -m experiment=exp11_consistency_rollout`` sweeps σ ∈ {0.01, 0.05,
0.1, 0.25, 0.5, 1.0}, and the sweep's aggregate (:func:`summarise_sigma_sweep`) writes ``sigma_sweep.json``
(every condition, σ and k), ``best_sigmas.json`` (per Tweedie condition, the σ with the lowest final state
error at k = 4 among runs whose NaN share is below 50 %) and ``sigma_sweep.png``.

Seeds (``seeds``, see :mod:`latentdyn.pipeline.seeds`): the denoiser (its score model's training), the rollout
segments and the categorical draws follow ``seed``; the direction AR and the MDN are the given checkpoints. With
several seeds each seed's rollouts go to ``seed<s>/`` (``rollout_metrics.json``, ``per_step.csv``,
``state_err_vs_k.png``, ``rollout_audio/``); ``summary.csv`` holds one row per condition x k with each metric's
mean, ``<col>_ci_low`` / ``<col>_ci_high`` (95 % bootstrap CI across seeds) and ``n_seeds``,
``summary_per_seed.csv`` the per-seed rows, ``sigma_sweep.json`` / ``best_sigmas.json`` the means (what the σ
sweep's aggregate compares), and ``state_err_vs_k.png`` the means with their CI bands.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from latentdyn.diagnostics.plots import curves_figure, figure_title, save_figure
from latentdyn.jsonio import write_json_atomic
from latentdyn.pipeline.common import write_csv_rows
from latentdyn.pipeline.score import build_correction, prepare_score_model, score_training_record
from latentdyn.pipeline.seeds import (
    CONFIDENCE,
    N_RESAMPLES,
    add_key_metric,
    ci_series,
    n_seeds_metric,
    plot_ci_curves,
    run_seeds,
    seed_config,
    seed_label,
    several,
    write_summaries,
)
from latentdyn.pipeline.stage3 import (
    AUDIO_DIR,
    Condition,
    check_same_store,
    direction_ar_stepper,
    dynamics_stepper,
    evaluate_conditions,
    per_step_csv_rows,
    plot_state_err,
    rollout_audio,
    rollout_rows,
    rollout_segments,
    run_directory,
)
from latentdyn.statistics import N_SEEDS, aggregate_seeds
from latentdyn.tracking.lookup import resolve_checkpoint
from latentdyn.tracking.run import METRICS_NAME, write_json

log = logging.getLogger(__name__)

TWEEDIE_SUFFIX = "_tweedie"
SWEEP_NAME = "sigma_sweep.json"
BEST_NAME = "best_sigmas.json"
SWEEP_PLOT = "sigma_sweep.png"
PLOT_NAME = "state_err_vs_k.png"
# The columns that name a summary row (the rest are metrics, averaged over seeds).
SUMMARY_KEYS = ("condition", "sigma", "k")


@dataclass(frozen=True)
class RawFrames:
    """The space the denoiser works in: raw latent frames (what the rollouts' states are)."""

    context: int
    horizon: int = 1
    standardized: bool = False


def sweep_entries(results: Mapping[str, Mapping[str, Any]], sigma: float) -> list[dict[str, Any]]:
    """Flat entries ``{condition, sigma, k, ...summary}`` of one job's results (``sigma`` None for the
    uncorrected conditions: they do not depend on it)."""
    return [
        {
            "condition": row["condition"],
            "sigma": sigma if row["condition"].endswith(TWEEDIE_SUFFIX) else None,
            **row,
        }
        for row in rollout_rows(results, "condition")
    ]


def best_sigmas(entries: Sequence[Mapping[str, Any]], target_k: int, max_nan_share: float) -> dict[str, Any]:
    """Per Tweedie condition, the σ whose ``target_k``-step rollout has the lowest final state error among the
    runs whose NaN share is below ``max_nan_share`` (None, with the reason, when no run qualifies), next to the
    uncorrected condition's error at the same k."""
    out: dict[str, Any] = {}
    for condition in sorted({e["condition"] for e in entries if e["condition"].endswith(TWEEDIE_SUFFIX)}):
        runs = [e for e in entries if e["condition"] == condition and int(e["k"]) == int(target_k)]
        valid = [e for e in runs if e["nan_share"] < max_nan_share and _finite(e.get("final_state_err"))]
        plain = condition.removesuffix(TWEEDIE_SUFFIX)
        base = [e for e in entries if e["condition"] == plain and int(e["k"]) == int(target_k)]
        record: dict[str, Any] = {
            "k": int(target_k),
            "n_sigmas": len(runs),
            "n_valid": len(valid),
            "uncorrected_state_err": base[0]["final_state_err"] if base else None,
        }
        if not valid:
            record.update(
                best_sigma=None, reason=f"no σ has a NaN share below {max_nan_share:g} at k={target_k}"
            )
        else:
            best = min(valid, key=lambda e: float(e["final_state_err"]))
            record.update(
                best_sigma=float(best["sigma"]),
                state_err=float(best["final_state_err"]),
                cos=best.get("final_cos"),
                nan_share=float(best["nan_share"]),
            )
        out[condition] = record
    return out


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def load_score(cfg: DictConfig, store: Any, space: RawFrames, logger: Any) -> tuple[Any, Path]:
    """The denoiser: ``score_checkpoint`` (a ``.ckpt``, a directory holding ``score_final.ckpt``, or an Exp 6
    run recording its score model) when set, else the cached score model of ``store`` (trained first)."""
    from latentdyn.models.score import load_score_model
    from latentdyn.pipeline.score import FINAL_NAME

    if cfg.score_checkpoint in (None, ""):
        return prepare_score_model(cfg, store, space, logger)
    path = run_directory(str(cfg.score_checkpoint), Path(cfg.paths.manifest), "score_checkpoint")
    if path.is_dir() and not (path / FINAL_NAME).is_file() and (path / METRICS_NAME).is_file():
        recorded = (json.loads((path / METRICS_NAME).read_text()).get("score_model") or {}).get("artifact")
        path = Path(recorded) if recorded else path
    ckpt = path / FINAL_NAME if path.is_dir() else path
    model = load_score_model(ckpt)
    if model.conditional or model.standardized or model.net.dim != store.dim:
        raise ValueError(
            f"score_checkpoint {ckpt}: Exp 11 needs an unconditional score model of raw {store.dim}-d frames, got "
            f"conditional={model.conditional}, standardized={model.standardized}, D={model.net.dim}"
        )
    return model, ckpt.parent


def build_conditions(
    cfg: DictConfig, models: Mapping[str, Any], store: Any, correction: Any
) -> list[Condition]:
    """Each configured condition as is and, with the denoiser, as ``<name>_tweedie``."""
    conditions = []
    for name, spec in cfg.conditions.items():
        if spec.model == "direction_ar":
            step = direction_ar_stepper(models["direction_ar"], str(spec.strategy), float(cfg.rollout.top_p))
        elif spec.model == "mdn":
            if "mdn" not in models:
                continue  # skip_mdn
            step = dynamics_stepper(models["mdn"], store, str(spec.predict))
        else:
            raise ValueError(f"conditions.{name}.model must be direction_ar or mdn, got {spec.model!r}")
        conditions.append(Condition(str(name), step, None, int(cfg.seed)))
        conditions.append(Condition(f"{name}{TWEEDIE_SUFFIX}", step, correction, int(cfg.seed)))
    return conditions


def run(cfg: DictConfig) -> dict[str, float]:
    from latentdyn.data.latent_store import LatentStore
    from latentdyn.models.direction_ar import load_direction_ar
    from latentdyn.models.dynamics import load_dynamics
    from latentdyn.pipeline.injection import store_root_of_checkpoint

    run_dir = Path(cfg.run_dir)
    manifest = Path(cfg.paths.manifest)
    seeds = run_seeds(cfg)
    k_values = [int(k) for k in cfg.rollout.k_values]
    if int(cfg.best_sigma.target_k) not in k_values:
        raise ValueError(
            f"best_sigma.target_k={cfg.best_sigma.target_k} must be one of rollout.k_values {k_values}"
        )
    dar_ckpt = resolve_checkpoint(
        str(cfg.direction_ar), manifest, "exp10_direction_ar", ["direction_ar_final.ckpt"], "direction_ar"
    )
    dar = load_direction_ar(dar_ckpt)
    if not dar.hparams.get("latent_store"):
        raise ValueError(
            f"{dar_ckpt} records no latent store: re-run `latentdyn experiment=exp10_direction_ar`"
        )
    store = LatentStore(Path(dar.hparams.latent_store))
    models: dict[str, Any] = {"direction_ar": dar.net}
    checkpoints = {"direction_ar": str(dar_ckpt)}
    if not cfg.skip_mdn:
        mdn_ckpt = resolve_checkpoint(str(cfg.mdn), manifest, "exp5_betavae", ["*_k1_final.ckpt"], "mdn")
        mdn = load_dynamics(mdn_ckpt)
        if int(mdn.horizon) != 1 or mdn.horizon_mode != "lag":
            raise ValueError(f"mdn={mdn_ckpt}: a frame-by-frame rollout needs a k = 1 lag model")
        check_same_store(
            # Compared by location: a mismatched MDN's store is not built just to be refused.
            [("direction AR", store.root), ("MDN", store_root_of_checkpoint(cfg, mdn.run_config))],
            ". Pass the MDN of the direction AR's store (mdn=latest:exp5_betavae/<its variant>, or a k = 1 "
            "checkpoint trained on it) or skip_mdn=true",
        )
        models["mdn"], checkpoints["mdn"] = mdn.net, str(mdn_ckpt)

    # The rollout window holds the longest context any model reads; each reads its own last frames.
    window = max(int(net.context) for net in models.values())
    sigma = float(cfg.correction.sigma)
    per_seed: list[dict[str, Any]] = []
    outputs: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        s_cfg = seed_config(cfg, seed, run_dir / seed_label(seed, seeds))
        outputs[seed] = rollout_seed(s_cfg, models, store, window, k_values, dar.net.codebook.numpy(), seeds)
        per_seed += [{"seed": seed, **row} for row in outputs[seed]["rows"]]
    summary = write_summaries(per_seed, SUMMARY_KEYS, run_dir)
    first = outputs[seeds[0]]
    if several(seeds):
        # The σ sweep's aggregate compares the means over seeds.
        entries = [row for row in summary if not str(row["condition"]).startswith("audio_")]
        plot_ci_state_err(cfg, entries, list(first["results"]), seeds, sigma)
    else:
        entries = first["entries"]
    best = best_sigmas(entries, int(cfg.best_sigma.target_k), float(cfg.best_sigma.max_nan_share))
    write_json(run_dir / SWEEP_NAME, entries)
    write_json(run_dir / BEST_NAME, best)

    by_key = {(row["condition"], int(row["k"])): row for row in entries}
    key: dict[str, float] = {}
    for name in first["results"]:
        for k in (int(cfg.best_sigma.target_k), max(k_values)):
            row = by_key[(name, k)]
            add_key_metric(key, f"{name}/state_err_k{k}", row, "final_state_err", seeds)
            add_key_metric(key, f"{name}/nan_share_k{k}", row, "nan_share", seeds, ci=False)
    n_seeds_metric(key, seeds)
    if several(seeds):
        score_model = {f"seed{s}": outputs[s]["score_model"] for s in seeds}
        audio = {f"seed{s}": outputs[s]["audio"] for s in seeds}
    else:
        score_model, audio = first["score_model"], first["audio"]
    write_json(
        run_dir / METRICS_NAME,
        {
            "key_metrics": key,
            "sigma": sigma,
            "seeds": seeds,
            "checkpoints": checkpoints,
            "latent_store": str(store.root),
            "score_model": score_model,
            "best_sigmas": best,
            "audio": audio,
        },
    )
    return key


def rollout_seed(
    cfg: DictConfig,
    models: Mapping[str, Any],
    store: Any,
    window: int,
    k_values: list[int],
    codebook: Any,
    seeds: Sequence[int],
) -> dict[str, Any]:
    """One seed's rollouts (``cfg.seed``) into ``cfg.run_dir``: the denoiser, the conditions, the segments;
    ``rollout_metrics.json``, ``per_step.csv``, ``state_err_vs_k.png`` and ``rollout_audio/``. Returns its
    ``results``, sweep ``entries``, summary ``rows`` (entries, then audio rows), ``score_model`` and ``audio``
    records."""
    from latentdyn.models.training import job_logger

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with job_logger(cfg) as logger:
        score, score_dir = load_score(cfg, store, RawFrames(window), logger)
    correction = build_correction(cfg, score)
    sigma = float(cfg.correction.sigma)
    conditions = build_conditions(cfg, models, store, correction)
    segments = rollout_segments(cfg, store, window)
    log.info(
        "seed %d: %d conditions x %d segments x %d steps, σ=%g",
        int(cfg.seed),
        len(conditions),
        len(segments.starts),
        max(k_values),
        sigma,
    )
    results = evaluate_conditions(conditions, segments, k_values, codebook)

    entries = sweep_entries(results, sigma)
    write_json(
        run_dir / "rollout_metrics.json",
        {"sigma": sigma, "seed": int(cfg.seed), "n_segments": len(segments.starts), "conditions": results},
    )
    write_csv_rows(per_step_csv_rows(results, "condition"), run_dir / "per_step.csv")
    rows = list(entries)  # summary rows: one per condition and k (then the audio rows)
    extra = f"Tweedie σ={sigma:g}" + (f" · seed {int(cfg.seed)}" if several(seeds) else "")
    plot_state_err(cfg, results, run_dir / PLOT_NAME, extra=extra, suffix=TWEEDIE_SUFFIX)

    audio_means: dict[str, Any] = {}
    if not cfg.skip_audio and int(cfg.n_utterances) > 0:
        entries_audio, audio_means = rollout_audio(cfg, store, conditions, window)
        write_json(run_dir / AUDIO_DIR / "manifest.json", {"files": entries_audio})
        rows += [
            {"condition": f"audio_{name}", "sigma": sigma if f"{TWEEDIE_SUFFIX}_k" in name else None, **d}
            for name, d in audio_means.items()
        ]
    return {
        "results": results,
        "entries": entries,
        "rows": rows,
        "score_model": {"artifact": str(score_dir), "training": score_training_record(score_dir)},
        "audio": audio_means,
    }


def plot_ci_state_err(
    cfg: DictConfig, entries: list[dict[str, Any]], conditions: list[str], seeds: Sequence[int], sigma: float
) -> None:
    """``state_err_vs_k.png`` of the run: each condition's final state error vs k, the mean over seeds with its
    CI band (conditions named ``<base>_tweedie`` share their base's colour, dashed)."""
    series = {}
    for name in conditions:
        rows = sorted((e for e in entries if e["condition"] == name), key=lambda e: int(e["k"]))
        series[name] = ([int(e["k"]) for e in rows], ci_series(rows, "final_state_err"))
    plot_ci_curves(
        series,
        Path(cfg.run_dir) / PLOT_NAME,
        title=figure_title(cfg.name, cfg.run_id, extra=f"Tweedie σ={sigma:g} · {len(seeds)} seeds"),
        xlabel="rollout steps k",
        ylabel="state error after k steps ‖x̂ − x‖ (raw latent units)",
        n_seeds=len(seeds),
        logx_base=2,
        logy=True,
        groups={name: name.removesuffix(TWEEDIE_SUFFIX) for name in series},
        dashed=[name for name in series if name.endswith(TWEEDIE_SUFFIX)],
    )


def _job_seeds(job: Any) -> list[Any]:
    """The seeds a sweep job ran: its ``metrics.json``'s ``seeds`` (what ran: ``seeds`` overrides ``seed``),
    else its swept ``seed``."""
    metrics = Path(job.run_dir or "") / METRICS_NAME
    if metrics.is_file():
        seeds = json.loads(metrics.read_text()).get("seeds")
        if isinstance(seeds, list) and seeds:
            return seeds
    return [job.settings.get("seed")]


def sigma_sweep_entries(jobs: Sequence[Any]) -> list[dict[str, Any]]:
    """The σ sweep's merged entries from its completed jobs' ``sigma_sweep.json``.

    Without a seed axis (every job has the same swept ``seed``): each job's entries, the uncorrected conditions
    (``sigma`` null) once. With one (the jobs' ``seed`` differ): each job must have run that one seed
    (``seeds=null``, or a one-element ``seeds`` equal to it); the entries are then the means over the seeds per
    condition, σ and k with ``<col>_ci_low`` / ``<col>_ci_high`` (95 % bootstrap CI) and ``n_seeds`` (the seeds
    that completed), as a job running several ``seeds`` writes them, and the uncorrected conditions are averaged
    over one job per seed. A job that ran several seeds itself (its entries are means already), or two jobs of
    one σ that ran the same seed (``seeds`` overrode the swept ``seed``), is a ValueError saying so: such a
    sweep cannot be told apart into seeds.
    """
    loaded: list[tuple[Any, list[dict[str, Any]]]] = []
    for job in jobs:
        path = Path(job.run_dir or "") / SWEEP_NAME
        if job.status == "completed" and path.is_file():
            loaded.append((job, json.loads(path.read_text())))
    swept_seeds = {repr(job.settings.get("seed")) for job, _ in loaded}
    if len(swept_seeds) <= 1:
        entries: list[dict[str, Any]] = []
        seen_plain = False
        for _, job_entries in loaded:
            entries += [e for e in job_entries if e["sigma"] is not None or not seen_plain]
            seen_plain = True
        return entries

    rows: list[dict[str, Any]] = []
    plain_seeds: set[Any] = set()
    ran: dict[tuple[Any, Any], int] = {}
    for job, job_entries in loaded:
        seeds = _job_seeds(job)
        if len(seeds) > 1 or any(N_SEEDS in e for e in job_entries):
            raise ValueError(
                f"the σ sweep varies seed, but job {job.job} ran seeds={seeds} itself (`seeds` overrides `seed`): "
                "its entries are means already. Sweep `seed=0,1,2 seeds=null`, or leave `seed` out of the sweep"
            )
        (seed,) = seeds
        sigma = job.settings.get("sigma")
        if (sigma, seed) in ran:
            raise ValueError(
                f"the σ sweep varies seed, but jobs {ran[(sigma, seed)]} and {job.job} (sigma={sigma}) both ran "
                f"seed {seed}: a one-element `seeds` overrides the swept `seed`. Sweep `seed=0,1,2 seeds=null`"
            )
        ran[(sigma, seed)] = job.job
        for entry in job_entries:
            if entry["sigma"] is None:
                if seed in plain_seeds:
                    continue  # the uncorrected conditions: the same for every σ of a seed
            rows.append({**entry, "seed": seed})
        plain_seeds.add(seed)
    return aggregate_seeds(rows, SUMMARY_KEYS, confidence=CONFIDENCE, n_resamples=N_RESAMPLES)


def summarise_sigma_sweep(sweep_dir: Path, jobs: Sequence[Any], spec: Mapping[str, Any]) -> list[Path]:
    """The σ sweep's aggregate (called when the multirun ends, and by ``latentdyn-results --sweep``): every
    completed job's entries in ``sigma_sweep.json`` (the uncorrected conditions once: they are the same in every
    job), ``best_sigmas.json`` and ``sigma_sweep.png`` (state error at ``target_k`` vs σ per condition).

    A sweep that also varies ``seed`` (``sigma=... seed=0,1,2 seeds=null``) compares the means over seeds: see
    :func:`sigma_sweep_entries`."""
    target_k = int(spec.get("target_k", 4))
    max_nan_share = float(spec.get("max_nan_share", 0.5))
    entries = sigma_sweep_entries(jobs)
    if not entries:
        return []
    best = best_sigmas(entries, target_k, max_nan_share)
    written = [Path(sweep_dir) / SWEEP_NAME, Path(sweep_dir) / BEST_NAME]
    write_json_atomic(written[0], entries)
    write_json_atomic(written[1], best)
    series: dict[str, Any] = {}
    groups: dict[str, str] = {}
    sigmas = sorted({float(e["sigma"]) for e in entries if e["sigma"] is not None})
    for condition in sorted({e["condition"] for e in entries}):
        at_k = {
            e["sigma"]: e["final_state_err"]
            for e in entries
            if e["condition"] == condition and int(e["k"]) == target_k
        }
        if condition.endswith(TWEEDIE_SUFFIX):
            series[condition] = (sorted(at_k), [at_k[s] for s in sorted(at_k)])
            groups[condition] = condition.removesuffix(TWEEDIE_SUFFIX)
        elif None in at_k and sigmas:
            series[f"{condition} (no denoiser)"] = (sigmas, [at_k[None]] * len(sigmas))
            groups[f"{condition} (no denoiser)"] = condition
    if series:
        extra = f"k={target_k}" + (" · means over seeds" if any(N_SEEDS in e for e in entries) else "")
        fig = curves_figure(
            series,
            title=figure_title("exp11_consistency_rollout", Path(sweep_dir).name, extra=extra),
            xlabel="Tweedie σ",
            ylabel=f"state error after {target_k} steps (raw latent units)",
            logx_base=10,
            logy=True,
            groups=groups,
            dashed=[name for name in series if name.endswith("(no denoiser)")],
        )
        written.append(save_figure(fig, Path(sweep_dir) / SWEEP_PLOT))
    return written
