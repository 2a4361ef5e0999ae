"""Every experiment config composes; the config tree's conventions hold."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from latentdyn.cli import available_experiments
from latentdyn.config import conf_dir

EXPERIMENTS = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))


def test_experiment_list_is_not_empty() -> None:
    assert "phase0" in EXPERIMENTS
    assert available_experiments() == EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(compose_cfg, experiment: str) -> None:
    cfg = compose_cfg([f"experiment={experiment}"])
    assert cfg.name == experiment, "an experiment config sets `name` to its file name"
    assert cfg.pipeline, "an experiment config names its pipeline"
    assert cfg.tier
    # Everything but Hydra-runtime interpolations resolves.
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["seed"] == 0


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_with_smoke(compose_cfg, experiment: str) -> None:
    cfg = compose_cfg([f"experiment={experiment}", "debug=smoke"])
    assert cfg.data.corpus._target_.endswith("SyntheticCorpus")
    assert cfg.extract.device == "cpu"


def test_experiment_files_are_global_packages() -> None:
    for path in (conf_dir() / "experiment").glob("*.yaml"):
        assert path.read_text().startswith("# @package _global_"), path


def test_primary_defaults_put_self_first() -> None:
    defaults = OmegaConf.load(conf_dir() / "config.yaml").defaults
    assert defaults[0] == "_self_"
    assert {"experiment": None} in defaults and {"debug": None} in defaults


def test_seed_zero_is_kept(compose_cfg) -> None:
    assert compose_cfg(["experiment=phase0", "seed=0"]).seed == 0
    assert compose_cfg(["experiment=phase0", "seed=7"]).seed == 7


def test_run_id_is_stable_within_a_process(compose_cfg) -> None:
    a = compose_cfg(["experiment=phase0"]).run_id
    b = compose_cfg(["experiment=phase0"]).run_id
    assert a == b and len(a) == len("2026-01-01_00-00-00_000000")
