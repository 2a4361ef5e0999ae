"""What produced a run: code version, software versions, machine."""

from __future__ import annotations

import os
import platform
import shlex
import socket
import subprocess
import sys
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


# The checkout whose state is recorded: the one the package runs from.
SOURCE_DIR = Path(__file__).resolve().parent


@cache
def git_state(source_dir: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the checkout the package runs from (``None`` outside a git checkout)."""
    source_dir = source_dir or SOURCE_DIR
    commit = _git(["rev-parse", "HEAD"], source_dir)
    if not commit:
        return {"git_commit": None, "git_dirty": None}
    status = _git(["status", "--porcelain", "--untracked-files=no"], source_dir)
    return {"git_commit": commit, "git_dirty": bool(status)}


@cache
def git_patch(source_dir: Path | None = None) -> tuple[str, tuple[str, ...]] | None:
    """For a dirty checkout: ``git diff HEAD`` (staged and unstaged changes to tracked files, with binary
    hunks) and the untracked files a patch cannot carry; ``None`` for a clean checkout or outside git.

    Read once per process, like :func:`git_state`: a composite run's sub-runs record the same code."""
    source_dir = source_dir or SOURCE_DIR
    if not git_state(source_dir).get("git_dirty"):
        return None
    top = _git(["rev-parse", "--show-toplevel"], source_dir)
    patch = _git(["diff", "HEAD", "--binary"], Path(top)) if top else None
    if patch is None:
        return None
    untracked = _git(["ls-files", "--others", "--exclude-standard"], Path(top)) or ""
    return patch + "\n", tuple(line for line in untracked.splitlines() if line)


def command_line(argv: list[str] | None = None) -> str:
    """The command that started this process, as the user would type it (``latentdyn a=b`` or
    ``python -m latentdyn a=b``), shell-quoted."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    program = Path(argv[0])
    name = f"python -m {program.parent.name}" if program.name == "__main__.py" else program.name
    return " ".join([name, *(shlex.quote(arg) for arg in argv[1:])])


def invocation() -> dict[str, Any]:
    """How this run was started: the command line and the working directory."""
    return {"command": command_line(), "cwd": os.getcwd()}


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def software_versions() -> dict[str, Any]:
    """Python, latentdyn and torch versions; CUDA and device only if the job already imported torch.

    The tracking layer never imports torch itself (it must stay cheap for light jobs); every training or
    extraction job has imported it by the time a run ends.
    """
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "latentdyn": _package_version("latentdyn"),
        "torch": _package_version("torch"),
        "cuda": None,
        "device": "cpu",
        "host": socket.gethostname(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(torch.cuda.current_device())
    if info["device"] == "cpu":
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return info
