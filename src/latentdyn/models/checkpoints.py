"""Checkpoint conventions shared by every latentdyn LightningModule.

A checkpoint embeds the resolved config of the run that wrote it (under :data:`CONFIG_KEY`) and holds only
tensors and plain data (:func:`plain_data`), so it loads with ``torch.load(weights_only=True)`` and a crafted
file cannot run code (:func:`refusing_to_load`).
"""

from __future__ import annotations

import pathlib
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

CONFIG_KEY = "latentdyn_config"

# Checkpoint entries holding configs; saved as plain data so that loading needs no pickled classes.
PLAIN_ENTRIES = ("hyper_parameters", "datamodule_hyper_parameters", CONFIG_KEY)
# Classes a checkpoint written before the entries were plain data may hold; rebuilding a path from its
# parts runs no code.
LEGACY_SAFE_GLOBALS = [
    pathlib.PosixPath,
    pathlib.WindowsPath,
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
]


def plain_data(obj: Any) -> Any:
    """``obj`` with every mapping, sequence and path turned into dicts, lists and strings (recursively).

    What ``torch.load(weights_only=True)`` accepts besides tensors: a checkpoint of plain data cannot run
    code when it is loaded.
    """
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, int | str) else k: plain_data(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain_data(v) for v in obj]
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if obj is None or isinstance(obj, bool | int | float | str | torch.Tensor):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint as plain data: {obj!r}")


class EmbedsRunConfig:
    """LightningModule mixin: checkpoints carry ``self.run_config`` and only plain data in their config entries."""

    run_config: dict[str, Any]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.run_config
        for entry in PLAIN_ENTRIES:
            if entry in checkpoint:
                checkpoint[entry] = plain_data(checkpoint[entry])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.run_config = dict(checkpoint.get(CONFIG_KEY) or {})


def refusing_to_load(path: Path, exc: pickle.UnpicklingError) -> ValueError:
    """The error for a checkpoint ``torch.load(weights_only=True)`` refused: it names the Python object."""
    named = re.search(r"GLOBAL (\S+)", str(exc))
    what = f" (it names {named.group(1)})" if named else ""
    return ValueError(
        f"refusing to load {path}: it holds Python objects other than tensors and plain data{what}, "
        "which could run code when unpickled. latentdyn writes checkpoints that load with "
        "torch.load(weights_only=True); pass a checkpoint written by a latentdyn run."
    )


def load_module_checkpoint(
    cls: Any, path: str | Path, what: str, map_location: Any = "cpu", **overrides: Any
) -> Any:
    """``cls.load_from_checkpoint(path, **overrides)`` (a latentdyn LightningModule; ``overrides`` replace
    recorded hyper-parameters) in eval mode, unpickling only tensors and plain data (``weights_only=True``: a
    crafted file cannot run code).

    Raises:
        FileNotFoundError: no such file (the message names ``what`` it should hold).
        ValueError: the file holds anything else (it is not a latentdyn checkpoint, or was tampered with).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(LEGACY_SAFE_GLOBALS):
            model = cls.load_from_checkpoint(path, map_location=map_location, weights_only=True, **overrides)
    except pickle.UnpicklingError as exc:
        raise refusing_to_load(path, exc) from None
    return model.eval()
