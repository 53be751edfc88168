"""RegionMap: rounding, planes, checkpoints, group commit, and recovery from the file.

Crash tests live in test_tracking_crash.py."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from backend.replication.mapfile import MAX_PLANES, RegionMapError
from backend.replication.tracking import IN_DOUBT, RegionMap, missed
from backend.storage import StorageError

KIB = 1024
MIB = 1024 * KIB
TIB = 1024**4
G = 64 * KIB
SIZE = 10 * MIB + 5  # the last region is 5 bytes long


@pytest.fixture
def open_map(tmp_path: Path) -> Iterator[Callable[..., RegionMap]]:
    opened: list[RegionMap] = []

    def make(size: int = SIZE, granularity: int = G, **kwargs: Any) -> RegionMap:
        regions = RegionMap.create(tmp_path / f"map{len(opened)}", size, granularity, **kwargs)
        opened.append(regions)
        return regions

    yield make
    for regions in opened:
        regions.close()


def reopen(regions: RegionMap) -> RegionMap:
    regions.close()
    return RegionMap.open(regions.path)


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        (0, 1, [(0, G)]),
        (G - 1, 1, [(0, G)]),
        (G - 1, 2, [(0, 2 * G)]),
        (G, G, [(G, G)]),
        (3 * G + 17, 5 * G, [(3 * G, 6 * G)]),
        (SIZE - 1, 1, [(SIZE - 5, 5)]),  # the partial last region
        (SIZE - 5 - 1, 6, [(SIZE - 5 - G, G + 5)]),
        (0, SIZE, [(0, SIZE)]),
        (4 * G, 0, []),
    ],
)
def test_mark_taints_every_region_it_touches(
    open_map: Callable[..., RegionMap], offset: int, length: int, expected: list[tuple[int, int]]
) -> None:
    regions = open_map()
    regions.mark([IN_DOUBT], offset, length)
    assert list(regions.regions(IN_DOUBT)) == expected
    assert regions.marked_bytes(IN_DOUBT) == sum(n for _, n in expected)


@pytest.mark.parametrize(
    ("offset", "length", "left"),
    [
        (0, G, [(G, SIZE - G)]),
        (1, G, [(0, SIZE)]),  # covers no whole region
        (G - 1, G + 2, [(0, G), (2 * G, SIZE - 2 * G)]),
        (SIZE - 5, 5, [(0, SIZE - 5)]),  # reaching the end covers the partial region
        (SIZE - 4, 4, [(0, SIZE)]),
        (0, SIZE, []),
    ],
)
def test_clear_cleans_only_regions_it_covers(
    open_map: Callable[..., RegionMap], offset: int, length: int, left: list[tuple[int, int]]
) -> None:
    regions = open_map()
    regions.mark([IN_DOUBT], 0, SIZE)
    regions.clear([IN_DOUBT], offset, length)
    assert list(regions.regions(IN_DOUBT)) == left


def test_regions_are_clipped_to_the_range_asked(open_map: Callable[..., RegionMap]) -> None:
    regions = open_map()
    regions.mark([IN_DOUBT], G, 3 * G)
    regions.mark([IN_DOUBT], 8 * G, 1)
    assert list(regions.regions(IN_DOUBT, 2 * G + 7, 7 * G)) == [(2 * G + 7, 2 * G - 7), (8 * G, G)]
    assert list(regions.regions(IN_DOUBT, 5 * G, G)) == []


@pytest.mark.parametrize("granularity", [4 * KIB, 64 * MIB])
def test_granularity_bounds_work(open_map: Callable[..., RegionMap], granularity: int) -> None:
    size = 200 * MIB + 1
    regions = open_map(size, granularity)
    regions.mark([IN_DOUBT], size - 1, 1)
    regions.mark([IN_DOUBT], 0, 1)
    last = (size - 1) // granularity * granularity
    assert list(reopen(regions).regions(IN_DOUBT)) == [(0, granularity), (last, size - last)]


@pytest.mark.parametrize(
    ("size", "granularity", "message"),
    [
        (MIB, 3 * 4096, "not a power of two"),
        (MIB, 2 * KIB, "not a power of two from 4096"),
        (MIB, 128 * MIB, "to 67108864"),
        (0, G, "not positive"),
        (16 * TIB, 4 * KIB, "use 65536 or more"),
        (16 * TIB + 1, G, "use 131072 or more"),
    ],
)
def test_impossible_geometry_is_refused(
    tmp_path: Path, size: int, granularity: int, message: str
) -> None:
    with pytest.raises(RegionMapError, match=message):
        RegionMap.create(tmp_path / "map", size, granularity)
    assert list(tmp_path.iterdir()) == []


def test_out_of_range_and_misuse_are_programming_errors(open_map: Callable[..., RegionMap]) -> None:
    regions = open_map()
    with pytest.raises(ValueError, match="outside"):
        regions.mark([IN_DOUBT], SIZE - 1, 2)
    with pytest.raises(ValueError, match="outside"):
        regions.mark([IN_DOUBT], -1, 1)
    with pytest.raises(ValueError, match="no plane 'nope'"):
        regions.mark(["nope"], 0, 1)
    with pytest.raises(TypeError, match="collection of plane names"):
        regions.mark(IN_DOUBT, 0, 1)
    with pytest.raises(ValueError, match="printable"):
        regions.add_plane("bad\nname")
    with pytest.raises(ValueError, match="1 to 64 bytes"):
        regions.add_plane("x" * 65)


def test_a_16_tib_volume_at_64_kib(tmp_path: Path) -> None:
    """32 MiB per plane, held sparse on disk; marks at both ends survive a reopen."""
    with RegionMap.create(tmp_path / "big", 16 * TIB) as regions:
        regions.mark([IN_DOUBT], 0, 1)
        regions.mark([IN_DOUBT], 16 * TIB - 1, 1)
        regions.add_plane(missed("b"), copy_from=IN_DOUBT)
        regions.mark([missed("b")], 8 * TIB, 1 * TIB)
    # Sparse: 64 MiB long, but only pages with set bits hold blocks (2 MiB for the TiB range).
    assert os.stat(tmp_path / "big").st_blocks * 512 < 3 * MIB
    with RegionMap.open(tmp_path / "big") as regions:
        assert list(regions.regions(IN_DOUBT)) == [(0, G), (16 * TIB - G, G)]
        assert regions.marked_bytes(missed("b")) == 1 * TIB + 2 * G


def test_a_missed_plane_starts_as_a_copy_of_in_doubt(open_map: Callable[..., RegionMap]) -> None:
    regions = open_map()
    regions.mark([IN_DOUBT], 0, 1)
    regions.add_plane(missed("b"), copy_from=IN_DOUBT)
    regions.mark([IN_DOUBT, missed("b")], 5 * G, 1)
    regions.clear([IN_DOUBT], 0, SIZE)
    regions = reopen(regions)
    assert regions.planes == (IN_DOUBT, missed("b"))
    assert list(regions.regions(missed("b"))) == [(0, G), (5 * G, G)]
    assert list(regions.regions(IN_DOUBT)) == []
    regions.close()


def test_a_removed_planes_slot_comes_back_empty(open_map: Callable[..., RegionMap]) -> None:
    regions = open_map()
    regions.add_plane(missed("b"))
    regions.mark([missed("b")], 0, SIZE)
    regions.remove_plane(missed("b"))
    assert regions.planes == (IN_DOUBT,)
    regions.add_plane(missed("c"))  # reuses slot 1, which holds b's bits on disk
    assert list(regions.regions(missed("c"))) == []
    regions = reopen(regions)
    assert regions.planes == (IN_DOUBT, missed("c"))
    assert list(regions.regions(missed("c"))) == []
    with pytest.raises(ValueError, match="no plane 'missed:b'"):
        regions.mark([missed("b")], 0, 1)
    regions.close()


def test_plane_count_is_bounded(open_map: Callable[..., RegionMap]) -> None:
    regions = open_map()
    for n in range(MAX_PLANES - 1):
        regions.add_plane(missed(f"m{n}"))
    with pytest.raises(RegionMapError, match=f"at most {MAX_PLANES} planes"):
        regions.add_plane(missed("one-too-many"))
    with pytest.raises(ValueError, match="exists"):
        regions.add_plane(missed("m0"))
    regions.mark([missed(f"m{MAX_PLANES - 2}")], SIZE - 1, 1)
    assert list(reopen(regions).regions(missed(f"m{MAX_PLANES - 2}"))) == [(SIZE - 5, 5)]


def test_a_checkpoint_clears_what_was_marked_before_it(open_map: Callable[..., RegionMap]) -> None:
    regions = open_map()
    regions.mark([IN_DOUBT], 0, 4 * G)
    with regions.checkpoint([IN_DOUBT]):
        pass
    assert list(regions.regions(IN_DOUBT)) == []


def test_a_checkpoint_keeps_marks_made_while_it_ran_and_writes_in_flight(
    open_map: Callable[..., RegionMap],
) -> None:
    regions = open_map()
    regions.mark([IN_DOUBT], 0, 10 * G)
    with regions.checkpoint([IN_DOUBT], in_flight=[(G, 1)]):
        regions.mark([IN_DOUBT], 5 * G, 1)  # already set: no I/O, still kept
        regions.mark([IN_DOUBT], 20 * G, G)  # new
    assert list(regions.regions(IN_DOUBT)) == [(G, G), (5 * G, G), (20 * G, G)]


def test_a_checkpoint_that_fails_clears_nothing(open_map: Callable[..., RegionMap]) -> None:
    regions = open_map()
    regions.mark([IN_DOUBT], 0, 4 * G)
    with pytest.raises(OSError, match="flush failed"), regions.checkpoint([IN_DOUBT]):
        raise OSError(errno.EIO, "flush failed")
    assert list(regions.regions(IN_DOUBT)) == [(0, 4 * G)]
    with regions.checkpoint([IN_DOUBT]):  # the failed one is gone: it keeps nothing now
        pass
    assert list(regions.regions(IN_DOUBT)) == []


def test_a_checkpoint_over_a_range_of_one_plane(open_map: Callable[..., RegionMap]) -> None:
    """Resync's use: copy a run, flush the member, clear the run in its plane only."""
    regions = open_map()
    regions.add_plane(missed("b"))
    regions.mark([IN_DOUBT, missed("b")], 0, 8 * G)
    with regions.checkpoint([missed("b")], 2 * G, 3 * G + 1):
        regions.mark([missed("b")], 3 * G, 1)  # a write the returning member missed again
    assert list(regions.regions(missed("b"))) == [(0, 2 * G), (3 * G, G), (5 * G, 3 * G)]
    assert list(regions.regions(IN_DOUBT)) == [(0, 8 * G)]


def test_a_plane_removed_during_a_checkpoint(open_map: Callable[..., RegionMap]) -> None:
    regions = open_map()
    regions.add_plane(missed("b"))
    regions.mark([IN_DOUBT, missed("b")], 0, G)
    with regions.checkpoint([IN_DOUBT, missed("b")]):
        regions.remove_plane(missed("b"))
    assert regions.planes == (IN_DOUBT,)
    assert list(regions.regions(IN_DOUBT)) == []


def test_clears_are_written_lazily_and_kept_after_sync(open_map: Callable[..., RegionMap]) -> None:
    regions = open_map()
    regions.mark([IN_DOUBT], 0, 4 * G)
    syncs = regions.stats.syncs
    regions.clear([IN_DOUBT], 0, 2 * G)
    assert regions.stats.syncs == syncs  # a clear costs no sync
    regions.sync()
    # A crash now (no close) finds the clear: simulate it with a second reader of the file.
    copy = regions.path.with_name("copy")
    copy.write_bytes(regions.path.read_bytes())
    with RegionMap.open(copy) as seen:
        assert list(seen.regions(IN_DOUBT)) == [(2 * G, 2 * G)]


class GatedSyncer:
    """fdatasync that counts, and can hold the first sync until the test lets it go."""

    def __init__(self) -> None:
        self.count = 0
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, fd: int) -> None:
        self.entered.set()
        self.gate.wait()
        os.fdatasync(fd)
        self.count += 1


@pytest.fixture
def syncer() -> Iterator[GatedSyncer]:
    gated = GatedSyncer()
    yield gated
    gated.gate.set()  # a failed test must not leave a thread held at the gate


def start(target: Callable[..., None], *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def test_a_durable_bit_costs_no_io(open_map: Callable[..., RegionMap], syncer: GatedSyncer) -> None:
    regions = open_map(syncer=syncer)
    regions.mark([IN_DOUBT], 0, 1)
    before, stats = syncer.count, regions.stats
    for n in range(1000):
        regions.mark([IN_DOUBT], n % G, 1)
    assert syncer.count == before
    assert regions.stats.marks == stats.marks + 1000
    assert regions.stats.marks_new == stats.marks_new


def test_concurrent_marks_share_one_sync(
    open_map: Callable[..., RegionMap], syncer: GatedSyncer
) -> None:
    """While one sync runs, every other new mark waits; the next sync covers all of them."""
    regions = open_map(syncer=syncer)
    syncer.gate.clear()
    syncer.entered.clear()
    first = start(regions.mark, [IN_DOUBT], 0, 1)
    assert syncer.entered.wait(30)  # the first mark is syncing, held at the gate
    others = [start(regions.mark, [IN_DOUBT], (n + 1) * G, 1) for n in range(20)]
    while regions.stats.marks < 21:  # every mark has set its bit and is waiting
        threading.Event().wait(0.01)
    before = syncer.count
    syncer.gate.set()
    for thread in [first, *others]:
        thread.join(30)
    assert syncer.count - before == 2  # the held one, and one for the 20 that waited
    assert regions.marked_bytes(IN_DOUBT) == 21 * G


def test_a_bit_set_but_not_yet_durable_makes_the_next_marker_wait(
    open_map: Callable[..., RegionMap], syncer: GatedSyncer
) -> None:
    regions = open_map(syncer=syncer)
    syncer.gate.clear()
    syncer.entered.clear()
    first = start(regions.mark, [IN_DOUBT], 0, 1)
    assert syncer.entered.wait(30)
    second = start(regions.mark, [IN_DOUBT], 1, 1)  # same region
    second.join(0.3)
    assert second.is_alive()  # its bit is in memory, not yet on disk
    syncer.gate.set()
    first.join(30)
    second.join(30)
    assert not second.is_alive()


def test_many_writers_mark_with_few_syncs(open_map: Callable[..., RegionMap]) -> None:
    """Stress: 16 threads each marking 100 new regions; a sync that takes about a disk's
    time lets the writers that arrive meanwhile share it."""

    def slow_sync(fd: int) -> None:
        os.fdatasync(fd)
        threading.Event().wait(0.001)

    regions = open_map(size=1 * TIB, syncer=slow_sync)
    threads = 16
    per_thread = 100

    def writer(n: int) -> None:
        for i in range(per_thread):
            regions.mark([IN_DOUBT], (i * threads + n) * 3 * G, 1)

    workers = [start(writer, n) for n in range(threads)]
    for thread in workers:
        thread.join(120)
    stats = regions.stats
    assert stats.marks_new == threads * per_thread
    assert stats.syncs < stats.marks_new / 4, stats
    assert regions.marked_bytes(IN_DOUBT) == threads * per_thread * G
    assert reopen(regions).marked_bytes(IN_DOUBT) == threads * per_thread * G


class FailingSyncer:
    """``fdatasync``, or ``OSError(code)`` while ``failing`` is set."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.failing = False

    def __call__(self, fd: int) -> None:
        if self.failing:
            raise OSError(self.code, os.strerror(self.code))
        os.fdatasync(fd)


def test_a_failed_sync_makes_the_map_unusable(open_map: Callable[..., RegionMap]) -> None:
    syncer = FailingSyncer(errno.EIO)
    regions = open_map(syncer=syncer)
    regions.mark([IN_DOUBT], 0, 1)
    syncer.failing = True
    with pytest.raises(StorageError, match="Input/output error") as raised:
        regions.mark([IN_DOUBT], G, 1)
    assert raised.value.errno == errno.EIO
    syncer.failing = False
    # After a failed fsync nothing is known to be durable: it never pretends otherwise.
    with pytest.raises(StorageError, match="failed earlier"):
        regions.mark([IN_DOUBT], 0, 1)
    with pytest.raises(StorageError, match="failed earlier"):
        regions.add_plane(missed("b"))
    regions.close()


def test_one_process_holds_a_map(open_map: Callable[..., RegionMap]) -> None:
    regions = open_map()
    with pytest.raises(RegionMapError, match="in use by another process"):
        RegionMap.open(regions.path)
    regions.close()
    RegionMap.open(regions.path).close()


def test_create_refuses_an_existing_file(tmp_path: Path) -> None:
    RegionMap.create(tmp_path / "map", SIZE).close()
    with pytest.raises(RegionMapError, match="already exists"):
        RegionMap.create(tmp_path / "map", SIZE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map"]


def test_a_file_that_is_not_a_map(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(os.urandom(3 * 4096))
    with pytest.raises(RegionMapError, match="not a region map"):
        RegionMap.open(tmp_path / "junk")


def test_closed_map_refuses_work(open_map: Callable[..., RegionMap]) -> None:
    regions = open_map()
    regions.close()
    regions.close()
    with pytest.raises(ValueError, match="closed"):
        regions.mark([IN_DOUBT], 0, 1)


def test_growing_keeps_every_bit_and_marks_the_new_range(
    open_map: Callable[..., RegionMap],
) -> None:
    # Past 32 Ki regions a plane's stride grows by a page, so every slot but the first moves.
    regions = open_map(size=SIZE, granularity=4 * KIB)
    regions.add_plane(missed("b"))
    regions.mark([IN_DOUBT], 3 * KIB, 2 * KIB)
    regions.mark([missed("b")], 9 * MIB, 5 * KIB)
    regions.clear([IN_DOUBT], 0, 4 * KIB)  # a clear still waiting to be written
    new_size = 200 * MIB + 7
    regions.grow(new_size, [IN_DOUBT, missed("b")])
    old_end = SIZE - SIZE % (4 * KIB)  # the old partial last region is in the new range
    expected_doubt = [(4 * KIB, 4 * KIB), (old_end, new_size - old_end)]
    expected_b = [(9 * MIB, 8 * KIB), (old_end, new_size - old_end)]
    for _ in range(2):  # as grown, then as reopened from the file
        assert regions.size == new_size
        assert list(regions.regions(IN_DOUBT)) == expected_doubt
        assert list(regions.regions(missed("b"))) == expected_b
        regions.mark([IN_DOUBT], new_size - 1, 1)
        assert regions.marked_bytes(IN_DOUBT) == 4 * KIB + new_size - old_end
        regions = reopen(regions)
    regions.close()
    assert sorted(p.name for p in regions.path.parent.iterdir()) == [regions.path.name]


def test_a_grown_map_is_still_held_by_this_process(open_map: Callable[..., RegionMap]) -> None:
    regions = open_map()
    regions.grow(2 * SIZE)
    with pytest.raises(RegionMapError, match="in use by another process"):
        RegionMap.open(regions.path)
    regions.mark([IN_DOUBT], 2 * SIZE - 1, 1)  # the new file is the one written
    regions.close()
    with RegionMap.open(regions.path) as reopened:
        assert reopened.size == 2 * SIZE


def test_a_failed_grow_leaves_the_map_as_it_was(open_map: Callable[..., RegionMap]) -> None:
    syncer = FailingSyncer(errno.ENOSPC)
    regions = open_map(syncer=syncer)
    regions.mark([IN_DOUBT], G, 1)
    syncer.failing = True
    with pytest.raises(StorageError, match=r"cannot grow region map .*No space left"):
        regions.grow(2 * SIZE)
    syncer.failing = False
    assert regions.size == SIZE
    regions.mark([IN_DOUBT], 0, 1)  # still usable
    with reopen(regions) as reopened:
        assert list(reopened.regions(IN_DOUBT)) == [(0, 2 * G)]
    assert sorted(p.name for p in regions.path.parent.iterdir()) == [regions.path.name]


def test_a_map_only_grows(open_map: Callable[..., RegionMap]) -> None:
    regions = open_map()
    with pytest.raises(ValueError, match="grows only"):
        regions.grow(SIZE)
    with pytest.raises(RegionMapError, match="too fine"):
        regions.grow(100 * TIB)
