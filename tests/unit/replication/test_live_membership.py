"""Members added, removed and replaced while the engine serves a stream of writes
(ReplicatedStorage.add_member / remove_member / replace_member, docs/decisions/0120).

The oracle: writer threads own disjoint 4 KiB blocks and write version-stamped data (or
zeroes) to them; what each block holds after its last acknowledged write is known exactly,
so every member must end byte-identical to that image once the resync supervisor brought
the new ones in, and no writer may see an error."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backend.replication.membership import Membership, TransitionError
from backend.replication.policy import ReplicationPolicy
from backend.replication.supervisor import ResyncSupervisor
from backend.replication.tracking import missed
from backend.storage import StorageError
from tests.unit.replication.replicas import (
    MIB,
    QUICK,
    SIZE,
    Engine,
    G,
    Volume,
    members,
)
from tests.unit.replication.writers import Writers


@contextlib.contextmanager
def supervised(engine: Engine) -> Iterator[ResyncSupervisor]:
    supervisor = ResyncSupervisor(lambda: {"vol": engine}, interval=0.05)
    supervisor.start()
    try:
        yield supervisor
    finally:
        supervisor.close()


def wait_in_sync(engine: Engine, want: set[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.membership.in_sync != want:
        assert time.monotonic() < deadline, f"still {engine.status()}"
        time.sleep(0.02)


def resync_under_writes(engine: Engine, writers: Writers, member: str, want: set[str]) -> None:
    """Wait for ``member``'s resync to start and end (supervised), checking that guest writes
    were acknowledged while it ran."""
    deadline = time.monotonic() + 30
    while engine.membership.state(member) == "out":
        assert time.monotonic() < deadline, f"no resync started: {engine.status()}"
        time.sleep(0.005)
    before = writers.acked
    wait_in_sync(engine, want)
    assert writers.acked > before, "no write was acknowledged during the resync"


# Slow enough (8 MiB in about half a second) that the writers run during the resync.
PACED = ReplicationPolicy(child_timeout=2.0, below_min_wait=0.5, resync_rate=16 * MIB)


def check_oracle(volume: Volume, engine: Engine, writers: Writers, among: set[str]) -> None:
    assert writers.errors == []
    assert set(engine.membership.members) == among
    expected = writers.image()
    for member in sorted(among):
        assert volume.replicas.image(member) == expected, f"{member} differs from the oracle"
    assert engine.read(0, SIZE) == expected


def _seed_data(engine: Engine) -> None:
    """Data written before the change, spread over the volume, so a joining member has
    regions to copy besides those written during its resync."""
    for at in range(0, SIZE, 5 * G):
        engine.write(at + 100, b"old data " * 50)


def test_member_added_under_writes_ends_identical(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine(PACED)
    _seed_data(engine)
    volume.replicas.add("r3")
    with Writers(engine) as writers, supervised(engine):
        writers.wait_for(100)
        engine.add_member("r3")
        assert engine.membership.state("r3") in ("out", "resyncing")
        resync_under_writes(engine, writers, "r3", {"r0", "r1", "r2", "r3"})
        writers.wait_for(50)
    check_oracle(volume, engine, writers, {"r0", "r1", "r2", "r3"})
    assert volume.store.load("vol").members == ("r0", "r1", "r2", "r3")


def test_member_removed_under_writes_gets_nothing_after(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    """When remove_member returns no request of ours runs on the member or reaches it
    later: its replica may be deleted.  The member is slow, so writes are in flight on it
    when it leaves."""
    engine = open_engine()
    volume.replicas.faults["r1"].set("slow", {"write", "flush"}, delay=0.05)
    with Writers(engine) as writers:
        writers.wait_for(30)
        engine.remove_member("r1")
        assert volume.replicas.requests_running("r1") == 0
        left = volume.replicas.image("r1")
        writers.wait_for(100)
    assert volume.replicas.image("r1") == left
    check_oracle(volume, engine, writers, {"r0", "r2"})
    assert missed("r1") not in engine.regions.planes
    assert engine.status().members_failed == 0  # leaving is not failing


def test_dead_member_replaced_under_writes(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    """The operator's case: a node died (its member failed and cannot be reopened); a new
    node takes its place while the guest writes; the resync brings it in."""
    engine = open_engine(PACED)
    _seed_data(engine)
    fault = volume.replicas.faults["r2"]
    fault.set("error")
    fault.unreachable = True
    volume.replicas.add("r3")
    with Writers(engine) as writers, supervised(engine):
        writers.wait_for(50)
        assert engine.membership.state("r2") == "out"
        engine.replace_member("r2", "r3")
        resync_under_writes(engine, writers, "r3", {"r0", "r1", "r3"})
        writers.wait_for(50)
    check_oracle(volume, engine, writers, {"r0", "r1", "r3"})
    assert engine.membership.members == ("r0", "r1", "r3")  # r3 in r2's place
    assert missed("r2") not in engine.regions.planes


def test_in_sync_member_replaced_under_writes(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine(PACED)
    _seed_data(engine)
    volume.replicas.add("r3")
    with Writers(engine) as writers, supervised(engine):
        writers.wait_for(50)
        engine.replace_member("r0", "r3")
        assert volume.replicas.requests_running("r0") == 0
        left = volume.replicas.image("r0")
        resync_under_writes(engine, writers, "r3", {"r1", "r2", "r3"})
    assert volume.replicas.image("r0") == left
    check_oracle(volume, engine, writers, {"r1", "r2", "r3"})


def test_joining_member_plane_marks_everything_before_it_is_committed(
    tmp_path: Path, engines: list[Engine]
) -> None:
    """The order that makes a write of the old membership harmless: the plane first."""
    volume = Volume.create(tmp_path, list(members(2)), SIZE, granularity=G)
    seen: list[int] = []

    def on_commit(engine: Engine, new: Membership) -> None:
        if "r2" in new.members:
            seen.append(engine.regions.marked_bytes(missed("r2")))

    engine = volume.open_recording(on_commit, QUICK)
    engines.append(engine)
    volume.replicas.add("r2")
    engine.add_member("r2")
    assert seen[0] == SIZE


def test_a_crash_before_the_new_member_resynced_resumes_it(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    _seed_data(engine)
    volume.replicas.add("r3")
    engine.replace_member("r1", "r3")
    engine.write(7 * G, b"after the change")
    engine.crash()
    again = open_engine()
    assert again.membership.state("r3") == "out"
    assert missed("r1") not in again.regions.planes
    again.resync("r3")
    assert volume.replicas.identical(["r0", "r2", "r3"])


def test_a_removed_member_plane_left_by_a_crash_is_dropped(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    volume.replicas.faults["r2"].set("error", {"write"})
    engine.write(0, b"x")  # r2 out, with a plane
    engine.regions.add_plane("missed:gone")  # as if its removal was committed, then a crash
    engine.close()
    again = open_engine()
    assert "missed:gone" not in again.regions.planes
    assert missed("r2") in again.regions.planes


def test_refused_changes(volume: Volume, open_engine: Callable[..., Engine]) -> None:
    engine = open_engine(ReplicationPolicy(min_insync=2, child_timeout=2.0, below_min_wait=0.5))
    volume.replicas.add("r3")
    before = engine.membership
    with pytest.raises(TransitionError, match="already a member"):
        engine.add_member("r1")
    with pytest.raises(TransitionError, match="already a member"):
        engine.replace_member("r0", "r1")
    with pytest.raises(TransitionError, match="not a member"):
        engine.remove_member("r9")
    with pytest.raises(TransitionError, match="not a member"):
        engine.replace_member("r9", "r3")
    assert engine.membership == before  # nothing committed
    volume.replicas.faults["r2"].set("error", {"write"})
    engine.write(0, b"y")  # r2 out: two in sync, as min_insync needs
    with pytest.raises(TransitionError, match="min_insync is 2"):
        engine.replace_member("r0", "r3")
    with pytest.raises(TransitionError, match="min_insync is 2"):
        engine.remove_member("r1")
    engine.replace_member("r2", "r3")  # the out one may go
    assert engine.membership.members == ("r0", "r1", "r3")
    engine.remove_member("r3")
    with pytest.raises(TransitionError, match="fewer than min_insync=2"):
        engine.remove_member("r1")
    assert missed("r3") not in engine.regions.planes


def test_last_in_sync_member_is_never_removed(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine()
    for member in ("r1", "r2"):
        volume.replicas.faults[member].set("error", {"write"})
    engine.write(0, b"z")
    with pytest.raises(TransitionError, match="last in-sync member"):
        engine.remove_member("r0")
    assert engine.membership.in_sync == {"r0"}


def test_member_removed_during_its_resync(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    """A resync of the leaving member stops, and the removal waits for it."""
    engine = open_engine(ReplicationPolicy(child_timeout=2.0, resync_rate=2 * MIB))
    _seed_data(engine)
    volume.replicas.add("r3")
    engine.add_member("r3")
    errors: list[BaseException] = []

    def resync() -> None:
        try:
            engine.resync("r3")
        except (StorageError, TransitionError) as err:
            errors.append(err)

    thread = threading.Thread(target=resync)
    thread.start()
    deadline = time.monotonic() + 10
    while engine.membership.state("r3") != "resyncing":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    engine.remove_member("r3")
    assert volume.replicas.requests_running("r3") == 0
    thread.join(10)
    assert not thread.is_alive()
    assert errors, "the resync of a removed member cannot succeed"
    assert engine.membership.members == ("r0", "r1", "r2")
    assert missed("r3") not in engine.regions.planes


def test_a_member_added_while_another_is_dead_is_resynced(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    """The supervisor takes out members in turn: a dead node, tried first and failing every
    round, does not keep a new member from its resync."""
    engine = open_engine()
    _seed_data(engine)
    volume.replicas.faults["r0"].set("error")
    volume.replicas.faults["r0"].unreachable = True
    engine.write(0, b"r0 fails on this")
    volume.replicas.add("r3")
    engine.add_member("r3")
    with supervised(engine):
        wait_in_sync(engine, {"r1", "r2", "r3"})
    assert volume.replicas.identical(["r1", "r2", "r3"])
