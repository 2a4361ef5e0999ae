"""Exp 4: a linear readout baseline. Does a low-dimensional PCA of the latents keep the predictable structure?

Method (the reference study's Exp 4). The base latent store (``data`` x ``representation``) is projected onto
its first ``d`` principal components for each ``d`` in ``pca.dims`` (the reference: 32 and 64 of Mimi's 512).
The PCA is :class:`sklearn.decomposition.IncrementalPCA` streamed over the train split's frames, in
``pca.space``: ``raw`` (the default, the reference) fits the raw latents, centred by the PCA mean and not
whitened, so a projection is ``y = C_d (z - mu)`` with orthonormal rows ``C_d``; ``train_standardized`` fits
the store's train-standardised latents instead (see :mod:`latentdyn.representations.pca`). One fit with
``max(dims)`` components serves every ``d`` (its first ``d`` components; the reference fits each ``d``
separately, which IncrementalPCA makes equal up to its streaming error). The fit (artifact ``pca_fit``) and
each projected store (artifact ``pca``, float16 like every store) are cached and keyed on the base store,
the dims and the space, so no audio is re-encoded, a second run reuses them, and the two spaces never mix.

Each variant (``raw``: the base store itself, and ``pca{d}``) then gets Phase 1: the reference's MDN
(``model=gaussian_mdn``, 8 components, 2 x [Linear 512, GELU], 15k steps) per horizon ``k`` in ``horizons``
(1, 2, 4, 8: the context lag, the target is always the one-frame delta) and the battery on each; and the
injection diagnostic (the reference's 4 modes, K = 16 steps) on its ``k = 1`` model. NLL and ΔNLL are in
nats per frame of each variant's own space (ΔNLL against that variant's unconditional baseline, so it is the
comparable one); ``k{k}_mse_vs_persistence`` (model MSE over the persistence baseline's) is scale-free.

The injection's ``state_err`` (``‖x̂[t-1] - x[t-1]‖``) is in each variant's space; ``state_err_raw`` puts
every variant on the raw latent scale: the raw variant's error in raw units, and a ``raw``-space projection's
own error, because decoding ``y -> C_d^T y + mu`` is an isometry on the components' span (the PCA mean
cancels in a difference, and the stored float16 projections decode through the same linear map). It is the
distance between the decoded rollout and the decoded, projected ground truth; the frame's reconstruction
residual (orthogonal to the span, ``recon_mse_test`` per dimension on average) is left out. A
``train_standardized`` projection decodes with a per-dimension rescaling, which is not an isometry, so its
``state_err_raw`` columns are NaN.

Outputs: ``summary.csv`` (one row per variant: dim, ``explained_variance_fraction``, ``recon_mse_test``,
per horizon ``k{k}_{nll,dnll,cos,logmag_r2,mag_ratio,mse}`` of the model on the training slice and
``k{k}_mse_vs_persistence``, per injection mode ``{mode}_{dnll,cos,mag_ratio,state_err,state_err_at_K,
state_err_raw,state_err_raw_at_K}``), ``tables.csv`` (all battery rows), ``injection_diag.json`` (variant ->
injection diagnostic), ``explained_variance.csv`` / ``.png``, per-variant ``<variant>/`` (checkpoints,
``injection/`` curves) and ``metrics.json``.

Seeds (``seeds``, see :mod:`latentdyn.pipeline.seeds`): every variant is trained and diagnosed once per seed,
from the same stores and PCA fit. With several seeds the per-variant outputs go to ``seed<s>/<variant>/``,
``summary.csv`` holds each metric's mean with ``<col>_ci_low`` / ``<col>_ci_high`` (95 % bootstrap CI across
seeds) and ``n_seeds``, ``summary_per_seed.csv`` and ``tables.csv`` a row per seed (``seed``),
``injection_diag.json`` maps variant -> ``seed<s>`` -> diagnostic, and ``dnll_vs_horizon.png`` and
``injection_ci/<variant>/`` plot the means with their CI bands.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from latentdyn import artifacts
from latentdyn.data.latent_store import LatentStore
from latentdyn.diagnostics.plots import explained_variance_figure, figure_title, save_figure
from latentdyn.jsonio import write_csv_atomic
from latentdyn.pipeline.common import plain, write_csv_rows
from latentdyn.pipeline.injection import injection_diagnostic
from latentdyn.pipeline.seeds import (
    add_key_metric,
    n_seeds_metric,
    plot_dnll_vs_horizon,
    run_seeds,
    seed_config,
    seed_label,
    several,
    write_injection_bands,
    write_summaries,
)
from latentdyn.pipeline.store import prepare_latent_store
from latentdyn.pipeline.train import model_battery, train_horizon
from latentdyn.representations.pca import (
    SPACE,
    PCAFit,
    check_space,
    fit_incremental_pca,
    projection_space,
    reconstruction_mse,
    write_projected_store,
)
from latentdyn.tracking.run import METRICS_NAME, record_weights, write_json

log = logging.getLogger(__name__)

# Bump when the content of a fit or a projected store changes, so stale caches are not reused.
PCA_FIT_VERSION = 2
PCA_STORE_VERSION = 2
RAW = "raw"
# Battery metrics of the model row (training slice) per horizon in summary.csv, as k{k}_{metric}.
BATTERY_COLUMNS = ("nll", "dnll", "cos", "logmag_r2", "mag_ratio", "mse")
# Injection summaries per mode in summary.csv, as {mode}_{summary} (InjectionResult.mode_summary keys).
INJECTION_COLUMNS = (
    "dnll",
    "cos",
    "mag_ratio",
    "state_err",
    "state_err_at_K",
    "state_err_raw",
    "state_err_raw_at_K",
)
RAW_SCALE_COLUMNS = ("state_err_raw", "state_err_raw_at_K")
# Per-variant entries that go to the results table (metrics.json and summary.csv have them all).
KEY_COLUMNS = ("k1_dnll", "D_rollout_dnll", "D_rollout_state_err_raw_at_K")
# The columns that name a variant in summary.csv (the rest are metrics, averaged over seeds).
SUMMARY_KEYS = ("variant", "representation", "dim")


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


def pca_space(cfg: DictConfig) -> str:
    """``pca.space`` (``raw`` when unset), validated (ValueError for an unknown space)."""
    return check_space(str(cfg.pca.get("space", SPACE)))


def fit_spec(cfg: DictConfig, base_store: LatentStore, n_components: int) -> dict[str, Any]:
    """Everything that determines a PCA fit: the base store, the number of components, the space, the fit
    settings."""
    return {
        "version": PCA_FIT_VERSION,
        "base_store": store_identity(base_store),
        "n_components": int(n_components),
        "space": pca_space(cfg),
        "split": "train",
        "chunk_frames": int(cfg.pca.chunk_frames),
    }


def prepare_pca_fit(cfg: DictConfig, base_store: LatentStore, n_components: int) -> tuple[PCAFit, Path]:
    """The PCA fit with ``n_components`` on the base store's train split in ``pca.space`` (artifact
    ``pca_fit``)."""
    space = pca_space(cfg)

    def build(tmp: Path) -> None:
        fit = fit_incremental_pca(
            base_store, n_components, chunk_frames=int(cfg.pca.chunk_frames), space=space
        )
        fit.save(tmp)
        log.info(
            "PCA fit (%s space): %d components on %d train frames in %d chunks, %.4f of the variance",
            space,
            n_components,
            fit.n_samples,
            fit.n_chunks,
            fit.explained_fraction(n_components),
        )

    spec = fit_spec(cfg, base_store, n_components)
    path = artifacts.get_or_build(Path(cfg.paths.cache_dir), "pca_fit", spec, build, force=cfg.force)
    fit = PCAFit.load(path)
    if fit.space != space:
        raise ValueError(f"the cached PCA fit {path} is in space {fit.space!r}, expected {space!r}")
    return fit, path


def prepare_projected_store(cfg: DictConfig, base_store: LatentStore, dim: int) -> LatentStore:
    """The base store projected onto its first ``dim`` principal components (artifact ``pca``).

    The fit has ``max(pca.dims + [dim])`` components and is shared by every projection of the run; its
    spec (with the space) is part of the store's, so projections of different spaces are different stores.
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


def explained_variance_title(cfg: DictConfig) -> str:
    """The explained-variance figure's title: experiment, run id and the fit's space."""
    return figure_title(cfg.name, cfg.run_id, extra=f"PCA explained variance ({pca_space(cfg)} space)")


def write_explained_variance(fit: PCAFit, dims: list[int], run_dir: Path, *, title: str) -> list[Path]:
    """``explained_variance.csv`` (per component: variance, ratio, cumulative ratio) and a PNG of the curve
    with the chosen ``dims`` marked, headed by ``title`` (:func:`explained_variance_title`)."""
    csv_path = run_dir / "explained_variance.csv"
    cumulative = fit.explained_variance_ratio.cumsum()
    columns = ["component", "explained_variance", "explained_variance_ratio", "cumulative_ratio"]
    rows = (
        dict(zip(columns, (i, float(var), float(ratio), float(cum)), strict=True))
        for i, (var, ratio, cum) in enumerate(
            zip(fit.explained_variance, fit.explained_variance_ratio, cumulative, strict=True), start=1
        )
    )
    write_csv_atomic(csv_path, columns, rows)
    fig = explained_variance_figure(
        fit.explained_variance_ratio, dims, title=title, input_dim=fit.input_dim, space=fit.space
    )
    png_path = save_figure(fig, run_dir / "explained_variance.png", dpi=120)
    return [csv_path, png_path]


def variant_config(cfg: DictConfig, name: str, store: LatentStore) -> DictConfig:
    """``cfg`` with outputs under ``<run_dir>/<name>`` and the variant's store recorded (it goes into the
    checkpoints' embedded config)."""
    var_cfg = cfg.copy()
    with open_dict(var_cfg):
        var_cfg.run_dir = str(Path(cfg.run_dir) / name)
        var_cfg.variant = {"name": name, "latent_store": str(store.root), "dim": store.dim}
    return var_cfg


def raw_scale_is_isometric(store: LatentStore) -> bool:
    """Whether a variant's ``state_err_raw`` is a raw latent-space distance: true for the base store and for
    a ``raw``-space projection (an isometry on its span), false for a ``train_standardized`` one."""
    return projection_space(store) in (None, "raw")


def horizon_columns(k: int, rows: list[dict[str, Any]], slice_name: str) -> dict[str, float]:
    """Summary columns of horizon ``k`` from its battery ``rows``: the model row on ``slice_name`` (the training
    slice) as ``k{k}_{metric}`` and ``k{k}_mse_vs_persistence`` (NaN without a persistence row)."""
    by_predictor = {r["predictor"]: r for r in rows if r["slice"] == slice_name}
    model = by_predictor["model"]
    out = {f"k{k}_{m}": float(model[m]) for m in BATTERY_COLUMNS}
    persistence = by_predictor.get("persistence")
    out[f"k{k}_mse_vs_persistence"] = (
        float(model["mse"]) / float(persistence["mse"]) if persistence is not None else math.nan
    )
    return out


def injection_columns(result: Any, isometric: bool) -> dict[str, float]:
    """Summary columns ``{mode}_{summary}`` of an :class:`~latentdyn.diagnostics.injection.InjectionResult`;
    the raw-scale state errors are NaN when the variant's space is not isometric to the raw latents."""
    out: dict[str, float] = {}
    for mode in result.modes:
        summary = result.mode_summary(mode)
        for key in INJECTION_COLUMNS:
            value = float(summary[key])
            out[f"{mode}_{key}"] = value if isometric or key not in RAW_SCALE_COLUMNS else math.nan
    return out


def evaluate_variant(
    cfg: DictConfig, name: str, store: LatentStore, logger: Any, note: str = ""
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Phase 1 (per horizon) and the injection diagnostic (k = 1 model) of one variant (outputs under
    ``<cfg.run_dir>/<name>``; ``note`` is added to plot titles, e.g. the seed).

    Returns its summary row, its battery rows and its injection diagnostic (``to_dict`` plus dim, rate and
    whether ``state_err_raw`` is in raw latent units).
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
        row.update(horizon_columns(k, rows, str(cfg.datamodule.slice)))
    one_frame = models[1] if 1 in models else train_horizon(var_cfg, store, 1, logger)[0]
    result = injection_diagnostic(one_frame.net, store, var_cfg.diagnostic)
    extra = f"injection · {name} ({store.dim} dims){note}"
    title = figure_title(cfg.name, cfg.run_id, horizon=int(one_frame.horizon), extra=extra)
    result.write(Path(var_cfg.run_dir) / "injection", frame_rate=store.frame_rate, title=title)
    isometric = raw_scale_is_isometric(store)
    if not isometric:
        log.warning(
            "variant %s is a %s projection: its state_err_raw columns are NaN (not an isometry of raw latents)",
            name,
            projection_space(store),
        )
    row.update(injection_columns(result, isometric))
    diag = {
        **result.to_dict(),
        "dim": store.dim,
        "frame_rate": store.frame_rate,
        "state_err_raw_is_raw_latent_units": isometric,
    }
    return row, battery_rows, diag


def write_seed_plots(
    cfg: DictConfig,
    summary: list[dict[str, Any]],
    variants: list[tuple[str, LatentStore, float, float]],
    seeds,
) -> None:
    """With several seeds: ``dnll_vs_horizon.png`` (each variant's model ΔNLL per horizon, mean and CI band
    across seeds) and ``injection_ci/<variant>/`` (the injection curves' mean and CI band across seeds)."""
    run_dir = Path(cfg.run_dir)
    plot_dnll_vs_horizon(cfg, summary, len(seeds), "model")
    for name, store, _, _ in variants:
        write_injection_bands(
            run_dir,
            name,
            {seed: run_dir / seed_label(seed, seeds, name) / "injection" for seed in seeds},
            title=figure_title(
                cfg.name,
                cfg.run_id,
                horizon=1,
                extra=f"injection · {name} ({store.dim} dims) · {len(seeds)} seeds",
            ),
            frame_rate=store.frame_rate,
        )


def run(cfg: DictConfig) -> dict[str, float]:
    """Fit the PCA, derive the projected stores, run Phase 1 and the injection diagnostic on each variant."""
    from latentdyn.models.training import job_logger

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dims = pca_dims(cfg)
    space = pca_space(cfg)
    seeds = run_seeds(cfg)
    if str(cfg.datamodule.slice) not in [str(s) for s in cfg.battery.slices]:
        raise ValueError(
            f"the training slice {cfg.datamodule.slice!r} must be one of battery.slices "
            f"{list(cfg.battery.slices)}: the summary reports the battery on it"
        )
    base = prepare_latent_store(cfg)
    if dims[-1] > base.dim:
        raise ValueError(f"pca.dims {dims} exceed the dimension {base.dim} of {base.meta['representation']}")
    fit, fit_path = prepare_pca_fit(cfg, base, dims[-1])
    write_explained_variance(fit, dims, run_dir, title=explained_variance_title(cfg))
    variants: list[tuple[str, LatentStore, float, float]] = [(RAW, base, 1.0, 0.0)]
    for k in dims:
        store = prepare_projected_store(cfg, base, k)
        variants.append((f"pca{k}", store, fit.explained_fraction(k), reconstruction_mse(store, "test")))
    per_seed: list[dict[str, Any]] = []
    battery: list[dict[str, Any]] = []
    diagnostics: dict[str, Any] = {}
    with job_logger(cfg) as logger:
        # Seed-independent inputs (the stores, the PCA fit) are shared; each seed trains its own models.
        for seed in seeds:
            s_cfg = seed_config(cfg, seed, run_dir / seed_label(seed, seeds))
            note = f" · seed {seed}" if several(seeds) else ""
            for name, store, fraction, recon in variants:
                log.info("variant %s, seed %d: %s (%d dims)", name, seed, store.root, store.dim)
                row, rows, diag = evaluate_variant(s_cfg, name, store, logger, note)
                per_seed.append(
                    {"seed": seed, **row, "explained_variance_fraction": fraction, "recon_mse_test": recon}
                )
                battery += [{"seed": seed, **r} for r in rows]
                if several(seeds):
                    diagnostics.setdefault(name, {})[f"seed{seed}"] = diag
                else:
                    diagnostics[name] = diag
    summary = write_summaries(per_seed, SUMMARY_KEYS, run_dir)
    write_csv_rows(battery, run_dir / "tables.csv")
    write_json(run_dir / "injection_diag.json", diagnostics)
    if several(seeds):
        write_seed_plots(cfg, summary, variants, seeds)
    key: dict[str, float] = {}
    for row in summary:
        for column in KEY_COLUMNS:
            add_key_metric(key, f"{row['variant']}/{column}", row, column, seeds)
        fraction = float(row["explained_variance_fraction"])
        if math.isfinite(fraction):
            key[f"{row['variant']}/explained_variance_fraction"] = fraction
    n_seeds_metric(key, seeds)
    details = {
        "latent_store": str(base.root),
        "pca_fit": str(fit_path),
        "pca_space": space,
        "projected_stores": {name: str(store.root) for name, store, _, _ in variants[1:]},
        "seeds": seeds,
        "summary": summary,
        "config": plain(cfg.pca),
    }
    write_json(run_dir / METRICS_NAME, {"key_metrics": key, **details})
    log.info("summary: %s", run_dir / "summary.csv")
    return key
