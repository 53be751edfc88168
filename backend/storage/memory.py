"""A sparse in-memory storage, for tests, benchmarks and scratch volumes.

Data lives in fixed-size pages kept in a dict, so a volume costs memory only for the pages that
were written: a 1 TiB MemoryStorage is free until used.  Missing pages read as zeroes and are
reported by :meth:`MemoryStorage.extents` as holes.  Nothing is durable: flush and FUA are
accepted and do nothing.
"""

from __future__ import annotations

import errno
import threading

from backend.storage.base import Capabilities, Extent, Storage, StorageError

PAGE_SIZE = 64 * 1024
# Extents returned per call at most; the contract allows covering less than the asked range.
MAX_EXTENTS = 1024

_ZERO_PAGE = bytes(PAGE_SIZE)
_ZERO_VIEW = memoryview(_ZERO_PAGE)

_WRITABLE = Capabilities(can_fast_zero=True, can_resize=True)
# A read-only storage advertises nothing that would modify it.
_READ_ONLY = Capabilities(read_only=True, can_trim=False, can_zero=False)


class MemoryStorage(Storage):
    """A ``size``-byte volume kept in memory, zero-filled and sparse.

    Thread safe: one lock serialises every request, which keeps each request atomic with
    respect to the others.  When ``read_only`` the volume stays all zeroes and every mutating
    call raises ``StorageError(EPERM)``.  After :meth:`close` the data is gone and every call
    but ``close`` raises ``StorageError(EBADF)``.
    """

    def __init__(self, size: int, read_only: bool = False) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, not {size}")
        self._size = size
        self._read_only = read_only
        self._capabilities = _READ_ONLY if read_only else _WRITABLE
        self._pages: dict[int, bytearray] = {}
        self._lock = threading.Lock()
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def allocated_pages(self) -> int:
        """How many pages hold data (for tests and memory accounting)."""
        with self._lock:
            return len(self._pages)

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            self._check_open()
            first, start = divmod(offset, PAGE_SIZE)
            if start + length <= PAGE_SIZE:
                page = self._pages.get(first)
                if page is None:
                    return bytes(length)
                return bytes(memoryview(page)[start : start + length])
            # Join slices of the pages so the result is built with a single copy.
            parts: list[memoryview] = []
            index, remaining = first, length
            while remaining > 0:
                chunk = min(PAGE_SIZE - start, remaining)
                page = self._pages.get(index)
                view = _ZERO_VIEW if page is None else memoryview(page)
                parts.append(view[start : start + chunk])
                remaining -= chunk
                index, start = index + 1, 0
            return b"".join(parts)

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        with self._lock:
            self._check_writable()
            view = memoryview(data).cast("B")
            index, start = divmod(offset, PAGE_SIZE)
            done = 0
            while done < len(view):
                chunk = min(PAGE_SIZE - start, len(view) - done)
                if chunk == PAGE_SIZE:
                    self._pages[index] = bytearray(view[done : done + chunk])
                else:
                    page = self._pages.get(index)
                    if page is None:
                        page = self._pages[index] = bytearray(PAGE_SIZE)
                    page[start : start + chunk] = view[done : done + chunk]
                done += chunk
                index, start = index + 1, 0

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> None:
        """Zero the range; always fast.

        With ``may_trim`` whole pages in the range are dropped; without it they are zeroed in
        place so they stay allocated, as NBD's NO_HOLE asks.  Pages never written stay
        unallocated either way: they already read as zeroes.
        """
        with self._lock:
            self._check_writable()
            self._zero(offset, length, drop=may_trim)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Drop the whole pages in the range and zero the partial ones at its edges."""
        with self._lock:
            self._check_writable()
            self._zero(offset, length, drop=True)

    def flush(self) -> None:
        with self._lock:
            self._check_open()

    def cache(self, offset: int, length: int) -> None:
        with self._lock:
            self._check_open()

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Allocated pages are data; missing pages are holes that read as zeroes.

        Adjacent pages of the same kind are merged; at most ``MAX_EXTENTS`` are returned.
        """
        with self._lock:
            self._check_open()
            end = offset + length
            first, last = offset // PAGE_SIZE, (end - 1) // PAGE_SIZE
            if last - first + 1 > len(self._pages):
                allocated = sorted(i for i in self._pages if first <= i <= last)
            else:
                allocated = [i for i in range(first, last + 1) if i in self._pages]
        result: list[Extent] = []
        pos = offset
        for index in allocated:
            page_start = index * PAGE_SIZE
            if page_start > pos:
                _append(result, pos, page_start, hole=True)
                pos = page_start
            page_end = min(page_start + PAGE_SIZE, end)
            _append(result, pos, page_end, hole=False)
            pos = page_end
            if len(result) >= MAX_EXTENTS:
                return result[:MAX_EXTENTS]
        if pos < end:
            _append(result, pos, end, hole=True)
        return result[:MAX_EXTENTS]

    def resize(self, new_size: int, *, allow_shrink: bool = False) -> None:
        """Grow (the new range reads as zeroes) or, with ``allow_shrink``, shrink (what lies
        past the new end is dropped)."""
        if new_size < 0:
            raise ValueError(f"size must be >= 0, not {new_size}")
        with self._lock:
            self._check_writable()
            if new_size < self._size:
                if not allow_shrink:
                    raise StorageError(
                        errno.EINVAL,
                        f"shrinking from {self._size} to {new_size} bytes needs allow_shrink",
                    )
                self._zero(new_size, self._size - new_size, drop=True)
            self._size = new_size

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._pages.clear()

    def _zero(self, offset: int, length: int, drop: bool) -> None:
        if length <= 0:
            return
        end = offset + length
        first, last = offset // PAGE_SIZE, (end - 1) // PAGE_SIZE
        # Huge trims (mkfs discards the whole device) over a sparse volume visit only the
        # allocated pages instead of every page number in the range.
        if last - first + 1 > len(self._pages):
            indexes = [i for i in self._pages if first <= i <= last]
        else:
            indexes = [i for i in range(first, last + 1) if i in self._pages]
        for index in indexes:
            page = self._pages[index]
            page_start = index * PAGE_SIZE
            start = max(offset, page_start) - page_start
            stop = min(end, page_start + PAGE_SIZE) - page_start
            if start == 0 and stop == PAGE_SIZE:
                if drop:
                    del self._pages[index]
                else:
                    page[:] = _ZERO_PAGE
            else:
                page[start:stop] = _ZERO_VIEW[: stop - start]
                if drop and page == _ZERO_PAGE:
                    del self._pages[index]

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(errno.EBADF, "memory storage is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._read_only:
            raise StorageError(errno.EPERM, "memory storage is read-only")


def _append(result: list[Extent], start: int, stop: int, hole: bool) -> None:
    """Append ``[start, stop)``, merging with the previous extent when of the same kind."""
    if result and result[-1].hole == hole:
        prev = result.pop()
        result.append(Extent(prev.offset, stop - prev.offset, hole=hole, zero=hole))
    else:
        result.append(Extent(start, stop - start, hole=hole, zero=hole))
