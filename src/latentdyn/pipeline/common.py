"""Steps shared by experiment pipelines: standardised GT data for diagnostics, model and data builders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from latentdyn.data.latent_store import LatentStore
from latentdyn.jsonio import write_csv_atomic
from latentdyn.tracking.ranks import shared_path


def bank_from_store(
    store: LatentStore, split: str, size: int, seed: int, standardized: bool = True
) -> torch.Tensor:
    """``(min(size, N_split), D)`` frames drawn uniformly without replacement from ``split``, standardised or
    raw (``standardized``, see :meth:`LatentStore.to_model_space`).

    Gathers only the chosen rows from the memory map, so it is cheap whatever the store's size.
    """
    rows = store.split_rows(split)
    if rows.size == 0:
        raise ValueError(f"split {split!r} of {store.root} has no frames for the manifold bank")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(rows, size=min(size, rows.size), replace=False))
    return store.to_model_space(store.latents[chosen], standardized)


def plain(node: Any) -> Any:
    """A config node as plain containers (resolved)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_dynamics(cfg: DictConfig, dim: int, horizon: int) -> Any:
    """The dynamics LightningModule ``cfg.model`` names (``_target_``, e.g. ``DynamicsModel``) for latent
    dimension ``dim`` and horizon ``horizon``, in the run's sample and space (``horizon_mode``,
    ``standardize``), with the run's resolved config to embed in its checkpoints.

    The backbone and head nodes are passed on as configs (the model instantiates them).
    """
    from hydra.utils import instantiate

    model_cfg = plain(cfg.model)
    if not model_cfg.get("_target_"):
        raise ValueError("model._target_ is not set: name the dynamics LightningModule to build")
    stride = model_cfg.pop("context_stride", 1)
    model_cfg.pop("horizon", None)
    return instantiate(
        model_cfg,
        _recursive_=False,
        _convert_="all",
        dim=dim,
        horizon=int(horizon),
        context_stride=int(horizon) if stride == "horizon" else int(stride),
        horizon_mode=str(cfg.horizon_mode),
        standardized=bool(cfg.standardize),
        run_config=plain(cfg),
    )


def window_datamodule(cfg: DictConfig, store: LatentStore, spec: Any, standardize: bool) -> Any:
    """Window datamodule over ``store`` with window geometry ``spec`` (a ``WindowSpec``) in the raw or
    standardised space, and this run's slice, batching and seed (``cfg.datamodule``, ``cfg.seed``)."""
    from latentdyn.data.windows import LatentWindowDataModule

    dm_cfg = cfg.datamodule
    return LatentWindowDataModule(
        store_root=store.root,
        context=spec.context,
        horizon=spec.horizon,
        context_stride=spec.context_stride,
        horizon_mode=spec.horizon_mode,
        standardize=standardize,
        slice_name=dm_cfg.slice,
        batch_size=dm_cfg.batch_size,
        num_workers=dm_cfg.num_workers,
        energy_percentile=dm_cfg.energy_percentile,
        medial_range=list(dm_cfg.medial_range),
        seed=cfg.seed,
        max_val_windows=dm_cfg.max_val_windows,
    )


def build_datamodule(cfg: DictConfig, store: LatentStore, model: Any) -> Any:
    """Window datamodule over ``store`` matching ``model``'s window geometry and space."""
    return window_datamodule(cfg, store, model.net.spec, model.standardized)


def checkpoint_dir(cfg: DictConfig) -> Path:
    """``<run_dir>/checkpoints``; in a data-parallel job the one rank 0 writes, which every rank reads."""
    path = shared_path(Path(cfg.run_dir)) / "checkpoints"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_csv_rows(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """CSV of ``rows`` with the union of their keys as columns (first-seen order); missing cells empty."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    write_csv_atomic(Path(path), columns, rows)


def budgeted_trainer(cfg: DictConfig, logger: Any, last: Path, settings: DictConfig, **overrides: Any) -> Any:
    """A resumable trainer (``build_trainer``, periodic checkpoint ``last``) for ``cfg.max_steps`` steps of a model
    other than the dynamics model (Exp 5's β-VAE, Exp 6's score model), with the clipping and validation of its
    ``settings`` node: ``gradient_clip_val``, ``val_check_interval`` (at most the budget), ``limit_val_batches``;
    ``overrides`` (Trainer arguments) win over them."""
    from latentdyn.models.training import build_trainer

    steps = int(cfg.max_steps)
    kwargs: dict[str, Any] = {
        "max_steps": steps,
        "gradient_clip_val": float(settings.gradient_clip_val),
        "val_check_interval": min(int(settings.val_check_interval), steps),
        "limit_val_batches": settings.limit_val_batches,
    }
    return build_trainer(cfg, logger, last_checkpoint=last, **{**kwargs, **overrides})
