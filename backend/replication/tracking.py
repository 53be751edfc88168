"""Persistent change tracking for a replicated volume: a file of bitmaps ("planes").

The engine keeps one ``RegionMap`` per replicated volume in its data directory (DRBD's
activity log and per-peer bitmap, in one file).  A bit stands for one region of
``granularity`` bytes; a set bit means "replicas may differ here".  Planes:

* ``IN_DOUBT``: set, durably, before a write/zero/trim to the region is sent to any replica;
  cleared by a checkpoint once a FLUSH that followed the write succeeded on every member that
  received it.  After an engine crash its set bits are the regions to reconcile.
* ``missed(member)``, one per member that is not in sync: the regions written while it was
  out, durable before the write it missed is acknowledged; it starts as a copy of
  ``IN_DOUBT`` (what may have been in flight when the member left).  Resync copies exactly
  these regions and clears each once it was copied and flushed on the member.

Rules this module keeps (docs/decisions/0095-engine-side-change-tracking.md):

* ``mark`` returns only once every bit it asked for is durable.  A bit already durable costs
  no I/O; marks that set new bits at the same time share one sync (group commit: the first
  waiter writes every dirty page and syncs, the others wait for it and piggy-back).
* Bits change in place, and every version of a page that is written holds every bit that
  was durable in it and not cleared since (only a checkpoint clears, once the regions are
  equal): whatever mix of old and new sectors a torn write leaves, a set bit is there.
  Headers are never overwritten in place (backend/replication/mapfile.py).
* Clearing is lazy: cleared pages are written with the next group commit, ``sync`` or
  ``close``, never synced on their own.  A clear that a crash loses leaves a stale set bit,
  which costs one region copy, never correctness.
* A failed write or sync makes the map unusable (every later call raises ``StorageError``):
  after a failed fsync nobody knows which pages are durable, so the engine must treat every
  region as in doubt.

A ``RegionMap`` is safe to use from many threads; one process holds it (``flock``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path

from backend.replication import bitmap
from backend.replication.bitmap import PAGE, PAGE_BITS
from backend.replication.mapfile import (
    DATA_START,
    HEADER_SLOTS,
    MAX_NAME,
    MAX_PLANES,
    Header,
    RegionMapError,
    newest,
    plane_stride,
)
from backend.storage import StorageError

IN_DOUBT = "in_doubt"
DEFAULT_GRANULARITY = 64 * 1024
MIN_GRANULARITY = 4 * 1024
MAX_GRANULARITY = 64 * 1024 * 1024
# One plane of 16 TiB at 64 KiB: bounds the memory a plane takes (the whole plane is held in
# memory) and the time open() takes to read it.
MAX_PLANE_BYTES = 32 * 1024 * 1024

Syncer = Callable[[int], None]

__all__ = [
    "DEFAULT_GRANULARITY",
    "IN_DOUBT",
    "RegionMap",
    "RegionMapError",
    "RegionMapStats",
    "missed",
]


def missed(member: str) -> str:
    """The name of the plane of regions that ``member`` missed."""
    return f"missed:{member}"


def check_geometry(size: int, granularity: int) -> None:
    """Raise RegionMapError unless a map of ``size`` bytes at ``granularity`` can be made."""
    if granularity & (granularity - 1) or not MIN_GRANULARITY <= granularity <= MAX_GRANULARITY:
        raise RegionMapError(
            f"tracking granularity {granularity} is not a power of two from "
            f"{MIN_GRANULARITY} to {MAX_GRANULARITY}"
        )
    if size <= 0:
        raise RegionMapError(f"volume size {size} is not positive")
    if plane_stride(-(-size // granularity)) > MAX_PLANE_BYTES:
        finest = granularity
        while plane_stride(-(-size // finest)) > MAX_PLANE_BYTES:
            finest *= 2
        raise RegionMapError(
            f"tracking granularity {granularity} is too fine for a volume of {size} bytes "
            f"(a plane would exceed {MAX_PLANE_BYTES} bytes); use {finest} or more"
        )


def _check_name(name: str) -> None:
    raw = name.encode()
    if not raw or len(raw) > MAX_NAME or not name.isprintable():
        raise ValueError(f"plane name {name!r}: 1 to {MAX_NAME} bytes of printable text")


@dataclasses.dataclass(frozen=True, slots=True)
class RegionMapStats:
    """Counters since open: how many marks, and what they cost."""

    marks: int  # mark() calls
    marks_new: int  # marks that set a bit not set before, so waited for a sync
    syncs: int  # file syncs: group commits and header commits
    pages_written: int


@dataclasses.dataclass(slots=True)
class _Plane:
    name: str
    slot: int
    bits: bytearray
    count: int  # set bits
    pages: set[int]  # pages of ``bits`` that may hold set bits (a superset)


class _Checkpoint:
    """Regions of some planes to clear at the end, unless marked in the meantime."""

    def __init__(self, planes: tuple[str, ...], first: int, stop: int, held: list[tuple[int, int]]):
        self.planes = planes
        self.first = first
        self.stop = stop
        self.touched = {name: list(held) for name in planes}

    def touch(self, plane: str, first: int, stop: int) -> None:
        spans = self.touched.get(plane)
        if spans is not None and first < self.stop and self.first < stop:
            spans.append((first, stop))


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view = view[done:]
        offset += done


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``; what lies past the end of the file reads as zeroes."""
    parts = []
    while length:
        part = os.pread(fd, length, offset)
        if not part:
            parts.append(bytes(length))
            break
        parts.append(part)
        length -= len(part)
        offset += len(part)
    return b"".join(parts)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RegionMap:
    """Planes of region bits in one file; see the module docstring for the rules.

    Offsets and lengths are in bytes of the volume.  ``mark`` rounds outwards to whole
    regions (any byte written taints its region); ``clear`` and checkpoints round inwards
    (a region is clean only if all of it is), except that a range reaching the end of the
    volume covers its last, partial region.
    """

    def __init__(self, fd: int, path: Path, header: Header, syncer: Syncer) -> None:
        self.path = path
        self._fd = fd
        self._header = header
        self._syncer = syncer
        self._planes: dict[str, _Plane] = {}
        self._cond = threading.Condition(threading.Lock())
        self._seq = 0  # marks that set new bits, numbered
        self._durable = 0  # every mark numbered up to this is durable
        self._flushing = False
        self._dirty: set[tuple[int, int]] = set()  # (slot, page) changed since last written
        self._pending: dict[tuple[int, int], int] = {}  # (slot, page) → mark not yet durable
        self._checkpoints: list[_Checkpoint] = []
        self._failure: BaseException | None = None
        self._closed = False
        self._marks = self._marks_new = self._syncs = self._pages_written = 0

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        size: int,
        granularity: int = DEFAULT_GRANULARITY,
        *,
        planes: Iterable[str] = (IN_DOUBT,),
        syncer: Syncer = os.fdatasync,
    ) -> RegionMap:
        """Create the file (which must not exist) with empty ``planes``, durably, and open it."""
        check_geometry(size, granularity)
        names = tuple(planes)
        for name in names:
            _check_name(name)
        if len(set(names)) != len(names) or len(names) > MAX_PLANES:
            raise ValueError(f"planes {names}: at most {MAX_PLANES}, each once")
        path = Path(path)
        header = Header(1, size, granularity, tuple((name, i) for i, name in enumerate(names)))
        # Built under a temporary name and linked into place: a crash never leaves a file
        # at ``path`` without a valid header, and link() refuses to replace another map.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            headers = bytearray(DATA_START)
            at = (header.sequence % HEADER_SLOTS) * PAGE
            headers[at : at + PAGE] = header.encode()
            _pwrite_all(fd, bytes(headers), 0)
            os.ftruncate(fd, header.slot_offset(len(names)))
            syncer(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise RegionMapError(f"{path} already exists") from None
        finally:
            os.close(fd)
            tmp.unlink()
        _sync_dir(path.parent)
        return cls.open(path, syncer=syncer)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, syncer: Syncer = os.fdatasync) -> RegionMap:
        """Open an existing map: every bit that was durable when the last process stopped
        (however it stopped) is set."""
        path = Path(path)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RegionMapError(f"{path} is in use by another process") from None
            header = newest([os.pread(fd, PAGE, slot * PAGE) for slot in range(HEADER_SLOTS)])
            check_geometry(header.size, header.granularity)
            opened = cls(fd, path, header, syncer)
            for name, slot in header.planes:
                opened._planes[name] = opened._load(name, slot)
        except BaseException:
            os.close(fd)
            raise
        return opened

    def _load(self, name: str, slot: int) -> _Plane:
        header = self._header
        bits = bytearray(_pread_all(self._fd, header.stride, header.slot_offset(slot)))
        bitmap.clear_range(bits, header.regions, len(bits) * 8)  # never set; keep it so
        pages = {p for p in range(len(bits) // PAGE) if not bitmap.page_is_zero(bits, p)}
        count = sum(bitmap.count_range(bits, p * PAGE_BITS, (p + 1) * PAGE_BITS) for p in pages)
        return _Plane(name, slot, bits, count, pages)

    @property
    def size(self) -> int:
        return self._header.size

    @property
    def granularity(self) -> int:
        return self._header.granularity

    @property
    def planes(self) -> tuple[str, ...]:
        with self._cond:
            return tuple(self._planes)

    @property
    def stats(self) -> RegionMapStats:
        with self._cond:
            return RegionMapStats(self._marks, self._marks_new, self._syncs, self._pages_written)

    def marked_bytes(self, plane: str) -> int:
        """Bytes of the volume in the regions set in ``plane``."""
        with self._cond:
            p = self._plane(plane)
            last = self._header.regions - 1
            tail = (last + 1) * self.granularity - self.size
            return p.count * self.granularity - (
                tail if bitmap.count_range(p.bits, last, last + 1) else 0
            )

    def regions(
        self, plane: str, offset: int = 0, length: int | None = None
    ) -> Iterator[tuple[int, int]]:
        """The runs ``(offset, length)`` of set regions in ``plane`` that meet the range,
        clipped to it, in order.  Bits set or cleared while iterating may or may not show."""
        end = self.size if length is None else offset + length
        first, stop = self._outer(offset, end - offset)
        g = self.granularity
        for a, b in self._runs(plane, first, stop):
            lo, hi = max(a * g, offset), min(b * g, end)
            yield lo, hi - lo

    def _runs(self, plane: str, first: int, stop: int) -> Iterator[tuple[int, int]]:
        """Runs of set bits within ``[first, stop)``, from page snapshots taken one at a time
        (the lock is not held between them)."""
        with self._cond:
            p = self._plane(plane)
            pages = self._pages_between(p, first, stop)

        def snapshots() -> Iterator[tuple[int, bytes]]:
            for page in pages:
                with self._cond:
                    snapshot = bytes(p.bits[page * PAGE : (page + 1) * PAGE])
                yield page, snapshot  # never yield with the lock held

        return _spans(snapshots(), first, stop)

    def _runs_locked(self, p: _Plane, first: int, stop: int) -> list[tuple[int, int]]:
        pages = self._pages_between(p, first, stop)
        snapshots = ((n, bytes(p.bits[n * PAGE : (n + 1) * PAGE])) for n in pages)
        return list(_spans(snapshots, first, stop))

    @staticmethod
    def _pages_between(p: _Plane, first: int, stop: int) -> list[int]:
        return sorted(n for n in p.pages if first < (n + 1) * PAGE_BITS and n * PAGE_BITS < stop)

    def mark(self, planes: Collection[str], offset: int, length: int) -> None:
        """Set the regions meeting ``[offset, offset+length)`` in every plane of ``planes``;
        return once they are durable.  Raises StorageError(EIO) if the map cannot be written."""
        names = self._names(planes)
        first, stop = self._outer(offset, length)
        if first == stop:
            return
        pages = range(first // PAGE_BITS, (stop - 1) // PAGE_BITS + 1)
        with self._cond:
            self._check_usable()
            self._marks += 1
            need = seq = 0
            for p in [self._plane(name) for name in names]:  # all known before any is set
                for checkpoint in self._checkpoints:
                    checkpoint.touch(p.name, first, stop)
                newly = bitmap.set_range(p.bits, first, stop)
                if newly:
                    if not seq:
                        self._seq += 1
                        self._marks_new += 1
                        seq = need = self._seq
                    p.count += newly
                    p.pages.update(pages)
                    for page in pages:
                        self._dirty.add((p.slot, page))
                        self._pending[(p.slot, page)] = seq
                else:  # already set, but perhaps by a mark whose sync is still to come
                    need = max(need, *(self._pending.get((p.slot, n), 0) for n in pages))
            while self._durable < need:
                self._check_usable()
                if self._flushing:
                    self._cond.wait()
                else:
                    self._flush_locked()

    def clear(self, planes: Collection[str], offset: int, length: int) -> None:
        """Clear the regions inside ``[offset, offset+length)`` (lazily written, never synced).

        Only for ranges no concurrent ``mark`` can touch; otherwise use ``checkpoint``, which
        keeps what was marked while it ran."""
        names = self._names(planes)
        first, stop = self._inner(offset, length)
        with self._cond:
            self._check_usable()
            for name in names:
                self._clear_locked(self._plane(name), first, stop)

    @contextlib.contextmanager
    def checkpoint(
        self,
        planes: Collection[str],
        offset: int = 0,
        length: int | None = None,
        in_flight: Iterable[tuple[int, int]] = (),
    ) -> Iterator[None]:
        """Clear the regions of ``planes`` inside the range when the block ends without an
        exception, except those marked while it ran and those in ``in_flight``.

        The block is where the caller makes the regions equal on its members (flush every
        member, or copy and flush); ``in_flight`` lists writes already marked but not yet
        completed on every member when the block starts, which its FLUSH does not cover.
        """
        names = self._names(planes)
        first, stop = self._inner(offset, self.size - offset if length is None else length)
        held = [self._outer(o, n) for o, n in in_flight]
        cp = _Checkpoint(names, first, stop, held)
        with self._cond:
            self._check_usable()
            for name in names:
                self._plane(name)
            self._checkpoints.append(cp)
        try:
            yield
        except BaseException:
            with self._cond:
                self._checkpoints.remove(cp)
            raise
        # One lock hold from here: a mark after the checkpoint leaves the list must find
        # its bits already cleared, so that it sets them again.
        with self._cond:
            self._checkpoints.remove(cp)
            for name in names:
                p = self._planes.get(name)
                if p is None:  # removed while the checkpoint ran
                    continue
                keep = bitmap.merge(cp.touched[name])
                for a, b in self._runs_locked(p, first, stop):
                    for x, y in bitmap.subtract(a, b, keep):
                        self._clear_locked(p, x, y)

    def _clear_locked(self, p: _Plane, first: int, stop: int) -> None:
        cleared = bitmap.clear_range(p.bits, first, stop)
        if not cleared:
            return
        p.count -= cleared
        for page in range(first // PAGE_BITS, (stop - 1) // PAGE_BITS + 1):
            self._dirty.add((p.slot, page))
            if bitmap.page_is_zero(p.bits, page):
                p.pages.discard(page)

    def add_plane(self, name: str, copy_from: str | None = None) -> None:
        """Add a plane, empty or a copy of ``copy_from``, durably.  Marks wait meanwhile."""
        _check_name(name)
        with self._cond:
            self._check_usable()
            if name in self._planes:
                raise ValueError(f"plane {name!r} exists")
            if len(self._planes) >= MAX_PLANES:
                raise RegionMapError(f"a region map holds at most {MAX_PLANES} planes")
            # No flush may be writing a page of the slot this plane is about to reuse.
            while self._flushing:
                self._cond.wait()
            used = {p.slot for p in self._planes.values()}
            slot = min(set(range(MAX_PLANES)) - used)
            header = self._header
            if copy_from is None:
                plane = _Plane(name, slot, bytearray(header.stride), 0, set())
            else:
                src = self._plane(copy_from)
                plane = _Plane(name, slot, bytearray(src.bits), src.count, set(src.pages))
            planes = (*header.planes, (name, slot))
            self._io(lambda: self._write_slot(plane))
            self._commit_header(planes)
            self._planes[name] = plane

    def remove_plane(self, name: str) -> None:
        """Remove a plane durably (its slot is zeroed when next reused)."""
        with self._cond:
            self._check_usable()
            p = self._plane(name)
            while self._flushing:
                self._cond.wait()
            self._commit_header(tuple(e for e in self._header.planes if e[0] != name))
            del self._planes[name]
            self._dirty = {k for k in self._dirty if k[0] != p.slot}
            self._pending = {k: s for k, s in self._pending.items() if k[0] != p.slot}

    def grow(self, size: int, mark: Collection[str] = (IN_DOUBT,)) -> None:
        """Make the map cover a volume of ``size`` bytes (more than now), every bit kept, and
        the new range set in the planes ``mark``, durably.  Marks wait meanwhile; no
        checkpoint may be running (the caller holds the whole volume).

        The planes' slots move when their stride grows, so the map is written anew beside
        the old one and renamed over it: a crash leaves the old map or the new, whole."""
        names = self._names(mark)
        with self._cond:
            self._check_usable()
            old = self._header
            if size <= old.size:
                raise ValueError(f"a region map grows only: {size} <= {old.size} bytes")
            if self._checkpoints:
                raise RegionMapError("cannot grow the region map while a checkpoint runs")
            check_geometry(size, old.granularity)
            for name in names:
                self._plane(name)
            while self._flushing:
                self._cond.wait()
            header = dataclasses.replace(old, sequence=old.sequence + 1, size=size)
            planes: dict[str, _Plane] = {}
            for name, p in self._planes.items():
                bits = bytearray(header.stride)
                bits[: len(p.bits)] = p.bits
                planes[name] = _Plane(name, p.slot, bits, p.count, set(p.pages))
            first, stop = old.size // old.granularity, header.regions
            pages = range(first // PAGE_BITS, (stop - 1) // PAGE_BITS + 1)
            for name in names:
                p = planes[name]
                p.count += bitmap.set_range(p.bits, first, stop)
                p.pages.update(pages)
            fd = self._write_new(header, planes)
            os.close(self._fd)  # the old file, unlinked by the rename: its lock goes with it
            self._fd = fd
            self._header = header
            self._planes = planes
            self._dirty.clear()
            self._pending.clear()
            self._durable = self._seq  # every bit is in the new file, synced
            self._syncs += 1
            self._cond.notify_all()
            self._io(lambda: _sync_dir(self.path.parent))  # the rename

    def _write_new(self, header: Header, planes: dict[str, _Plane]) -> int:
        """Write ``header`` and ``planes`` to a new file, synced and locked, and rename it over
        the map; return its descriptor.  On an error the map is as it was (StorageError)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.grow")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise StorageError(errno.EIO, f"cannot grow region map {self.path}: {err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _pwrite_all(fd, header.encode(), (header.sequence % HEADER_SLOTS) * PAGE)
            slots = max((p.slot for p in planes.values()), default=-1) + 1
            os.ftruncate(fd, header.slot_offset(slots))
            for p in planes.values():
                at = header.slot_offset(p.slot)
                for page in sorted(p.pages):
                    data = bytes(p.bits[page * PAGE : (page + 1) * PAGE])
                    _pwrite_all(fd, data, at + page * PAGE)
            self._syncer(fd)
            os.rename(tmp, self.path)
        except BaseException as err:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(err, OSError):
                raise StorageError(errno.EIO, f"cannot grow region map {self.path}: {err}") from err
            raise
        return fd

    def _write_slot(self, plane: _Plane) -> None:
        """Write a whole plane into its slot: zeroes over whatever a removed plane left there
        (found with SEEK_DATA), then its set pages; then sync."""
        start = self._header.slot_offset(plane.slot)
        end = start + self._header.stride
        if os.fstat(self._fd).st_size < end:
            os.ftruncate(self._fd, end)
        pos = start
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:  # only holes from here on
                    break
                raise
            if data >= end:
                break
            hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), end)
            for at in range(data, hole, 1 << 20):
                _pwrite_all(self._fd, bytes(min(1 << 20, hole - at)), at)
            pos = hole
        for page in sorted(plane.pages):
            _pwrite_all(
                self._fd, bytes(plane.bits[page * PAGE : (page + 1) * PAGE]), start + page * PAGE
            )
        self._syncer(self._fd)
        self._syncs += 1

    def _commit_header(self, planes: tuple[tuple[str, int], ...]) -> None:
        """Write the next header into the slot the current one is not in, and sync."""
        old = self._header
        new = dataclasses.replace(old, sequence=old.sequence + 1, planes=planes)

        def write() -> None:
            _pwrite_all(self._fd, new.encode(), (new.sequence % HEADER_SLOTS) * PAGE)
            self._syncer(self._fd)
            self._syncs += 1

        self._io(write)
        self._header = new

    def _flush_locked(self) -> None:
        """Write every dirty page and sync; called with the lock held, released during I/O.
        Every mark numbered up to the one last made before the pages were copied is durable
        when this returns."""
        self._flushing = True
        target = self._seq
        by_slot = {p.slot: p.bits for p in self._planes.values()}
        writes = [
            (
                self._header.slot_offset(slot) + page * PAGE,
                bytes(by_slot[slot][page * PAGE : (page + 1) * PAGE]),
            )
            for slot, page in sorted(self._dirty)
        ]
        self._dirty.clear()
        self._cond.release()
        failure: BaseException | None = None
        try:
            for offset, data in writes:
                _pwrite_all(self._fd, data, offset)
            self._syncer(self._fd)
        except Exception as err:
            failure = err
        finally:
            self._cond.acquire()
            self._flushing = False
            self._cond.notify_all()
        if failure is not None:
            self._fail(failure)
        self._syncs += 1
        self._pages_written += len(writes)
        self._durable = max(self._durable, target)
        self._pending = {k: s for k, s in self._pending.items() if s > target}

    def sync(self) -> None:
        """Write every change, clears included, and sync."""
        with self._cond:
            self._check_usable()
            while self._flushing:
                self._cond.wait()
            if self._dirty or self._durable < self._seq:
                self._flush_locked()

    def _io(self, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as err:
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        self._failure = err
        self._cond.notify_all()
        raise StorageError(errno.EIO, f"region map {self.path}: {err}") from err

    def _check_usable(self) -> None:
        if self._closed:
            raise ValueError("region map is closed")
        if self._failure is not None:
            raise StorageError(
                errno.EIO, f"region map {self.path} failed earlier: {self._failure}"
            ) from self._failure

    def close(self) -> None:
        """Write and sync every change, release the file; idempotent."""
        with self._cond:
            if self._closed:
                return
            try:
                if self._failure is None:
                    while self._flushing:
                        self._cond.wait()
                    if self._dirty:
                        self._flush_locked()
            finally:
                self._closed = True
                os.close(self._fd)

    def __enter__(self) -> RegionMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _plane(self, name: str) -> _Plane:
        try:
            return self._planes[name]
        except KeyError:
            raise ValueError(f"no plane {name!r} in {self.path}") from None

    def _names(self, planes: Collection[str]) -> tuple[str, ...]:
        if isinstance(planes, str):
            raise TypeError("planes is a collection of plane names, not one name")
        return tuple(planes)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} outside a volume of {self.size} bytes")

    def _outer(self, offset: int, length: int) -> tuple[int, int]:
        """The regions that meet the range."""
        self._check_range(offset, length)
        if not length:
            return 0, 0
        g = self.granularity
        return offset // g, -(-(offset + length) // g)

    def _inner(self, offset: int, length: int) -> tuple[int, int]:
        """The regions the range covers entirely (the last, partial one when it reaches the
        end of the volume)."""
        self._check_range(offset, length)
        g = self.granularity
        end = offset + length
        first = -(-offset // g)
        stop = self._header.regions if end == self.size else end // g
        return (first, stop) if first < stop else (0, 0)


def _spans(
    snapshots: Iterable[tuple[int, bytes]], first: int, stop: int
) -> Iterator[tuple[int, int]]:
    """Runs of set bits within ``[first, stop)`` from ``(page, bytes)`` snapshots in page
    order, merged across page boundaries."""
    run: tuple[int, int] | None = None
    for page, snapshot in snapshots:
        for lo, hi in bitmap.page_runs(snapshot, page * PAGE_BITS):
            a, b = max(lo, first), min(hi, stop)
            if a >= b:
                continue
            if run is not None and run[1] == a:
                run = (run[0], b)
                continue
            if run is not None:
                yield run
            run = (a, b)
    if run is not None:
        yield run
