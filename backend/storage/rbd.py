"""Volumes as RBD images (Ceph block devices), through librbd's Python binding.

A writable :class:`RbdStorage` owns its image exclusively: at open it takes librbd's managed
*exclusive lock* with ``lock_acquire(RBD_LOCK_MODE_EXCLUSIVE)``, which also switches the lock to
the policy that never hands it over on request.  Measured on Ceph 16.2:

* A second writable open anywhere (another NBS server, or this one) fails at once: librbd asks
  the holder, the holder refuses, ``lock_acquire`` raises ``EROFS``; RbdStorage raises
  ``StorageError(EBUSY, "... is held writable by <client address> ...")``.  A plain librbd
  writer that does not ask for the lock (``rbd bench``, QEMU) gets ``EROFS`` on its writes.
* Read-only opens (``read_only=True`` or a ``snapshot``) take no lock and always succeed.
* A holder that died (kill -9, host lost) still owns the lock until the OSD drops its watch,
  ``osd_client_watch_timeout`` later (30 s by default).  A writable open in the meantime
  *waits* for it, then librbd blocklists the dead client (fencing it, should it only have been
  cut off) and breaks the lock: the open succeeds, without an operator.  Operators who cannot
  wait run ``ceph osd blocklist add <address>`` on the address from the EBUSY message; the OSD
  drops the dead client's watch at once and the next open takes the lock over.  A blocklisted
  holder that comes back gets ``StorageError(EPERM)`` on every write: it was fenced.

Durability: librbd's cache (``rbd_cache``, write-around in Pacific) may acknowledge a write
before the OSDs have it; ``flush()`` waits for every such write, and a FUA write is a write
then a flush.  Other handles on the image (a read-only open elsewhere) see a write once it
is flushed.  One ``rbd.Image`` handle serves every connection and thread: librbd is thread
safe per image and the binding releases the GIL during I/O, so requests run in parallel, every
connection sees every completed write and a flush covers them all (multi-conn is safe).

Full pools: as for RADOS objects (backend/storage/objects/rados.py), the I/O context is set
``FULL_TRY``, so a write to a pool over its quota fails with ``StorageError(ENOSPC)`` at once
(measured: the write, or its flush, that crossed the quota) rather than pausing until the op
timeout turns it into ``ETIMEDOUT``.

Image operations for the volume catalogue are module functions (:func:`create_image`,
:func:`remove_image`, :func:`create_snapshot`, :func:`remove_snapshot`, :func:`clone`,
:func:`flatten`, :func:`used_bytes`, :func:`list_images`, :func:`list_snapshots`); each opens
the image only for its own duration.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable, Iterator
from typing import Any

import rbd

from backend.storage.base import Capabilities, Extent, Storage, StorageError
from backend.storage.ceph import RadosCluster, UseGate, ceph_errors, error_code

KIB = 1024
MIB = 1024 * KIB
DEFAULT_OBJECT_SIZE = 4 * MIB
# The features of images created here: exclusive-lock is what makes single-writer ownership
# work; object-map and fast-diff make extents and used_bytes cheap; deep-flatten lets a
# flattened clone drop its parent's snapshots too.
FEATURES = (
    rbd.RBD_FEATURE_LAYERING
    | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
    | rbd.RBD_FEATURE_OBJECT_MAP
    | rbd.RBD_FEATURE_FAST_DIFF
    | rbd.RBD_FEATURE_DEEP_FLATTEN
)
# Objects described per extents() call at most; the contract allows covering less.
EXTENT_OBJECTS = 4096


class RbdStorage(Storage):
    """The RBD image ``pool/[namespace/]image`` of ``cluster``, open for the storage's life.

    ``snapshot``: open that snapshot, read-only.  Writable opens take the exclusive lock (see
    the module docstring) and raise ``StorageError(EBUSY)`` while another client holds it; an
    image without the exclusive-lock feature cannot be opened writable (``EINVAL``).  A
    missing pool, image or snapshot raises ``StorageError(ENOENT)``.  The cluster stays open on
    ``close()``.

    Requests: ``write_zeroes`` and ``trim`` are librbd's write-zeroes (whole objects removed,
    partial ones zeroed in place on the OSD, no zero bytes sent), which reads back as zeroes,
    unlike ``discard`` with its 64 KiB granularity; NO_HOLE asks for thick provisioning
    (``WRITESAME`` of zeroes on the OSD).  Both count as fast: neither sends the zeroes.
    ``extents`` reports the objects that exist (in this image or, for a clone, its parent) as
    data and the rest as holes, from ``diff_iterate`` (the object map when fast-diff is on).
    ``cache`` does nothing.
    """

    def __init__(
        self,
        cluster: RadosCluster,
        pool: str,
        image: str,
        *,
        namespace: str = "",
        read_only: bool = False,
        snapshot: str | None = None,
    ) -> None:
        self.cluster = cluster
        self.pool, self.namespace, self.image = pool, namespace, image
        self.snapshot_name = snapshot
        self.spec = _spec(pool, namespace, image, snapshot)
        self._read_only = read_only or snapshot is not None
        self._ioctx: Any = cluster.ioctx(pool, namespace)
        # A full pool answers ENOSPC at once instead of pausing writes (see the docstring).
        self._ioctx.set_osdmap_full_try()
        try:
            with ceph_errors(f"cannot open rbd image {self.spec}"):
                self._image: Any = rbd.Image(
                    self._ioctx, image, snapshot=snapshot, read_only=self._read_only
                )
            try:
                if not self._read_only:
                    self._acquire_lock()
                with ceph_errors(f"cannot inspect rbd image {self.spec}"):
                    self._size = int(self._image.size())
                    self.object_size = int(self._image.stat()["obj_size"])
                    self._fast_diff = bool(self._image.features() & rbd.RBD_FEATURE_FAST_DIFF)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._image.close()
                raise
        except BaseException:
            self._ioctx.close()
            raise
        if self._read_only:
            self._capabilities = Capabilities(
                read_only=True,
                can_trim=False,
                can_zero=False,
                inline=False,
                cheap_extents=False,
                can_resize=True,
            )
        else:
            self._capabilities = Capabilities(
                can_fast_zero=True, inline=False, cheap_extents=False, can_resize=True
            )
        self._gate = UseGate(f"rbd image {self.spec}")

    def _acquire_lock(self) -> None:
        try:
            self._image.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
        except Exception as err:
            if type(err).__module__ != "rbd":
                raise
            code = error_code(err)
            if code in {errno.EROFS, errno.EBUSY, errno.EAGAIN}:
                raise StorageError(
                    errno.EBUSY,
                    f"rbd image {self.spec} is held writable by {self._lock_owners()}; it "
                    "stays so until that client closes it, or for osd_client_watch_timeout "
                    "(30 s by default) after it died",
                ) from err
            if code == errno.EINVAL:
                raise StorageError(
                    errno.EINVAL,
                    f"rbd image {self.spec} has no exclusive-lock feature: enable it with "
                    f"'rbd feature enable {self.spec} exclusive-lock' to serve it writable",
                ) from err
            raise

    def _lock_owners(self) -> str:
        try:
            owners = [str(o["owner"]) for o in self._image.lock_get_owners()]
        except Exception:
            owners = []
        return ", ".join(f"client at {o}" for o in owners) if owners else "another client"

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def read(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        with self._gate.use(), self.cluster.errors(f"read {self.spec} [{offset}, +{length})"):
            data: bytes = self._image.read(offset, length)
        if len(data) != length:
            raise StorageError(errno.EIO, f"read {self.spec}: short read at {offset}")
        return data

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self._check_writable()
        payload = data if isinstance(data, bytes) else memoryview(data).cast("B").tobytes()
        if not payload:
            return
        with (
            self._gate.use(),
            self.cluster.errors(f"write {self.spec} [{offset}, +{len(payload)})"),
        ):
            written = self._image.write(payload, offset)
            if written != len(payload):
                raise StorageError(errno.EIO, f"write {self.spec}: short write at {offset}")
            if fua:
                self._image.flush()

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> None:
        self._check_writable()
        flags = 0 if may_trim else rbd.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        self._zero(offset, length, flags, fua, "write zeroes")

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._check_writable()
        self._zero(offset, length, 0, fua, "trim")

    def _zero(self, offset: int, length: int, flags: int, fua: bool, what: str) -> None:
        if length <= 0:
            return
        with self._gate.use(), self.cluster.errors(f"{what} {self.spec} [{offset}, +{length})"):
            self._image.write_zeroes(offset, length, flags)
            if fua:
                self._image.flush()

    def flush(self) -> None:
        with self._gate.use(), self.cluster.errors(f"flush {self.spec}"):
            self._image.flush()

    def cache(self, offset: int, length: int) -> None:
        # Advisory; librbd's cache does not prefetch on request.
        with self._gate.use():
            pass

    def extents(self, offset: int, length: int) -> list[Extent]:
        end = min(offset + length, self._size)
        # Whole objects from offset's object on, at most EXTENT_OBJECTS of them.
        limit = (offset // self.object_size + EXTENT_OBJECTS) * self.object_size
        end = min(end, limit)
        runs: list[tuple[int, int]] = []

        def collect(start: int, count: int, exists: bool) -> int:
            if exists:
                runs.append((start, start + count))
            return 0

        with self._gate.use(), self.cluster.errors(f"extents {self.spec} [{offset}, +{length})"):
            self._image.diff_iterate(
                offset, end - offset, None, collect, include_parent=True,
                whole_object=self._fast_diff,
            )  # fmt: skip
        result: list[Extent] = []
        pos = offset
        for run_start, run_stop in sorted(runs):
            start, stop = max(run_start, pos), min(run_stop, end)
            if stop <= pos:
                continue
            if start > pos:
                result.append(Extent(pos, start - pos, hole=True, zero=True))
            if result and not result[-1].hole:
                previous = result.pop()
                result.append(Extent(previous.offset, stop - previous.offset))
            else:
                result.append(Extent(start, stop - start))
            pos = stop
        if pos < end:
            result.append(Extent(pos, end - pos, hole=True, zero=True))
        return result

    def resize(self, new_size: int, *, allow_shrink: bool = False) -> None:
        """Grow (or, with ``allow_shrink``, shrink) the image, live; flushed first.

        Shrinking without ``allow_shrink`` raises ``StorageError(EINVAL)``.  Clients keep the
        size they were told at handshake until they reconnect.
        """
        self._check_writable()
        if new_size < 0:
            raise ValueError(f"size must be >= 0, not {new_size}")
        if new_size < self._size and not allow_shrink:
            raise StorageError(
                errno.EINVAL,
                f"resize {self.spec}: {new_size} is smaller than {self._size} "
                "(pass allow_shrink=True to cut the image)",
            )
        with self._gate.use(), self.cluster.errors(f"resize {self.spec} to {new_size}"):
            self._image.flush()
            self._image.resize(new_size, allow_shrink=True)
            self._size = new_size

    def snapshot(self, name: str) -> None:
        """Snapshot the image as ``name``: every write completed before the call is in it
        (flushed first).  An existing snapshot name raises ``StorageError(EEXIST)``."""
        self._check_writable()
        with self._gate.use(), self.cluster.errors(f"snapshot {self.spec}@{name}"):
            self._image.flush()
            self._image.create_snap(name)

    def close(self) -> None:
        if not self._gate.close():
            return
        try:
            # librbd flushes its cache and releases the lock here.
            with ceph_errors(f"close {self.spec}"):
                self._image.close()
        finally:
            self._ioctx.close()

    def _check_writable(self) -> None:
        if self._read_only:
            raise StorageError(errno.EPERM, f"rbd image {self.spec} is open read-only")

    def __repr__(self) -> str:
        mode = "ro" if self._read_only else "rw"
        return f"RbdStorage({self.spec!r}, {mode}, size={self._size})"


# -- Image operations (the volume catalogue's) -------------------------------------------------


def _spec(pool: str, namespace: str, image: str, snapshot: str | None = None) -> str:
    """``pool/[namespace/]image[@snap]``, as the rbd CLI spells it."""
    path = f"{pool}/{namespace}/{image}" if namespace else f"{pool}/{image}"
    return f"{path}@{snapshot}" if snapshot else path


@contextlib.contextmanager
def _ioctx(cluster: RadosCluster, pool: str, namespace: str) -> Iterator[Any]:
    ioctx = cluster.ioctx(pool, namespace)
    try:
        yield ioctx
    finally:
        ioctx.close()


@contextlib.contextmanager
def _open(
    cluster: RadosCluster,
    pool: str,
    image: str,
    namespace: str,
    *,
    read_only: bool = False,
    snapshot: str | None = None,
) -> Iterator[Any]:
    """The image opened for one operation, without taking its lock: librbd takes it for
    maintenance operations itself, or forwards them to the client holding it."""
    with _ioctx(cluster, pool, namespace) as ioctx:
        with ceph_errors(f"cannot open rbd image {_spec(pool, namespace, image, snapshot)}"):
            handle = rbd.Image(ioctx, image, snapshot=snapshot, read_only=read_only)
        try:
            yield handle
        finally:
            handle.close()


def create_image(
    cluster: RadosCluster,
    pool: str,
    name: str,
    size: int,
    *,
    namespace: str = "",
    object_size: int | None = None,
) -> None:
    """Create an empty (thin) image of ``size`` bytes with :data:`FEATURES`.

    ``object_size``: a power of two in [4 KiB, 32 MiB] (default 4 MiB; else ``ValueError``).
    An existing image raises ``StorageError(EEXIST)``.
    """
    object_size = object_size or DEFAULT_OBJECT_SIZE
    if object_size & (object_size - 1) or not 4 * KIB <= object_size <= 32 * MIB:
        raise ValueError(f"object size must be a power of two in [4 KiB, 32 MiB]: {object_size}")
    with (
        _ioctx(cluster, pool, namespace) as ioctx,
        ceph_errors(f"create rbd image {_spec(pool, namespace, name)}"),
    ):
        rbd.RBD().create(
            ioctx, name, size, order=object_size.bit_length() - 1, old_format=False,
            features=FEATURES,
        )  # fmt: skip


def remove_image(cluster: RadosCluster, pool: str, name: str, namespace: str = "") -> None:
    """Delete the image and its data; nothing happens if it does not exist.

    An image with snapshots raises ``StorageError(ENOTEMPTY)`` (remove them first), one that
    is open somewhere ``StorageError(EBUSY)``.
    """
    with (
        _ioctx(cluster, pool, namespace) as ioctx,
        ceph_errors(f"remove rbd image {_spec(pool, namespace, name)}"),
        contextlib.suppress(rbd.ImageNotFound),
    ):
        rbd.RBD().remove(ioctx, name)


def list_images(cluster: RadosCluster, pool: str, namespace: str = "") -> list[str]:
    """The names of the images in ``pool`` (and ``namespace``), sorted."""
    with _ioctx(cluster, pool, namespace) as ioctx, ceph_errors(f"list rbd images in {pool}"):
        names: list[str] = rbd.RBD().list(ioctx)
    return sorted(names)


def create_snapshot(
    cluster: RadosCluster, pool: str, image: str, snap: str, namespace: str = ""
) -> None:
    """Snapshot an image nobody serves (a served one: ``RbdStorage.snapshot``, which flushes
    the server's cache first).  An existing name raises ``StorageError(EEXIST)``."""
    with (
        _open(cluster, pool, image, namespace) as handle,
        ceph_errors(f"snapshot {_spec(pool, namespace, image, snap)}"),
    ):
        handle.create_snap(snap)


def list_snapshots(cluster: RadosCluster, pool: str, image: str, namespace: str = "") -> list[str]:
    """The image's snapshot names, oldest first."""
    with (
        _open(cluster, pool, image, namespace, read_only=True) as handle,
        ceph_errors(f"list snapshots of {_spec(pool, namespace, image)}"),
    ):
        return [str(snap["name"]) for snap in handle.list_snaps()]


def remove_snapshot(
    cluster: RadosCluster, pool: str, image: str, snap: str, namespace: str = ""
) -> None:
    """Remove a snapshot, unprotecting it first; nothing happens if it (or the image) does
    not exist.  A snapshot that clones still depend on raises ``StorageError(EBUSY)``
    (flatten or remove them first)."""
    spec = _spec(pool, namespace, image, snap)
    try:
        with _open(cluster, pool, image, namespace) as handle, ceph_errors(f"remove {spec}"):
            if not handle.snap_exists(snap):
                return
            if handle.is_protected_snap(snap):
                handle.unprotect_snap(snap)
            handle.remove_snap(snap)
    except StorageError as err:
        if err.errno != errno.ENOENT:
            raise


def clone(  # noqa: PLR0917 - the signature the catalogue was promised
    cluster: RadosCluster,
    pool: str,
    parent_image: str,
    parent_snap: str,
    child: str,
    namespace: str = "",
) -> None:
    """Create ``child`` as a copy-on-write clone of ``parent_image@parent_snap`` (same pool
    and namespace).  The snapshot is protected first, which clone format 1 requires and
    format 2 tolerates; :func:`remove_snapshot` unprotects it.  An existing child raises
    ``StorageError(EEXIST)``."""
    with (
        _open(cluster, pool, parent_image, namespace) as parent,
        ceph_errors(f"protect {_spec(pool, namespace, parent_image, parent_snap)}"),
    ):
        if not parent.is_protected_snap(parent_snap):
            parent.protect_snap(parent_snap)
    with (
        _ioctx(cluster, pool, namespace) as ioctx,
        ceph_errors(f"clone {_spec(pool, namespace, parent_image, parent_snap)} to {child}"),
    ):
        rbd.RBD().clone(ioctx, parent_image, parent_snap, ioctx, child, features=FEATURES)


def flatten(
    cluster: RadosCluster,
    pool: str,
    image: str,
    progress: Callable[[int, int], None] | None = None,
    namespace: str = "",
) -> None:
    """Copy every block a clone still reads from its parent into it, detaching it.

    ``progress(done, total)`` is called as it goes (in units librbd chooses: objects), and
    once more with ``done == total`` when it is finished (librbd itself stops short of that).
    May take long; the image can be served meanwhile (librbd forwards the work to the holder
    of its lock).  An image that is not a clone raises ``StorageError(EINVAL)``.
    """
    last_total = 0

    def report(done: int, total: int) -> int:
        nonlocal last_total
        last_total = total
        if progress is not None:
            progress(done, total)
        return 0

    with (
        _open(cluster, pool, image, namespace) as handle,
        ceph_errors(f"flatten {_spec(pool, namespace, image)}"),
    ):
        handle.flatten(on_progress=report)
    if progress is not None:
        progress(last_total, last_total)


def used_bytes(
    cluster: RadosCluster,
    pool: str,
    image: str,
    snapshot: str | None = None,
    namespace: str = "",
) -> int:
    """Bytes of the image (or of its ``snapshot``) that are allocated, at object granularity
    and without what a clone still reads from its parent: ``rbd du``'s USED, from the object
    map when fast-diff is on (one read), else one stat per object."""
    total = 0

    def count(_offset: int, length: int, exists: bool) -> int:
        nonlocal total
        if exists:
            total += length
        return 0

    with (
        _open(cluster, pool, image, namespace, read_only=True, snapshot=snapshot) as handle,
        ceph_errors(f"usage of {_spec(pool, namespace, image, snapshot)}"),
    ):
        fast = bool(handle.features() & rbd.RBD_FEATURE_FAST_DIFF)
        handle.diff_iterate(0, handle.size(), None, count, include_parent=False,
                            whole_object=fast)  # fmt: skip
    return total
