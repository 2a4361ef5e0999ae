"""The distributions are self-contained: an installed ``latentdyn`` starts with no repository around it.

The wheel must carry the Hydra config tree as ``latentdyn/conf`` (``config.conf_dir()`` looks there first),
and the sdist must carry ``conf/`` so that a wheel built from it does too. The test builds both offline
(``uv build`` makes the sdist, then the wheel from the unpacked sdist), installs the wheel into a bare
target directory and runs the app from a directory outside the repository, with the project's
interpreter: its dependencies resolve from the project environment, ``latentdyn`` itself from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def _uv() -> str:
    """The uv executable: the one running this session (``$UV``), else the one on ``PATH``."""
    uv = os.environ.get("UV") or shutil.which("uv")
    if uv is None:
        pytest.fail("uv not found ($UV unset and no uv on PATH): the packaging test builds with uv")
    return uv


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; on a non-zero exit fail with its output, so the reason reaches the test report."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc


def _config_files() -> list[str]:
    """Every YAML file of the repository's config tree, relative to ``conf/`` (POSIX separators)."""
    files = sorted(p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml"))
    assert "config.yaml" in files
    return files


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding the sdist and the wheel built from it, offline (build deps come from uv's cache)."""
    out = tmp_path_factory.mktemp("dist")
    _run([_uv(), "build", "--offline", "--out-dir", str(out), str(REPO)], cwd=out)
    return out


@pytest.fixture(scope="module")
def wheel(dist_dir: Path) -> Path:
    (path,) = dist_dir.glob("latentdyn-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Target directory with the wheel installed (no dependencies; scripts in ``bin/``)."""
    target = tmp_path_factory.mktemp("site")
    _run(
        [_uv(), "pip", "install", "--offline", "--no-deps", "--python", sys.executable]
        + ["--target", str(target), str(wheel)],
        cwd=target,
    )
    return target


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A working directory outside the repository (no ``conf/`` to fall back on)."""
    assert not tmp_path.resolve().is_relative_to(REPO)
    return tmp_path


def _env(installed: Path) -> dict[str, str]:
    """Environment whose ``latentdyn`` is the installed wheel's, ahead of the repo's editable install."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(installed)
    return env


def test_wheel_ships_every_config_file_inside_the_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in _config_files() if f"latentdyn/conf/{f}" not in names]
    assert not missing, f"config files missing from {wheel.name}: {missing}"


def test_sdist_ships_the_config_tree(dist_dir: Path) -> None:
    (sdist,) = dist_dir.glob("latentdyn-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = [f for f in _config_files() if f"conf/{f}" not in names]
    assert not missing, f"config files missing from {sdist.name}: {missing}"


def test_installed_package_reads_its_own_config_tree(installed: Path, outside: Path) -> None:
    code = "import latentdyn, latentdyn.config as c; print(latentdyn.__file__); print(c.conf_dir())"
    proc = _run([sys.executable, "-c", code], cwd=outside, env=_env(installed))
    module_file, conf = (Path(line) for line in proc.stdout.splitlines()[-2:])
    assert module_file.is_relative_to(installed), f"imported {module_file}, not the installed wheel"
    assert conf == (installed / "latentdyn" / "conf").resolve()


@pytest.mark.parametrize("entry", ["module", "script"])
def test_installed_app_starts_outside_the_repo(installed: Path, outside: Path, entry: str) -> None:
    app = [sys.executable, "-m", "latentdyn"] if entry == "module" else [str(installed / "bin" / "latentdyn")]
    env = _env(installed)

    help_text = _run(app + ["--help"], cwd=outside, env=env).stdout
    experiments = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
    assert experiments
    for name in experiments:
        assert name in help_text, f"--help does not list experiment {name!r}:\n{help_text}"

    job = _run(app + ["--cfg", "job", "experiment=quickstart"], cwd=outside, env=env).stdout
    assert "pipeline:" in job
    assert not (outside / "outputs").exists(), "--cfg job must not start a run"
