"""Process-wide allocator tuning for processes that move camera frames (the node, the test camera).

Why: glibc serves every allocation above ``M_MMAP_THRESHOLD`` (128 KiB at start; its dynamic
adjustment did not kick in for the rclpy/NumPy allocation pattern here) with a fresh ``mmap`` and
returns it to the kernel on ``free``. A 640x480 rgb8 frame is 900 KiB, so every message taken or
serialised, every label image and every temporary array of a frame then starts on untouched
pages, and the first write to each 4 KiB page is a page fault. On the project's 2-core VM that
costs about 5 us per page: measured 2.6 ms to serialise one 640x480 rgb8 Image (0.15 ms with the
setting below), 3 ms for a 640x480 float -> uint16 conversion (0.8 ms).

With the threshold raised to glibc's maximum and trimming deferred, frame-sized buffers come from
the heap and are reused frame after frame; the resident size settles at the per-frame peak
instead of being handed back and faulted in again 30 times a second.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["keep_large_allocations_on_heap", "MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES"]

_LOG = logging.getLogger("mafr_ros.memory")
# glibc's upper bound for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2): larger values are refused.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
# Free heap memory is only returned to the kernel beyond this much at the top of the heap.
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024
_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
_applied: bool | None = None


def keep_large_allocations_on_heap() -> bool:
    """Raise glibc's mmap and trim thresholds (see the module docstring); True if applied.

    Idempotent. A no-op (False) on a C library other than glibc (musl, macOS, Windows), where the
    tuning does not apply; nothing else changes.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; the trim threshold first so that nothing is trimmed between.
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and ok
    if not ok:
        _LOG.debug("mallopt refused the mmap/trim thresholds; allocator left as it is")
    _applied = ok
    return ok
