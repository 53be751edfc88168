"""A volume kept as fixed-size chunks in an ObjectStore (a directory, S3, RADOS...).

Chunk ``i`` covers ``[i * chunk_size, (i + 1) * chunk_size)`` (the last one may be shorter)
and is the object ``f"{prefix}{i:016x}"``.  The volume is sparse: a missing object reads as
zeroes and is reported as a hole; ``trim`` and ``write_zeroes`` delete the objects of whole
chunks.

Writes of whole chunks are a ``put``.  A partial write is a ``put_range`` when the store has
offset writes, else a read-modify-write of the chunk.  Mutations hold the range of chunks they
touch: overlapping writes apply one after the other, so a read-modify-write never loses a
concurrent write.  Reads take no lock: an object ``put`` is atomic.  A request spanning
several chunks runs them in parallel on a pool of ``workers`` threads.

Durability is the store's: ``flush`` and FUA call ``store.sync()``.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from backend.storage.base import Capabilities, Extent, Storage, StorageError
from backend.storage.objects.base import ObjectStore
from backend.storage.ranges import RangeLock

KIB = 1024
MIB = 1024 * KIB
DEFAULT_CHUNK_SIZE = 4 * MIB
MIN_CHUNK_SIZE = 64 * KIB
MAX_CHUNK_SIZE = 32 * MIB
# Chunks looked at per extents() call at most (one list() of the store); the contract allows
# covering less than the asked range.
EXTENT_CHUNKS = 4096

P = TypeVar("P")
T = TypeVar("T")
_Buffer = bytes | bytearray | memoryview


def chunk_key(prefix: str, index: int) -> str:
    """The object key of chunk ``index``."""
    return f"{prefix}{index:016x}"


class ChunkedStorage(Storage):
    """A ``size``-byte volume in ``store``, which it owns (``close`` closes the store).

    ``chunk_size`` must be a power of two in [64 KiB, 32 MiB] (else ``ValueError``).  Store
    errors reach the caller as the store raised them (errno preserved).  When ``read_only``
    every mutating call raises ``StorageError(EPERM)``.

    ``preferred_block`` is ``chunk_size`` on stores without offset writes, where anything
    smaller is a read-modify-write of a whole chunk, and 4096 on stores with them.
    ``may_trim=False`` (NO_HOLE) keeps the chunks that exist as zero-filled objects; chunks
    that do not exist stay missing: an object store has nothing to preallocate.
    """

    def __init__(
        self,
        store: ObjectStore,
        size: int,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        prefix: str = "",
        workers: int = 8,
        read_only: bool = False,
    ) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, not {size}")
        if (
            chunk_size < MIN_CHUNK_SIZE
            or chunk_size > MAX_CHUNK_SIZE
            or chunk_size & (chunk_size - 1)
        ):
            raise ValueError(
                f"chunk size must be a power of two in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}], "
                f"not {chunk_size}"
            )
        if workers < 1:
            raise ValueError(f"workers must be >= 1, not {workers}")
        self._store = store
        self._size = size
        self._chunk_size = chunk_size
        self._prefix = prefix
        self._read_only = read_only
        self._offset_writes = store.supports_offset_writes
        preferred = 4096 if self._offset_writes else chunk_size
        if read_only:
            self._capabilities = Capabilities(
                read_only=True,
                can_trim=False,
                can_zero=False,
                inline=False,
                preferred_block=preferred,
            )
        else:
            self._capabilities = Capabilities(
                can_fast_zero=True, inline=False, preferred_block=preferred
            )
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="chunked")
        self._locks = RangeLock()
        self._close_lock = threading.Lock()
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    @property
    def store(self) -> ObjectStore:
        return self._store

    def read(self, offset: int, length: int) -> bytes:
        self._check_open()
        if length <= 0:
            return b""
        pieces = list(self._pieces(offset, length))
        return b"".join(self._map(lambda p: self._read_piece(*p), pieces))

    def _read_piece(self, index: int, start: int, length: int) -> bytes:
        data = self._store.get_range(self._key(index), start, length)
        if data is None:
            return bytes(length)
        if len(data) < length:  # an object cut short reads as zeroes past its end
            return data + bytes(length - len(data))
        return data[:length]

    def write(self, offset: int, data: _Buffer, fua: bool = False) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        if not view:
            return
        pieces = list(self._pieces(offset, len(view)))
        base = offset

        def one(piece: tuple[int, int, int]) -> None:
            index, start, length = piece
            at = index * self._chunk_size + start - base
            self._write_piece(index, start, view[at : at + length])

        with self._locks.hold(pieces[0][0], pieces[-1][0] + 1):
            self._map(one, pieces)
        if fua:
            self._store.sync()

    def _write_piece(self, index: int, start: int, data: memoryview) -> None:
        key = self._key(index)
        chunk_length = self._chunk_length(index)
        if start == 0 and len(data) == chunk_length:
            self._store.put(key, data)
        elif self._offset_writes:
            self._store.put_range(key, start, data)
        else:
            self._modify(key, chunk_length, start, data, create=True)

    def _modify(
        self, key: str, chunk_length: int, start: int, data: memoryview | bytes, create: bool
    ) -> None:
        """Read-modify-write ``data`` into the chunk at ``start`` (its range lock held).

        ``create``: a missing chunk is created; otherwise it is left missing (zeroing it would
        change nothing).
        """
        old = self._store.get(key)
        if old is None and not create:
            return
        chunk = bytearray(chunk_length)
        if old is not None:
            chunk[: min(len(old), chunk_length)] = old[:chunk_length]
        chunk[start : start + len(data)] = data
        self._store.put(key, chunk)

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> None:
        """Delete whole chunks (or, NO_HOLE, overwrite the existing ones with zeroes) and zero
        the partial ones at the edges with a read-modify-write.  Always fast: it never writes
        more than a write of the same zeroes would."""
        self._check_writable()
        self._zero(offset, length, keep=not may_trim)
        if fua:
            self._store.sync()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._check_writable()
        self._zero(offset, length, keep=False)
        if fua:
            self._store.sync()

    def _zero(self, offset: int, length: int, keep: bool) -> None:
        if length <= 0:
            return
        cs = self._chunk_size
        end = offset + length
        first, stop = offset // cs, (end - 1) // cs + 1
        # Whole chunks: only those that exist are touched, found with one list(), so that a
        # trim of a huge sparse volume costs its objects, not its size.
        whole_first = -(-offset // cs)
        whole_stop = stop if end == self._size else end // cs
        edges = [
            (index, max(offset, index * cs) - index * cs, min(end, (index + 1) * cs))
            for index in sorted({first, stop - 1})
            if not whole_first <= index < whole_stop
        ]

        def one(index: int) -> None:
            key = self._key(index)
            if not keep:
                self._store.delete(key)
            else:
                self._store.put(key, bytes(self._chunk_length(index)))

        def edge(piece: tuple[int, int, int]) -> None:
            index, start, piece_end = piece
            zeroes = bytes(piece_end - index * cs - start)
            self._modify(self._key(index), self._chunk_length(index), start, zeroes, False)

        with self._locks.hold(first, stop):
            if whole_first < whole_stop:
                present = sorted(self._present(whole_first, whole_stop))
                self._map(one, present)
            self._map(edge, edges)

    def flush(self) -> None:
        self._check_open()
        self._store.sync()

    def cache(self, offset: int, length: int) -> None:
        # Nothing faster to fetch into: a layer above (CachingStorage) does the caching.
        self._check_open()

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Existing chunks are data, missing ones hole and zero; one ``list`` per call, at
        most ``EXTENT_CHUNKS`` chunks described."""
        self._check_open()
        cs = self._chunk_size
        end = offset + length
        first = offset // cs
        stop = min((end - 1) // cs + 1, first + EXTENT_CHUNKS)
        end = min(end, stop * cs)
        present = self._present(first, stop)
        result: list[Extent] = []
        pos = offset
        for index in range(first, stop):
            chunk_end = min((index + 1) * cs, end)
            hole = index not in present
            if result and result[-1].hole == hole:
                previous = result.pop()
                result.append(Extent(previous.offset, chunk_end - previous.offset, hole, hole))
            else:
                result.append(Extent(pos, chunk_end - pos, hole, hole))
            pos = chunk_end
        return result

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True)
        self._store.close()

    # -- Internals ---------------------------------------------------------------------------

    def _key(self, index: int) -> str:
        return chunk_key(self._prefix, index)

    def _present(self, first: int, stop: int) -> set[int]:
        """The chunks of ``[first, stop)`` that have an object, from one ``list``.

        The keys listed are those under the longest prefix shared by the first and last key,
        so a small range lists few objects.
        """
        low, high = self._key(first), self._key(stop - 1)
        # Both keys have the same length: the shared head is a plain string prefix.
        shared = next(
            (i for i, (a, b) in enumerate(zip(low, high, strict=True)) if a != b), len(low)
        )
        present: set[int] = set()
        width = len(self._prefix)
        for key in self._store.list(low[:shared]):
            digits = key[width:]
            if key.startswith(self._prefix) and len(digits) == 16:
                with contextlib.suppress(ValueError):
                    index = int(digits, 16)
                    if first <= index < stop:
                        present.add(index)
        return present

    def _chunk_length(self, index: int) -> int:
        return min(self._chunk_size, self._size - index * self._chunk_size)

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """``(chunk index, start in chunk, length)`` for each chunk ``[offset, +length)``
        touches, in order."""
        end = offset + length
        while offset < end:
            index, start = divmod(offset, self._chunk_size)
            piece = min(self._chunk_size - start, end - offset)
            yield index, start, piece
            offset += piece

    def _map(self, func: Callable[[P], T], pieces: Sequence[P]) -> list[T]:
        """``func`` over ``pieces``, in parallel when there are several; results in order.

        Every piece is waited for before an error is raised, so nothing runs on once the
        request has failed (and its chunk locks are released).
        """
        if len(pieces) == 1:
            return [func(pieces[0])]
        futures = [self._pool.submit(func, piece) for piece in pieces]
        results: list[T] = []
        error: BaseException | None = None
        for future in futures:
            try:
                results.append(future.result())
            except BaseException as err:
                if error is None:
                    error = err
        if error is not None:
            raise error
        return results

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(errno.EBADF, "chunked storage is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._read_only:
            raise StorageError(errno.EPERM, "chunked storage is read-only")

    def __repr__(self) -> str:
        mode = "ro" if self._read_only else "rw"
        return (
            f"ChunkedStorage({self._store!r}, {mode}, size={self._size}, "
            f"chunk_size={self._chunk_size}, prefix={self._prefix!r})"
        )
