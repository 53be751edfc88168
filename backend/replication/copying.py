"""Copying regions from one member to another: holes skipped, pace set by a token bucket.

Reconcile (after an engine crash) and resync (of a returning member) both copy a range of the
volume from a member that is current to one that may not be; neither may spend bandwidth on
holes (the source's extents say where they are), and resync must leave room for guest I/O.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from backend.storage.base import Storage, StorageError

# Big enough to amortise a request's round trip, small enough that a guest write waiting on
# the range lock of the piece being copied waits for at most one piece.
COPY_PIECE = 1024 * 1024


class TokenBucket:
    """At most ``rate`` bytes per second on average, bursts up to ``burst`` bytes; ``rate``
    0 means unlimited.  ``take`` sleeps until the bytes are available (the caller holds no
    lock meanwhile, so guest I/O goes first)."""

    def __init__(
        self,
        rate: float,
        burst: int = COPY_PIECE,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._rate = rate
        self._burst = max(burst, 1)
        self._tokens = float(self._burst)
        self._clock = clock
        self._sleep = sleep
        self._last = clock()
        self._lock = threading.Lock()

    def take(self, amount: int) -> None:
        if self._rate <= 0:
            return
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
            # Going into debt lets a piece larger than the burst through, paid for by waiting.
            self._tokens -= amount
            debt = -self._tokens
        if debt > 0:
            self._sleep(debt / self._rate)


class CopyError(Exception):
    """A copy failed on one side: ``source`` says which, ``error`` is the StorageError."""

    def __init__(self, source: bool, error: StorageError) -> None:
        super().__init__(f"{'source' if source else 'target'}: {error}")
        self.source = source
        self.error = error


def copy_range(source: Storage, target: Storage, offset: int, length: int) -> int:
    """Make ``[offset, offset+length)`` of ``target`` equal to ``source``'s; return the bytes
    of data copied (holes and zero runs are zeroed on the target, not copied).  Raises
    CopyError naming the side that failed, so the caller knows which member to blame."""
    copied = 0
    end = offset + length
    pos = offset
    while pos < end:
        with _blame(source=True):
            extents = source.extents(pos, end - pos)
        for extent in extents:
            at, stop = extent.offset, extent.offset + extent.length
            if extent.zero or extent.hole:
                with _blame(source=False):
                    target.write_zeroes(at, extent.length, may_trim=True)
            while at < stop and not (extent.zero or extent.hole):
                n = min(COPY_PIECE, stop - at)
                with _blame(source=True):
                    data = source.read(at, n)
                with _blame(source=False):
                    target.write(at, data)
                copied += n
                at += n
            pos = stop
    return copied


@contextlib.contextmanager
def _blame(source: bool) -> Iterator[None]:
    try:
        yield
    except StorageError as err:
        raise CopyError(source, err) from err
