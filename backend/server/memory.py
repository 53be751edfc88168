"""Make freed payload buffers go back to the operating system (issue 10, item 9).

glibc serves an allocation over its mmap threshold with its own mapping, returned on free.
The threshold is dynamic, though: the first time such a block is freed, glibc raises the
threshold to its size, and from then on buffers of that size come from the heaps of the
malloc arenas, which keep freed memory.  Clients that announce large WRITEs and leave then
grew the server's RSS by tens of MiB that never came back (measured: 49 -> 107 MiB after 64
abandoned 32 MiB WRITEs in 4 rounds and 400 sessions; 51 -> 59 MiB with the thresholds
fixed, tests/integration/test_server_load.py).  Fixing the
threshold at the payload piece size keeps the small, frequent buffers (1 MiB reads and
writes, recycled per session) on the heap and sends the rare large ones to mmap.  A fixed
threshold also freezes the heap trim threshold at 128 KiB, which would give back and fault
in again the top of the heap around every 1 MiB read; it is set to twice the mmap threshold,
what glibc's dynamic rule would pick.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


def release_large_buffers(threshold: int) -> bool:
    """Allocations of ``threshold`` bytes or more get their own mapping from now on.

    Process-wide; a no-op returning False where the C library is not glibc (musl maps large
    blocks itself)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 2 * threshold)
    )
    if not done:
        log.debug("mallopt(M_MMAP_THRESHOLD/M_TRIM_THRESHOLD, %d) failed", threshold)
    return done
