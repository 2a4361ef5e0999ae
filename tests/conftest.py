"""Shared fixtures: composing configs with Hydra's compose API and running the CLI in subprocesses."""

from __future__ import annotations

import json
import os

# One intra-op thread per test process, set before torch loads: on 2 cores torch's default pool busy-waits
# whenever another process wants a core, which makes the suite several times slower under load.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from latentdyn.config import conf_dir, register_resolvers

register_resolvers()

REPO_ROOT = Path(__file__).resolve().parents[1]


def compose_at(root: Path, overrides: Sequence[str], run_dir: Path) -> DictConfig:
    """Compose the app config like the CLI does, with outputs and caches under ``root`` and ``run_dir`` set
    (created), so a pipeline can be called directly with the result."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"paths.root_dir={root}", *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return cfg


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """:func:`compose_at` rooted in ``tmp_path``, with ``run_dir`` ``tmp_path/run``."""

    def _compose(overrides: Sequence[str] = ()) -> DictConfig:
        return compose_at(tmp_path, overrides, tmp_path / "run")

    yield _compose
    GlobalHydra.instance().clear()


def run_cli(
    args: Sequence[str], root: Path, *, module: str = "latentdyn", timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <module> ARGS`` with LATENTDYN_ROOT=root; raises with the output on failure."""
    # The repo on the path: tests' own pipelines (`pipeline=tests.pipelines.ok`) are importable.
    env = {**os.environ, "LATENTDYN_ROOT": str(root), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def manifest_lines(root: Path) -> list[dict]:
    """The manifest's records under ``root/outputs``."""
    path = root / "outputs" / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def spec_id(spec: object) -> str:
    """A readable pytest id of a ``WindowSpec``: ``lag-W3-k2-s1``."""
    return f"{spec.horizon_mode}-W{spec.context}-k{spec.horizon}-s{spec.context_stride}"
