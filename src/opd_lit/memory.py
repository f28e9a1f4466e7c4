"""Process-level memory settings of a training run.

:func:`return_freed_memory`: on Linux with glibc, malloc serves a large block from the heap
once a block of that size has been freed (its mmap threshold rises with every such free, up to
32 MiB), and a heap holed by the step's many MiB-sized temporaries (one decoding step's
``[B, V]`` blocks, vocabulary tiles, optimizer temporaries) is not given back to the system.
Fixing the threshold at glibc's own starting value keeps blocks of 128 KiB and more in their
own mappings, returned when freed: measured on the Qwen3-shaped pair with the 151,936-token
vocabulary (``docs/performance.md``), the first 64-token rollout peaks 65 MiB above the loaded
model instead of 170-265 MiB, and the run's peak RSS drops by about 190 MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 128 * 1024
_applied = False


def return_freed_memory() -> bool:
    """Fix glibc malloc's mmap threshold (see the module docstring); True when it was set.
    A no-op elsewhere (not Linux, not glibc) and when already applied."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False  # not glibc, or the user set it (glibc reads the variable at start-up)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    if not _applied:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; freed memory may stay in the heap")
    return _applied
