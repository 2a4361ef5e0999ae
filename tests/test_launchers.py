"""Sweep launchers (``conf/hydra/launcher/``): every config is a complete, valid set of its plugin's options,
and a sweep run through submitit (``hydra/launcher=submitit_local``) is tracked like any other."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class
from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf

from latentdyn.config import conf_dir
from tests.conftest import manifest_lines, run_cli

PLUGIN_OPTIONS = {
    "submitit_local": LocalQueueConf,
    "submitit_slurm": SlurmQueueConf,
    "joblib": JobLibLauncherConf,
}


def test_every_launcher_config_is_shipped() -> None:
    shipped = sorted(p.stem for p in (conf_dir() / "hydra" / "launcher").glob("*.yaml"))
    assert shipped == sorted(PLUGIN_OPTIONS)


@pytest.mark.parametrize("name", sorted(PLUGIN_OPTIONS))
def test_a_launcher_config_names_its_plugin_and_only_options_it_has(name: str) -> None:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(
                config_name="config",
                overrides=["experiment=exp6_score_correction", f"hydra/launcher={name}"],
                return_hydra_config=True,
            )
    finally:
        GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    options = {f.name for f in dataclasses.fields(PLUGIN_OPTIONS[name])}
    assert set(launcher) == options
    assert get_class(launcher._target_).__module__.startswith("hydra_plugins.")


@pytest.mark.slow
def test_a_submitit_sweep_tracks_each_job_in_its_own_process_and_dir(tmp_path: Path) -> None:
    """``latentdyn -m experiment=exp6_score_correction hydra/launcher=submitit_local``: two jobs, each in its
    own submitit process with its own run dir and record, both in the manifest and the sweep's summary."""
    proc = run_cli(
        [
            "-m",
            "experiment=exp6_score_correction",
            "debug=smoke",
            "correction.n_steps=3",
            "correction.step_size=0.1",
            "correction.sigma=0.1,0.25",
            "hydra/launcher=submitit_local",
            "run_id=sub",
        ],
        tmp_path,
    )
    sweep = tmp_path / "multirun" / "exp6_score_correction" / "sub"
    assert (sweep / ".submitit").is_dir(), proc.stdout
    infos = [json.loads((sweep / str(job) / "run_info.json").read_text()) for job in range(2)]
    assert {info["status"] for info in infos} == {"completed"}
    assert len({info["pid"] for info in infos}) == 2
    assert all(info["host"] for info in infos)
    records = manifest_lines(tmp_path)
    assert sorted((r["run_id"], r["status"]) for r in records) == [
        ("sub-0", "completed"),
        ("sub-0", "started"),
        ("sub-1", "completed"),
        ("sub-1", "started"),
    ]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["completed", "completed"]
