"""What produced a run: code version, software versions, machine."""

from __future__ import annotations

import platform
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


@cache
def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the checkout the package runs from (``None`` outside a git checkout)."""
    source_dir = Path(__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], source_dir)
    if not commit:
        return {"git_commit": None, "git_dirty": None}
    status = _git(["status", "--porcelain", "--untracked-files=no"], source_dir)
    return {"git_commit": commit, "git_dirty": bool(status)}


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
