"""The base of every storage that wraps another one (nbdkit's filters: ``next``).

:class:`ForwardingStorage` forwards every Storage method to ``inner``, one explicit line each,
so a subclass overrides only what it adds.  nbdkit's filter docs warn that a call passed on
silently can corrupt data: when the Storage interface grows a method, it is added here once,
and every layer forwards it (tests/unit/storage/test_layers.py checks that none is missed).

Ownership of ``inner`` is stated at construction: an owned storage is closed by ``close``
(a layer built over a storage it was handed); a borrowed one is left to its owner (a volume's
storage lent to a temporary server).
"""

from __future__ import annotations

import dataclasses

from backend.storage.base import Capabilities, Extent, Request, Storage


class ForwardingStorage(Storage):
    """``inner``, unchanged.  ``owns_inner``: ``close`` closes ``inner`` (else the caller
    does, after this storage is closed).  Capabilities and size are the inner storage's."""

    def __init__(self, inner: Storage, *, owns_inner: bool = True) -> None:
        self._inner = inner
        self._owns_inner = owns_inner

    @property
    def inner(self) -> Storage:
        return self._inner

    @property
    def size(self) -> int:
        return self._inner.size

    @property
    def capabilities(self) -> Capabilities:
        caps = self._inner.capabilities
        # submit() is not passed on (below), so it is not declared either.
        return dataclasses.replace(caps, can_submit=False) if caps.can_submit else caps

    def read(self, offset: int, length: int) -> bytes:
        return self._inner.read(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self._inner.write(offset, data, fua)

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> None:
        self._inner.write_zeroes(offset, length, fua, may_trim, fast)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._inner.trim(offset, length, fua)

    def flush(self) -> None:
        self._inner.flush()

    def cache(self, offset: int, length: int) -> None:
        self._inner.cache(offset, length)

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self._inner.extents(offset, length)

    def resize(self, new_size: int, *, allow_shrink: bool = False) -> None:
        self._inner.resize(new_size, allow_shrink=allow_shrink)

    def submit(self, request: Request) -> object | None:
        # Refused, not forwarded: a request submitted to ``inner`` would skip this layer's
        # write (a cache to update, a retry to make).
        return Storage.submit(self, request)

    def wait(self, handle: object, timeout: float, *, keep: bool = False) -> bool:
        return Storage.wait(self, handle, timeout, keep=keep)

    def inline_ready(self) -> bool:
        return self._inner.inline_ready()

    def close(self) -> None:
        """Close ``inner`` if owned; a borrowed one stays open for its owner."""
        if self._owns_inner:
            self._inner.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._inner!r})"
