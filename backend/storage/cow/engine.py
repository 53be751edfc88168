"""The copy-on-write request engine: :class:`CowStorage` serves a chain of layers (read, write,
zero, trim, extents, flush; snapshots, resizing, flattening).  The chain's semantics,
durability ordering and concurrency rules are in backend/storage/cow/__init__.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from backend.storage.base import Capabilities, Extent, Storage, StorageError
from backend.storage.chains import UNLIMITED, visible_limits, zeroing_drops
from backend.storage.chunks import chunk_count, chunk_span, whole_chunks
from backend.storage.cow.bitmap import bit, ranges, run_end
from backend.storage.cow.format import create_layer, remove_layer
from backend.storage.cow.layer import Layer
from backend.storage.ranges import RangeLock, SharedLock

# Extents returned per call at most; the contract allows covering less than the asked range.
MAX_EXTENTS = 1024
# flatten_into copies (and reports progress) in pieces of about this many bytes.
FLATTEN_PIECE = 4 * 1024 * 1024


def flatten_into(
    layers: Sequence[Path], progress: Callable[[int, int], None] | None = None
) -> None:
    """Copy into the top every chunk it shows from a lower layer, then flush.

    Afterwards ``CowStorage([layers[-1]])`` reads exactly as ``CowStorage(layers)`` and the top
    no longer depends on the layers below; those are only read.  Chunks that read as zeroes
    are not copied (an absent chunk reads as zeroes in a chain of one).  ``progress(done,
    total)`` is called with bytes of the volume examined so far: first with ``done == 0``,
    after each copied piece, and last with ``done == total``.  The top must not be open for
    writing elsewhere (it is locked; ``StorageError(EBUSY)`` if it is).
    """
    storage = CowStorage(layers)
    try:
        storage._flatten(progress)
    finally:
        storage.close()


class CowStorage(Storage):
    """A copy-on-write volume over the chain of layers ``layers``, bottom (oldest) first.

    The top layer is written unless ``read_only``; the others are opened read-only and never
    modified.  The size is the top layer's.  Opening raises ``StorageError``: ``ENOENT`` (with
    the path) for a missing file, ``EINVAL`` (naming the file) for a map that is not a layer
    map, is truncated or corrupt, or whose chunk size differs from the rest of the chain,
    ``EBUSY`` if the top is already open for writing (or a writer is asked for a top opened
    elsewhere).

    Thread safe, multi-conn safe (one set of descriptors and one in-memory map per volume).
    After :meth:`close` every call but ``close`` raises ``StorageError(EBADF)``.
    """

    def __init__(self, layers: Sequence[Path], read_only: bool = False) -> None:
        stems = [Path(stem) for stem in layers]
        if not stems:
            raise StorageError(errno.EINVAL, "a chain needs at least one layer")
        if len(set(stems)) != len(stems):
            raise StorageError(errno.EINVAL, f"a layer appears twice in the chain {stems}")
        self._read_only = read_only
        self._layers: list[Layer] = []
        try:
            for index, stem in enumerate(stems):
                writable = not read_only and index == len(stems) - 1
                self._layers.append(Layer(stem, writable))
            chunk_size = self._layers[0].chunk_size
            for layer in self._layers:
                if layer.chunk_size != chunk_size:
                    raise StorageError(
                        errno.EINVAL,
                        f"{layer.map_path}: chunk size {layer.chunk_size} differs from "
                        f"{chunk_size} in {self._layers[0].map_path}",
                    )
        except BaseException:
            for layer in self._layers:
                with contextlib.suppress(StorageError):
                    layer.close()
            raise
        self._chunk_size = chunk_size
        self._size = self._layers[-1].size
        self._limits: list[int] = []
        self._visible: list[int] = []
        self._update_limits()
        top = self._layers[-1].data.capabilities
        block = min(chunk_size, Capabilities().max_block)
        if read_only:
            self._capabilities = Capabilities(
                read_only=True,
                can_trim=False,
                can_zero=False,
                rotational=top.rotational,
                can_resize=True,
                preferred_block=block,
            )
        else:
            self._capabilities = Capabilities(
                can_fast_zero=top.can_fast_zero,
                rotational=top.rotational,
                can_resize=True,
                preferred_block=block,
            )
        self._requests = SharedLock()
        self._chunk_locks = RangeLock()
        self._flush_lock = threading.Lock()
        self._closed = False

    # -- Storage -----------------------------------------------------------------------------

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
    def layers(self) -> tuple[Path, ...]:
        """The stems of the chain, bottom first; the last one is the top."""
        return tuple(layer.stem for layer in self._layers)

    def read(self, offset: int, length: int) -> bytes:
        self._requests.acquire_shared()
        try:
            self._check_request(offset, length)
            if length <= 0:
                return b""
            return self._read_levels(len(self._layers) - 1, offset, offset + length)
        finally:
            self._requests.release_shared()

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        self._requests.acquire_shared()
        try:
            self._check_request(offset, len(view))
            if len(view):
                self._write(offset, view)
            if fua:
                self._flush()
        finally:
            self._requests.release_shared()

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> None:
        """Zero the range: whole chunks are punched (see the package docstring), the partial
        chunks at its edges are written with zeroes through the copy-up path.  Fast whenever
        the top's filesystem can punch holes (``can_fast_zero``)."""
        self._check_writable()
        self._requests.acquire_shared()
        try:
            self._check_request(offset, length)
            if length > 0:
                self._zero(offset, length, may_trim, fast)
            if fua:
                self._flush()
        finally:
            self._requests.release_shared()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Zero the range, deallocating what can be (as ``write_zeroes`` with ``may_trim``)."""
        self.write_zeroes(offset, length, fua=fua, may_trim=True)

    def flush(self) -> None:
        self._requests.acquire_shared()
        try:
            self._check_open()
            self._flush()
        finally:
            self._requests.release_shared()

    def cache(self, offset: int, length: int) -> None:
        """``posix_fadvise(WILLNEED)`` on the parts of the data files that hold the range."""
        self._requests.acquire_shared()
        try:
            self._check_request(offset, length)
            for start, stop, level in self._byte_runs(offset, length):
                end = min(stop, self._limits[level]) if level >= 0 else start
                if start < end:
                    self._layers[level].data.cache(start, end - start)
        finally:
            self._requests.release_shared()

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Chunks held by no layer are holes; chunks punched in the layer that provides them
        (zeroed whole) are zero but not holes; the rest is data.  At most ``MAX_EXTENTS``."""
        self._requests.acquire_shared()
        try:
            self._check_request(offset, length)
            result: list[Extent] = []
            for start, stop, level in self._byte_runs(offset, length):
                if level < 0:
                    _append(result, start, stop, hole=True, zero=True)
                else:
                    self._layer_extents(result, level, start, stop)
                if len(result) > MAX_EXTENTS:
                    break
            return result[:MAX_EXTENTS]
        finally:
            self._requests.release_shared()

    def close(self) -> None:
        """Close every file (waiting for requests in progress); flushes nothing.  Idempotent."""
        with self._requests.exclusive():
            if self._closed:
                return
            self._closed = True
            failure: StorageError | None = None
            for layer in self._layers:
                try:
                    layer.close()
                except StorageError as err:
                    failure = failure or err
            if failure is not None:
                raise failure

    # -- Snapshots and resizing --------------------------------------------------------------

    def snapshot(self, new_top: Path, commit: Callable[[Path], None] | None = None) -> Path:
        """Freeze the top and continue on a new empty top layer created at ``new_top``.

        Returns the stem of the frozen layer: with the layers below it, the snapshot.  Atomic
        with respect to requests: every request that completed before the call is in the
        snapshot (it is flushed first), every request that starts after it returns goes to the
        new top.  Connections are not disturbed.  If the new layer cannot be created (it
        exists: ``EEXIST``) the volume keeps writing to its current top.

        ``commit(frozen_stem)`` runs while requests are held, after the new layer exists and
        before any request can reach it: the place to record the new chain (the catalogue), so
        a crash can never leave writes in a layer nothing points at.  If it raises, the new
        layer is removed and the volume keeps writing to its current top.
        """
        self._check_writable()
        new_top = Path(new_top)
        with self._requests.exclusive():
            self._check_open()
            self._flush()
            create_layer(new_top, self._size, self._chunk_size)
            try:
                layer = Layer(new_top, writable=True)
            except BaseException:
                remove_layer(new_top)
                raise
            frozen = self._layers[-1]
            if commit is not None:
                try:
                    commit(frozen.stem)
                except BaseException:
                    layer.close()
                    remove_layer(new_top)
                    raise
            frozen.freeze()
            self._layers.append(layer)
            self._update_limits()
            return frozen.stem

    def resize(self, new_size: int, *, allow_shrink: bool = False) -> None:
        """Change the size of the top layer (and so of the volume), live and durably.

        Growing adds a range that reads as zeroes, even where lower layers hold data there.
        Shrinking needs ``allow_shrink=True`` (else ``StorageError(EINVAL)``): it cuts the top
        and forgets its chunks past the new end; lower layers keep theirs and are ignored past
        it.  The volume is flushed first.  Clients keep the size they were told at handshake
        until they reconnect, so shrink only volumes nobody uses past the new end.
        """
        if new_size < 0:
            raise ValueError(f"size must be >= 0, not {new_size}")
        self._check_writable()
        with self._requests.exclusive():
            self._check_open()
            old_size = self._size
            if new_size == old_size:
                return
            if new_size < old_size and not allow_shrink:
                raise StorageError(
                    errno.EINVAL,
                    f"shrinking {self._layers[-1].stem} from {old_size} to {new_size} bytes "
                    "needs allow_shrink=True",
                )
            self._flush()
            try:
                if new_size > old_size:
                    self._grow(new_size)
                else:
                    self._shrink(new_size)
            except OSError as err:
                raise StorageError.from_os_error(
                    err, f"cannot resize {self._layers[-1].stem}"
                ) from err
            self._size = new_size
            self._update_limits()

    # -- Internals: locating chunks ----------------------------------------------------------

    def _update_limits(self) -> None:
        # A layer shows bytes only below its own size (its last chunk may be short) and the
        # size of every frozen layer above it (what each snapshot in between could see).  The
        # top cuts nothing: growing it sets the bits of what it must hide (see _grow).
        sizes = [layer.size for layer in self._layers]
        self._limits = visible_limits(sizes, [*sizes[:-1], UNLIMITED])
        self._visible = [chunk_count(limit, self._chunk_size) for limit in self._limits]

    def _provider(self, chunk: int, level: int) -> int:
        """The topmost level at or below ``level`` holding ``chunk``; -1 for none."""
        layers, visible = self._layers, self._visible
        while level >= 0:
            if chunk < visible[level] and layers[level].bitmap.bits[chunk >> 3] >> (chunk & 7) & 1:
                return level
            level -= 1
        return -1

    def _providers(self, level: int, first: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """``(first, stop, level)`` runs of chunks covering ``[first, stop)``: the topmost level
        at or below ``level`` that holds them, -1 for none."""
        if level < 0:
            yield first, stop, -1
            return
        bitmap = self._layers[level].bitmap.bits
        visible = min(stop, self._visible[level])
        pos = first
        while pos < visible:
            value = bitmap[pos >> 3] >> (pos & 7) & 1
            end = run_end(bitmap, pos, visible, value)
            if value:
                yield pos, end, level
            else:
                yield from self._providers(level - 1, pos, end)
            pos = end
        if pos < stop:
            yield from self._providers(level - 1, pos, stop)

    def _merged_providers(
        self, level: int, first: int, stop: int
    ) -> Iterator[tuple[int, int, int]]:
        """:meth:`_providers` with adjacent runs of the same level joined."""
        pending: tuple[int, int, int] | None = None
        for run in self._providers(level, first, stop):
            if pending is not None and pending[2] == run[2]:
                pending = (pending[0], run[1], run[2])
                continue
            if pending is not None:
                yield pending
            pending = run
        if pending is not None:
            yield pending

    def _byte_runs(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """``(start, stop, level)`` byte runs covering ``[offset, offset+length)``."""
        cs, end = self._chunk_size, offset + length
        first, stop = chunk_span(offset, length, cs)
        for a, b, level in self._merged_providers(len(self._layers) - 1, first, stop):
            yield max(a * cs, offset), min(b * cs, end), level

    # -- Internals: reading ------------------------------------------------------------------

    def _read_levels(self, level: int, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` as seen through the layers at or below ``level``."""
        cs = self._chunk_size
        first, end_chunk = start // cs, (stop - 1) // cs + 1  # chunk_span, inlined (hot path)
        if end_chunk - first == 1:
            return self._read_from(self._provider(first, level), start, stop)
        parts = [
            self._read_from(found, max(a * cs, start), min(b * cs, stop))
            for a, b, found in self._merged_providers(level, first, end_chunk)
        ]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_from(self, level: int, start: int, stop: int) -> bytes:
        if level < 0:
            return bytes(stop - start)
        limit = self._limits[level]
        data = self._layers[level].data
        if stop <= limit:
            return data.read(start, stop - start)
        if start >= limit:
            return bytes(stop - start)
        return data.read(start, limit - start) + bytes(stop - limit)

    def _layer_extents(self, result: list[Extent], level: int, start: int, stop: int) -> None:
        # Within the chunks a layer provides, holes in its data file were punched by zeroing.
        data = self._layers[level].data
        limit = min(stop, self._limits[level])
        pos = start
        while pos < limit:
            if len(result) > MAX_EXTENTS:
                return
            for extent in data.extents(pos, limit - pos):
                _append(result, extent.offset, extent.offset + extent.length, False, extent.zero)
                pos = extent.offset + extent.length
        if limit < stop:
            _append(result, max(start, limit), stop, hole=False, zero=True)

    # -- Internals: writing ------------------------------------------------------------------

    def _write(self, offset: int, view: memoryview) -> None:
        cs = self._chunk_size
        # chunk_span inlined: this is every guest write's path (a call costs ~5 % of it).
        first, stop = offset // cs, (offset + len(view) - 1) // cs + 1
        top = self._layers[-1]
        bitmap = top.bitmap.bits
        if bitmap[first >> 3] >> (first & 7) & 1 and (
            stop - first == 1 or run_end(bitmap, first, stop, 1) == stop
        ):
            # Every chunk is already in the top: an overwrite in place, no lock, no bit.
            top.data.write(offset, view)
            return
        with self._chunk_locks.hold(first, stop):
            self._write_locked(offset, view)

    def _write_locked(self, offset: int, view: memoryview) -> None:
        """Write with the range lock of the chunks held: copy up the partial edge chunks the
        top lacks, write, then set the bits (every chunk of the range is now whole in the top).
        """
        cs = self._chunk_size
        end = offset + len(view)
        first, stop = chunk_span(offset, len(view), cs)
        top = self._layers[-1]
        below = len(self._layers) - 2
        head_start = first * cs
        tail_stop = min(stop * cs, self._size)
        head = tail = b""
        if head_start < offset and not bit(top.bitmap.bits, first):
            head = self._read_levels(below, head_start, offset)
        if end < tail_stop and not bit(top.bitmap.bits, stop - 1):
            tail = self._read_levels(below, end, tail_stop)
        if (head or tail) and len(view) <= 2 * cs:
            # A small write: one pwrite of the merged chunks beats three.
            top.data.write(head_start if head else offset, b"".join((head, view, tail)))
        else:
            if head:
                top.data.write(head_start, head)
            top.data.write(offset, view)
            if tail:
                top.data.write(end, tail)
        top.bitmap.mark(first, stop, True)

    def _zero(self, offset: int, length: int, may_trim: bool, fast: bool) -> None:
        cs = self._chunk_size
        end = offset + length
        first, stop = chunk_span(offset, length, cs)
        whole_first, whole_stop = whole_chunks(offset, length, cs, self._size)
        with self._chunk_locks.hold(first, stop):
            if whole_first >= whole_stop:
                self._write_locked(offset, memoryview(bytes(length)))
                return
            # Whole chunks first: if a fast zero must refuse, it refuses before changing data.
            self._zero_chunks(whole_first, whole_stop, may_trim, fast)
            if offset < whole_first * cs:
                self._write_locked(offset, memoryview(bytes(whole_first * cs - offset)))
            if whole_stop * cs < end:
                self._write_locked(whole_stop * cs, memoryview(bytes(end - whole_stop * cs)))

    def _zero_chunks(self, first: int, stop: int, may_trim: bool, fast: bool) -> None:
        cs, size = self._chunk_size, self._size
        top = self._layers[-1]
        below = len(self._layers) - 2
        for a, b, level in self._merged_providers(below, first, stop):
            start, end = a * cs, min(b * cs, size)
            if zeroing_drops(may_trim, held_below=level >= 0):
                # Punching only frees space: the cleared bits alone make them read as zeroes.
                top.data.trim(start, end - start)
                top.bitmap.mark(a, b, False)
            else:
                # The data is zeroed before the bits claim it.
                top.data.write_zeroes(start, end - start, may_trim=may_trim, fast=fast)
                top.bitmap.mark(a, b, True)

    def _flush(self) -> None:
        """Make completed writes durable: data first, then the bits that cover it."""
        if self._read_only:
            return
        # Serialised: a flush must not return while an earlier one still holds pages it took.
        with self._flush_lock:
            top = self._layers[-1]
            # Taken before the data sync: each bit in the copy covers data already written.
            captured = top.bitmap.capture()
            try:
                top.data.flush()
                top.bitmap.write_back(captured)
            except BaseException as err:
                top.bitmap.restore(captured)
                if isinstance(err, OSError):
                    raise StorageError.from_os_error(err, f"flush {top.map_path}") from err
                raise

    # -- Internals: resizing and flattening ----------------------------------------------------

    def _grow(self, new_size: int) -> None:
        cs, old_size = self._chunk_size, self._size
        top = self._layers[-1]
        below = len(self._layers) - 2
        old_chunks, new_chunks = chunk_count(old_size, cs), chunk_count(new_size, cs)
        # The bytes past the old end must read as zeroes whatever the lower layers hold there.
        # The top's data file reads zeroes past the old end once truncated there; a boundary
        # chunk the top lacks is copied up, and whole chunks a lower layer holds get their bit
        # set over the (zero) new data: both hide the layers below.
        boundary = old_size // cs if old_size % cs else -1
        head = b""
        if boundary >= 0 and not bit(top.bitmap.bits, boundary):
            level = self._provider(boundary, below)
            if level >= 0 and self._limits[level] > old_size:
                head = self._read_levels(below, boundary * cs, old_size)
        masked = [
            (a, b) for a, b, level in self._providers(below, old_chunks, new_chunks) if level >= 0
        ]
        # Cut whatever an interrupted shrink may have left past the old end, then extend.
        os.truncate(top.data_path, old_size)
        os.truncate(top.data_path, new_size)
        if head:
            top.data.write(boundary * cs, head)
        top.data.flush()
        if head:
            masked.insert(0, (boundary, boundary + 1))
        first_changed = min(boundary, old_chunks) if boundary >= 0 else old_chunks
        top.grow_map(new_size, masked, first_changed)
        top.size = new_size

    def _shrink(self, new_size: int) -> None:
        top = self._layers[-1]
        # The map first: until the data file is cut, it is merely longer than the layer.
        top.shrink_map(new_size)
        os.truncate(top.data_path, new_size)
        top.data.flush()
        top.size = new_size

    def flatten(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Copy into the top every non-zero chunk it shows from below, while serving.

        Afterwards the top alone reads like the whole chain (see flatten_into).  Requests keep
        running (each piece is copied under its chunk locks); snapshot, resize and close wait.
        """
        self._flatten(progress)

    def _flatten(self, progress: Callable[[int, int], None] | None) -> None:
        """Copy into the top every non-zero chunk it shows from below (see flatten_into)."""
        self._check_writable()
        self._requests.acquire_shared()
        try:
            self._check_open()
            cs, total = self._chunk_size, self._size
            top_level = len(self._layers) - 1
            piece = max(1, FLATTEN_PIECE // cs)
            if progress is not None:
                progress(0, total)
            for first, stop, level in self._merged_providers(top_level, 0, chunk_count(total, cs)):
                if level < 0 or level == top_level:
                    continue
                for a in range(first, stop, piece):
                    b = min(a + piece, stop)
                    with self._chunk_locks.hold(a, b):
                        self._copy_up(a, b)
                    if progress is not None:
                        progress(min(b * cs, total), total)
            self._flush()
            if progress is not None:
                progress(total, total)
        finally:
            self._requests.release_shared()

    def _copy_up(self, first: int, stop: int) -> None:
        """Copy the non-zero chunks of ``[first, stop)`` the top lacks into it (lock held)."""
        cs, size = self._chunk_size, self._size
        top = self._layers[-1]
        top_level = len(self._layers) - 1
        for a, b, level in self._merged_providers(top_level, first, stop):
            if level < 0 or level == top_level:
                continue
            data = self._read_from(level, a * cs, min(b * cs, size))
            view = memoryview(data)
            # All-zero chunks stay out of the top: absent, they read as zeroes there too.
            wanted = [
                chunk
                for chunk in range(a, b)
                if data.count(0, (chunk - a) * cs, (chunk - a + 1) * cs)
                != len(view[(chunk - a) * cs : (chunk - a + 1) * cs])
            ]
            for lo, hi in ranges(wanted):
                top.data.write(lo * cs, view[(lo - a) * cs : (hi - a) * cs])
                top.bitmap.mark(lo, hi, True)

    # -- Internals: checks -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(errno.EBADF, f"{self._layers[-1].stem} is closed")

    def _check_request(self, offset: int, length: int) -> None:
        self._check_open()
        # The NBD core validated the range against the size it advertised; only a live
        # shrink since then can put a request past the end, and the bitmap must not see it.
        if offset + length > self._size:
            raise StorageError(
                errno.EINVAL, f"[{offset}, +{length}) is past the end ({self._size})"
            )

    def _check_writable(self) -> None:
        if self._read_only:
            raise StorageError(errno.EPERM, f"{self._layers[-1].stem} is open read-only")

    def __repr__(self) -> str:
        mode = "ro" if self._read_only else "rw"
        stems = ", ".join(str(stem) for stem in self.layers)
        return f"CowStorage([{stems}], {mode}, size={self._size})"


def _append(result: list[Extent], start: int, stop: int, hole: bool, zero: bool) -> None:
    """Append ``[start, stop)``, merging with the previous extent when of the same kind."""
    if result and result[-1].hole == hole and result[-1].zero == zero:
        previous = result.pop()
        start = previous.offset
    result.append(Extent(start, stop - start, hole=hole, zero=zero))
