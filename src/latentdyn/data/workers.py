"""The process start method of DataLoader workers.

A job of a parallel Hydra sweep (``hydra/launcher=joblib``) runs in a loky worker process, where the default
multiprocessing context is loky's own; its ``Process`` class cannot start a DataLoader's workers (they are
plain ``multiprocessing.Process`` objects). Loaders therefore name a standard start method explicitly.
"""

from __future__ import annotations

import multiprocessing
import sys
from multiprocessing.context import BaseContext

#: The start methods multiprocessing itself provides; any other default (loky's) is replaced.
STANDARD_METHODS = ("fork", "spawn", "forkserver")


def worker_context(num_workers: int) -> BaseContext | None:
    """The ``multiprocessing_context`` for a DataLoader with ``num_workers`` workers: None (the default) when it
    has none or the process's default start method is a standard one; else the platform's standard method
    (``fork`` on Linux, as torch uses there; ``spawn`` elsewhere)."""
    if int(num_workers) <= 0:
        return None
    if multiprocessing.get_start_method(allow_none=True) in (*STANDARD_METHODS, None):
        return None
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
