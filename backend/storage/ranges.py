"""A lock over ranges of chunk numbers, shared by the chunk-based storages."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class RangeLock:
    """Mutual exclusion over ranges of chunk numbers.

    Holding ``[first, stop)`` is equivalent to holding a lock per chunk taken in ascending
    order, but all at once: no deadlock (a range is granted only when no held range overlaps
    it), and O(1) for a request over millions of chunks.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._held: list[tuple[int, int]] = []

    @contextlib.contextmanager
    def hold(self, first: int, stop: int) -> Iterator[None]:
        with self._cond:
            while any(a < stop and first < b for a, b in self._held):
                self._cond.wait()
            self._held.append((first, stop))
        try:
            yield
        finally:
            with self._cond:
                self._held.remove((first, stop))
                self._cond.notify_all()
