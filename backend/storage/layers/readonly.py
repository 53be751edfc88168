"""A read-only view of a storage that stays writable for its owner.

:class:`ReadOnlyStorage` passes reads, extents and cache hints to ``inner`` and refuses every
write, zero and trim with EPERM; a flush does nothing (nothing was written through it).  It
borrows ``inner`` by default: the view of a replicated volume whose engine serves it in this
process reads through that engine, which stays open for its clients (a second engine would
take a new epoch and fence the first: docs/replication.md, "Read-only views and snapshots").
"""

from __future__ import annotations

import dataclasses
import errno

from backend.storage.base import Capabilities, Storage, StorageError
from backend.storage.layers.forwarding import ForwardingStorage


class ReadOnlyStorage(ForwardingStorage):
    """``inner``, read only.  ``owns_inner`` (default False): ``close`` closes ``inner``."""

    def __init__(self, inner: Storage, *, owns_inner: bool = False) -> None:
        super().__init__(inner, owns_inner=owns_inner)
        self._caps = dataclasses.replace(
            super().capabilities,
            read_only=True,
            can_flush=False,
            can_fua=False,
            can_trim=False,
            can_zero=False,
            can_fast_zero=False,
            can_resize=False,
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        raise self._refused()

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> None:
        raise self._refused()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        raise self._refused()

    def flush(self) -> None:
        """Nothing was written through this view: nothing to make durable."""

    def resize(self, new_size: int, *, allow_shrink: bool = False) -> None:
        raise self._refused()

    def _refused(self) -> StorageError:
        return StorageError(errno.EPERM, "a read-only view")
