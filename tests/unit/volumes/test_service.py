"""The volume service on a real data directory: SQLite, and volumes on copy-on-write layer
files, on chunks in a directory store, and on chunks under cache and retry layers."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from backend.volumes.catalogue import VolumeRow
from backend.volumes.model import (
    AlreadyExistsError,
    CreateRequest,
    DependencyError,
    Holder,
    InUseError,
    InvalidRequestError,
    NotFoundError,
    parse_size,
)
from backend.volumes.service import ServedElsewhereError, VolumeService
from backend.volumes.storages import parse_storage

MiB = 1 << 20


STORAGES = ["file", "dir:chunk_size=64KiB", "dir:chunk_size=64KiB+cache:size=1MiB+retry"]


@pytest.fixture(params=STORAGES)
def service(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[VolumeService]:
    svc = VolumeService(tmp_path / "data", default_storage=parse_storage(request.param))
    yield svc
    svc.close()


def leftovers(svc: VolumeService) -> list[str]:
    """Layer files and objects in the data directory."""
    found = [p.name for p in svc.layers.iterdir()]
    objects = svc.data_dir / "objects"
    if objects.exists():
        found += [str(p.relative_to(objects)) for p in objects.rglob("*") if p.is_file()]
    return found


def test_create_list_info(service: VolumeService) -> None:
    service.create(CreateRequest("a", "8MiB", description="first", labels={"env": "test"}))
    service.create(CreateRequest("b", 4 * MiB, read_only=True))
    assert [v.name for v in service.list()] == ["a", "b"]
    info = service.info("a")
    assert (info.size, info.description, info.labels, info.used_bytes) == (
        8 * MiB,
        "first",
        {"env": "test"},
        0,
    )
    assert service.info("b").read_only


@pytest.mark.parametrize("name", ["", "a/b", "..", ".", "a\0b", "x" * 256, "-lead", "sp ace", "ü"])
def test_bad_names_are_refused(service: VolumeService, name: str) -> None:
    with pytest.raises(InvalidRequestError):
        service.create(CreateRequest(name, MiB))
    assert service.list() == []


@pytest.mark.parametrize("size", ["0", "-1", "1000", "12 parsecs", "2EiB", 0, -512, 513])
def test_bad_sizes_are_refused(service: VolumeService, size: str | int) -> None:
    with pytest.raises(InvalidRequestError):
        service.create(CreateRequest("v", size))
    assert service.list() == []
    assert leftovers(service) == []


def test_size_units() -> None:
    assert parse_size("10GiB") == 10 << 30
    assert parse_size("512M") == 512 * MiB
    assert parse_size("1t") == 1 << 40
    assert parse_size(4096) == 4096


def test_duplicate_names_are_refused(service: VolumeService) -> None:
    service.create(CreateRequest("v", MiB))
    with pytest.raises(AlreadyExistsError):
        service.create(CreateRequest("v", 2 * MiB))
    assert service.info("v").size == MiB


def test_write_read_through_the_storage(service: VolumeService) -> None:
    service.create(CreateRequest("v", 8 * MiB))
    storage = service.storage("v")
    storage.write(MiB + 5, b"hello")
    storage.flush()
    assert storage.read(MiB + 5, 5) == b"hello"
    assert service.info("v").used_bytes > 0


def test_resize_grows_and_refuses_to_shrink_without_permission(service: VolumeService) -> None:
    service.create(CreateRequest("v", 4 * MiB))
    service.storage("v").write(3 * MiB, b"keep")
    assert service.resize("v", "8MiB").size == 8 * MiB
    assert service.storage("v").size == 8 * MiB
    with pytest.raises(InvalidRequestError, match="allow-shrink"):
        service.resize("v", MiB)
    assert service.storage("v").read(3 * MiB, 4) == b"keep"
    assert service.resize("v", 2 * MiB, allow_shrink=True).size == 2 * MiB


def test_delete_refused_while_in_use_unless_forced(tmp_path: Path) -> None:
    holder = Holder("127.0.0.1:40000", writable=True, since=0.0)
    svc = VolumeService(tmp_path / "d", holders=lambda n: [holder] if n == "v" else [])
    svc.create(CreateRequest("v", MiB))
    with pytest.raises(InUseError):
        svc.delete("v")
    assert svc.info("v")
    svc.delete("v", force=True)
    with pytest.raises(NotFoundError):
        svc.info("v")
    assert leftovers(svc) == []
    svc.close()


def test_snapshot_is_a_point_in_time_and_clone_is_thin(service: VolumeService) -> None:
    service.create(CreateRequest("gold", 8 * MiB))
    live = service.storage("gold")
    live.write(0, b"version one")
    snap = service.snapshot("gold", "s1")
    live.write(0, b"version two")
    assert (snap.volume, snap.name, snap.size) == ("gold", "s1", 8 * MiB)
    clone = service.clone("gold", "s1", "vm1")
    assert clone.origin == "gold@s1"
    assert clone.used_bytes == 0  # thin: nothing copied
    vm1 = service.storage("vm1")
    assert vm1.read(0, 11) == b"version one"
    vm1.write(0, b"clone edits")
    assert service.storage("gold").read(0, 11) == b"version two"
    view = service.open_view("gold", "s1")
    assert view.read(0, 11) == b"version one"
    view.close()
    assert [s.clones for s in service.snapshots("gold")] == [("vm1",)]


def test_snapshot_under_concurrent_writes_keeps_every_completed_write(
    service: VolumeService,
) -> None:
    service.create(CreateRequest("v", 16 * MiB))
    storage = service.storage("v")
    done: list[int] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set() and i < 2000:
            storage.write((i % 256) * 4096, i.to_bytes(4, "big") * 1024)
            done.append(i)
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    while len(done) < 50:
        pass
    completed = len(done)
    service.snapshot("v", "mid")
    stop.set()
    thread.join()
    view = service.open_view("v", "mid")
    # Every write that completed before the snapshot began is in it.
    last = completed - 1
    assert int.from_bytes(view.read((last % 256) * 4096, 4), "big") >= last
    view.close()


def test_deleting_a_snapshot_with_clones_is_refused_or_flattens(service: VolumeService) -> None:
    service.create(CreateRequest("gold", 4 * MiB))
    service.storage("gold").write(0, b"golden")
    service.snapshot("gold", "s")
    service.clone("gold", "s", "c1")
    with pytest.raises(DependencyError):
        service.delete_snapshot("gold", "s")
    with pytest.raises(DependencyError):
        service.delete("gold")
    progress: list[tuple[int, int]] = []
    service.delete_snapshot(
        "gold", "s", flatten_clones=True, progress=lambda d, t: progress.append((d, t))
    )
    assert progress
    assert progress[-1][0] == progress[-1][1]
    assert service.info("c1").origin is None
    assert service.storage("c1").read(0, 6) == b"golden"
    service.delete("gold")
    assert service.storage("c1").read(0, 6) == b"golden"


def test_gc_rolls_back_a_volume_left_creating_and_orphan_layers(tmp_path: Path) -> None:
    data = tmp_path / "d"
    svc = VolumeService(data)
    svc.create(CreateRequest("half", MiB), ready=False)
    svc.create(CreateRequest("whole", MiB))
    (svc.layers / "deadbeef.data").write_bytes(b"x")
    svc.close()  # its lease on "half" ends with it, as when the process dies
    svc = VolumeService(data)
    assert [v.name for v in svc.list()] == ["whole"]
    assert len(list(svc.layers.iterdir())) == 5  # reading collects nothing
    svc.create(CreateRequest("next", MiB))  # the first change collects
    assert svc.catalogue.volume("half") is None
    assert sorted(p.name.split(".")[0] for p in svc.layers.iterdir()) == sorted(
        [cast(VolumeRow, svc.catalogue.volume(n)).top for n in ("whole", "next")] * 2
    )
    assert list((data / "creating").iterdir()) == []
    svc.close()


def test_gc_never_collects_a_volume_whose_creator_is_alive(tmp_path: Path) -> None:
    data = tmp_path / "d"
    creator = VolumeService(data)
    creator.create(CreateRequest("importing", MiB), ready=False)
    other = VolumeService(data)  # another command, in this process or another
    other.create(CreateRequest("x", MiB))
    assert other.gc() == []
    assert creator.gc() == []  # nor its own (an API server's import)
    assert cast(VolumeRow, creator.catalogue.volume("importing")).state == "creating"
    with pytest.raises(AlreadyExistsError):
        other.create(CreateRequest("importing", MiB))
    creator.mark_ready("importing")
    assert [v.name for v in other.list()] == ["importing", "x"]
    assert list((data / "creating").iterdir()) == []
    other.close()
    creator.close()


def test_commands_that_read_change_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    svc = VolumeService(missing)
    assert svc.list() == []
    assert svc.snapshots() == []
    with pytest.raises(NotFoundError):
        svc.info("v")
    svc.close()
    assert not missing.exists()
    data = tmp_path / "d"
    data.mkdir(mode=0o755)
    svc = VolumeService(data)
    svc.create(CreateRequest("v", MiB))
    generation = svc.generation()
    svc.close()
    os.chmod(data, 0o750)
    before = sorted(p.name for p in data.iterdir())
    svc = VolumeService(data)
    assert [v.name for v in svc.list()] == ["v"]
    assert svc.generation() == generation  # a server watching it sees no change
    svc.close()
    assert data.stat().st_mode & 0o777 == 0o750
    assert sorted(p.name for p in data.iterdir()) == before


def test_a_second_server_on_one_data_dir_is_refused(tmp_path: Path) -> None:
    first = VolumeService(tmp_path / "d")
    first.start_serving()
    second = VolumeService(tmp_path / "d")
    with pytest.raises(ServedElsewhereError):
        second.start_serving()
    second.close()
    local = VolumeService(tmp_path / "d")
    first.create(CreateRequest("v", MiB))
    with pytest.raises(ServedElsewhereError):
        local.snapshot("v", "s")
    local.close()
    first.close()


def on_disk(data: Path) -> list[tuple[str, int, int, int]]:
    """Every file under ``data`` with its mode, size and mtime, and the directory's mode.
    SQLite's own -wal/-shm files come and go with any open connection (readers too), so they
    and the directory's mtime are left out."""
    if not data.exists():
        return []
    files = [p for p in sorted(data.rglob("*")) if not p.name.endswith(("-wal", "-shm"))]
    return [(".", data.stat().st_mode, 0, 0)] + [
        (str(p.relative_to(data)), p.stat().st_mode, p.stat().st_size, p.stat().st_mtime_ns)
        for p in files
    ]


def test_constructing_a_service_touches_nothing_on_disk(tmp_path: Path) -> None:
    """Construction has no side effects, even as ``nbs serve`` builds it (holders, profiles,
    default storage): no mkdir, chmod, lock or gc.  Becoming the server is start_serving()."""
    data = tmp_path / "d"
    as_server = functools.partial(
        VolumeService,
        holders=lambda name: (),
        profiles={"chunks": parse_storage("dir:chunk_size=64KiB")},
        default_storage=parse_storage("dir:chunk_size=64KiB"),
    )
    as_server(data).close()
    assert not data.exists()

    crashed = VolumeService(data)
    crashed.create(CreateRequest("half", MiB), ready=False)  # its creator dies: gc rolls it back
    (crashed.layers / "deadbeef.data").write_bytes(b"x")
    crashed.close()
    os.chmod(data, 0o750)
    before = on_disk(data)
    svc = as_server(data)
    assert on_disk(data) == before
    svc.start_serving()  # now it is the server: the directory is private, leftovers gone
    assert data.stat().st_mode & 0o777 == 0o700
    assert svc.catalogue.volume("half") is None
    assert not (svc.layers / "deadbeef.data").exists()

    before = on_disk(data)
    second = as_server(data)  # another server's: refused only when it starts
    assert on_disk(data) == before
    with pytest.raises(ServedElsewhereError):
        second.start_serving()
    second.close()
    svc.close()


def test_data_dir_is_private(tmp_path: Path) -> None:
    svc = VolumeService(tmp_path / "d")
    svc.create(CreateRequest("v", MiB))  # made by the first change
    assert os.stat(tmp_path / "d").st_mode & 0o777 == 0o700
    svc.close()
