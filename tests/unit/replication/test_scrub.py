"""Scrub (ReplicatedStorage.scrub, backend/replication/scrub.py): the in-sync replicas are
compared; a replica changed behind the engine's back is found to the block, and repaired to
the majority's bytes when there is a majority; writes during a scrub are never taken for
mismatches; a member whose read fails goes out."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from backend.replication.scrub import Difference, differences
from backend.storage import StorageError
from tests.unit.replication.replicas import MIB, SIZE, Engine, Volume
from tests.unit.replication.writers import Writers


def test_differences_finds_blocks_and_the_majority() -> None:
    same = bytes(range(256)) * 64  # 16 KiB
    other = bytearray(same)
    other[4096 + 10] ^= 0xFF  # block 1
    other[8192] ^= 0xFF  # block 2: adjacent, same outcome, merged
    assert differences({"a": same, "b": same, "c": same}) == []
    assert differences({"a": same, "b": bytes(other), "c": same}) == [
        Difference(4096, 8192, ("b",), same[4096:12288])
    ]
    # Two copies that disagree: no majority, both named.
    assert differences({"a": same, "b": bytes(other)}) == [Difference(4096, 8192, ("a", "b"), None)]
    # Different members in adjacent blocks are two ranges.
    third = bytearray(same)
    third[12288] ^= 1
    found = differences({"a": same, "b": bytes(other), "c": bytes(third)})
    assert found == [
        Difference(4096, 8192, ("b",), same[4096:12288]),
        Difference(12288, 4096, ("c",), same[12288:]),
    ]
    with pytest.raises(ValueError, match="different lengths"):
        differences({"a": same, "b": same[:-1]})


def test_a_clean_volume_scrubs_clean_with_progress(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    engine.write(MIB, b"x" * 8192)
    seen: list[tuple[int, int]] = []
    report = engine.scrub(progress=lambda done, total: seen.append((done, total)))
    assert report.mismatches == ()
    assert report.failed == ()
    assert report.compared == SIZE
    assert report.members == ("r0", "r1", "r2")
    assert seen[-1] == (SIZE, SIZE)
    assert [done for done, _ in seen] == sorted({done for done, _ in seen})


def test_a_changed_replica_is_found_then_repaired_to_the_majority(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    engine.write(0, b"a" * SIZE)
    engine.flush()
    disk = volume.replicas.disks["r1"]
    disk.write(3 * MIB + 4096, b"rot" * 100)  # bit rot, say: 300 bytes in one block
    disk.write(5 * MIB, b"\0" * 8192)  # two blocks lost

    found = engine.scrub()
    assert [(m.offset, m.length, m.members, m.majority, m.repaired) for m in found.mismatches] == [
        (3 * MIB + 4096, 4096, ("r1",), True, False),
        (5 * MIB, 8192, ("r1",), True, False),
    ]
    assert found.unresolved == 2
    assert not volume.replicas.identical()  # found, not touched

    fixed = engine.scrub(repair=True)
    assert [(m.offset, m.repaired) for m in fixed.mismatches] == [
        (3 * MIB + 4096, True),
        (5 * MIB, True),
    ]
    assert fixed.unresolved == 0
    assert volume.replicas.identical()
    assert volume.replicas.image("r1") == b"a" * SIZE
    assert engine.scrub().mismatches == ()
    assert engine.membership.in_sync == {"r0", "r1", "r2"}  # nobody was failed for it


def test_two_replicas_that_disagree_are_reported_not_repaired(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    engine.write(0, b"b" * 4096)
    volume.replicas.faults["r2"].set("error", {"read"})
    engine.scrub()  # r2's read fails: out, two left
    assert engine.membership.state("r2") == "out"
    volume.replicas.faults["r2"].clear()
    volume.replicas.disks["r0"].write(0, b"c" * 4096)
    report = engine.scrub(repair=True)
    assert [(m.offset, m.members, m.majority, m.repaired) for m in report.mismatches] == [
        (0, ("r0", "r1"), False, False)
    ]
    assert report.unresolved == 1
    assert volume.replicas.image("r0")[:4096] == b"c" * 4096  # nothing chosen for them


def test_a_member_whose_read_fails_goes_out_and_the_rest_are_compared(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    engine.write(0, b"e" * SIZE)  # data: a node serves holes without reading them
    volume.replicas.faults["r1"].set("error", {"read"})
    report = engine.scrub()
    assert report.failed == ("r1",)
    assert report.compared == SIZE  # r0 and r2
    assert engine.membership.state("r1") == "out"


def test_fewer_than_two_in_sync_is_nothing_to_compare(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    for member in ("r1", "r2"):
        volume.replicas.faults[member].set("error", {"write"})
    engine.write(0, b"d" * 4096)  # r1 and r2 fail: out
    with pytest.raises(StorageError) as refused:
        engine.scrub()
    assert refused.value.errno == errno.EBUSY
    assert "1 replica(s) in sync, nothing to compare" in str(refused.value)


def test_writes_during_a_scrub_are_not_mismatches(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    with Writers(engine) as writers:
        writers.wait_for(50)
        reports = [engine.scrub(step=64 * 1024) for _ in range(3)]
        writers.wait_for(50)
    assert writers.errors == []
    assert [r.mismatches for r in reports] == [(), (), ()]
    assert [r.compared for r in reports] == [SIZE] * 3
    engine.flush()
    assert volume.replicas.identical()
