"""Pretrained weights for representations: locating the file, its provenance, seeded random init.

A pretrained representation takes its weights either from a local ``checkpoint`` file or from the
Hugging Face hub through :func:`huggingface_hub.hf_hub_download` (its cache, offline mode and errors).
When neither is available the run fails at once, before any model is built, with a message that names
both ways to provide the weights and the random-weight alternative. Every representation records a
JSON-able provenance dict (``source``, ``pretrained``, and for files their ``sha256``) that ends up in
latent-store metadata and run records.

The hub's environment variables (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ...) are read when a
file is resolved rather than when ``huggingface_hub`` is imported (which is when it reads them itself),
so a variable set later in the process, by a launcher or a test, still takes effect.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download

from latentdyn.data.download import sha256_file
from latentdyn.errors import UserFacingError

__all__ = [
    "WeightsFile",
    "WeightsUnavailableError",
    "cached_sha256",
    "file_provenance",
    "hf_hub_cache_dir",
    "hf_hub_offline",
    "hf_provenance",
    "locate_pretrained",
    "missing_weights_message",
    "random_provenance",
    "resolve_checkpoint",
    "resolve_hf_file",
    "seeded_init",
    "trained_checkpoint",
]

_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


class WeightsUnavailableError(UserFacingError, RuntimeError):
    """Pretrained weights were asked for but neither a local checkpoint nor the HF hub could supply them."""


@dataclass(frozen=True)
class WeightsFile:
    """A located weights file and its provenance (see :func:`file_provenance`, :func:`hf_provenance`)."""

    path: Path
    provenance: dict[str, Any]


def _env_true(*names: str) -> bool:
    value = next((os.environ[n] for n in names if os.environ.get(n)), "")
    return value.upper() in _TRUE_VALUES


def _expand(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))


def hf_hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value now."""
    return _env_true("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def hf_hub_cache_dir() -> Path:
    """The HF hub cache directory the environment names now, with ``huggingface_hub``'s precedence.

    ``HF_HUB_CACHE``, else the legacy ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, with ``HF_HOME``
    defaulting to ``$XDG_CACHE_HOME/huggingface`` and that to ``~/.cache/huggingface``.
    """
    home = _expand(
        os.environ.get("HF_HOME")
        or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    )
    legacy = os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(_expand(os.environ.get("HF_HUB_CACHE") or legacy))


def missing_weights_message(
    repo: str, filename: str, cause: str, *, config_key: str = "representation"
) -> str:
    """The error text when pretrained weights cannot be had: both ways to provide them, and the way out.

    Args:
        repo: HF hub repository id (``owner/name``).
        filename: the weights file inside ``repo``.
        cause: why the hub could not supply it (the hub's own error message).
        config_key: the config group whose ``checkpoint`` / ``pretrained`` keys the user can override.
    """
    offline_advice = " and unset HF_HUB_OFFLINE (it is set now)" if hf_hub_offline() else ""
    return (
        f"pretrained weights unavailable: could not get {filename!r} from the Hugging Face hub repo "
        f"{repo!r} ({cause}).\n"
        "Provide them in one of two ways:\n"
        f"  1. a local file: {config_key}.checkpoint=/path/to/{filename}\n"
        f"  2. the HF hub: make huggingface.co reachable{offline_advice}, or pre-download the file\n"
        f"     on a machine that can reach it with `huggingface-cli download {repo} {filename}` and set\n"
        f"     HF_HOME (or HF_HUB_CACHE) to that cache (searched now: {hf_hub_cache_dir()}).\n"
        f"For a run with randomly initialised weights instead, set {config_key}.pretrained=false."
    )


def hub_resolves(timeout_s: float = 5.0) -> bool:
    """Whether the HF hub's host name resolves (DNS only, within ``timeout_s``): a cheap "is there a network"."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(os.environ.get("HF_ENDPOINT", constants.ENDPOINT)).hostname or "huggingface.co"
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(socket.getaddrinfo, host, 443).result(timeout=timeout_s)
    except (OSError, TimeoutError):
        return False
    finally:
        pool.shutdown(wait=False)  # a resolver stuck past the timeout is left behind, not waited for
    return True


def resolve_hf_file(
    repo: str, filename: str, *, revision: str | None = None, config_key: str = "representation"
) -> Path:
    """Local path of ``filename`` in HF hub repo ``repo``: cached, or downloaded into the cache.

    Uses :func:`huggingface_hub.hf_hub_download` with the cache of :func:`hf_hub_cache_dir` and, when
    :func:`hf_hub_offline`, ``local_files_only=True`` (no network request at all).

    Raises:
        WeightsUnavailableError: the file is neither cached nor downloadable (offline, network error,
            missing or gated repo or file); the message says how to provide it (:func:`missing_weights_message`).
    """
    offline = hf_hub_offline()
    # Cached copies are used either way; a hub whose name does not even resolve is not asked (its client
    # would retry for ~25 s before failing).
    unreachable = not offline and not hub_resolves()
    try:
        path = hf_hub_download(
            repo_id=repo,
            filename=filename,
            revision=revision,
            cache_dir=hf_hub_cache_dir(),
            local_files_only=offline or unreachable,
        )
    # huggingface_hub's HTTP, offline and cache-miss errors are OSErrors; bad repo ids are ValueErrors.
    except (OSError, ValueError) as err:
        if offline:
            cause = "HF_HUB_OFFLINE is set and the file is not in the local cache"
        elif unreachable:
            cause = (
                "the hub's host name does not resolve (no network?) and the file is not in the local cache"
            )
        else:
            cause = f"{type(err).__name__}: {err}".strip()
        raise WeightsUnavailableError(
            missing_weights_message(repo, filename, cause, config_key=config_key)
        ) from err
    return Path(path)


def resolve_checkpoint(checkpoint: str | os.PathLike[str], *, config_key: str = "representation") -> Path:
    """``checkpoint`` as an existing file path (``~`` and ``$VARS`` expanded); FileNotFoundError naming it."""
    path = Path(_expand(os.fspath(checkpoint)))
    if not path.is_file():
        raise FileNotFoundError(
            f"{config_key}.checkpoint={os.fspath(checkpoint)!r}: no such file ({path.absolute()})"
        )
    return path


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def cached_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed, and cached per resolved path, size and modification time."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _sha256_cached(str(resolved), stat.st_size, stat.st_mtime_ns)


def file_provenance(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Provenance of weights loaded from a local file: its absolute path and sha256."""
    resolved = Path(path).resolve()
    return {"source": str(resolved), "pretrained": True, "sha256": cached_sha256(resolved)}


def hf_provenance(repo: str, filename: str, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Provenance of weights from the HF hub: ``hf:<repo>/<filename>``, the file's sha256 and, when the
    cache path shows it (``.../snapshots/<commit>/<filename>``), the commit they came from."""
    prov: dict[str, Any] = {
        "source": f"hf:{repo}/{filename}",
        "pretrained": True,
        "sha256": cached_sha256(path),
    }
    parts = Path(path).parts
    n_name = len(Path(filename).parts)
    if len(parts) > n_name + 1 and parts[-n_name - 2] == "snapshots" and _COMMIT_RE.match(parts[-n_name - 1]):
        prov["revision"] = parts[-n_name - 1]
    return prov


def trained_checkpoint(checkpoint: str | None, final_name: str, usage: str) -> Path:
    """The checkpoint file a trained model's representation reads (``representation=betavae``, ``pocket_vae``):
    ``checkpoint`` itself, or ``checkpoints/<final_name>`` in the run directory it names.

    Raises:
        ValueError: none given (``usage`` says what to give), or an unresolved ``latest`` run reference.
    """
    if not checkpoint:
        raise ValueError(usage)
    if str(checkpoint).startswith("latest"):
        raise ValueError(
            f"representation.checkpoint={checkpoint} is a run reference; it is resolved through the run "
            "manifest by the pipeline (latentdyn.pipeline.store), not here"
        )
    path = Path(checkpoint).expanduser()
    return path / "checkpoints" / final_name if path.is_dir() else path


def random_provenance(seed: int, **extra: Any) -> dict[str, Any]:
    """Provenance of randomly initialised weights drawn with ``seed`` (``extra`` is merged in)."""
    return {"source": "random", "pretrained": False, "seed": int(seed), **extra}


def locate_pretrained(
    *,
    checkpoint: str | os.PathLike[str] | None,
    hf_repo: str,
    filename: str,
    revision: str | None = None,
    config_key: str = "representation",
) -> WeightsFile:
    """The weights file for a pretrained representation and its provenance.

    A given ``checkpoint`` must exist (FileNotFoundError otherwise) and is used as is; without one the
    file comes from the HF hub (:func:`resolve_hf_file`, WeightsUnavailableError when it cannot).
    """
    if checkpoint is not None and os.fspath(checkpoint) != "":
        path = resolve_checkpoint(checkpoint, config_key=config_key)
        return WeightsFile(path, file_provenance(path))
    path = resolve_hf_file(hf_repo, filename, revision=revision, config_key=config_key)
    return WeightsFile(path, hf_provenance(hf_repo, filename, path))


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Run a block (module construction on CPU) with the CPU RNG seeded to ``seed``, restoring it after.

    ``torch.nn`` initialisers draw from the global generator; forking it makes random weights a function
    of ``seed`` alone while leaving the caller's random stream where it was. Only the CPU generator is
    forked, so build on CPU and move the module afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield
