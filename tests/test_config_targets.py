"""Configs mean what they say: every `_target_` in every config group builds, and `model._target_` is used."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from latentdyn.config import conf_dir
from tests.conftest import compose_at


def _group_files() -> list[Path]:
    return sorted(p for p in conf_dir().rglob("*.yaml") if p.parts[len(conf_dir().parts)] not in ("hydra",))


def _targets(node: Any, path: str = "") -> list[tuple[str, str]]:
    """(dotted key, target) of every ``_target_`` in a plain config tree."""
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            found.append((path, node["_target_"]))
        for key, value in node.items():
            found += _targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _targets(value, f"{path}[{i}]")
    return found


def _locate(target: str) -> Any:
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


ALL_TARGETS = sorted(
    {
        (str(p.relative_to(conf_dir())), key, target)
        for p in _group_files()
        for key, target in _targets(OmegaConf.to_container(OmegaConf.load(p), resolve=False))
    }
)


# Arguments the pipelines pass at run time (not in the config): stand-ins for building a node here.
RUNTIME_ARGS = {
    "dim": 4,
    "context": 3,
    "in_features": 8,
    "horizon": 1,
    "utts": None,
    "save_dir": None,
    # The β-VAE's base representation (Exp 5 passes the run's `representation` node).
    "base": {"_target_": "latentdyn.representations.mel.MelRepresentation", "n_mels": 8},
    # A correction's score function (Exp 6 passes its score model's): bound only, built in test_score_model.
    "score": None,
    # The score model's window (Exp 6 passes the dynamics model's W).
    "context_frames": 3,
    # The direction AR's codebook size (Exp 10 passes its Exp 8 codebook's K).
    "n_codes": 5,
    # The VAE-GAN's codec (Exp 9 passes the run's `representation` node, pocket_mimi).
    "codec": {
        "_target_": "latentdyn.representations.pocket_mimi.PocketMimiRepresentation",
        "pretrained": False,
    },
}
# Groups chosen for the whole config (`# @package _global_`): their targets are checked through the groups.
GLOBAL_GROUPS = ("experiment", "hydra", "debug", "setup")


def _group_choices() -> list[str]:
    """``group=choice`` for every file of every config group (``model/backbone=gru``, ``data/split=reference``)."""
    choices = []
    for path in sorted(conf_dir().rglob("*.yaml")):
        rel = path.relative_to(conf_dir())
        if len(rel.parts) > 1 and rel.parts[0] not in GLOBAL_GROUPS:
            choices.append(f"{rel.parent.as_posix()}={rel.stem}")
    return choices


def test_the_config_tree_has_targets() -> None:
    groups = {entry[0].split("/")[0] for entry in ALL_TARGETS}
    assert {"model", "representation", "data", "logger", "diagnostic"} <= groups


@pytest.mark.parametrize("choice", _group_choices())
def test_every_target_node_of_every_group_builds(tmp_path: Path, choice: str, monkeypatch) -> None:
    """Compose ``group=choice`` and build every ``_target_`` node under the group's key with the values the
    config gives it: every key must be a parameter of its target, and the node must build (arguments only a
    pipeline has at run time get stand-ins; a node whose run-time argument has no stand-in is bound only)."""
    import inspect

    from hydra.utils import instantiate

    monkeypatch.setenv("WANDB_MODE", "disabled")
    group, _ = choice.split("=")
    cfg = compose_at(tmp_path, [choice, "pretrained=false", f"paths.root_dir={tmp_path}"], tmp_path / "run")
    node = OmegaConf.select(cfg, group.replace("/", "."))
    plain_node = OmegaConf.to_container(node, resolve=True)
    for key, target in _targets(plain_node, group.replace("/", ".")):
        sub = OmegaConf.select(cfg, key) if key != group.replace("/", ".") else node
        fn = _locate(target)
        params = {k: v for k, v in OmegaConf.to_container(sub, resolve=True).items() if not k.startswith("_")}
        signature = inspect.signature(fn)
        try:
            signature.bind_partial(**params)
        except TypeError as exc:
            raise AssertionError(f"{choice}: {key} has keys {target} does not take: {exc}") from None
        missing = [
            name
            for name, p in signature.parameters.items()
            if p.default is inspect.Parameter.empty
            and name not in params
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        assert set(missing) <= set(RUNTIME_ARGS), f"{choice}: {key} ({target}) misses {missing}"
        if target == "latentdyn.models.dynamics.DynamicsModel" or any(
            RUNTIME_ARGS[m] is None for m in missing
        ):
            continue  # models: built by build_dynamics below; splits need a corpus
        if OmegaConf.missing_keys(sub):
            continue  # a value the user must give (`???`, e.g. representation=betavae's checkpoint)
        built = instantiate(sub, _recursive_=False, **{m: RUNTIME_ARGS[m] for m in missing})
        assert type(built).__name__ == target.rsplit(".", 1)[1] or callable(fn)


@pytest.mark.parametrize("model", ["gaussian_mdn", "vmf_lognormal"])
@pytest.mark.parametrize("backbone", ["mlp", "mlp_reference", "gru", "transformer"])
def test_every_model_and_backbone_builds_and_predicts(tmp_path: Path, model: str, backbone: str) -> None:
    import torch

    from latentdyn.pipeline.common import build_dynamics

    cfg = compose_at(tmp_path, [f"model={model}", f"model/backbone={backbone}"], tmp_path / "run")
    net = build_dynamics(cfg, dim=4, horizon=2)
    assert type(net).__name__ == "DynamicsModel"
    context = torch.randn(3, net.context, 4)
    assert net.predictive(context).log_prob(torch.randn(3, 4)).shape == (3,)


def test_model_target_is_honoured(tmp_path: Path) -> None:
    from latentdyn.pipeline.common import build_dynamics

    cfg = compose_at(tmp_path, ["model._target_=tests.pipelines.custom_dynamics"], tmp_path / "run")
    model = build_dynamics(cfg, dim=4, horizon=2)
    assert model.built_by == "tests.pipelines.custom_dynamics"
    assert (model.horizon, model.horizon_mode, model.standardized) == (2, "lag", False)


def test_exp3_applies_representation_overrides_to_each_representation_that_has_the_key(
    tmp_path: Path,
) -> None:
    from latentdyn.experiments.exp3_rep_compare import representation_config
    from latentdyn.pipeline.composite import unused_group_overrides

    cfg = compose_at(tmp_path, ["experiment=exp3_rep_compare"], tmp_path / "run")
    overrides = ["representation.latent_space=pre_quantizer", "representation.seed=7", "seed=3"]
    mimi = representation_config(cfg, "mimi", overrides).representation
    assert (mimi.latent_space, mimi.seed, mimi.pretrained) == ("pre_quantizer", 7, True)
    mel = representation_config(cfg, "mel", overrides).representation
    assert "latent_space" not in mel and mel.n_mels == 80
    # Interpolations resolve against the run's config.
    off = compose_at(tmp_path, ["experiment=exp3_rep_compare", "pretrained=false"], tmp_path / "run")
    assert representation_config(off, "mimi").representation.pretrained is False
    assert unused_group_overrides("representation", ["mel", "encodec"], overrides) == [overrides[0]]
    assert unused_group_overrides("representation", ["mimi", "mel"], overrides) == []
