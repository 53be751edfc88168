"""A read-only view of identical copies: reads from one, and from the next when it fails.

:class:`FailoverStorage` serves reads and extents from one copy (a replica of a replicated
volume, or a replica's snapshot), opened when first needed; a copy that fails with a
StorageError (its node down, its connection gone) is set aside and the request done again on
the next one.  Which copies may be read, and in what order, is asked of ``sources``, which
returns them with a *version*: a number that changes whenever that set may have changed (a
replicated volume's membership generation; a constant for snapshots, which never change).
A result is returned only if the version after the request is still the one the copy was
chosen under, so a read never comes from a copy that was dropped from the set while it ran
(a replica failed, or was resyncing, meanwhile): otherwise it is done again on a copy of the
new set.  Nothing is ever written: writes, zeroes and trims fail with EPERM.

A copy set aside stays open until the view is closed (another thread may still be reading
from it); the view owns every copy it opened.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from backend.storage.base import Capabilities, Extent, Storage, StorageError

log = logging.getLogger(__name__)

# Version changes one request may meet before it gives up (a set that changes all the time).
MAX_VERSION_CHANGES = 8

Sources = Callable[[], tuple[int, Sequence[str]]]
T = TypeVar("T")


class FailoverStorage(Storage):
    """``name`` (for messages), ``size`` bytes read from whichever copy of ``sources()``
    answers; ``open_copy(source)`` opens one (StorageError if it cannot).  Opens the first
    copy that answers now: StorageError naming every copy tried, and why, if none does.
    Thread safe."""

    def __init__(
        self, name: str, size: int, sources: Sources, open_copy: Callable[[str], Storage]
    ) -> None:
        self._name = name
        self._size = size
        self._sources = sources
        self._open_copy = open_copy
        self._lock = threading.Lock()
        self._current: tuple[str, Storage, int] | None = None  # source, its storage, version
        self._set_aside: list[Storage] = []
        self._closed = False
        self._declared: Capabilities | None = None  # once the first copy is open
        _, storage, _ = self._choose({})
        caps = storage.capabilities
        self._declared = Capabilities(
            read_only=True,
            can_flush=False,
            can_fua=False,
            can_trim=False,
            can_zero=False,
            can_extents=caps.can_extents,
            cheap_extents=False,
            can_cache=False,
            can_multi_conn=False,
            thread_safe=True,
            inline=False,
            min_block=caps.min_block,
            preferred_block=caps.preferred_block,
            max_block=caps.max_block,
        )

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        assert self._declared is not None
        return self._declared

    @property
    def source(self) -> str | None:
        """The copy reads go to now (None before one is chosen again)."""
        with self._lock:
            return self._current[0] if self._current is not None else None

    def _choose(self, failed: dict[str, str]) -> tuple[str, Storage, int]:
        """The copy to use: the current one unless it failed in this request, else the first
        of ``sources()`` that did not and opens (the reasons of those that do not go into
        ``failed``)."""
        with self._lock:
            if self._closed:
                raise StorageError(errno.EBADF, f"{self._name}: the view is closed")
            if self._current is not None and self._current[0] not in failed:
                return self._current
            version, sources = self._sources()
            for source in sources:
                if source in failed:
                    continue
                try:
                    storage = self._open_copy(source)
                except StorageError as err:
                    failed[source] = err.message
                    continue
                unfit = self._unfit(storage)
                if unfit:
                    failed[source] = unfit
                    self._set_aside.append(storage)
                    continue
                if self._current is not None:
                    self._set_aside.append(self._current[1])
                self._current = (source, storage, version)
                return self._current
            tried = "; ".join(f"{s}: {why}" for s, why in failed.items()) or "none is readable"
            raise StorageError(errno.EIO, f"no copy of {self._name} answered ({tried})")

    def _unfit(self, storage: Storage) -> str:
        """Why ``storage`` cannot serve this view ("" if it can)."""
        if storage.size < self._size:
            return f"it holds {storage.size} bytes, not {self._size}"
        if self._declared is not None and (
            storage.capabilities.min_block > self._declared.min_block
        ):
            return f"it needs blocks of {storage.capabilities.min_block} bytes"
        return ""

    def _set_current_aside(self, storage: Storage) -> None:
        with self._lock:
            if self._current is not None and self._current[1] is storage:
                self._set_aside.append(storage)
                self._current = None

    def _do(self, call: Callable[[Storage], T]) -> T:
        failed: dict[str, str] = {}
        changes = 0
        while True:
            source, storage, version = self._choose(failed)
            try:
                result = call(storage)
            except StorageError as err:
                log.warning("%s: copy %s failed, trying another: %s", self._name, source, err)
                failed[source] = err.message
                self._set_current_aside(storage)
                continue
            now, sources = self._sources()
            if now == version:
                return result
            # The set changed while the request ran: its result counts only if done again
            # under the new version, on a copy still in the set.
            changes += 1
            if changes >= MAX_VERSION_CHANGES:
                raise StorageError(errno.EIO, f"{self._name}: the set of copies kept changing")
            with self._lock:
                if self._current is not None and self._current[1] is storage:
                    if source in sources:
                        self._current = (source, storage, now)
                    else:
                        self._set_aside.append(storage)
                        self._current = None

    def read(self, offset: int, length: int) -> bytes:
        return self._do(lambda storage: storage.read(offset, length))

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self._do(lambda storage: storage.extents(offset, length))

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        raise self._read_only()

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> None:
        raise self._read_only()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        raise self._read_only()

    def flush(self) -> None:
        """Nothing was written through this view."""

    def cache(self, offset: int, length: int) -> None:
        """Advisory: nothing to prefetch into."""

    def _read_only(self) -> StorageError:
        return StorageError(errno.EPERM, f"{self._name} is a read-only view")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            storages = self._set_aside + ([self._current[1]] if self._current else [])
            self._set_aside, self._current = [], None
        for storage in storages:
            try:
                storage.close()
            except StorageError as err:
                log.warning("%s: closing a copy: %s", self._name, err)

    def __repr__(self) -> str:
        return f"FailoverStorage({self._name})"
