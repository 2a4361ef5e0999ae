"""Process-level settings for long jobs."""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3


def return_large_frees_to_the_os(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations above ``threshold_bytes`` with mmap so freeing them returns memory to the OS.

    glibc otherwise raises its mmap threshold after the first large free (up to 32 MiB), after which
    every batch-sized buffer (10-30 MB during extraction) comes from a heap that only grows: peak memory
    then creeps up with corpus size instead of staying flat. Returns whether the setting was applied
    (it is a no-op outside glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False
