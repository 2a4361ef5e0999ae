"""Steps shared by experiment pipelines: standardised GT data for diagnostics, model and data builders."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from latentdyn.data.latent_store import LatentStore


def standardize(store: LatentStore, x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(…, D)`` raw latents -> float32 tensor in the store's train-standardised space."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    return (x - torch.from_numpy(store.mean)) / torch.from_numpy(store.std)


def split_trajectories(store: LatentStore, split: str) -> list[np.ndarray]:
    """The split's utterances as raw ``(T, D)`` float16 memmap views (no copy)."""
    return [store.utterance_latents(u) for u in store.utterances(split)]


def bank_from_store(store: LatentStore, split: str, size: int, seed: int) -> torch.Tensor:
    """``(min(size, N_split), D)`` standardised frames drawn uniformly without replacement from ``split``.

    Gathers only the chosen rows from the memory map, so it is cheap whatever the store's size.
    """
    rows = store.split_rows(split)
    if rows.size == 0:
        raise ValueError(f"split {split!r} of {store.root} has no frames for the manifold bank")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(rows, size=min(size, rows.size), replace=False))
    return standardize(store, store.latents[chosen])


def plain(node: Any) -> Any:
    """A config node as plain containers (resolved)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_dynamics(cfg: DictConfig, dim: int, horizon: int) -> Any:
    """The configured dynamics LightningModule for latent dimension ``dim`` and horizon ``horizon``."""
    from latentdyn.models.dynamics import DynamicsModel

    model_cfg = plain(cfg.model)
    stride = (
        horizon if model_cfg.get("context_stride") == "horizon" else int(model_cfg.get("context_stride", 1))
    )
    return DynamicsModel(
        dim=dim,
        context=int(model_cfg["context"]),
        horizon=int(horizon),
        context_stride=stride,
        backbone=model_cfg["backbone"],
        head=model_cfg["head"],
        optimizer=model_cfg["optimizer"],
        name=str(model_cfg.get("name", "model")),
        run_config=plain(cfg),
    )


def build_datamodule(cfg: DictConfig, store: LatentStore, model: Any) -> Any:
    """Window datamodule over ``store`` matching ``model``'s context, horizon and stride."""
    from latentdyn.data.windows import LatentWindowDataModule

    dm_cfg = cfg.datamodule
    return LatentWindowDataModule(
        store_root=store.root,
        context=model.context,
        horizon=model.horizon,
        context_stride=model.context_stride,
        slice_name=dm_cfg.slice,
        batch_size=dm_cfg.batch_size,
        num_workers=dm_cfg.num_workers,
        energy_percentile=dm_cfg.energy_percentile,
        edge_frames=dm_cfg.edge_frames,
        seed=cfg.seed,
        max_val_windows=dm_cfg.max_val_windows,
    )


def checkpoint_dir(cfg: DictConfig) -> Path:
    path = Path(cfg.run_dir) / "checkpoints"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_csv_rows(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """CSV of ``rows`` with the union of their keys as columns (first-seen order); missing cells empty."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with Path(path).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
