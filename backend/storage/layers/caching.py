"""A bounded LRU block cache in front of a storage, shared by every connection.

One cache per storage (not per connection), so every connection sees every other one's
writes and CAN_MULTI_CONN stays whatever the inner storage says.

* Write-through (the default): writes, zeroing and trims go to the inner storage first, then
  drop the cached blocks they touched.  The cache never holds anything the inner storage does
  not, so it can never serve stale data nor lose any on a crash.
* Write-back (``write_back=True``): writes land in cached blocks marked dirty; a dirty block
  reaches the inner storage when it is evicted, on ``flush`` (then the inner storage is
  flushed), before an ``extents``, ``trim`` or ``write_zeroes`` that touches it, and on
  ``close``.  A FUA write goes through to the inner storage with FUA.  The risk is a disk
  cache's: writes not yet flushed are lost on a crash, which NBD allows; FLUSH and FUA are
  still honoured.  Mutations hold the cache lock across their inner I/O, so write-back
  trades concurrency for latency.

Reads of missing blocks go to the inner storage without the lock and fill the cache only if
no mutation happened meanwhile (a counter tells), so a slow read never blocks the others and
never caches data that a concurrent write just replaced.
"""

from __future__ import annotations

import collections
import errno
import threading
from collections.abc import Callable

from backend.storage.base import Extent, Storage, StorageError
from backend.storage.layers.forwarding import ForwardingStorage

DEFAULT_BLOCK = 64 * 1024

_Buffer = bytes | bytearray | memoryview


class CachingStorage(ForwardingStorage):
    """Caches up to ``capacity_bytes`` of ``inner`` in ``block``-byte blocks (LRU).

    Owns ``inner``: ``close`` closes it.  ``block`` must be a power of two; a capacity smaller
    than one block caches nothing.  Capabilities are the inner storage's.
    """

    def __init__(
        self,
        inner: Storage,
        capacity_bytes: int,
        *,
        block: int = DEFAULT_BLOCK,
        write_back: bool = False,
    ) -> None:
        if block < 512 or block & (block - 1):
            raise ValueError(f"block must be a power of two >= 512, not {block}")
        if capacity_bytes < 0:
            raise ValueError(f"capacity must be >= 0, not {capacity_bytes}")
        super().__init__(inner)
        self._block = block
        self._capacity = capacity_bytes // block
        self._write_back = write_back
        self._size = inner.size
        self._blocks: collections.OrderedDict[int, bytearray] = collections.OrderedDict()
        self._dirty: set[int] = set()
        self._lock = threading.RLock()
        self._mutations = 0
        self._closed = False
        self.hits = 0
        self.misses = 0

    @property
    def size(self) -> int:
        return self._size

    @property
    def cached_blocks(self) -> int:
        with self._lock:
            return len(self._blocks)

    @property
    def dirty_blocks(self) -> int:
        with self._lock:
            return len(self._dirty)

    # -- Reads -------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        self._check_open()
        if length <= 0:
            return b""
        bs = self._block
        first, last = offset // bs, (offset + length - 1) // bs
        found: dict[int, bytes] = {}
        with self._lock:
            seen = self._mutations
            for index in range(first, last + 1):
                cached = self._blocks.get(index)
                if cached is not None:
                    self._blocks.move_to_end(index)
                    found[index] = bytes(cached)
            self.hits += len(found)
            self.misses += last - first + 1 - len(found)
        missing = [i for i in range(first, last + 1) if i not in found]
        fetched: dict[int, bytes] = {}
        for start, stop in _runs(missing):
            data = self._inner.read(start * bs, min(stop * bs, self._size) - start * bs)
            for index in range(start, stop):
                fetched[index] = data[(index - start) * bs : (index - start + 1) * bs]
        if fetched:
            with self._lock:
                if self._mutations == seen and len(fetched) <= self._capacity:
                    for index, data in fetched.items():
                        if index not in self._blocks:
                            self._insert(index, bytearray(data))
        found.update(fetched)
        joined = b"".join(found[i] for i in range(first, last + 1))
        skip = offset - first * bs
        return joined[skip : skip + length]

    def cache(self, offset: int, length: int) -> None:
        """Forward the hint, and prefetch the range when it fits in the cache."""
        self._check_open()
        self._inner.cache(offset, length)
        if length <= self._capacity * self._block:
            self.read(offset, length)

    # -- Mutations ---------------------------------------------------------------------------

    def write(self, offset: int, data: _Buffer, fua: bool = False) -> None:
        self._check_open()
        view = memoryview(data).cast("B")
        if not self._write_back or fua or len(view) > self._capacity * self._block:
            self._pass_through(offset, len(view), lambda: self._inner.write(offset, view, fua))
            return
        bs = self._block
        with self._lock:
            self._mutations += 1
            pos, end = offset, offset + len(view)
            while pos < end:
                index, start = divmod(pos, bs)
                piece = min(bs - start, end - pos)
                cached = self._blocks.get(index)
                if cached is None:
                    if piece == self._block_length(index):
                        cached = bytearray(view[pos - offset : pos - offset + piece])
                    else:
                        cached = bytearray(self._inner.read(index * bs, self._block_length(index)))
                    self._insert(index, cached)
                else:
                    self._blocks.move_to_end(index)
                cached[start : start + piece] = view[pos - offset : pos - offset + piece]
                self._dirty.add(index)
                pos += piece

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> None:
        self._check_open()
        self._pass_through(
            offset,
            length,
            lambda: self._inner.write_zeroes(offset, length, fua, may_trim, fast),
        )

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._check_open()
        self._pass_through(offset, length, lambda: self._inner.trim(offset, length, fua))

    def flush(self) -> None:
        self._check_open()
        with self._lock:
            self._write_dirty(0, self._size)
        self._inner.flush()

    def resize(self, new_size: int, *, allow_shrink: bool = False) -> None:
        """Resize the inner storage (if it can be): dirty blocks go first, the cache is emptied."""
        if not self.capabilities.can_resize:  # refused before the cache is touched
            raise StorageError(errno.ENOTSUP, f"{self._inner!r} cannot be resized")
        self._check_open()
        with self._lock:
            self._write_dirty(0, self._size)
            self._blocks.clear()
            self._dirty.clear()
            self._mutations += 1
            self._inner.resize(new_size, allow_shrink=allow_shrink)
            self._size = self._inner.size

    def extents(self, offset: int, length: int) -> list[Extent]:
        """The inner storage's extents, after handing it the dirty blocks in the range."""
        self._check_open()
        if self._write_back:
            with self._lock:
                self._write_dirty(offset, length)
        return self._inner.extents(offset, length)

    def close(self) -> None:
        """Hand dirty blocks to the inner storage (without flushing it), then close it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._write_dirty(0, self._size)
            finally:
                self._blocks.clear()
                self._dirty.clear()
                super().close()

    # -- Internals ---------------------------------------------------------------------------

    def _pass_through(self, offset: int, length: int, op: Callable[[], None]) -> None:
        """Run ``op`` on the inner storage over the range, then drop the blocks it touched.

        Write-back: the dirty blocks in the range go first, and the lock is held throughout,
        or a write landing in a cached block meanwhile would be dropped with it.  The blocks
        are dropped even if ``op`` fails: the inner storage may hold part of the change.
        """
        if not self._write_back:
            try:
                op()
            finally:
                self._invalidate(offset, length)
            return
        with self._lock:
            try:
                self._write_dirty(offset, length)
                op()
            finally:
                self._invalidate(offset, length)

    def _block_length(self, index: int) -> int:
        return min(self._block, self._size - index * self._block)

    def _insert(self, index: int, data: bytearray) -> None:
        """Add a block (lock held), evicting the least recently used ones beyond capacity."""
        if self._capacity == 0:
            if self._write_back:
                self._inner.write(index * self._block, data)
            return
        self._blocks[index] = data
        while len(self._blocks) > self._capacity:
            old, old_data = self._blocks.popitem(last=False)
            if old in self._dirty:
                try:
                    self._inner.write(old * self._block, old_data)
                except BaseException:
                    self._blocks[old] = old_data
                    self._blocks.move_to_end(old, last=False)
                    raise
                self._dirty.discard(old)

    def _write_dirty(self, offset: int, length: int) -> None:
        """Write the dirty blocks overlapping the range to the inner storage (lock held)."""
        if not self._dirty or length <= 0:
            return
        first, last = offset // self._block, (offset + length - 1) // self._block
        for index in sorted(i for i in self._dirty if first <= i <= last):
            self._inner.write(index * self._block, self._blocks[index])
            self._dirty.discard(index)

    def _invalidate(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first, last = offset // self._block, (offset + length - 1) // self._block
        with self._lock:
            self._mutations += 1
            if last - first + 1 > len(self._blocks):
                doomed = [i for i in self._blocks if first <= i <= last]
            else:
                doomed = [i for i in range(first, last + 1) if i in self._blocks]
            for index in doomed:
                del self._blocks[index]
                self._dirty.discard(index)

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(errno.EBADF, "caching storage is closed")

    def __repr__(self) -> str:
        mode = "write-back" if self._write_back else "write-through"
        return f"CachingStorage({self._inner!r}, {self._capacity * self._block}, {mode})"


def _runs(indexes: list[int]) -> list[tuple[int, int]]:
    """``[start, stop)`` runs of consecutive numbers in the sorted ``indexes``."""
    runs: list[tuple[int, int]] = []
    for index in indexes:
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs
