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

Layers (copy-on-write in the store, for snapshots and clones of volumes): a *layer* is a key
prefix holding chunks plus a small ``{prefix}meta`` object (JSON: size, chunk size, floor; see
:func:`create_layer`).  A ChunkedStorage opened with ``lower`` layers (the frozen layers under
its top, nearest first) reads a chunk missing from the top from the nearest layer below that
has it, and never writes below: a partial write to such a chunk first copies it up (reads it
from below, writes the whole merged chunk to the top); zeroing such a chunk leaves an empty
object in the top (a *whiteout*: an object shorter than its chunk reads as zeroes past its
end).  A layer's *floor* is the smallest size it ever had; every layer below it is cut there,
so a volume shrunk and grown again reads zeroes, not its old data.  :meth:`snapshot` freezes
the top and continues in a new one; :meth:`flatten` copies everything read from below into the
top; :meth:`resize` changes the size recorded in the top's ``meta``.

Requests hold a shared lock; snapshot, resize, flatten and close hold it exclusively, so none
of them ever sees a request half done.
"""

from __future__ import annotations

import contextlib
import errno
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from backend.storage.base import Capabilities, Extent, Storage, StorageError
from backend.storage.chains import UNLIMITED, visible_limits, zeroing_drops
from backend.storage.chunks import (
    check_geometry,
    chunk_count,
    chunk_pieces,
    chunk_span,
    whole_chunks,
)
from backend.storage.objects.base import ObjectStore
from backend.storage.ranges import RangeLock, SharedLock

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


def meta_key(prefix: str) -> str:
    """The key of a layer's ``meta`` object."""
    return f"{prefix}meta"


def create_layer(
    store: ObjectStore, prefix: str, size: int, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> None:
    """Write the ``meta`` object of a new, empty layer (durable on return)."""
    _check_geometry(size, chunk_size)
    _write_meta(store, prefix, size, chunk_size, size)


def read_layer(store: ObjectStore, prefix: str) -> tuple[int, int, int]:
    """``(size, chunk_size, floor)`` of the layer at ``prefix``; ``ENOENT`` if it has none."""
    raw = store.get(meta_key(prefix))
    if raw is None:
        raise StorageError(errno.ENOENT, f"no chunked layer at {prefix!r} (no meta object)")
    try:
        meta = json.loads(raw)
        size, chunk_size, floor = int(meta["size"]), int(meta["chunk_size"]), int(meta["floor"])
        _check_geometry(size, chunk_size)
    except (ValueError, KeyError, TypeError) as err:
        raise StorageError(errno.EIO, f"corrupt meta object of layer {prefix!r}: {err}") from err
    return size, chunk_size, floor


def open_chain(
    store: ObjectStore,
    prefixes: Sequence[str],
    *,
    read_only: bool = False,
    workers: int = 8,
    owns_store: bool = False,
) -> ChunkedStorage:
    """The volume whose layers are ``prefixes`` (bottom first, top last), as created by
    :func:`create_layer` and :meth:`ChunkedStorage.snapshot`."""
    if not prefixes:
        raise ValueError("a chain has at least one layer")
    size, chunk_size, floor = read_layer(store, prefixes[-1])
    lower = []
    for prefix in reversed(prefixes[:-1]):
        _, lower_chunk, lower_floor = read_layer(store, prefix)
        if lower_chunk != chunk_size:
            raise StorageError(
                errno.EINVAL,
                f"layer {prefix!r} has chunk size {lower_chunk}, the top {chunk_size}",
            )
        lower.append((prefix, lower_floor))
    return ChunkedStorage(
        store,
        size,
        chunk_size=chunk_size,
        prefix=prefixes[-1],
        workers=workers,
        read_only=read_only,
        lower=lower,
        floor=floor,
        owns_store=owns_store,
        layered=True,
    )


def layer_keys(store: ObjectStore, prefix: str) -> list[str]:
    """Every key of the layer at ``prefix`` (its chunks and its meta)."""
    return store.keys(prefix)


def remove_layer(store: ObjectStore, prefix: str) -> None:
    """Delete a layer's chunks, then its meta (so a crash midway leaves a layer that can be
    removed again)."""
    meta = meta_key(prefix)
    for key in store.list(prefix):
        if key != meta:
            store.delete(key)
    store.delete(meta)
    store.sync()


def _check_geometry(size: int, chunk_size: int) -> None:
    check_geometry(size, chunk_size, MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)


def _write_meta(store: ObjectStore, prefix: str, size: int, chunk_size: int, floor: int) -> None:
    meta = {"size": size, "chunk_size": chunk_size, "floor": floor}
    store.put(meta_key(prefix), json.dumps(meta, sort_keys=True).encode())
    store.sync()


class ChunkedStorage(Storage):
    """A ``size``-byte volume in ``store``, which it owns (``close`` closes the store).

    ``chunk_size`` must be a power of two in [64 KiB, 32 MiB] (else ``ValueError``).  Store
    errors reach the caller as the store raised them (errno preserved).  When ``read_only``
    every mutating call raises ``StorageError(EPERM)``.

    ``preferred_block`` is ``chunk_size`` on stores without offset writes, where anything
    smaller is a read-modify-write of a whole chunk, and 4096 on stores with them.
    ``may_trim=False`` (NO_HOLE) keeps the chunks that exist as zero-filled objects; chunks
    that do not exist stay missing: an object store has nothing to preallocate.

    ``lower``: the frozen layers under this one, nearest first, as ``(prefix, floor)``;
    ``floor``: this layer's floor; ``layered``: keep the top's ``meta`` object up to date
    (resize); see the module docstring.  ``owns_store``: ``close`` closes the store.
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
        lower: Sequence[tuple[str, int]] = (),
        floor: int | None = None,
        owns_store: bool = True,
        layered: bool = False,
    ) -> None:
        _check_geometry(size, chunk_size)
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
                cheap_extents=False,
                can_resize=layered,
                preferred_block=preferred,
            )
        else:
            self._capabilities = Capabilities(
                can_fast_zero=True,
                inline=False,
                cheap_extents=False,
                can_resize=layered,
                preferred_block=preferred,
            )
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="chunked")
        self._locks = RangeLock()
        self._requests = SharedLock()
        self._close_lock = threading.Lock()
        self._closed = False
        self._owns_store = owns_store
        self._layered = layered
        self._floor = size if floor is None else floor
        self._lower_floors = list(lower)
        self._lower: list[tuple[str, int]] = []
        self._set_limits()
        # Chunks known to exist in the top (only tracked with layers below).
        self._in_top: set[int] = set()

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
        with self._request():
            if length <= 0:
                return b""
            pieces = list(chunk_pieces(offset, length, self._chunk_size))
            return b"".join(self._map(lambda p: self._read_piece(*p), pieces))

    def _read_piece(self, index: int, start: int, length: int) -> bytes:
        data = self._store.get_range(self._key(index), start, length)
        if data is None and self._lower:
            data = self._read_below(index, start, length)
        if data is None:
            return bytes(length)
        if len(data) < length:  # an object cut short reads as zeroes past its end
            return data + bytes(length - len(data))
        return data[:length]

    def _read_below(self, index: int, start: int, length: int) -> bytes | None:
        """``[start, +length)`` of chunk ``index`` from the nearest lower layer holding it,
        cut at that layer's limit; ``None`` when no layer has it (zeroes)."""
        base = index * self._chunk_size
        for prefix, limit in self._lower:
            if base >= limit:
                return None
            data = self._store.get_range(chunk_key(prefix, index), start, length)
            if data is not None:
                visible = max(0, min(len(data), limit - base - start))
                return bytes(data[:visible])
        return None

    def write(self, offset: int, data: _Buffer, fua: bool = False) -> None:
        with self._request(write=True):
            view = memoryview(data).cast("B")
            if not view:
                return
            pieces = list(chunk_pieces(offset, len(view), self._chunk_size))
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
            self._note_in_top(index)
        elif self._offset_writes and (not self._lower or self._top_has(index)):
            self._store.put_range(key, start, data)
            self._note_in_top(index)
        else:
            self._modify(index, start, data, create=True)

    def _top_has(self, index: int) -> bool:
        """Whether the top holds chunk ``index`` (its range lock held), or nothing below does
        (so that an offset write cannot hide data)."""
        if index in self._in_top:
            return True
        if self._store.exists(self._key(index)):
            self._in_top.add(index)
            return True
        return not self._below_has(index)

    def _below_has(self, index: int) -> bool:
        base = index * self._chunk_size
        for prefix, limit in self._lower:
            if base >= limit:
                return False
            if self._store.exists(chunk_key(prefix, index)):
                return True
        return False

    def _note_in_top(self, index: int) -> None:
        if self._lower:
            self._in_top.add(index)

    def _modify(self, index: int, start: int, data: memoryview | bytes, create: bool) -> None:
        """Read-modify-write ``data`` into chunk ``index`` at ``start`` (its range lock held);
        a chunk the top lacks is read from the layers below (copied up).

        ``create``: a missing chunk is created; otherwise it is left missing (zeroing it would
        change nothing).
        """
        key = self._key(index)
        chunk_length = self._chunk_length(index)
        old = self._store.get(key)
        if old is None and self._lower:
            old = self._read_below(index, 0, chunk_length)
        if old is None and not create:
            return
        chunk = bytearray(chunk_length)
        if old is not None:
            chunk[: min(len(old), chunk_length)] = old[:chunk_length]
        chunk[start : start + len(data)] = data
        self._store.put(key, chunk)
        self._note_in_top(index)

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
        with self._request(write=True):
            self._zero(offset, length, keep=not may_trim)
            if fua:
                self._store.sync()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        with self._request(write=True):
            self._zero(offset, length, keep=False)
            if fua:
                self._store.sync()

    def _zero(self, offset: int, length: int, keep: bool) -> None:
        if length <= 0:
            return
        cs = self._chunk_size
        end = offset + length
        first, stop = chunk_span(offset, length, cs)
        # Whole chunks: only those that exist are touched, found with one list(), so that a
        # trim of a huge sparse volume costs its objects, not its size.
        whole_first, whole_stop = whole_chunks(offset, length, cs, self._size)
        edges = [
            (index, max(offset, index * cs) - index * cs, min(end, (index + 1) * cs))
            for index in sorted({first, stop - 1})
            if not whole_first <= index < whole_stop
        ]

        def one(index: int) -> None:
            key = self._key(index)
            if zeroing_drops(not keep, held_below=index in below):
                self._store.delete(key)
                self._in_top.discard(index)
            elif keep:
                self._store.put(key, bytes(self._chunk_length(index)))
            else:
                self._store.put(key, b"")  # a whiteout: reads as zeroes, hides the layers below
                self._note_in_top(index)

        def edge(piece: tuple[int, int, int]) -> None:
            index, start, piece_end = piece
            zeroes = bytes(piece_end - index * cs - start)
            self._modify(index, start, zeroes, create=False)

        below: set[int] = set()
        with self._locks.hold(first, stop):
            if whole_first < whole_stop:
                below = self._present_below(whole_first, whole_stop)
                present = self._present(whole_first, whole_stop) | below
                self._map(one, sorted(present))
            self._map(edge, edges)

    def flush(self) -> None:
        with self._request():
            self._store.sync()

    def cache(self, offset: int, length: int) -> None:
        # Nothing faster to fetch into: a layer above (CachingStorage) does the caching.
        self._check_open()

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Existing chunks are data, missing ones hole and zero; one ``list`` per call, at
        most ``EXTENT_CHUNKS`` chunks described."""
        with self._request():
            return self._extents(offset, length)

    def _extents(self, offset: int, length: int) -> list[Extent]:
        cs = self._chunk_size
        end = offset + length
        first = offset // cs
        stop = min((end - 1) // cs + 1, first + EXTENT_CHUNKS)
        end = min(end, stop * cs)
        present = self._present(first, stop) | self._present_below(first, stop)
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
            with self._requests.exclusive():
                self._closed = True
        self._pool.shutdown(wait=True)
        if self._owns_store:
            self._store.close()

    # -- Layers ------------------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def lower(self) -> list[tuple[str, int]]:
        """The layers below the top, nearest first, as ``(prefix, floor)``."""
        return list(self._lower_floors)

    def snapshot(self, new_prefix: str, commit: Callable[[], None] | None = None) -> str:
        """Freeze the top and continue in a new empty layer at ``new_prefix``; returns the
        frozen top's prefix.

        Writes are held meanwhile: everything written before is flushed into the frozen layer,
        nothing after reaches it.  ``commit`` runs after the new layer exists and before any
        write lands in it (to record the new chain); if it raises, the snapshot is undone.
        """
        if not self._layered:
            raise StorageError(errno.EINVAL, "only a layered chunked storage has snapshots")
        with self._requests.exclusive():
            self._check_writable()
            self._store.sync()
            _write_meta(self._store, new_prefix, self._size, self._chunk_size, self._size)
            if commit is not None:
                try:
                    commit()
                except BaseException:
                    with contextlib.suppress(StorageError):
                        remove_layer(self._store, new_prefix)
                    raise
            frozen = self._prefix
            self._lower_floors.insert(0, (frozen, self._floor))
            self._prefix = new_prefix
            self._floor = self._size
            self._in_top.clear()
            self._set_limits()
            return frozen

    def resize(self, new_size: int, *, allow_shrink: bool = False) -> None:
        """Change the size (recorded in the top's ``meta``).  Shrinking deletes the chunks past
        the new end, zeroes the tail of the last one and lowers the floor."""
        if not self._layered:
            # Declared: Capabilities.can_resize is false, so callers do not ask.
            raise StorageError(errno.ENOTSUP, "only a layered chunked storage can be resized")
        with self._requests.exclusive():
            self._check_writable()
            _check_geometry(new_size, self._chunk_size)
            if new_size < self._size and not allow_shrink:
                raise StorageError(errno.EINVAL, "refusing to shrink without allow_shrink")
            cs = self._chunk_size
            old_size = self._size
            floor = min(self._floor, new_size)
            end = min(new_size, old_size)
            keep = chunk_count(end, cs)
            # Chunks past the smaller end go (also when growing: a crash during an earlier
            # shrink may have left some), and the last partial chunk loses its tail.
            for key in self._store.list(self._prefix):
                digits = key[len(self._prefix) :]
                if len(digits) == 16 and int(digits, 16) >= keep:
                    self._store.delete(key)
                    self._in_top.discard(int(digits, 16))
            if end % cs and new_size < old_size:
                index = end // cs
                old = self._store.get(self._key(index))
                if old is None and self._lower:
                    old = self._read_below(index, 0, cs)
                if old is not None:
                    self._store.put(self._key(index), bytes(old[: end - index * cs]))
                    self._note_in_top(index)
            self._store.sync()
            _write_meta(self._store, self._prefix, new_size, cs, floor)
            self._size = new_size
            self._floor = floor
            self._set_limits()

    def flatten(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Copy every chunk read from the layers below into the top; then the top alone holds
        the volume and the layers below are no longer read.  ``progress(done, total)``."""
        with self._requests.exclusive():
            self._check_writable()
            cs = self._chunk_size
            total = chunk_count(self._size, cs)
            done = 0
            step = EXTENT_CHUNKS
            for first in range(0, total, step):
                stop = min(total, first + step)
                todo = sorted(self._present_below(first, stop) - self._present(first, stop))
                self._map(self._copy_up, todo)
                done = stop
                if progress is not None:
                    progress(done * cs if stop < total else self._size, self._size)
            self._store.sync()
            self._lower_floors = []
            self._set_limits()
            if progress is not None and total == 0:
                progress(0, 0)

    def _copy_up(self, index: int) -> None:
        data = self._read_below(index, 0, self._chunk_length(index))
        self._store.put(self._key(index), data or b"")

    def _set_limits(self) -> None:
        # Every layer, the top too, cuts the layers below it at its floor; a layer's own chunks
        # past its floor were written after it grew again, so they count.
        floors = [self._floor, *(floor for _, floor in self._lower_floors)]  # top first
        limits = visible_limits([UNLIMITED] * len(floors), floors[::-1])[::-1]
        prefixes = [prefix for prefix, _ in self._lower_floors]
        self._lower = list(zip(prefixes, limits[1:], strict=True))

    # -- Internals ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _request(self, write: bool = False) -> Iterator[None]:
        self._requests.acquire_shared()
        try:
            if write:
                self._check_writable()
            else:
                self._check_open()
            yield
        finally:
            self._requests.release_shared()

    def _key(self, index: int) -> str:
        return chunk_key(self._prefix, index)

    def _present_below(self, first: int, stop: int) -> set[int]:
        """The chunks of ``[first, stop)`` some lower layer holds within its limit."""
        present: set[int] = set()
        for prefix, limit in self._lower:
            limit_stop = min(stop, chunk_count(limit, self._chunk_size))
            if limit_stop > first:
                present |= self._present(first, limit_stop, prefix)
        return present

    def _present(self, first: int, stop: int, prefix: str | None = None) -> set[int]:
        """The chunks of ``[first, stop)`` that have an object in the layer at ``prefix``
        (the top by default), from one ``list``.

        The keys listed are those under the longest prefix shared by the first and last key,
        so a small range lists few objects.
        """
        prefix = self._prefix if prefix is None else prefix
        low, high = chunk_key(prefix, first), chunk_key(prefix, stop - 1)
        # Both keys have the same length: the shared head is a plain string prefix.
        shared = next(
            (i for i, (a, b) in enumerate(zip(low, high, strict=True)) if a != b), len(low)
        )
        present: set[int] = set()
        width = len(prefix)
        for key in self._store.list(low[:shared]):
            digits = key[width:]
            if key.startswith(prefix) and len(digits) == 16:
                with contextlib.suppress(ValueError):
                    index = int(digits, 16)
                    if first <= index < stop:
                        present.add(index)
        return present

    def _chunk_length(self, index: int) -> int:
        return min(self._chunk_size, self._size - index * self._chunk_size)

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
