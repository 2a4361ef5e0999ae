"""Where the Hydra config tree lives and the OmegaConf resolvers it uses.

Kept free of torch/lightning imports: the CLI imports this on every invocation (``--help`` must stay fast).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from omegaconf import OmegaConf

# One stamp per process: every `${latentdyn.utc_stamp:}` in a run resolves to the same run id.
_PROCESS_STAMP = datetime.now(UTC).strftime("%Y-%m-%d_%H-%M-%S_%f")
#: Set by a sweep for the processes it launches (joblib workers), so their jobs resolve the sweep's run id.
STAMP_ENV = "LATENTDYN_SWEEP_STAMP"


def conf_dir() -> Path:
    """Absolute path of the config tree: inside the package for wheel installs, the repo's ``conf/`` otherwise."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "conf", package_dir.parents[1] / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"latentdyn config tree not found next to {package_dir}")


def utc_stamp() -> str:
    """UTC timestamp with microseconds, fixed for the life of the process (the default run id); in a process a
    sweep launched, the sweep's own (:data:`STAMP_ENV`)."""
    return os.environ.get(STAMP_ENV) or _PROCESS_STAMP


def or_default(value: object, default: object) -> object:
    """``value`` unless it is null, else ``default`` (``${latentdyn.or_default:${variant},betavae_smooth}``)."""
    return default if value is None else value


def register_resolvers() -> None:
    """Register latentdyn's OmegaConf resolvers (idempotent)."""
    resolvers = {
        "latentdyn.utc_stamp": utc_stamp,
        "latentdyn.cwd": os.getcwd,
        "latentdyn.or_default": or_default,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
