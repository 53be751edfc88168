"""A fault-injecting ObjectStore wrapper, for tests: errors, delays and hangs on demand."""

from __future__ import annotations

import collections
import errno as errno_mod
import random
import threading
import time
from collections.abc import Callable, Collection, Iterator
from typing import TypeVar

from backend.storage.base import StorageError
from backend.storage.objects.base import ObjectStore

T = TypeVar("T")


class FaultyObjectStore(ObjectStore):
    """Forwards every call to ``inner`` after maybe delaying, hanging or failing it.

    * ``fail_rate``: the probability that an eligible call fails with ``StorageError(errno)``
      *before* reaching ``inner`` (so a failed call changes nothing).
    * ``fail_keys``: when given, only calls on these keys are eligible (``list``, ``sync`` and
      ``close`` have no key and are eligible only when ``fail_keys`` is ``None``).
    * ``fail_ops``: when given, only these method names are eligible (``"put"``, ``"get"``…).
    * ``delay``: seconds slept before every call.
    * ``hang``: when given, every call waits until the event is set.
    * ``seed``: makes the failures reproducible.

    Every setting is a public attribute and may be changed while the store is in use.
    ``calls`` and ``failures`` count calls and injected failures by method name.  ``close`` is
    forwarded and never fails.
    """

    def __init__(
        self,
        inner: ObjectStore,
        *,
        fail_rate: float = 0.0,
        errno: int = errno_mod.EIO,
        delay: float = 0.0,
        seed: int | None = None,
        fail_keys: Collection[str] | None = None,
        fail_ops: Collection[str] | None = None,
        hang: threading.Event | None = None,
    ) -> None:
        self.inner = inner
        self.supports_offset_writes = inner.supports_offset_writes
        self.fail_rate = fail_rate
        self.errno = errno
        self.delay = delay
        self.fail_keys = fail_keys
        self.fail_ops = fail_ops
        self.hang = hang
        self.calls: collections.Counter[str] = collections.Counter()
        self.failures: collections.Counter[str] = collections.Counter()
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        return self._call("get", key, lambda: self.inner.get(key))

    def get_range(self, key: str, offset: int, length: int) -> bytes | None:
        return self._call("get_range", key, lambda: self.inner.get_range(key, offset, length))

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        self._call("put", key, lambda: self.inner.put(key, data))

    def put_range(self, key: str, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._call("put_range", key, lambda: self.inner.put_range(key, offset, data))

    def delete(self, key: str) -> None:
        self._call("delete", key, lambda: self.inner.delete(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        return self._call("list", None, lambda: self.inner.list(prefix))

    def sync(self) -> None:
        self._call("sync", None, self.inner.sync)

    def close(self) -> None:
        with self._lock:
            self.calls["close"] += 1
        self.inner.close()

    def _call(self, op: str, key: str | None, forward: Callable[[], T]) -> T:
        if self.hang is not None:
            self.hang.wait()
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            self.calls[op] += 1
            eligible = (self.fail_ops is None or op in self.fail_ops) and (
                self.fail_keys is None or (key is not None and key in self.fail_keys)
            )
            fail = eligible and self.fail_rate > 0 and self._random.random() < self.fail_rate
            if fail:
                self.failures[op] += 1
        if fail:
            raise StorageError(self.errno, f"injected fault in {op} {key or ''}".rstrip())
        return forward()
