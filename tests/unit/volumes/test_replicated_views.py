"""Read-only views of replicated volumes and their snapshots (``VolumeService.open_view``,
what `nbs volume export` reads), over in-process storage nodes: no view takes an epoch,
snapshots fail over between replicas, a live view reads through this process's engine if it
has one, else only from members in sync.  (With real processes and `nbs volume export`:
tests/integration/test_replicated_volumes.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.replication.membership import member_failed
from backend.storage import StorageError
from backend.storage.failover import FailoverStorage
from backend.storage.layers import ReadOnlyStorage
from backend.volumes.memberships import CatalogueMembershipStore
from backend.volumes.model import CreateRequest, StorageFailureError
from backend.volumes.service import VolumeService
from tests.unit.storage.conformance import pattern
from tests.unit.volumes.nodes import InProcessNodes

MiB = 1 << 20
SIZE = 4 * MiB


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[InProcessNodes]:
    made = InProcessNodes(tmp_path / "nodes", ["a", "b", "c"])
    yield made
    made.close()


@pytest.fixture
def engine(tmp_path: Path, nodes: InProcessNodes) -> Iterator[VolumeService]:
    service = VolumeService(tmp_path / "engine", nodes=nodes)
    service.start_serving()
    yield service
    service.close()


def create(service: VolumeService) -> str:
    spec = "replicated:nodes=a/b/c,timeout=2,reconnect=0.5"
    info = service.create(CreateRequest("vol", SIZE, storage=spec))
    assert info.replication is not None
    return info.replication.replicas[0].volume


def epoch(service: VolumeService) -> int:
    info = service.info("vol").replication
    assert info is not None
    return info.epoch


def test_a_snapshot_view_reads_the_snapshot_and_fails_over_to_another_replica(
    engine: VolumeService, nodes: InProcessNodes
) -> None:
    create(engine)
    live = engine.storage("vol")
    live.write(0, pattern(1, SIZE))
    engine.snapshot("vol", "s")
    live.write(0, pattern(2, SIZE))
    taken = epoch(engine)
    view = engine.open_view("vol", "s")
    try:
        assert isinstance(view, FailoverStorage)
        assert view.capabilities.read_only
        assert view.size == SIZE
        assert view.read(0, SIZE) == pattern(1, SIZE)
        assert view.source == "a"
        nodes.stop("a")
        assert view.read(0, SIZE) == pattern(1, SIZE)
        assert view.source == "b"
    finally:
        view.close()
    assert epoch(engine) == taken  # the view took none: the engine serves on
    live.write(0, b"still writable")
    for node in ("b", "c"):
        nodes.stop(node)
    with pytest.raises(StorageFailureError) as excinfo:
        engine.open_view("vol", "s")
    message = str(excinfo.value)
    assert message.startswith("cannot open 'vol': no copy of vol@s answered (")
    assert "\n" not in message
    for node in ("a", "b", "c"):
        assert f"{node}: " in message, message


def test_a_live_view_reads_through_the_open_engine_and_never_writes(
    engine: VolumeService,
) -> None:
    create(engine)
    live = engine.storage("vol")
    live.write(MiB, pattern(3, MiB))
    taken = epoch(engine)
    view = engine.open_view("vol")
    assert isinstance(view, ReadOnlyStorage)
    assert view.read(MiB, MiB) == pattern(3, MiB)
    with pytest.raises(StorageError):
        view.write(0, b"no")
    view.close()  # borrowed: the engine stays open
    live.write(0, b"after the view")
    assert live.read(0, 14) == b"after the view"
    assert epoch(engine) == taken


def test_a_live_view_of_a_volume_served_by_another_process_takes_no_epoch(
    engine: VolumeService, nodes: InProcessNodes, tmp_path: Path
) -> None:
    """As `nbs volume export VOL` beside the `nbs serve` that has the engine open: members
    read over plain connections (served read-only), the engine goes on writing."""
    create(engine)
    live = engine.storage("vol")
    live.write(0, pattern(4, SIZE))
    taken = epoch(engine)
    reader = VolumeService(tmp_path / "engine", nodes=nodes)
    view = reader.open_view("vol")
    try:
        assert isinstance(view, FailoverStorage)
        assert view.read(0, SIZE) == pattern(4, SIZE)
        live.write(0, b"written after the view opened")
        live.flush()
        assert view.read(0, 29) == b"written after the view opened"
    finally:
        view.close()
        reader.close()
    assert epoch(engine) == taken
    live.write(0, b"the engine was not fenced")
    live.flush()


def test_a_live_view_never_reads_a_member_out_of_sync(
    tmp_path: Path, nodes: InProcessNodes
) -> None:
    engine = VolumeService(tmp_path / "engine", nodes=nodes)
    engine.start_serving()
    name = create(engine)
    engine.storage("vol").write(0, pattern(5, SIZE))
    engine.close()
    # Member a misses a write: it is out in the committed membership, b and c have it.
    reader = VolumeService(tmp_path / "engine", nodes=nodes)
    store = CatalogueMembershipStore(reader.catalogue)
    layer = name.removeprefix("r-")
    current = store.load(layer)
    store.commit(member_failed(current, "a"), current.generation)
    for node in ("b", "c"):
        nodes.services[node].storage(name).write(0, pattern(6, SIZE))
    view = reader.open_view("vol")
    try:
        assert view.read(0, SIZE) == pattern(6, SIZE)
        assert isinstance(view, FailoverStorage)
        assert view.source == "b"
    finally:
        view.close()
        reader.close()


def test_a_replicated_volume_marked_read_only_is_refused_in_one_line_but_exported(
    engine: VolumeService,
) -> None:
    """Serving it would need an engine, and an engine takes an epoch: refused; a view (what
    `nbs volume export` opens) reads it."""
    spec = "replicated:nodes=a/b/c,timeout=2,reconnect=0.5"
    engine.create(CreateRequest("ro", SIZE, storage=spec, read_only=True))
    with pytest.raises(StorageFailureError) as excinfo:
        engine.storage("ro")
    assert "cannot be served read-only" in str(excinfo.value)
    assert "\n" not in str(excinfo.value)
    view = engine.open_view("ro")
    assert view.read(0, 4096) == bytes(4096)
    view.close()
