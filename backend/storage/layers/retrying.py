"""Retries of transient storage errors, with exponential backoff and jitter.

A request that fails with a transient errno (``EIO``, ``ETIMEDOUT``, ``EAGAIN``...) is sent
again after ``backoff``, then twice that, and so on up to ``max_backoff``, each wait scaled by
a random factor in [0.5, 1] so that many clients do not retry in step.  It gives up after
``attempts`` tries or once the next try would start past ``deadline`` seconds, and raises the
last error unchanged.  Other errors (``EPERM``, ``ENOSPC``, ``EINVAL``, ``ENOTSUP``,
``EBADF``...) are raised at once.

Every request is safe to repeat: a write of the same bytes to the same place, a zeroing, a
trim and a flush all end in the same state however often they run.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable, Collection
from typing import TypeVar

from backend.storage.base import Extent, Storage, StorageError
from backend.storage.layers.forwarding import ForwardingStorage

logger = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.ETIMEDOUT,
        errno.EAGAIN,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.EBUSY,
        errno.EINTR,
    }
)


class RetryingStorage(ForwardingStorage):
    """``inner`` with transient errors retried.  Owns ``inner``: ``close`` closes it (once,
    not retried: close must release what it can and be idempotent).

    ``sleep`` is for tests (a fake clock).  Capabilities are the inner storage's.  ``resize``
    is forwarded once, not retried: a resize that half failed is not idempotent.
    """

    def __init__(
        self,
        inner: Storage,
        *,
        attempts: int = 5,
        backoff: float = 0.05,
        max_backoff: float = 2.0,
        deadline: float = 30.0,
        retry_errnos: Collection[int] = TRANSIENT_ERRNOS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, not {attempts}")
        super().__init__(inner)
        self._attempts = attempts
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._deadline = deadline
        self._retry_errnos = frozenset(retry_errnos)
        self._sleep = sleep
        self._random = random.Random()
        self.retries = 0

    def read(self, offset: int, length: int) -> bytes:
        return self._retry("read", lambda: self._inner.read(offset, length))

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self._retry("write", lambda: self._inner.write(offset, data, fua))

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> None:
        self._retry(
            "write_zeroes",
            lambda: self._inner.write_zeroes(offset, length, fua, may_trim, fast),
        )

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._retry("trim", lambda: self._inner.trim(offset, length, fua))

    def flush(self) -> None:
        self._retry("flush", self._inner.flush)

    def cache(self, offset: int, length: int) -> None:
        self._retry("cache", lambda: self._inner.cache(offset, length))

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self._retry("extents", lambda: self._inner.extents(offset, length))

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        give_up_at = time.monotonic() + self._deadline
        attempt = 1
        while True:
            try:
                return call()
            except StorageError as err:
                if err.errno not in self._retry_errnos or attempt >= self._attempts:
                    raise
                delay = min(self._max_backoff, self._backoff * 2 ** (attempt - 1))
                delay *= self._random.uniform(0.5, 1.0)
                if time.monotonic() + delay > give_up_at:
                    raise
                logger.warning(
                    "%s failed (%s), attempt %d of %d; retrying in %.3f s",
                    what,
                    err,
                    attempt,
                    self._attempts,
                    delay,
                )
                self.retries += 1
                self._sleep(delay)
                attempt += 1

    def __repr__(self) -> str:
        return f"RetryingStorage({self._inner!r}, attempts={self._attempts})"
