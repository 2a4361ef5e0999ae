"""Provenance: the command line, and for a checkout with uncommitted changes the patch that reproduces it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from latentdyn.tracking import provenance
from latentdyn.tracking.run import PATCH_NAME, tracked_run


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git checkout the package 'runs from' (its source dir is ``pkg/`` inside it)."""
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "model.py").write_text("WIDTH = 256\n")
    _git(repo, "init", "-q")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "add", ".")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    monkeypatch.setattr(provenance, "SOURCE_DIR", repo / "pkg")
    provenance.git_state.cache_clear()
    provenance.git_patch.cache_clear()
    yield repo
    provenance.git_state.cache_clear()
    provenance.git_patch.cache_clear()


def _run(tmp_path: Path) -> dict:
    with tracked_run(
        run_dir=tmp_path / "run", manifest_path=tmp_path / "m.jsonl", run_id="r", experiment="e", config={}
    ) as run:
        run.result = {}
    return json.loads((tmp_path / "run" / "run_info.json").read_text())


def test_dirty_checkout_leaves_a_patch_that_reproduces_it(tmp_path: Path, checkout: Path) -> None:
    (checkout / "pkg" / "model.py").write_text("WIDTH = 512  # tried a wider model\n")
    (checkout / "pkg" / "notes.txt").write_text("untracked\n")
    info = _run(tmp_path)
    assert info["git_dirty"] is True and info["git_patch"] == PATCH_NAME
    assert info["git_untracked"] == ["pkg/notes.txt"]
    patch = tmp_path / "run" / PATCH_NAME
    _git(checkout, "checkout", "--", ".")
    assert (checkout / "pkg" / "model.py").read_text() == "WIDTH = 256\n"
    _git(checkout, "apply", str(patch))
    assert (checkout / "pkg" / "model.py").read_text() == "WIDTH = 512  # tried a wider model\n"


def test_clean_checkout_writes_no_patch(tmp_path: Path, checkout: Path) -> None:
    info = _run(tmp_path)
    assert info["git_dirty"] is False and info["git_patch"] is None
    assert not (tmp_path / "run" / PATCH_NAME).exists()


def test_command_line_is_recorded_as_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["/venv/lib/latentdyn/__main__.py", "experiment=exp1_vmf", "horizons=[1,2]", "run_id=my run"]
    assert (
        provenance.command_line(argv)
        == "python -m latentdyn experiment=exp1_vmf 'horizons=[1,2]' 'run_id=my run'"
    )
    assert provenance.command_line(["/venv/bin/latentdyn", "-m", "seed=1,2"]) == "latentdyn -m seed=1,2"
    monkeypatch.setattr("sys.argv", ["/venv/bin/latentdyn", "experiment=quickstart"])
    info = _run(tmp_path)
    assert info["command"] == "latentdyn experiment=quickstart" and info["cwd"]
