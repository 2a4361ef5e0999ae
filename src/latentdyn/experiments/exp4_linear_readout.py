"""Exp 4: a linear readout baseline. Do low-dimensional PCA projections of the latents roll out better?

The base latent store (``data`` x ``representation``) is projected onto its first ``k`` principal
components for each ``k`` in ``pca.dims``. The PCA is fitted once, streaming, on the train split in the
base store's train-standardised space (:mod:`latentdyn.representations.pca`) with ``max(dims)``
components; each projection keeps the first ``k``. Projected stores are artifacts derived from the base
store (kind ``pca``; the fit is kind ``pca_fit``), so no audio is re-encoded and a second run reuses them.

Each variant (``raw``, ``pca{k}``...) then gets Exp 1's Phase 1 (a dynamics model per horizon and the
battery) and Exp 2's injection diagnostic (on a one-frame model). As in Exp 3, every error is measured
in its own store's train-standardised space: for a projection that is the space of the components each
scaled to unit variance, so an MSE of 1 means "as far off as that variant's own spread". The scale-free
``k{k}_mse_vs_persistence`` (model MSE over the persistence baseline's) compares variants directly;
``explained_variance_fraction`` and ``recon_mse_test`` (per base dimension, base standardised units) say
what each projection throws away.

Outputs: ``summary.csv`` (one row per variant), ``tables.csv`` (all battery rows), ``injection_diag.json``
(variant -> injection diagnostic), ``explained_variance.csv`` / ``.png``, per-variant ``<variant>/``
(checkpoints, ``injection/`` curves) and ``metrics.json``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from latentdyn import artifacts
from latentdyn.data.latent_store import LatentStore
from latentdyn.experiments.common import plain, write_csv_rows
from latentdyn.experiments.exp1_vmf import KEY_METRICS, model_battery, train_horizon
from latentdyn.experiments.exp2_injection import KEY_SUMMARIES, injection_diagnostic
from latentdyn.experiments.phase0 import prepare_latent_store
from latentdyn.representations.pca import (
    SPACE,
    PCAFit,
    fit_incremental_pca,
    reconstruction_mse,
    write_projected_store,
)
from latentdyn.tracking.run import METRICS_NAME, record_weights, write_json

log = logging.getLogger(__name__)

# Bump when the content of a fit or a projected store changes, so stale caches are not reused.
PCA_FIT_VERSION = 1
PCA_STORE_VERSION = 1
RAW = "raw"
# Per-variant entries that go to the results table (metrics.json and summary.csv have them all).
KEY_COLUMNS = ("k1_nll_per_dim", "k1_mse_vs_persistence", "D_rollout_auc_mse", "D_rollout_divergence_step")


def store_identity(store: LatentStore) -> dict[str, Any]:
    """What determines a store's content: its artifact record (kind, key, spec) when it is a cached
    artifact, else a hash of its meta, stats and index files (a store written outside the cache)."""
    record = Path(store.root) / artifacts.SPEC_NAME
    if record.is_file():
        info = json.loads(record.read_text())
        return {"kind": info["kind"], "key": info["key"], "spec": info["spec"]}
    digest = hashlib.sha256()
    for name in ("meta.json", "stats.json", "index.jsonl"):
        digest.update((Path(store.root) / name).read_bytes())
    return {"root": str(store.root), "content_sha256": digest.hexdigest()}


def pca_dims(cfg: DictConfig) -> list[int]:
    """``pca.dims`` as sorted distinct positive integers (ValueError otherwise)."""
    dims = [int(d) for d in cfg.pca.dims]
    if not dims or any(d < 1 for d in dims) or any(int(d) != d for d in cfg.pca.dims):
        raise ValueError(f"pca.dims must be a non-empty list of positive integers, got {list(cfg.pca.dims)}")
    return sorted(set(dims))


def fit_spec(cfg: DictConfig, base_store: LatentStore, n_components: int) -> dict[str, Any]:
    """Everything that determines a PCA fit: the base store, the number of components, the fit settings."""
    return {
        "version": PCA_FIT_VERSION,
        "base_store": store_identity(base_store),
        "n_components": int(n_components),
        "space": SPACE,
        "split": "train",
        "chunk_frames": int(cfg.pca.chunk_frames),
    }


def prepare_pca_fit(cfg: DictConfig, base_store: LatentStore, n_components: int) -> tuple[PCAFit, Path]:
    """The PCA fit with ``n_components`` on the base store's train split (artifact ``pca_fit``)."""

    def build(tmp: Path) -> None:
        fit = fit_incremental_pca(base_store, n_components, chunk_frames=int(cfg.pca.chunk_frames))
        fit.save(tmp)
        log.info(
            "PCA fit: %d components on %d train frames in %d chunks, %.4f of the variance",
            n_components,
            fit.n_samples,
            fit.n_chunks,
            fit.explained_fraction(n_components),
        )

    spec = fit_spec(cfg, base_store, n_components)
    path = artifacts.get_or_build(Path(cfg.paths.cache_dir), "pca_fit", spec, build, force=cfg.force)
    return PCAFit.load(path), path


def prepare_projected_store(cfg: DictConfig, base_store: LatentStore, dim: int) -> LatentStore:
    """The base store projected onto its first ``dim`` principal components (artifact ``pca``).

    The fit has ``max(pca.dims + [dim])`` components and is shared by every projection of the run.
    """
    n_components = max([*pca_dims(cfg), int(dim)])
    spec = {
        "version": PCA_STORE_VERSION,
        "fit": fit_spec(cfg, base_store, n_components),
        "dim": int(dim),
    }

    def build(tmp: Path) -> None:
        fit, _ = prepare_pca_fit(cfg, base_store, n_components)
        write_projected_store(fit, base_store, int(dim), tmp)

    path = artifacts.get_or_build(Path(cfg.paths.cache_dir), "pca", spec, build, force=cfg.force)
    store = LatentStore(path)
    record_weights(store.meta["representation"], store.meta["weights"])
    return store


def write_explained_variance(fit: PCAFit, dims: list[int], run_dir: Path) -> list[Path]:
    """``explained_variance.csv`` (per component: variance, ratio, cumulative ratio) and a PNG of the curve
    with the chosen ``dims`` marked."""
    from matplotlib.figure import Figure

    csv_path = run_dir / "explained_variance.csv"
    cumulative = fit.explained_variance_ratio.cumsum()
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["component", "explained_variance", "explained_variance_ratio", "cumulative_ratio"])
        for i, (var, ratio, cum) in enumerate(
            zip(fit.explained_variance, fit.explained_variance_ratio, cumulative, strict=True), start=1
        ):
            writer.writerow([i, float(var), float(ratio), float(cum)])
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    components = range(1, fit.n_components + 1)
    ax.bar(components, fit.explained_variance_ratio, color="0.7", label="per component")
    ax.plot(components, cumulative, marker=".", label="cumulative")
    for k in dims:
        ax.axvline(k, color="C3", linestyle=":", linewidth=1)
        ax.annotate(f"{cumulative[k - 1]:.3f}", (k, cumulative[k - 1]), fontsize="small")
    ax.set_xlabel(f"principal component (of {fit.input_dim} dims)")
    ax.set_ylabel("fraction of train variance (standardised)")
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    png_path = run_dir / "explained_variance.png"
    fig.savefig(png_path, dpi=120, bbox_inches="tight")
    return [csv_path, png_path]


def variant_config(cfg: DictConfig, name: str, store: LatentStore) -> DictConfig:
    """``cfg`` with outputs under ``<run_dir>/<name>`` and the variant's store recorded (it goes into the
    checkpoints' embedded config)."""
    var_cfg = cfg.copy()
    with open_dict(var_cfg):
        var_cfg.run_dir = str(Path(cfg.run_dir) / name)
        var_cfg.variant = {"name": name, "latent_store": str(store.root), "dim": store.dim}
    return var_cfg


def evaluate_variant(
    cfg: DictConfig, name: str, store: LatentStore, logger: Any
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Phase 1 (per horizon) and the injection diagnostic of one variant.

    Returns its summary row, its battery rows and its injection diagnostic (``to_dict`` plus dim and rate).
    """
    var_cfg = variant_config(cfg, name, store)
    row: dict[str, Any] = {"variant": name, "representation": store.meta["representation"], "dim": store.dim}
    battery_rows: list[dict[str, Any]] = []
    models: dict[int, Any] = {}
    for k in (int(h) for h in cfg.horizons):
        model, _, _ = train_horizon(var_cfg, store, k, logger)
        models[k] = model
        rows = model_battery(var_cfg, model, store)
        battery_rows += [{"variant": name, **r} for r in rows]
        by_predictor = {r["predictor"]: r for r in rows if r["slice"] == cfg.datamodule.slice}
        row.update({f"k{k}_{m}": float(by_predictor["model"][m]) for m in KEY_METRICS})
        if "persistence" in by_predictor:
            row[f"k{k}_mse_vs_persistence"] = (
                by_predictor["model"]["mse"] / by_predictor["persistence"]["mse"]
            )
    one_frame = models[1] if 1 in models else train_horizon(var_cfg, store, 1, logger)[0]
    result = injection_diagnostic(one_frame.net, store, var_cfg.diagnostic)
    result.write(Path(var_cfg.run_dir) / "injection", frame_rate=store.frame_rate)
    for mode, summary in result.summaries.items():
        row.update({f"{mode}_{s}": float(summary[s]) for s in KEY_SUMMARIES})
    diag = {**result.to_dict(), "dim": store.dim, "frame_rate": store.frame_rate}
    return row, battery_rows, diag


def run(cfg: DictConfig) -> dict[str, float]:
    """Fit the PCA, derive the projected stores, run Phase 1 and the injection diagnostic on each variant."""
    from latentdyn.models.training import job_logger

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    base = prepare_latent_store(cfg)
    dims = pca_dims(cfg)
    if dims[-1] > base.dim:
        raise ValueError(f"pca.dims {dims} exceed the dimension {base.dim} of {base.meta['representation']}")
    fit, fit_path = prepare_pca_fit(cfg, base, dims[-1])
    write_explained_variance(fit, dims, run_dir)
    variants: list[tuple[str, LatentStore, float, float]] = [(RAW, base, 1.0, 0.0)]
    for k in dims:
        store = prepare_projected_store(cfg, base, k)
        variants.append((f"pca{k}", store, fit.explained_fraction(k), reconstruction_mse(store, "test")))
    summary: list[dict[str, Any]] = []
    battery: list[dict[str, Any]] = []
    diagnostics: dict[str, Any] = {}
    with job_logger(cfg) as logger:
        for name, store, fraction, recon in variants:
            log.info("variant %s: %s (%d dims)", name, store.root, store.dim)
            row, rows, diagnostics[name] = evaluate_variant(cfg, name, store, logger)
            summary.append({**row, "explained_variance_fraction": fraction, "recon_mse_test": recon})
            battery += rows
    write_csv_rows(summary, run_dir / "summary.csv")
    write_csv_rows(battery, run_dir / "tables.csv")
    (run_dir / "injection_diag.json").write_text(json.dumps(diagnostics, indent=2) + "\n")
    key = {
        f"{row['variant']}/{column}": float(row[column])
        for row in summary
        for column in (*KEY_COLUMNS, "explained_variance_fraction")
        if column in row and math.isfinite(float(row[column]))
    }
    details = {
        "latent_store": str(base.root),
        "pca_fit": str(fit_path),
        "projected_stores": {name: str(store.root) for name, store, _, _ in variants[1:]},
        "summary": summary,
        "config": plain(cfg.pca),
    }
    write_json(run_dir / METRICS_NAME, {"key_metrics": key, **details})
    log.info("summary: %s", run_dir / "summary.csv")
    return key
