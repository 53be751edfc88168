"""FailoverStorage: a read-only view of identical copies, failing over to the next copy, and
never returning a read made on a copy that left the set while it ran."""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence

import pytest

from backend.storage import MemoryStorage, Storage, StorageError
from backend.storage.failover import FailoverStorage
from backend.storage.layers import ForwardingStorage
from tests.unit.storage.conformance import (
    StorageFactory,
    opened_storages,
    pattern,
    test_read_only_rejects_writes,
)

__all__ = ["opened_storages", "test_read_only_rejects_writes"]

KIB = 1024
SIZE = 256 * KIB


def copies(*seeds: int, size: int = SIZE) -> dict[str, Storage]:
    """Copies named a, b, c…, each holding the pattern of its seed."""
    made: dict[str, Storage] = {}
    for i, seed in enumerate(seeds):
        storage = MemoryStorage(size)
        storage.write(0, pattern(seed, size))
        made["abcdefgh"[i]] = storage
    return made


class Sources:
    """A set of copies that a test can change: ``version`` and ``names`` are what
    ``sources()`` answers; ``opened`` records every open."""

    def __init__(self, storages: dict[str, Storage], names: Sequence[str] | None = None) -> None:
        self.storages = storages
        self.version = 1
        self.names = list(names if names is not None else storages)
        self.opened: list[str] = []
        self.unreachable: set[str] = set()

    def __call__(self) -> tuple[int, Sequence[str]]:
        return self.version, list(self.names)

    def open(self, name: str) -> Storage:
        if name in self.unreachable:
            raise StorageError(errno.ECONNREFUSED, f"node {name} does not answer")
        self.opened.append(name)
        return Borrowed(self.storages[name])


class Borrowed(ForwardingStorage):
    """A copy the view may close without closing the test's storage."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner, owns_inner=False)


class During(ForwardingStorage):
    """Calls ``hook`` in the middle of each read (after reading, before returning)."""

    def __init__(self, inner: Storage, hook: Callable[[], None]) -> None:
        super().__init__(inner, owns_inner=False)
        self.hook = hook

    def read(self, offset: int, length: int) -> bytes:
        data = super().read(offset, length)
        self.hook()
        return data


@pytest.fixture
def read_only_storage_factory() -> StorageFactory:
    def make(size: int) -> Storage:
        sources = Sources(copies(1, 2, size=size))
        return FailoverStorage("test", size, sources, sources.open)

    return make


def test_reads_come_from_the_first_copy_that_answers() -> None:
    sources = Sources(copies(1, 2))
    sources.unreachable = {"a"}
    view = FailoverStorage("vol", SIZE, sources, sources.open)
    assert view.source == "b"
    assert view.read(100, 1000) == pattern(2, SIZE)[100:1100]
    assert view.capabilities.read_only
    assert not view.capabilities.can_zero
    assert not view.capabilities.can_trim
    view.close()


def test_a_failing_copy_is_set_aside_and_the_read_done_on_the_next() -> None:
    data = copies(1, 1)
    sources = Sources(data)
    view = FailoverStorage("vol", SIZE, sources, sources.open)
    assert view.read(0, 10) == pattern(1, SIZE)[:10]
    data["a"].close()  # its node went away: reads fail with EBADF
    assert view.read(5000, 4096) == pattern(1, SIZE)[5000:9096]
    assert view.source == "b"
    assert view.extents(0, SIZE)[0].offset == 0
    view.close()
    data["b"].close()


def test_every_copy_failing_is_one_error_naming_each() -> None:
    data = copies(1, 1)
    sources = Sources(data)
    view = FailoverStorage("snapshot s", SIZE, sources, sources.open)
    sources.unreachable = {"a", "b"}
    data["a"].close()
    with pytest.raises(StorageError) as excinfo:
        view.read(0, 10)
    message = excinfo.value.message
    assert message.startswith("no copy of snapshot s answered (")
    assert "a: " in message
    assert "b: node b does not answer" in message
    assert "\n" not in message
    data["b"].close()
    view.close()


def test_no_copy_answering_at_open_names_every_node_tried() -> None:
    sources = Sources(copies(1, 1, 1))
    sources.unreachable = {"a", "b", "c"}
    with pytest.raises(StorageError, match=r"a: node a does not answer; b: .*; c: ") as excinfo:
        FailoverStorage("vol", SIZE, sources, sources.open)
    assert excinfo.value.errno == errno.EIO


def test_a_copy_smaller_than_the_view_is_never_read() -> None:
    data = copies(1, 2)
    data["a"] = MemoryStorage(SIZE // 2)
    sources = Sources(data)
    view = FailoverStorage("vol", SIZE, sources, sources.open)
    assert view.source == "b"
    view.close()


def test_a_read_made_while_its_copy_left_the_set_is_done_again_on_a_copy_in_it() -> None:
    """A replica fails out (the membership generation changes) while a read from it runs: its
    bytes may be stale, so the read is redone on a copy of the new set."""
    data = copies(1, 2)  # a is stale (1), b current (2)
    sources = Sources(data)

    def a_leaves() -> None:
        sources.version, sources.names = 2, ["b"]

    sources.storages["a"] = During(data["a"], a_leaves)
    view = FailoverStorage("vol", SIZE, sources, sources.open)
    assert view.source == "a"
    assert view.read(0, 100) == pattern(2, SIZE)[:100]
    assert view.source == "b"
    view.close()


def test_a_read_made_while_the_set_changed_counts_only_when_redone() -> None:
    """The set changed (another member resynced, say) while a read ran, its copy still in
    it: the read is done again under the new version before it is returned."""
    data = copies(1, 1)
    sources = Sources(data)
    reads = []

    def changes_once() -> None:
        reads.append(1)
        if len(reads) == 1:
            sources.version = 2

    sources.storages["a"] = During(data["a"], changes_once)
    view = FailoverStorage("vol", SIZE, sources, sources.open)
    assert view.read(0, 100) == pattern(1, SIZE)[:100]
    assert len(reads) == 2
    assert view.source == "a"
    view.close()


def test_a_set_that_never_settles_is_an_error() -> None:
    sources = Sources(copies(1))

    def bump() -> None:
        sources.version += 1

    sources.storages["a"] = During(sources.storages["a"], bump)
    view = FailoverStorage("vol", SIZE, sources, sources.open)
    with pytest.raises(StorageError, match="the set of copies kept changing"):
        view.read(0, 1)
    view.close()


def test_close_closes_every_copy_it_opened_and_later_calls_fail() -> None:
    data = copies(1, 1)
    sources = Sources(data)
    closed: list[str] = []

    class Tracked(Borrowed):
        def __init__(self, name: str) -> None:
            super().__init__(data[name])
            self.name = name

        def close(self) -> None:
            closed.append(self.name)

    view = FailoverStorage("vol", SIZE, sources, Tracked)
    data["a"].close()
    view.read(0, 1)  # a set aside, b opened
    view.close()
    view.close()
    assert sorted(closed) == ["a", "b"]
    with pytest.raises(StorageError) as excinfo:
        view.read(0, 1)
    assert excinfo.value.errno == errno.EBADF
    data["b"].close()
