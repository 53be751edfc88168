"""Objects in a RADOS pool (Ceph): one RADOS object per key, in a namespace of the pool.

``put`` is a single ``write_full`` operation and ``put_range`` a single ``write`` at an
offset: RADOS writes in place, so a partial chunk update is never a read-modify-write.

Atomicity and durability.  An OSD applies each client operation as one transaction of its
object store (BlueStore: the new data is written to free space, then one key-value commit
switches the object's metadata to it), and operations on one object are applied in order, a
read never interleaving with a write.  So a ``write_full`` is seen whole or not at all, by
concurrent readers and after a crash of the OSD alike (tests/integration/test_ceph_storage.py
kills the OSD with SIGKILL during 8 MiB ``write_full`` calls and finds every object whole).
librados returns from a write only once every OSD of the placement group's acting set has
committed it to disk: every completed ``put``, ``put_range`` and ``delete`` is already durable,
and ``sync()`` has nothing left to do.

Full pools.  By default librados *pauses* writes to a full pool (quota or cluster full) until
space appears, which the op timeout turns into ``ETIMEDOUT`` much later.  The store sets
``FULL_TRY`` on its I/O context instead: the OSD answers at once, ``EDQUOT`` for a pool over
its quota (``ceph osd pool set-quota POOL max_bytes N``) and ``ENOSPC`` for a full cluster,
both raised as ``StorageError(ENOSPC)``; deletes still work, so space can be freed.

Listing.  ``list(prefix)`` is a listing of the whole namespace (RADOS has no prefix index),
filtered and sorted here: it costs one request per placement group and grows with the number
of objects in the pool.  A namespace per volume set keeps what comes back small;
ChunkedStorage calls it for ``extents`` and for large ``trim``/``write_zeroes``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import rados

from backend.storage.ceph import RadosCluster, UseGate
from backend.storage.objects.base import ObjectStore
from backend.storage.objects.directory import check_key


class RadosObjectStore(ObjectStore):
    """Objects in ``pool`` (and ``namespace``) of ``cluster``.

    The cluster is shared and stays open on ``close()`` unless ``owns_cluster``.  A missing
    pool raises ``StorageError(ENOENT)``.  Thread safe: every call goes through one librados
    I/O context, and librados runs calls from several threads in parallel.
    """

    supports_offset_writes = True

    def __init__(
        self,
        cluster: RadosCluster,
        pool: str,
        namespace: str = "",
        *,
        owns_cluster: bool = False,
    ) -> None:
        self.cluster = cluster
        self.pool = pool
        self.namespace = namespace
        self._owns_cluster = owns_cluster
        self._ioctx: Any = cluster.ioctx(pool, namespace)
        # Full pool: an ENOSPC now, not a pause until the op timeout (see the docstring).
        self._ioctx.set_osdmap_full_try()
        self._gate = UseGate(repr(self))

    def get(self, key: str) -> bytes | None:
        check_key(key)
        with self._gate.use(), self.cluster.errors(f"get {key}"):
            try:
                size, _ = self._ioctx.stat(key)
                # One read op returns the object as it was when the op ran: asking for more
                # than its size proves we have all of it, even if it changed since the stat.
                want = int(size) + 1
                while True:
                    data: bytes = self._ioctx.read(key, want, 0)
                    if len(data) < want:
                        return data
                    want *= 2
            except rados.ObjectNotFound:
                return None

    def get_range(self, key: str, offset: int, length: int) -> bytes | None:
        check_key(key)
        with self._gate.use(), self.cluster.errors(f"get {key} [{offset}, +{length})"):
            try:
                if length <= 0:
                    # A RADOS read of length 0 means "to the end of the object".
                    self._ioctx.stat(key)
                    return b""
                data: bytes = self._ioctx.read(key, length, offset)
                return data
            except rados.ObjectNotFound:
                return None

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        check_key(key)
        with self._gate.use(), self.cluster.errors(f"put {key}"):
            self._ioctx.write_full(key, _as_bytes(data))

    def put_range(self, key: str, offset: int, data: bytes | bytearray | memoryview) -> None:
        check_key(key)
        with self._gate.use(), self.cluster.errors(f"put {key} at {offset}"):
            self._ioctx.write(key, _as_bytes(data), offset)

    def delete(self, key: str) -> None:
        check_key(key)
        with (
            self._gate.use(),
            self.cluster.errors(f"delete {key}"),
            contextlib.suppress(rados.ObjectNotFound),
        ):
            self._ioctx.remove_object(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        # Not Ioctx.list_objects(): it ends silently on errors (see backend.storage.ceph).
        with self._gate.use():
            keys = sorted(self.cluster.list_objects(self.pool, self.namespace, prefix))
        return iter(keys)

    def sync(self) -> None:
        # Every write and delete was committed on the acting set before it returned.
        with self._gate.use():
            pass

    def close(self) -> None:
        if not self._gate.close():
            return
        try:
            self._ioctx.close()
        finally:
            if self._owns_cluster:
                self.cluster.close()

    def __repr__(self) -> str:
        where = f"{self.pool}/{self.namespace}" if self.namespace else self.pool
        return f"RadosObjectStore({where!r})"


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """The binding takes ``bytes`` only."""
    if isinstance(data, bytes):
        return data
    return memoryview(data).cast("B").tobytes()
