"""Locks shared by the chunk-based storages: a lock over ranges of chunk numbers, and a
shared/exclusive lock that lets snapshots and resizes wait for requests in flight."""

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


class SharedLock:
    """Many shared holders or one exclusive holder.  A waiting exclusive holder blocks new
    shared ones, so a snapshot is not starved by a steady stream of requests."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    def acquire_shared(self) -> None:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1

    def release_shared(self) -> None:
        with self._cond:
            self._shared -= 1
            if not self._shared and self._waiting:
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()
