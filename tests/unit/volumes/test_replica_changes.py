"""Replica add/remove/replace through the volume service, with the engine open (the live
path) or not (the catalogue path), over in-process storage nodes (tests/unit/volumes/nodes.py):
members are real NbdStorages with fenced export names.  (Nodes as separate processes, one of
them killed: tests/integration/test_replicated_volumes.py.)"""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backend.replication.supervisor import ResyncSupervisor
from backend.storage import StorageError
from backend.volumes.model import CreateRequest, InvalidRequestError, NodeReplica, NotFoundError
from backend.volumes.service import VolumeService
from tests.unit.volumes.nodes import InProcessNodes

MiB = 1 << 20
SIZE = 4 * MiB


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[InProcessNodes]:
    made = InProcessNodes(tmp_path / "nodes", ["a", "b", "c", "d"])
    yield made
    made.close()


@pytest.fixture
def engine(tmp_path: Path, nodes: InProcessNodes) -> Iterator[VolumeService]:
    service = VolumeService(tmp_path / "engine", nodes=nodes)
    service.start_serving()
    yield service
    service.close()


def create(service: VolumeService, nodes: str, extra: str = "") -> str:
    spec = f"replicated:nodes={nodes},timeout=2,reconnect=0.5{extra}"
    info = service.create(CreateRequest("vol", SIZE, storage=spec))
    assert info.replication is not None
    return info.replication.replicas[0].volume


@contextlib.contextmanager
def supervised(service: VolumeService) -> Iterator[None]:
    supervisor = ResyncSupervisor(service.replicated_engines, interval=0.05)
    supervisor.start()
    try:
        yield
    finally:
        supervisor.close()


def wait_in_sync(service: VolumeService, want: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = service.info("vol").replication
        assert info is not None
        if [(r.node, r.state) for r in info.replicas] == [(n, "in_sync") for n in want]:
            return
        assert time.monotonic() < deadline, info
        time.sleep(0.02)


def test_replace_while_open_under_writes(engine: VolumeService, nodes: InProcessNodes) -> None:
    name = create(engine, "a/b/c")
    storage = engine.storage("vol")  # open: the live engine takes the change
    storage.write(0, b"before" * 1000)
    stop = threading.Event()
    errors: list[BaseException] = []
    written: dict[int, bytes] = {}

    def writer() -> None:
        i = 0
        while not stop.is_set():
            data = bytes([i % 251 + 1]) * 4096
            try:
                storage.write(MiB + (i % 256) * 4096, data)
            except Exception as err:
                errors.append(err)
                return
            written[i % 256] = data
            i += 1
            time.sleep(0.0005)

    thread = threading.Thread(target=writer)
    with supervised(engine):
        thread.start()
        try:
            time.sleep(0.05)
            info = engine.replace_replica("vol", "a", "d")
            assert info.replication is not None
            assert info.replication.live
            assert [r.node for r in info.replication.replicas] == ["d", "b", "c"]
            time.sleep(0.05)
            wait_in_sync(engine, ["d", "b", "c"])
        finally:
            stop.set()
            thread.join()
    assert errors == []
    storage.flush()
    assert nodes.replicas("a") == []  # deleted once it had left
    images = {node: nodes.replica_bytes(node, name) for node in "bcd"}
    assert images["d"] == images["b"] == images["c"]
    assert images["d"][:6000] == (b"before" * 1000)
    for block, data in written.items():
        assert images["d"][MiB + block * 4096 : MiB + (block + 1) * 4096] == data


def test_add_and_remove_while_open(engine: VolumeService, nodes: InProcessNodes) -> None:
    name = create(engine, "a/b")
    storage = engine.storage("vol")
    storage.write(3 * MiB, b"x" * 8192)
    with supervised(engine):
        engine.add_replica("vol", "c")
        storage.write(0, b"y" * 4096)
        wait_in_sync(engine, ["a", "b", "c"])
    engine.remove_replica("vol", "a")
    storage.write(4096, b"z" * 4096)
    storage.flush()
    assert nodes.replicas("a") == []
    assert nodes.replica_bytes("c", name) == nodes.replica_bytes("b", name)
    assert nodes.replica_bytes("c", name)[3 * MiB : 3 * MiB + 8192] == b"x" * 8192


def test_replace_of_a_closed_volume_goes_to_the_catalogue(
    engine: VolumeService, nodes: InProcessNodes
) -> None:
    name = create(engine, "a/b", ",min_insync=1")
    info = engine.replace_replica("vol", "a", "c")
    assert info.replication is not None
    assert not info.replication.live
    assert [(r.node, r.state) for r in info.replication.replicas] == [
        ("c", "out"),
        ("b", "in_sync"),
    ]
    assert nodes.replicas("a") == []
    storage = engine.storage("vol")  # the engine opens with c out, a full plane to copy
    storage.write(0, b"w" * 4096)
    with supervised(engine):
        wait_in_sync(engine, ["c", "b"])
    storage.flush()
    assert nodes.replica_bytes("c", name) == nodes.replica_bytes("b", name)


@pytest.mark.parametrize("open_it", [False, True])
def test_user_errors_are_invalid_requests(
    engine: VolumeService, nodes: InProcessNodes, open_it: bool
) -> None:
    create(engine, "a/b/c")
    if open_it:
        engine.storage("vol")
    cases: tuple[tuple[Callable[[], object], str], ...] = (
        (lambda: engine.replace_replica("vol", "a", "zz"), "no storage node 'zz' is configured"),
        (lambda: engine.replace_replica("vol", "a", "b"), "storage node b already holds"),
        (lambda: engine.replace_replica("vol", "d", "a"), "storage node a already holds"),
        (lambda: engine.replace_replica("vol", "d", "d"), "storage node d holds no replica"),
        (lambda: engine.add_replica("vol", "a"), "storage node a already holds"),
        (lambda: engine.remove_replica("vol", "d"), "storage node d holds no replica"),
    )
    for call, message in cases:
        with pytest.raises(InvalidRequestError, match=message):
            call()
    engine.remove_replica("vol", "c")
    with pytest.raises(InvalidRequestError, match="fewer than min_insync=2"):
        engine.remove_replica("vol", "b")
    assert nodes.replicas("d") == []  # nothing made for a refused change


def _min_insync(service: VolumeService) -> int:
    info = service.info("vol").replication
    assert info is not None
    return info.min_insync


def test_the_default_min_insync_follows_removed_replicas(
    engine: VolumeService, nodes: InProcessNodes
) -> None:
    """Without ``min_insync`` a write needs a majority of the members as they are now, not
    of the ``nodes=`` create put replicas on: a volume shrunk from four replicas to three
    keeps serving writes with one of the three down."""
    create(engine, "a/b/c/d", ",below_min=fail")
    assert _min_insync(engine) == 3
    storage = engine.storage("vol")
    engine.remove_replica("vol", "d")
    assert _min_insync(engine) == 2
    nodes.stop("c")
    for i in range(3):  # the first write finds c failing, the next ones find it out
        storage.write(i * 4096, b"w" * 4096)
    storage.flush()
    info = engine.info("vol").replication
    assert info is not None
    assert [(r.node, r.state) for r in info.replicas] == [
        ("a", "in_sync"),
        ("b", "in_sync"),
        ("c", "out"),
    ]


def test_the_default_min_insync_follows_added_replicas(
    engine: VolumeService, nodes: InProcessNodes
) -> None:
    """Grown from two replicas to four, a volume needs three in sync for a write: two out of
    four is no majority, and acknowledging with two would leave fewer copies than the
    default promises."""
    create(engine, "a/b", ",below_min=fail")
    assert _min_insync(engine) == 2
    storage = engine.storage("vol")
    with supervised(engine):
        engine.add_replica("vol", "c")
        engine.add_replica("vol", "d")
        wait_in_sync(engine, ["a", "b", "c", "d"])
    assert _min_insync(engine) == 3
    nodes.stop("c")
    nodes.stop("d")
    with contextlib.suppress(StorageError):
        storage.write(0, b"w" * 4096)  # finds c and d failing: they go out
    with pytest.raises(StorageError) as failed:
        storage.write(4096, b"w" * 4096)
    assert failed.value.errno == errno.EIO
    assert "min_insync is 3" in str(failed.value)


def test_nodes_show_the_replicas_each_holds(engine: VolumeService, nodes: InProcessNodes) -> None:
    """`nbs node list|info`: every configured node, whether it answers, and the replicas it
    holds with their live states."""
    name = create(engine, "a/b/c", ",below_min=fail")
    nodes.stop("c")
    engine.storage("vol").write(0, b"x" * 4096)  # c fails: out
    listed = {n.name: n for n in engine.nodes()}
    assert list(listed) == ["a", "b", "c", "d"]
    assert listed["a"].reachable
    assert listed["a"].replicas == (NodeReplica("vol", name, "in_sync"),)
    assert (listed["c"].reachable, listed["c"].error) == (False, "stopped")
    assert listed["c"].replicas == (NodeReplica("vol", name, "out"),)
    assert listed["d"].replicas == ()
    assert all(n.configured for n in listed.values())
    assert engine.node("c") == listed["c"]
    with pytest.raises(NotFoundError, match="no storage node 'zz' is configured"):
        engine.node("zz")


def test_scrub_finds_a_replica_changed_behind_the_engine_and_repairs_it(
    engine: VolumeService, nodes: InProcessNodes
) -> None:
    name = create(engine, "a/b/c")
    storage = engine.storage("vol")
    storage.write(0, b"s" * SIZE)
    storage.flush()
    nodes.services["b"].storage(name).write(MiB + 100, b"rot")  # behind the engine's back
    found = engine.scrub("vol")
    assert found.compared == SIZE
    assert found.replicas == ("a", "b", "c")
    assert [(m.offset, m.length, m.replicas, m.majority, m.repaired) for m in found.mismatches] == [
        (MiB, 4096, ("b",), True, False)
    ]
    assert found.unresolved == 1
    fixed = engine.scrub("vol", repair=True)
    assert (fixed.unresolved, fixed.mismatches[0].repaired) == (0, True)
    shown = engine.info("vol").replication
    assert shown is not None
    assert shown.last_scrub == fixed  # `nbs volume info` shows the last one
    assert nodes.replica_bytes("b", name) == b"s" * SIZE
    assert engine.scrub("vol").mismatches == ()
    engine.create(CreateRequest("plain", SIZE))
    with pytest.raises(InvalidRequestError, match="'plain' is not replicated"):
        engine.scrub("plain")
    with pytest.raises(NotFoundError):
        engine.scrub("nothing")


def test_scheduled_scrubs_find_and_repair_a_changed_replica(
    engine: VolumeService, nodes: InProcessNodes
) -> None:
    """The supervisor with ``scrub_interval`` (and ``scrub_repair``) scrubs an open volume
    on its own, once it is due, and the result shows in the volume's info."""
    name = create(engine, "a/b/c")
    storage = engine.storage("vol")
    storage.write(0, b"t" * SIZE)
    storage.flush()
    nodes.services["c"].storage(name).write(2 * MiB + 5, b"rot")
    supervisor = ResyncSupervisor(
        engine.replicated_engines, interval=0.05, scrub_interval=1, scrub_repair=True
    )
    supervisor.start()
    try:
        deadline = time.monotonic() + 30
        while (info := engine.info("vol").replication) is None or info.last_scrub is None:
            assert time.monotonic() < deadline, "no scheduled scrub"
            time.sleep(0.05)
    finally:
        supervisor.close()
    scrubbed = info.last_scrub
    assert (scrubbed.repair, scrubbed.unresolved) == (True, 0)
    assert [(m.offset, m.replicas, m.repaired) for m in scrubbed.mismatches] == [
        (2 * MiB, ("c",), True)
    ]
    assert nodes.replica_bytes("c", name) == b"t" * SIZE
