"""Every experiment config composes; the config tree's conventions hold."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from latentdyn.cli import available_experiments
from latentdyn.config import conf_dir

EXPERIMENTS = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))


def test_experiment_list_is_not_empty_and_in_the_studys_order() -> None:
    assert "phase0" in EXPERIMENTS
    listed = available_experiments()
    assert sorted(listed) == EXPERIMENTS
    assert (
        listed.index("exp2_injection")
        < listed.index("exp8_direction_codebook")
        < listed.index("exp10_direction_ar")
    )
    assert listed.index("exp1_vmf") < listed.index("exp1b_vmf_rollout") < listed.index("exp2_injection")


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


def test_setup_reference_composes_the_reference_study(compose_cfg) -> None:
    """One switch: LibriSpeech train-clean-100 with the reference split, Mimi's quantiser-output latents, the
    lag sample on raw latents with W = 8; command-line groups still win over it."""
    cfg = compose_cfg(["experiment=exp1_vmf", "setup=reference"])
    assert cfg.data.name == "librispeech" and list(cfg.data.corpus.subsets) == ["train-clean-100"]
    assert cfg.data.split._target_.endswith("reference_splits")
    assert cfg.representation._target_.endswith("MimiRepresentation")
    assert cfg.representation.latent_space == "quantizer_output"
    assert (cfg.horizon_mode, cfg.standardize, cfg.predict, cfg.model.context) == ("lag", False, "median", 8)
    offline = compose_cfg(["experiment=exp1_vmf"])
    assert offline.data.name == "synthetic" and offline.representation._target_.endswith("MelRepresentation")
    chosen = compose_cfg(["experiment=exp1_vmf", "setup=reference", "representation=encodec"])
    assert chosen.representation._target_.endswith("EncodecRepresentation")


def test_data_provenance_names_corpus_subsets_and_split(compose_cfg) -> None:
    from latentdyn.pipeline.store import data_provenance

    assert data_provenance(compose_cfg(["experiment=phase0"]))["label"] == "synthetic/stratified"
    reference = data_provenance(compose_cfg(["experiment=phase0", "setup=reference"]))
    assert reference["label"] == "librispeech:train-clean-100/reference"
