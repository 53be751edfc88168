"""RADOS objects and RBD volumes on a real single-node Ceph (tests/integration/cephrig.py).

The storage conformance suite and the model test run over ``ChunkedStorage`` on a
``RadosObjectStore`` (the offset-write path) and over ``RbdStorage``; then the ObjectStore
contract on RADOS itself, the image functions (snapshots, clones, flatten), single-writer
ownership across two processes, a pool quota, and real faults: the OSD killed with SIGKILL
while writes run, restarted, and kept down past the op timeout.  The fault tests come last:
they take the session's OSD down (and bring it back).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backend.storage import Extent, Storage, StorageError
from backend.storage.ceph import RadosCluster
from backend.storage.chunked import ChunkedStorage, create_layer, open_chain
from backend.storage.layers import CachingStorage, RetryingStorage
from backend.storage.objects.rados import RadosObjectStore
from backend.storage.rbd import (
    RbdStorage,
    clone,
    create_image,
    create_snapshot,
    flatten,
    list_images,
    list_snapshots,
    remove_image,
    remove_snapshot,
    used_bytes,
)
from tests.integration.cephrig import CephCluster
from tests.unit.storage.conformance import *  # noqa: F403
from tests.unit.storage.conformance import StorageFactory, pattern
from tests.unit.storage.model import make_model_test

pytestmark = pytest.mark.integration

KIB = 1024
MIB = 1024 * KIB
CHUNK = 64 * KIB
ROOT = Path(__file__).resolve().parents[2]

# The model tests are unittest classes built without fixtures: the module fixture below
# leaves the connection here for their factories.
_connection: list[RadosCluster] = []


@pytest.fixture(scope="module", autouse=True)
def cluster(ceph_cluster: CephCluster) -> Iterator[RadosCluster]:
    connection = RadosCluster(str(ceph_cluster.conf_path), timeout=30)
    _connection.append(connection)
    yield connection
    _connection.remove(connection)
    connection.close()


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class _DisposableRadosStore(RadosObjectStore):
    """A store in a namespace of its own, emptied on close."""

    def __init__(self, connection: RadosCluster) -> None:
        super().__init__(connection, "nbs", _unique("t"))

    def close(self) -> None:
        for key in self.keys():
            self.delete(key)
        super().close()


class _DisposableRbd(RbdStorage):
    """A fresh image (64 KiB objects, so small volumes cross objects), removed on close."""

    def __init__(self, connection: RadosCluster, size: int, read_only: bool = False) -> None:
        name = _unique("t")
        create_image(connection, "rbd", name, size, object_size=64 * KIB)
        super().__init__(connection, "rbd", name, read_only=read_only)

    def close(self) -> None:
        super().close()
        remove_image(self.cluster, "rbd", self.image)


def _rados_chunked(size: int, read_only: bool = False) -> ChunkedStorage:
    store = _DisposableRadosStore(_connection[0])
    return ChunkedStorage(store, size, chunk_size=CHUNK, workers=4, read_only=read_only)


def _rbd(size: int, read_only: bool = False) -> RbdStorage:
    return _DisposableRbd(_connection[0], size, read_only)


def _rbd_layered(size: int) -> Storage:
    """RBD under a write-back cache and a retry layer (what a volume spec with
    ``+cache:mode=write-back+retry`` builds)."""
    return CachingStorage(RetryingStorage(_rbd(size)), 1024 * KIB, block=16 * KIB, write_back=True)


def _rados_layers(size: int) -> Storage:
    """A top layer over a frozen one on RADOS (copy-on-write in the store), under a cache."""
    store = _DisposableRadosStore(_connection[0])
    create_layer(store, "base/", size, CHUNK)
    base = open_chain(store, ["base/"])
    base.write(0, bytes(min(size, CHUNK)))  # a chunk below to copy up from (zeroes)
    base.snapshot("top/")
    base.close()
    chain = open_chain(store, ["base/", "top/"], workers=4, owns_store=True)
    return CachingStorage(chain, 512 * KIB, block=16 * KIB)


FACTORIES: dict[str, StorageFactory] = {
    "rados-chunked": _rados_chunked,
    "rbd": _rbd,
    "rbd+cache+retry": _rbd_layered,
    "rados-layers+cache": _rados_layers,
}


@pytest.fixture(params=sorted(FACTORIES))
def storage_factory(request: pytest.FixtureRequest) -> StorageFactory:
    return FACTORIES[request.param]


@pytest.fixture(params=["rados-chunked", "rbd"])
def read_only_storage_factory(request: pytest.FixtureRequest) -> StorageFactory:
    factory = _rados_chunked if request.param == "rados-chunked" else _rbd
    return lambda size: factory(size, True)


TestRadosChunkedModel = make_model_test(_rados_chunked, max_examples=15, step_count=20)
TestRbdModel = make_model_test(_rbd, max_examples=15, step_count=20)
TestRbdLayeredModel = make_model_test(_rbd_layered, max_examples=10, step_count=20)
TestRadosLayersModel = make_model_test(_rados_layers, max_examples=10, step_count=20)


@pytest.fixture
def store(cluster: RadosCluster) -> Iterator[RadosObjectStore]:
    opened = _DisposableRadosStore(cluster)
    yield opened
    opened.close()


@pytest.fixture
def image(cluster: RadosCluster) -> Iterator[str]:
    """The name of a fresh 8 MiB image (4 MiB objects) in pool rbd, removed afterwards with
    its snapshots and clones."""
    name = _unique("img")
    create_image(cluster, "rbd", name, 8 * MIB)
    yield name
    # Clones (``name-...``) sort after their parent: remove them first.
    for leftover in sorted((n for n in list_images(cluster, "rbd") if n.startswith(name)),
                           reverse=True):  # fmt: skip
        for snap in list_snapshots(cluster, "rbd", leftover):
            remove_snapshot(cluster, "rbd", leftover, snap)
        remove_image(cluster, "rbd", leftover)


# -- The ObjectStore contract on RADOS ----------------------------------------------------------


def test_rados_store_basics(store: RadosObjectStore) -> None:
    assert store.supports_offset_writes
    assert store.get("a") is None
    assert store.get_range("a/b", 0, 5) is None
    store.delete("missing")
    store.put("a/b/c", b"hello")
    store.put("a/d", bytearray(b"x"))
    store.put("e", memoryview(b"..yy..")[2:4])
    assert store.get("a/b/c") == b"hello"
    assert store.get_range("a/b/c", 1, 3) == b"ell"
    assert store.get_range("a/b/c", 3, 10) == b"lo"
    assert store.get_range("a/b/c", 9, 10) == b""
    assert store.get_range("a/b/c", 2, 0) == b""
    assert store.get("e") == b"yy"
    assert store.keys() == ["a/b/c", "a/d", "e"]
    assert store.keys("a/") == ["a/b/c", "a/d"]
    assert store.keys("a/b") == ["a/b/c"]
    store.put("a/d", b"new")
    assert store.get("a/d") == b"new"
    store.put("a/d", b"")
    assert store.get("a/d") == b""
    store.delete("a/d")
    assert store.get("a/d") is None
    store.sync()


def test_rados_store_put_range(store: RadosObjectStore) -> None:
    store.put_range("k", 5, b"abc")  # creates, the gap reads as zeroes
    assert store.get("k") == b"\0" * 5 + b"abc"
    store.put_range("k", 6, memoryview(b"XYZW"))  # overwrites and grows
    assert store.get("k") == b"\0" * 5 + b"aXYZW"
    store.put("k", b"0123456789")
    store.put_range("k", 2, b"--")  # in place, the rest stays
    assert store.get("k") == b"01--456789"


def test_rados_store_keys_are_checked_and_listed_in_order(store: RadosObjectStore) -> None:
    for key in ["", "../x", "a//b", "sp ace", "a~b"]:
        with pytest.raises(StorageError) as excinfo:
            store.put(key, b"x")
        assert excinfo.value.errno == errno.EINVAL
    keys = [f"vol/{i:016x}" for i in (17, 3, 255, 0, 4096)]
    for key in keys:
        store.put(key, b"x")
    store.put("other", b"y")
    assert store.keys("vol/") == sorted(keys)
    assert store.keys("vol/00000000000000") == sorted(keys)[:4]


def test_rados_store_large_objects(store: RadosObjectStore) -> None:
    data = pattern(1, 32 * MIB)
    store.put("big", data)
    assert store.get("big") == data
    assert store.get_range("big", 32 * MIB - 10, 100) == data[-10:]
    store.put("big", b"small")  # a shorter object replaces it whole
    assert store.get("big") == b"small"


def test_rados_stores_share_a_connection_and_keep_to_their_namespace(
    cluster: RadosCluster,
) -> None:
    one = RadosObjectStore(cluster, "nbs", _unique("ns"))
    two = RadosObjectStore(cluster, "nbs", _unique("ns"))
    try:
        one.put("k", b"one")
        assert two.get("k") is None
        assert two.keys() == []
    finally:
        one.delete("k")
        one.close()
        two.close()
    one.close()  # idempotent
    with pytest.raises(StorageError) as excinfo:
        one.get("k")
    assert excinfo.value.errno == errno.EBADF
    assert cluster.ioctx("nbs") is not None  # the shared connection stays open


def test_missing_pool(cluster: RadosCluster) -> None:
    with pytest.raises(StorageError) as excinfo:
        RadosObjectStore(cluster, "no-such-pool")
    assert excinfo.value.errno == errno.ENOENT
    with pytest.raises(StorageError) as excinfo:
        RbdStorage(cluster, "rbd", "no-such-image")
    assert excinfo.value.errno == errno.ENOENT


def test_cluster_without_monitor_times_out() -> None:
    started = time.monotonic()
    with pytest.raises(StorageError) as excinfo:
        RadosCluster(conf={"mon_host": "[v2:127.0.0.1:9]"}, timeout=3)
    assert excinfo.value.errno in {errno.ETIMEDOUT, errno.EIO, errno.ENOENT}, excinfo.value
    assert time.monotonic() - started < 30


@pytest.fixture
def quota_pool(ceph_cluster: CephCluster) -> Iterator[str]:
    """A new pool limited to 1 MiB (``ceph osd pool set-quota POOL max_bytes``), deleted
    afterwards."""
    pool = _unique("quota")
    ceph_cluster.ceph("osd", "pool", "create", pool, "8", "8")
    ceph_cluster.ceph("osd", "pool", "application", "enable", pool, "rbd")
    ceph_cluster.ceph("osd", "pool", "set-quota", pool, "max_bytes", str(MIB))
    yield pool
    ceph_cluster.ceph("osd", "pool", "delete", pool, pool, "--yes-i-really-really-mean-it")


def _write_until_refused(write: Callable[[int], None], limit: float = 90) -> StorageError:
    """Call ``write(n)`` for n = 0, 1, ... until it raises; the monitors mark a pool full from
    usage statistics a few seconds after the writes, so this keeps writing, within a bound.
    The refused call must fail well before the op timeout (30 s): a paused write would not."""
    deadline = time.monotonic() + limit
    count = 0
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            write(count)
        except StorageError as err:
            took = time.monotonic() - started
            assert took < 15, f"refused after {took:.1f} s: paused until the timeout"
            return err
        count += 1
        time.sleep(0.2)
    raise AssertionError(f"{count} writes of 256 KiB fit in a 1 MiB quota")


def test_rados_pool_quota_is_enospc(cluster: RadosCluster, quota_pool: str) -> None:
    store = RadosObjectStore(cluster, quota_pool)
    try:
        refused = _write_until_refused(lambda n: store.put(f"o{n}", bytes(256 * KIB)))
        assert refused.errno == errno.ENOSPC, refused
        assert "quota" in refused.message
        store.delete("o0")  # a full pool still takes deletes
        assert store.get("o0") is None
    finally:
        store.close()


def test_rbd_pool_quota_is_enospc(cluster: RadosCluster, quota_pool: str) -> None:
    create_image(cluster, quota_pool, "q", 64 * MIB)
    volume = RbdStorage(cluster, quota_pool, "q")
    try:
        refused = _write_until_refused(
            lambda n: volume.write(n * 256 * KIB, pattern(n, 256 * KIB), fua=True)
        )
        assert refused.errno == errno.ENOSPC, refused
    finally:
        volume.close()


# -- RBD: capabilities, extents, ownership ------------------------------------------------------


def test_rbd_capabilities(cluster: RadosCluster, image: str) -> None:
    storage = RbdStorage(cluster, "rbd", image)
    try:
        caps = storage.capabilities
        assert not caps.inline
        assert caps.thread_safe
        assert caps.can_multi_conn
        assert caps.can_fua
        assert storage.size == 8 * MIB
        assert storage.object_size == 4 * MIB
    finally:
        storage.close()


def test_rbd_extents_follow_objects(cluster: RadosCluster, image: str) -> None:
    storage = RbdStorage(cluster, "rbd", image)
    try:
        assert storage.extents(0, 8 * MIB) == [Extent(0, 8 * MIB, hole=True, zero=True)]
        storage.write(4 * MIB + 10, b"data")
        assert storage.extents(0, 8 * MIB) == [
            Extent(0, 4 * MIB, hole=True, zero=True),
            Extent(4 * MIB, 4 * MIB),
        ]
        assert storage.extents(5 * MIB, 100) == [Extent(5 * MIB, 100)]
        storage.trim(4 * MIB, 4 * MIB)  # the whole object goes
        assert storage.extents(0, 8 * MIB) == [Extent(0, 8 * MIB, hole=True, zero=True)]
        assert used_bytes(cluster, "rbd", image) == 0
    finally:
        storage.close()


def test_rbd_read_only_and_snapshot_opens(cluster: RadosCluster, image: str) -> None:
    writer = RbdStorage(cluster, "rbd", image)
    try:
        writer.write(0, b"before")
        writer.snapshot("s1")
        writer.write(0, b"after!")
        # Another handle sees a write once it is flushed out of the writer's librbd cache.
        writer.flush()
        reader = RbdStorage(cluster, "rbd", image, read_only=True)
        snap = RbdStorage(cluster, "rbd", image, snapshot="s1")
        try:
            assert reader.read(0, 6) == b"after!"
            assert snap.read(0, 6) == b"before"
            assert snap.capabilities.read_only
            with pytest.raises(StorageError) as excinfo:
                snap.write(0, b"x")
            assert excinfo.value.errno == errno.EPERM
        finally:
            reader.close()
            snap.close()
        with pytest.raises(StorageError) as excinfo:
            writer.snapshot("s1")
        assert excinfo.value.errno == errno.EEXIST
    finally:
        writer.close()


def test_rbd_resize(cluster: RadosCluster, image: str) -> None:
    storage = RbdStorage(cluster, "rbd", image)
    try:
        storage.write(8 * MIB - 4, b"tail")
        storage.resize(12 * MIB)
        assert storage.size == 12 * MIB
        assert storage.read(8 * MIB - 4, 8) == b"tail" + bytes(4)
        with pytest.raises(StorageError) as excinfo:
            storage.resize(4 * MIB)
        assert excinfo.value.errno == errno.EINVAL
        storage.resize(4 * MIB, allow_shrink=True)
        assert storage.size == 4 * MIB
    finally:
        storage.close()
    reopened = RbdStorage(cluster, "rbd", image, read_only=True)
    assert reopened.size == 4 * MIB
    reopened.close()


def test_snapshot_clone_flatten_remove(cluster: RadosCluster, image: str) -> None:
    base = pattern(1, 2 * MIB)
    storage = RbdStorage(cluster, "rbd", image)
    storage.write(MIB, base)
    storage.close()
    create_snapshot(cluster, "rbd", image, "gold")
    assert list_snapshots(cluster, "rbd", image) == ["gold"]

    # Later writes to the parent do not reach its snapshot or the clone.
    storage = RbdStorage(cluster, "rbd", image)
    storage.write(MIB, b"parent moved on")
    storage.close()
    child = f"{image}-child"
    clone(cluster, "rbd", image, "gold", child)
    assert child in list_images(cluster, "rbd")
    assert used_bytes(cluster, "rbd", child) == 0  # everything still read from the parent

    copy = RbdStorage(cluster, "rbd", child)
    try:
        assert copy.read(MIB, 2 * MIB) == base
        assert copy.extents(0, 8 * MIB)[0] == Extent(0, 4 * MIB)  # the parent's data is data
        copy.write(MIB, b"child diverges")
        assert copy.read(MIB, 14) == b"child diverges"
    finally:
        copy.close()
    snap = RbdStorage(cluster, "rbd", image, snapshot="gold")
    assert snap.read(MIB, 2 * MIB) == base
    snap.close()

    # The snapshot cannot go while the clone needs it; after flatten it can.
    with pytest.raises(StorageError) as excinfo:
        remove_snapshot(cluster, "rbd", image, "gold")
    assert excinfo.value.errno == errno.EBUSY, excinfo.value
    progress: list[tuple[int, int]] = []
    flatten(cluster, "rbd", child, progress=lambda done, total: progress.append((done, total)))
    assert progress
    assert progress[-1][0] == progress[-1][1]
    assert used_bytes(cluster, "rbd", child) == 4 * MIB  # the copied-up object
    remove_snapshot(cluster, "rbd", image, "gold")
    remove_snapshot(cluster, "rbd", image, "gold")  # missing: no error
    assert list_snapshots(cluster, "rbd", image) == []
    copy = RbdStorage(cluster, "rbd", child, read_only=True)
    assert copy.read(MIB, 2 * MIB) == b"child diverges" + base[14:]
    copy.close()
    remove_image(cluster, "rbd", child)
    remove_image(cluster, "rbd", child)  # missing: no error
    assert child not in list_images(cluster, "rbd")


def test_image_functions_report_errors(cluster: RadosCluster, image: str) -> None:
    with pytest.raises(StorageError) as excinfo:
        create_image(cluster, "rbd", image, MIB)
    assert excinfo.value.errno == errno.EEXIST
    with pytest.raises(ValueError, match="object size"):
        create_image(cluster, "rbd", _unique("x"), MIB, object_size=3000)
    create_snapshot(cluster, "rbd", image, "s")
    with pytest.raises(StorageError) as excinfo:
        remove_image(cluster, "rbd", image)
    assert excinfo.value.errno == errno.ENOTEMPTY, excinfo.value
    with pytest.raises(StorageError) as excinfo:
        flatten(cluster, "rbd", image)
    assert excinfo.value.errno == errno.EINVAL, excinfo.value
    remove_snapshot(cluster, "rbd", "no-such-image", "s")  # missing image: no error


# The other NBS server: opens the image, says how it went, and holds it until told to close.
_HOLDER = """
import sys
from backend.storage import StorageError
from backend.storage.ceph import RadosCluster
from backend.storage.rbd import RbdStorage
cluster = RadosCluster(sys.argv[1], timeout=30)
try:
    storage = RbdStorage(cluster, "rbd", sys.argv[2], read_only=sys.argv[3] == "ro")
except StorageError as err:
    print(f"ERROR {err.errno} {err.message}", flush=True)
    sys.exit(0)
print(f"OPEN {cluster.address}", flush=True)
if sys.stdin.readline().strip() == "write":
    storage.write(0, b"from the holder", fua=True)
    print("WROTE", flush=True)
    sys.stdin.readline()
storage.close()
cluster.close()
print("CLOSED", flush=True)
"""


class _Holder:
    """A separate process holding the image open (see _HOLDER)."""

    def __init__(self, conf: Path, image: str, mode: str) -> None:
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(conf), image, mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.process.stdout is not None
        self.first = self.process.stdout.readline().strip()
        self.seconds = time.monotonic() - self.started

    def tell(self, line: str) -> str:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def close(self) -> None:
        if self.process.poll() is None:
            self.tell("close")
        self.process.wait(60)
        self._release()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._release()

    def _release(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


def test_only_one_writer_across_processes(
    ceph_cluster: CephCluster, cluster: RadosCluster, image: str
) -> None:
    first = _Holder(ceph_cluster.conf_path, image, "rw")
    holders = [first]
    try:
        assert first.first.startswith("OPEN "), first.first
        address = first.first.split()[1]

        second = _Holder(ceph_cluster.conf_path, image, "rw")
        holders.append(second)
        assert second.first.startswith(f"ERROR {errno.EBUSY} "), second.first
        assert f"held writable by client at {address}" in second.first
        assert second.seconds < 10  # refused at once, not after a wait
        second.close()

        # This process is refused too, and so is a plain librbd writer that asks nobody.
        with pytest.raises(StorageError) as excinfo:
            RbdStorage(cluster, "rbd", image)
        assert excinfo.value.errno == errno.EBUSY

        # Readers are welcome, in other processes and here, and see the holder's writes.
        reader = _Holder(ceph_cluster.conf_path, image, "ro")
        holders.append(reader)
        assert reader.first.startswith("OPEN "), reader.first
        assert first.tell("write") == "WROTE"
        local = RbdStorage(cluster, "rbd", image, read_only=True)
        assert local.read(0, 15) == b"from the holder"
        local.close()
        reader.close()

        # Once the holder closes, the next writer gets the image.
        assert first.tell("close") == "CLOSED"
        first.close()
        third = _Holder(ceph_cluster.conf_path, image, "rw")
        holders.append(third)
        assert third.first.startswith("OPEN "), third.first
        third.close()
    finally:
        for holder in holders:
            holder.kill()


def test_crashed_writer_is_fenced_and_replaced(
    ceph_cluster: CephCluster, cluster: RadosCluster, image: str
) -> None:
    crashed = _Holder(ceph_cluster.conf_path, image, "rw")
    assert crashed.first.startswith("OPEN "), crashed.first
    address = crashed.first.split()[1]
    crashed.kill()  # kill -9: the lock stays, held by a dead client
    # The open waits for the dead client's watch to expire (osd client watch timeout = 10 s
    # in the rig), then blocklists it and breaks its lock.
    started = time.monotonic()
    storage = RbdStorage(cluster, "rbd", image)
    waited = time.monotonic() - started
    try:
        storage.write(0, b"new owner", fua=True)
        assert storage.read(0, 9) == b"new owner"
    finally:
        storage.close()
    assert waited < 60
    blocklist = ceph_cluster.ceph("osd", "blocklist", "ls")
    assert address in blocklist, (address, blocklist)


# -- Real faults: the OSD killed (these take the session's OSD down and restart it) -------------


def _run_bounded(func: Callable[[], object], limit: float) -> BaseException | None:
    """Run ``func`` in a thread; its exception, None if it returned; fail if it hangs."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            func()
            outcome.append(None)
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"still blocked after {limit} s: a hang, not an error"
    return outcome[0]


def test_osd_crash_and_restart_loses_no_acknowledged_write(
    ceph_cluster: CephCluster, image: str
) -> None:
    # An op timeout longer than the restart: the writes in flight must wait, not fail.
    patient = RadosCluster(str(ceph_cluster.conf_path), timeout=120)
    volume = RbdStorage(patient, "rbd", image)
    objects = RadosObjectStore(patient, "nbs", _unique("crash"))
    flushed = pattern(2, 3 * MIB)
    volume.write(0, flushed)
    volume.flush()
    objects.put("flushed", flushed)

    stop = threading.Event()
    errors: list[BaseException] = []
    completed: list[int] = []  # RBD writes that returned, by index
    versions: list[int] = []  # RADOS write_full calls that returned, by version

    def write_volume() -> None:
        try:
            index = 0
            while not stop.is_set():
                block = 4 * MIB + (index % 256) * 16 * KIB
                volume.write(block, pattern(1000 + index, 16 * KIB))
                completed.append(index)
                index += 1
        except BaseException as err:
            errors.append(err)

    def write_objects() -> None:
        try:
            version = 0
            while not stop.is_set():
                version += 1
                objects.put("big", bytes([version % 251 + 1]) * (8 * MIB))
                versions.append(version)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=write_volume), threading.Thread(target=write_objects)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        ceph_cluster.kill_osd()
        before = (len(completed), len(versions))
        time.sleep(2)
        ceph_cluster.start_osd()
        # Progress after the restart: the writers were blocked, not broken.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            len(completed) < before[0] + 10 or len(versions) < before[1] + 2
        ):
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(150)
    try:
        assert not errors, errors
        assert len(completed) >= before[0] + 10, "RBD writes did not resume after the restart"
        assert len(versions) >= before[1] + 2, "RADOS writes did not resume after the restart"
        volume.flush()
        assert volume.read(0, len(flushed)) == flushed
        assert objects.get("flushed") == flushed
        # Every completed RBD write is there (the last one to each block wins).
        last: dict[int, int] = {}
        for index in completed:
            last[index % 256] = index
        for slot, index in last.items():
            block = 4 * MIB + slot * 16 * KIB
            assert volume.read(block, 16 * KIB) == pattern(1000 + index, 16 * KIB), index
        # The 8 MiB object is whole: one version throughout, the last acknowledged one.
        big = objects.get("big")
        assert big is not None
        assert big == bytes([versions[-1] % 251 + 1]) * (8 * MIB)
    finally:
        for key in objects.list():
            objects.delete(key)
        objects.close()
        volume.close()
        patient.close()


def test_osd_down_past_the_timeout_is_an_error_not_a_hang(
    ceph_cluster: CephCluster, image: str
) -> None:
    timeout = 5.0
    hasty = RadosCluster(str(ceph_cluster.conf_path), timeout=timeout)
    volume = RbdStorage(hasty, "rbd", image)
    objects = RadosObjectStore(hasty, "nbs", _unique("down"))
    objects.put("k", b"v")
    volume.write(0, b"v", fua=True)
    ceph_cluster.kill_osd()
    try:
        for name, call in [
            ("rados put", lambda: objects.put("k", b"w")),
            ("rados get", lambda: objects.get("k") and None),
            # The binding's listing ends silently on errors: an empty answer here would make
            # a chunked volume read zeroes (backend.storage.ceph lists through the C API).
            ("rados list", lambda: objects.keys() and None),
            ("rbd write+fua", lambda: volume.write(0, b"w" * 4096, fua=True)),
            # Inside the object the first write created (a missing object reads as zeroes
            # from the object map, without asking any OSD).
            ("rbd read", lambda: volume.read(64 * KIB, 4096) and None),
        ]:
            started = time.monotonic()
            error = _run_bounded(call, limit=timeout * 6 + 30)
            took = time.monotonic() - started
            assert isinstance(error, StorageError), (name, error)
            assert error.errno in {errno.ETIMEDOUT, errno.EIO}, (name, error)
            assert took >= timeout * 0.8, (name, took)
        ceph_cluster.start_osd()
        # The same connection serves again (librados alone would keep sending to the dead
        # OSD's address until its next map: the cluster fetches maps after a timeout).
        deadline = time.monotonic() + 60
        while True:
            try:
                assert objects.get("k") in {b"v", b"w"}
                assert objects.keys() == ["k"]
                volume.read(0, 4096)
                break
            except StorageError:
                if time.monotonic() > deadline:
                    raise
        objects.delete("k")
    finally:
        if ceph_cluster.pid("osd") is None:
            ceph_cluster.start_osd()
        # Closing after timeouts must come back too (librbd may still try to flush).
        _run_bounded(volume.close, limit=120)
        _run_bounded(objects.close, limit=30)
        hasty.close()


def test_rig_reports_its_processes(ceph_cluster: CephCluster) -> None:
    assert all(ceph_cluster.pid(name) for name in ("mon.a", "mgr.x", "osd"))
    status = json.loads(ceph_cluster.ceph("status", "-f", "json"))
    assert status["osdmap"]["num_up_osds"] == 1
    assert os.path.exists(ceph_cluster.conf_path)
