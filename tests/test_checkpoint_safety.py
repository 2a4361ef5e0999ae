"""Checkpoints are loaded with ``weights_only=True``: a crafted file cannot run code, ours still load."""

from __future__ import annotations

import os
import pathlib
from pathlib import Path

import pytest
import torch

from latentdyn.models.checkpoints import CONFIG_KEY, plain_data
from latentdyn.models.dynamics import DynamicsModel, load_dynamics

BACKBONE = {"_target_": "latentdyn.models.backbones.MLPBackbone", "hidden": 8, "layers": 1}
HEAD = {"_target_": "latentdyn.models.heads.GaussianMDNHead", "n_components": 2}
OPTIMIZER = {"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 0}


class _RunsCode:
    """Unpickling this calls ``os.system``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _model() -> DynamicsModel:
    return DynamicsModel(
        dim=3,
        context=2,
        horizon=1,
        backbone=BACKBONE,
        head=HEAD,
        optimizer=OPTIMIZER,
        horizon_mode="lag",
        standardized=False,
        run_config={"name": "exp1_vmf", "paths": {"root": "/x"}},
    )


def _lightning_checkpoint(model: DynamicsModel, **extra: object) -> dict:
    """What ``Trainer.save_checkpoint`` writes, reduced to the entries loading reads."""
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": "2.6.0",
        "datamodule_hyper_parameters": {"store_root": pathlib.Path("/cache/latents/abc"), "spans": (1, 2)},
        **extra,
    }
    model.on_save_checkpoint(checkpoint)
    return checkpoint


def test_crafted_checkpoint_is_refused_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    checkpoint = _lightning_checkpoint(_model())
    checkpoint[CONFIG_KEY] = {"payload": _RunsCode(marker)}
    path = tmp_path / "evil.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.ckpt"):
        load_dynamics(path)
    assert not marker.exists()


def test_saved_checkpoint_is_plain_data_and_loads(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "ok.ckpt"
    torch.save(_lightning_checkpoint(model), path)
    raw = torch.load(path, weights_only=True)  # no pickled classes left
    assert raw["datamodule_hyper_parameters"] == {"store_root": "/cache/latents/abc", "spans": [1, 2]}
    loaded = load_dynamics(path)
    assert loaded.run_config["name"] == "exp1_vmf"
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


def test_checkpoint_from_before_plain_data_still_loads(tmp_path: Path) -> None:
    """Checkpoints written by earlier versions hold a pathlib.Path among the datamodule's settings."""
    model = _model()
    checkpoint = _lightning_checkpoint(model)
    checkpoint["datamodule_hyper_parameters"]["store_root"] = pathlib.Path("/cache/latents/abc")
    path = tmp_path / "old.ckpt"
    torch.save(checkpoint, path)
    assert load_dynamics(path).horizon_mode == "lag"


def test_plain_data_rejects_what_it_cannot_store() -> None:
    assert plain_data({"a": (pathlib.Path("/p"), {1: None})}) == {"a": ["/p", {1: None}]}
    with pytest.raises(TypeError, match="set"):
        plain_data({"a": {1, 2}})
