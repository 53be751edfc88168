"""ReplicatedStorage: one test per rule of backend/replication/engine.py, members in memory
behind switchable faults (tests/unit/replication/replicas.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from backend.replication.membership import Membership, take_epoch
from backend.replication.policy import ReplicationPolicy
from backend.replication.tracking import IN_DOUBT, RegionMap, missed
from backend.storage import StorageError
from tests.unit.replication.replicas import (
    KIB,
    MIB,
    QUICK,
    SIZE,
    Engine,
    G,
    Volume,
    members,
)


def test_opening_takes_a_new_epoch_and_opens_members_with_it(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    first = open_engine()
    assert first.membership.epoch == 1
    first.close()
    second = open_engine()
    assert second.membership.epoch == 2
    assert volume.replicas.opened[-3:] == [("r0", 2), ("r1", 2), ("r2", 2)]


def test_write_reaches_every_member(volume: Volume, open_engine: Callable[..., Engine]) -> None:
    engine = open_engine()
    engine.write(5000, b"x" * 70000)
    engine.trim(0, 100)
    engine.write_zeroes(6000, 10)
    for disk in volume.replicas.disks.values():
        assert disk.read(5000, 10) == b"x" * 10
        assert disk.read(6000, 10) == bytes(10)


def test_failed_member_is_committed_with_its_missed_plane_before_the_ack(
    tmp_path: Path, engines: list[Engine]
) -> None:
    events: list[tuple[str, object]] = []
    volume = Volume.create(tmp_path, list(members(3)), SIZE, granularity=G)

    def on_commit(engine: Engine, new: Membership) -> None:
        if "r1" not in new.in_sync:
            events.append(("commit", list(engine.regions.regions(missed("r1")))))

    engine = volume.open_recording(on_commit, QUICK)
    engines.append(engine)
    volume.replicas.faults["r1"].set("error", {"write"})
    engine.write(3 * G + 100, b"y" * 200)
    events.append(("ack", None))
    assert events == [("commit", [(3 * G, G)]), ("ack", None)]
    assert volume.store.load("vol").in_sync == {"r0", "r2"}
    assert volume.replicas.disks["r1"].read(3 * G + 100, 200) == bytes(200)


def test_hung_member_is_failed_after_child_timeout(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine(ReplicationPolicy(child_timeout=0.2))
    volume.replicas.faults["r2"].set("hang", {"write"})
    engine.write(0, b"z" * 10)
    assert engine.membership.state("r2") == "out"
    volume.replicas.faults["r2"].release()
    status = {m.member: m for m in engine.status().members}
    assert status["r2"].last_error is not None
    assert "no answer" in status["r2"].last_error
    assert not status["r2"].open


def test_out_member_misses_are_marked(volume: Volume, open_engine: Callable[..., Engine]) -> None:
    engine = open_engine()
    volume.replicas.faults["r2"].set("error", {"write"})
    engine.write(0, b"a")
    engine.flush()
    engine.write(5 * G, b"b")
    assert list(engine.regions.regions(missed("r2"))) == [(0, G), (5 * G, G)]
    assert engine.regions.marked_bytes(IN_DOUBT) == G, "the flush checkpointed the first write"


def test_below_min_insync_fail_policy(volume: Volume, open_engine: Callable[..., Engine]) -> None:
    engine = open_engine(ReplicationPolicy(min_insync=2, below_min="fail"))
    engine.write(0, b"before")
    for member in ("r1", "r2"):
        volume.replicas.faults[member].set("error", {"write"})
    with pytest.raises(StorageError) as excinfo:
        engine.write(0, b"during")
    assert excinfo.value.errno == errno.EIO
    assert "min_insync is 2" in excinfo.value.message
    with pytest.raises(StorageError):
        engine.write(100, b"again")
    assert engine.read(100, 5) == bytes(5), "reads go on"


def test_below_min_insync_wait_policy_waits_then_fails(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine(ReplicationPolicy(min_insync=3, below_min="wait", below_min_wait=0.2))
    volume.replicas.faults["r2"].set("error", {"write"})
    with pytest.raises(StorageError, match="min_insync is 3"):
        engine.write(0, b"x")


def test_below_min_insync_wait_policy_goes_on_when_a_member_returns(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    volume.replicas.faults["r2"].unreachable = True
    engine = open_engine(ReplicationPolicy(min_insync=3, below_min="wait", below_min_wait=30))
    assert engine.membership.state("r2") == "out"
    outcome: list[BaseException | None] = []

    def writer() -> None:
        try:
            engine.write(G, b"waits")
            outcome.append(None)
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join(0.2)
    assert thread.is_alive(), "the write waits for a member"
    volume.replicas.faults["r2"].unreachable = False
    engine.resync("r2")
    thread.join(10)
    assert outcome == [None]
    assert volume.replicas.identical()


def test_last_in_sync_member_is_never_failed(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    for fault in volume.replicas.faults.values():
        fault.set("error", {"write"})
    with pytest.raises(StorageError, match="last in-sync member") as excinfo:
        engine.write(0, b"nowhere")
    assert excinfo.value.errno == errno.EIO
    stored = volume.store.load("vol")
    assert len(stored.in_sync) == 1
    assert engine.membership == stored


def test_read_repair_writes_good_data_back(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    engine.write(G, b"good" * 1000)
    volume.replicas.disks["r0"].write(G, b"rot!" * 1000)  # what its failing read would hide
    volume.replicas.faults["r0"].set("error", {"read"})
    assert engine.read(G, 4000) == b"good" * 1000
    assert volume.replicas.disks["r0"].read(G, 4000) == b"good" * 1000
    assert engine.membership.state("r0") == "in_sync"
    assert engine.status().read_repairs == 1


def test_member_whose_repair_fails_is_failed(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    engine.write(G, b"good")
    engine.flush()
    volume.replicas.faults["r0"].set("error", {"read", "write"})
    assert engine.read(G, 4) == b"good"
    assert engine.membership.state("r0") == "out"
    assert list(engine.regions.regions(missed("r0"))) == [(G, G)]


def test_reads_go_to_the_least_busy_member(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    volume.replicas.faults["r0"].set("hang", {"read"})
    # r0 is busy with a hung read; the next reads go elsewhere and are not slowed by it.
    first = threading.Thread(target=lambda: engine.read(0, 1))
    first.start()
    while not engine.status().members[0].in_flight:
        threading.Event().wait(0.001)
    for _ in range(20):
        assert engine.read(0, 10) == bytes(10)
    busy = {m.member: m.in_flight for m in engine.status().members}
    assert busy == {"r0": 1, "r1": 0, "r2": 0}
    volume.replicas.faults["r0"].clear()
    first.join()


def test_overlapping_writes_are_ordered_on_every_member(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    for member in ("r1", "r2"):  # each applies requests in its own, jittered order
        volume.replicas.faults[member].set("slow", {"write"}, delay=0.002, jitter=True)

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            offset = rng.randrange(0, 64 * KIB)
            engine.write(offset, bytes([rng.randrange(1, 256)]) * rng.randrange(1, 16 * KIB))

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert volume.replicas.identical()
    assert engine.membership.in_sync == {"r0", "r1", "r2"}


def test_fenced_engine_refuses_everything(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    old = open_engine()
    old.write(0, b"old")
    newer = take_epoch(volume.store, "vol")  # another engine attaches ...
    volume.replicas.promise(newer.epoch)  # ... and the replicas promise it its epoch
    with pytest.raises(StorageError) as excinfo:
        old.write(0, b"stale")
    assert excinfo.value.errno == errno.EIO
    for call in (lambda: old.read(0, 3), old.flush, lambda: old.write(G, b"x")):
        with pytest.raises(StorageError, match="newer engine"):
            call()
    assert old.status().fenced
    for disk in volume.replicas.disks.values():
        assert disk.read(0, 3) == b"old"
    assert volume.store.load("vol").in_sync == {"r0", "r1", "r2"}, "a fenced engine fails nobody"


def test_flush_checkpoints_writes_completed_before_it(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    engine.write(0, b"x")
    engine.write(4 * G, b"y", fua=True)
    assert engine.status().in_doubt_bytes == 2 * G
    engine.flush()
    assert engine.status().in_doubt_bytes == 0


def test_reconcile_after_engine_crash(volume: Volume, open_engine: Callable[..., Engine]) -> None:
    engine = open_engine(ReplicationPolicy(child_timeout=30))
    engine.write(0, b"a" * G)
    engine.flush()
    volume.replicas.faults["r2"].set("hang", {"write"})
    # A write reaches r0 and r1 while r2 hangs; the engine dies before anything is acked.
    writer = threading.Thread(target=lambda: _swallow(lambda: engine.write(2 * G, b"b" * 100)))
    writer.start()
    # Both: over NBD the two writes are in flight at once and r1's may land first, while the
    # reconcile copies from r0 (an unacknowledged write may be lost; here it must not be).
    while any(volume.replicas.disks[m].read(2 * G, 1) != b"b" for m in ("r0", "r1")):
        threading.Event().wait(0.001)
    engine.crash()
    volume.replicas.faults["r2"].clear()  # its write returns an error: never applied
    writer.join()
    assert not volume.replicas.identical()
    again = open_engine()
    assert volume.replicas.identical()
    status = again.status()
    assert status.reconciled_bytes == G
    assert status.in_doubt_bytes == 0
    assert again.read(2 * G, 100) == b"b" * 100
    assert again.membership.in_sync == {"r0", "r1", "r2"}


def test_members_unreachable_at_open_are_out(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    volume.replicas.faults["r1"].unreachable = True
    engine = open_engine()
    assert engine.membership.state("r1") == "out"
    assert engine.status().members[1].missed_bytes == 0
    for fault in volume.replicas.faults.values():
        fault.unreachable = True
    engine.close()
    with pytest.raises(StorageError, match="last in-sync"):
        open_engine()


def _away_writes(engine: Engine, rng: random.Random, count: int) -> int:
    written = 0
    for _ in range(count):
        length = rng.choice((4 * KIB, 16 * KIB))
        offset = rng.randrange(0, SIZE - length)
        engine.write(offset, rng.randbytes(length))
        written += length
    return written


def test_resync_copies_only_missed_regions(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    rng = random.Random(12)
    _away_writes(engine, rng, 50)
    engine.flush()
    volume.replicas.faults["r2"].set("error", {"write"})
    engine.write(0, b"first miss")
    written = 10 + _away_writes(engine, rng, 40)
    volume.replicas.faults["r2"].clear()
    seen: list[tuple[int, int]] = []
    result = engine.resync("r2", progress=lambda done, total: seen.append((done, total)))
    assert engine.membership.in_sync == {"r0", "r1", "r2"}
    assert volume.replicas.identical()
    assert result.bytes_copied <= 1.1 * written + G * result.regions
    assert result.bytes_done == result.bytes_total == seen[-1][0]
    assert result.bytes_done < SIZE // 2, "not the whole volume"
    assert missed("r2") not in engine.regions.planes


def test_resync_resumes_after_interruption(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    volume.replicas.faults["r2"].set("error", {"write"})
    for i in range(40):
        engine.write(i * 2 * G, b"v" * 100)
    engine.flush()  # else a failure during the resync takes in all that is still in doubt
    total = engine.regions.marked_bytes(missed("r2"))
    volume.replicas.faults["r2"].clear()
    fault = volume.replicas.faults["r2"]

    def interrupt(done: int, all_: int) -> None:
        if done >= total // 2:
            fault.set("error", {"write", "flush"})

    with pytest.raises(StorageError, match="resync of r2"):
        engine.resync("r2", progress=interrupt)
    assert engine.membership.state("r2") == "out"
    left = engine.regions.marked_bytes(missed("r2"))
    assert 0 < left < total
    engine.crash()
    fault.clear()
    again = open_engine()
    result = again.resync("r2")
    assert result.bytes_total == left <= total - total // 2 + 2 * G
    assert volume.replicas.identical()


def test_resync_under_concurrent_writes_ends_identical(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine(ReplicationPolicy(resync_rate=64 * MIB))
    volume.replicas.faults["r1"].set("error", {"write"})
    rng = random.Random(5)
    _away_writes(engine, rng, 200)
    volume.replicas.faults["r1"].clear()
    stop = threading.Event()

    def writer(seed: int) -> None:
        r = random.Random(seed)
        while not stop.is_set():
            _away_writes(engine, r, 1)
            if r.random() < 0.1:
                engine.flush()

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(3)]
    for thread in threads:
        thread.start()
    try:
        engine.resync("r1")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert engine.membership.in_sync == {"r0", "r1", "r2"}
    assert volume.replicas.identical()


def test_member_failing_during_resync_goes_back_out(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    volume.replicas.faults["r0"].unreachable = True
    engine.close()
    engine = open_engine()
    engine.write(0, b"x")
    volume.replicas.faults["r0"].unreachable = False
    volume.replicas.faults["r0"].set("error", {"write"})
    with pytest.raises(StorageError):
        engine.resync("r0")
    assert engine.membership.state("r0") == "out"


def test_status_is_printable(volume: Volume, open_engine: Callable[..., Engine]) -> None:
    engine = open_engine()
    volume.replicas.faults["r2"].set("error", {"write"})
    engine.write(0, b"x")
    status = json.loads(json.dumps(dataclasses.asdict(engine.status())))
    assert status["epoch"] == 1
    assert [m["state"] for m in status["members"]] == ["in_sync", "in_sync", "out"]
    assert status["members"][2]["errors"] == 1
    assert status["members"][2]["missed_bytes"] == G


def _swallow(action: Callable[[], object]) -> None:
    with contextlib.suppress(StorageError):
        action()


def test_quiesced_holds_writes_until_the_block_ends(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    """A write started inside quiesced() reaches no member until the block ends."""
    engine = open_engine()
    engine.write(0, b"a" * 4096)
    done = threading.Event()

    def write() -> None:
        engine.write(4096, b"b" * 4096)
        done.set()

    thread = threading.Thread(target=write)
    with engine.quiesced() as membership:
        assert membership.in_sync == {"r0", "r1", "r2"}
        thread.start()
        assert not done.wait(0.3)
        for member in ("r0", "r1", "r2"):
            image = volume.replicas.image(member)
            assert image[:8192] == b"a" * 4096 + bytes(4096)
    assert done.wait(5)
    thread.join(5)
    assert all(volume.replicas.image(m)[4096:8192] == b"b" * 4096 for m in ("r0", "r1", "r2"))


def test_quiesced_flushes_every_member_first(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    """The flush is the point's durability: a member whose flush fails is out before the
    block runs (a snapshot of it would not be of that point)."""
    engine = open_engine()
    volume.replicas.faults["r2"].set("error", {"flush"})
    with engine.quiesced() as membership:
        assert membership.in_sync == {"r0", "r1"}


def test_a_timed_out_write_that_lands_late_cannot_undo_the_resync(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    """A member too slow to answer within child_timeout is failed, but its write is still
    running and lands later (a zombie).  The resync waits for it, and reconnects the member
    under a new epoch, before copying: the member ends with the newer bytes."""
    engine = open_engine(ReplicationPolicy(child_timeout=0.1, below_min_wait=0.5))
    volume.replicas.faults["r2"].set("slow", {"write"}, delay=0.6)
    engine.write(G, b"old" * 100)  # r2 times out: out, but its write sleeps on
    assert engine.membership.state("r2") == "out"
    volume.replicas.faults["r2"].clear()
    engine.write(G, b"new" * 100)  # r2 misses this one
    epoch = engine.membership.epoch
    engine.resync("r2")
    time.sleep(0.7)  # past the zombie's landing time, had the resync not waited for it
    assert engine.membership.state("r2") == "in_sync"
    assert engine.membership.epoch == epoch + 1
    assert ("r2", epoch + 1) in volume.replicas.opened
    assert volume.replicas.identical()
    assert volume.replicas.disks["r2"].read(G, 300) == b"new" * 100


def test_replicas_refusing_the_epoch_fence_the_engine_without_failing_members(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    """A newer engine that the store does not know of (its own catalogue) is known to the
    replicas: their EPERM fences this engine at once; it records no member failure."""
    old = open_engine(ReplicationPolicy(child_timeout=2.0, below_min_wait=30.0))
    old.write(0, b"old")
    before = old.membership
    volume.replicas.promise(before.epoch + 1)
    started = time.monotonic()
    with pytest.raises(StorageError) as excinfo:
        old.write(0, b"stale")
    assert excinfo.value.errno == errno.EIO
    assert time.monotonic() - started < 5  # not the 30 s below-min wait
    assert old.status().fenced
    assert old.membership == before  # nobody failed
    assert volume.store.load("vol") == before
    for disk in volume.replicas.disks.values():
        assert disk.read(0, 3) == b"old"


def test_a_member_out_at_a_crash_also_missed_what_was_in_doubt(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    """A write in flight at the crash reached the in-sync members, but the failure handling
    that would have added its region to an out member's plane never ran (seen in the chaos
    test: r0 failed between a write taking the membership and marking its regions).  The next
    engine adds what is in doubt to every out member's plane before reconciling."""
    engine = open_engine()
    volume.replicas.faults["r2"].set("error", {"write"})
    engine.write(0, b"a" * 100)
    assert engine.membership.state("r2") == "out"
    volume.replicas.faults["r2"].clear()
    engine.flush()
    engine.crash()
    # What the crash left: the write reached r0 and r1, its region is in doubt, and r2's
    # plane does not have it.
    for member in ("r0", "r1"):
        volume.replicas.disks[member].write(3 * G, b"b" * 100)
    regions = RegionMap.open(volume.map_path)
    regions.mark([IN_DOUBT], 3 * G, 100)
    assert list(regions.regions(missed("r2"))) == [(0, G)]
    regions.close()
    again = open_engine()
    again.resync("r2")
    assert volume.replicas.identical()
    assert volume.replicas.disks["r2"].read(3 * G, 100) == b"b" * 100
