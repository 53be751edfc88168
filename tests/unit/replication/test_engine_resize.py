"""Growing a replicated volume (ReplicatedStorage.resize): at one point of the write stream,
every member resized and reconnected, the region map grown, the new range zeroed on every
member; refused in one line when it cannot be done safely."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from backend.replication.tracking import IN_DOUBT
from backend.storage import StorageError
from backend.storage.base import Request
from tests.unit.replication.replicas import MIB, SIZE, Engine, Volume
from tests.unit.replication.writers import Writers

NEW = SIZE + 3 * MIB + 4096


def test_growing_keeps_the_data_and_serves_the_new_range_on_every_member(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    assert engine.capabilities.can_resize
    engine.write(SIZE - 4096, b"\xaa" * 4096)
    opened = len(volume.replicas.opened)
    engine.resize(NEW)
    assert engine.size == NEW
    # Every member was reconnected (NBD tells the size at the handshake only).
    assert len(volume.replicas.opened) == opened + 3
    engine.write(NEW - 4096, b"\xbb" * 4096)
    engine.flush()
    expected = bytearray(NEW)
    expected[SIZE - 4096 : SIZE] = b"\xaa" * 4096
    expected[NEW - 4096 :] = b"\xbb" * 4096
    assert engine.read(0, NEW) == expected
    for member in volume.replicas.disks:
        assert volume.replicas.image(member) == expected, member
    assert engine.regions.marked_bytes(IN_DOUBT) == 0  # the new range's doubt was settled
    engine.resize(NEW)  # the same size again: nothing to do
    assert engine.size == NEW


def test_the_new_range_reads_as_zeroes_even_where_a_replica_held_bytes(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    """A replica that an earlier, failed attempt left larger may hold data past the old end
    (written there by anything but this engine): the grow zeroes it on every member."""
    engine = open_engine()
    stale = volume.replicas.disks["r1"]
    stale.resize(NEW)
    stale.write(SIZE + 4096, b"\xee" * 8192)
    engine.resize(NEW)
    assert engine.read(SIZE, NEW - SIZE) == bytes(NEW - SIZE)
    assert volume.replicas.identical()


def test_a_grown_volume_reopens_at_its_new_size(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    engine.resize(NEW)
    engine.write(NEW - 512, b"\xcc" * 512)
    engine.flush()
    engine.close()
    again = open_engine()
    assert again.size == NEW
    assert again.read(NEW - 512, 512) == b"\xcc" * 512


def test_an_engine_crash_right_after_the_map_grew_reconciles_the_new_range(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    """The crash window between the map's growth and the zeroing: the new range is in
    doubt, so the next engine makes the members agree on it before serving."""
    engine = open_engine()
    stale = volume.replicas.disks["r2"]
    stale.resize(NEW)
    stale.write(NEW - 4096, b"\xee" * 4096)

    def crash_instead_of_zeroing(request: object) -> None:
        engine.crash()
        raise StorageError(errno.EIO, "killed")

    engine._mutate = crash_instead_of_zeroing  # type: ignore[method-assign]
    with pytest.raises(StorageError, match="killed"):
        engine.resize(NEW)
    again = open_engine()
    assert again.size == NEW
    assert volume.replicas.identical()
    assert again.regions.marked_bytes(IN_DOUBT) == 0


def test_shrinking_is_refused_and_changes_nothing(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    with pytest.raises(StorageError, match="grows but never shrinks") as raised:
        engine.resize(SIZE - MIB, allow_shrink=True)
    assert raised.value.errno == errno.EOPNOTSUPP
    assert engine.size == SIZE
    assert all(d.size == SIZE for d in volume.replicas.disks.values())


def test_growing_needs_every_member_in_sync(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    volume.replicas.faults["r2"].set("error", {"write"})
    engine.write(0, b"x" * 512)  # r2 fails, goes out
    assert engine.membership.state("r2") == "out"
    with pytest.raises(StorageError, match="every replica in sync; r2 is not") as raised:
        engine.resize(NEW)
    assert raised.value.errno == errno.EBUSY
    assert engine.size == SIZE
    assert all(d.size == SIZE for d in volume.replicas.disks.values())


def test_a_member_that_cannot_be_resized_leaves_the_volume_as_it_was(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    volume.replicas.faults["r2"].unreachable = True
    with pytest.raises(StorageError, match="r2 is unreachable"):
        engine.resize(NEW)
    assert engine.size == SIZE
    assert engine.regions.size == SIZE
    engine.write(SIZE - 512, b"\x11" * 512)  # still serving, every member in sync
    assert engine.membership.in_sync == {"r0", "r1", "r2"}
    volume.replicas.faults["r2"].unreachable = False
    engine.resize(NEW)  # the retry resizes all (r0 and r1 are already larger)
    assert all(d.size == NEW for d in volume.replicas.disks.values())
    assert engine.read(SIZE - 512, 1024) == b"\x11" * 512 + bytes(512)
    assert volume.replicas.identical()


def test_growing_under_writes_loses_none(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    with Writers(engine) as writers:
        writers.wait_for(50)
        engine.resize(NEW)
        writers.wait_for(50)
    assert writers.errors == []
    engine.flush()
    expected = writers.image() + bytes(NEW - SIZE)
    assert engine.read(0, NEW) == expected
    for member in volume.replicas.disks:
        assert volume.replicas.image(member) == expected, member


def test_the_new_range_is_zeroed_before_any_client_can_write_it(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    """A client connecting once the size grew may write the new range at once: the zeroing
    must be done by then, or it would wipe an acknowledged write."""
    engine = open_engine()
    seen: list[int] = []
    mutate = engine._mutate

    def watching(request: Request) -> None:
        if request.offset >= SIZE:
            seen.append(engine.size)
        mutate(request)

    engine._mutate = watching  # type: ignore[method-assign]
    engine.resize(NEW)
    assert seen == [SIZE]  # the one zeroing, while the old size was still served


def test_a_grow_that_failed_after_the_map_grew_is_finished_by_the_same_resize(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    mutate = engine._mutate
    failures = [StorageError(errno.EIO, "zeroing failed")]

    def failing_once(request: Request) -> None:
        if request.offset >= SIZE and failures:
            raise failures.pop()
        mutate(request)

    engine._mutate = failing_once  # type: ignore[method-assign]
    with pytest.raises(StorageError, match="zeroing failed"):
        engine.resize(NEW)
    assert engine.size == SIZE  # never served
    assert engine.regions.size == NEW
    with pytest.raises(StorageError, match=r"earlier resize to .* did not finish") as raised:
        engine.resize(NEW + MIB)
    assert raised.value.errno == errno.EINVAL
    engine.resize(NEW)
    assert engine.size == NEW
    assert engine.read(SIZE, NEW - SIZE) == bytes(NEW - SIZE)
    assert volume.replicas.identical()
