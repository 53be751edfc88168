"""Membership: invariants, every transition, the compare-and-swap store, epochs, fencing."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from backend.replication.membership import (
    ConflictError,
    FencedError,
    InMemoryMembershipStore,
    InvalidMembershipError,
    Membership,
    MembershipStore,
    TransitionError,
    UnknownVolumeError,
    commit_change,
    epoch_taken,
    member_added,
    member_failed,
    member_removed,
    member_replaced,
    resync_done,
    resync_started,
    take_epoch,
)
from backend.volumes.catalogue import Catalogue
from backend.volumes.memberships import CatalogueMembershipStore

ABC = ("a", "b", "c")


def volume(**changes: Any) -> Membership:
    """Volume v: members a, b, c; a and b in sync, c out."""
    base = Membership("v", 3, 10, ABC, frozenset({"a", "b"}))
    return dataclasses.replace(base, **changes)


def test_a_new_volume_has_every_member_in_sync() -> None:
    m = Membership.new("v", ABC)
    assert (m.epoch, m.generation, m.members) == (0, 1, ABC)
    assert m.in_sync == set(ABC)
    assert m.resyncing == m.out == frozenset()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"volume_id": ""}, "volume id is empty"),
        ({"epoch": -1}, "not negative"),
        ({"generation": -1}, "not negative"),
        ({"members": (), "in_sync": frozenset()}, "at least one member"),
        ({"members": ("a", "a", "b")}, "distinct"),
        ({"members": ("a", "", "b")}, "non-empty"),
        ({"in_sync": frozenset({"a", "z"})}, r"in-sync members \['a', 'z'\] are members"),
        ({"resyncing": frozenset({"z"})}, r"resyncing members \['z'\] are members"),
        ({"resyncing": frozenset({"b"})}, "both in sync and resyncing"),
        ({"in_sync": frozenset(), "resyncing": frozenset({"c"})}, "at least one member is in sync"),
    ],
)
def test_invariants(changes: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidMembershipError, match=message):
        volume(**changes)


def test_states() -> None:
    m = volume(resyncing=frozenset({"c"}))
    assert [m.state(x) for x in ABC] == ["in_sync", "in_sync", "resyncing"]
    assert volume().out == {"c"}
    with pytest.raises(TransitionError, match="'z' is not a member of v"):
        m.state("z")


def test_every_transition_takes_one_generation_and_keeps_the_epoch() -> None:
    m = volume()
    for new in (
        member_failed(m, "b"),
        resync_started(m, "c"),
        resync_done(volume(resyncing=frozenset({"c"})), "c"),
        member_added(m, "d"),
        member_removed(m, "b"),
        member_replaced(m, "c", "d"),
    ):
        assert (new.epoch, new.generation) == (m.epoch, m.generation + 1)
    assert (epoch_taken(m).epoch, epoch_taken(m).generation) == (m.epoch + 1, m.generation + 1)


def test_a_member_fails_from_in_sync_or_from_resyncing() -> None:
    m = member_failed(volume(), "b")
    assert m.in_sync == {"a"}
    assert m.out == {"b", "c"}
    m = member_failed(volume(resyncing=frozenset({"c"})), "c")
    assert m.out == {"c"}
    assert m.in_sync == {"a", "b"}


def test_a_member_already_out_cannot_fail() -> None:
    with pytest.raises(TransitionError, match="'c' of v is already out"):
        member_failed(volume(), "c")


def test_the_last_in_sync_member_never_leaves() -> None:
    """It holds the only copy of every acknowledged write: failing it must fail the write."""
    m = member_failed(volume(), "b")
    with pytest.raises(TransitionError, match="last in-sync member of v: it cannot be failed"):
        member_failed(m, "a")
    with pytest.raises(TransitionError, match="last in-sync member of v: it cannot be removed"):
        member_removed(m, "a")
    with pytest.raises(TransitionError, match="last in-sync member"):
        member_replaced(m, "a", "d")


def test_resync_from_out_to_in_sync() -> None:
    m = resync_started(volume(), "c")
    assert m.resyncing == {"c"}
    assert m.state("c") == "resyncing"
    m = resync_done(m, "c")
    assert m.in_sync == set(ABC)
    assert m.resyncing == frozenset()


@pytest.mark.parametrize(
    ("transition", "member", "message"),
    [
        (resync_started, "a", "'a' of v is in_sync, not out"),
        (resync_done, "c", "'c' of v is out, not resyncing"),
        (resync_done, "a", "'a' of v is in_sync, not resyncing"),
        (resync_started, "z", "'z' is not a member"),
    ],
)
def test_resync_transitions_that_do_not_apply(
    transition: Callable[[Membership, str], Membership], member: str, message: str
) -> None:
    with pytest.raises(TransitionError, match=message):
        transition(volume(), member)


def test_a_new_member_is_out_and_last_in_order() -> None:
    m = member_added(volume(), "d")
    assert m.members == ("a", "b", "c", "d")
    assert m.state("d") == "out"
    with pytest.raises(TransitionError, match="'a' is already a member"):
        member_added(m, "a")


@pytest.mark.parametrize("member", ["a", "c"])
def test_removing_a_member(member: str) -> None:
    m = member_removed(volume(resyncing=frozenset({"c"})), member)
    assert member not in m.members
    assert member not in m.in_sync | m.resyncing
    with pytest.raises(TransitionError, match="not a member"):
        member_removed(m, member)


def test_replacing_a_member_keeps_its_place() -> None:
    m = member_replaced(volume(), "b", "d")
    assert m.members == ("a", "d", "c")
    assert m.in_sync == {"a"}
    assert m.state("d") == "out"
    with pytest.raises(TransitionError, match="'c' is already a member"):
        member_replaced(m, "a", "c")
    with pytest.raises(TransitionError, match="'z' is not a member"):
        member_replaced(m, "z", "e")


StoreFactory = Callable[[], MembershipStore]


@pytest.fixture(params=["memory", "catalogue"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Empty stores of one implementation: the Protocol's contract holds for every one."""
    catalogues: list[Catalogue] = []

    def make() -> MembershipStore:
        if request.param == "memory":
            return InMemoryMembershipStore()
        catalogues.append(Catalogue(tmp_path / f"catalogue-{len(catalogues)}.sqlite3"))
        return CatalogueMembershipStore(catalogues[-1])

    yield make
    for catalogue in catalogues:
        catalogue.close()


@pytest.fixture
def store(new_store: StoreFactory) -> MembershipStore:
    store = new_store()
    store.commit(Membership.new("v", ABC), None)
    return store


def test_the_store_loads_what_was_committed(store: MembershipStore) -> None:
    assert store.load("v") == Membership.new("v", ABC)
    with pytest.raises(UnknownVolumeError, match="no membership for volume w"):
        store.load("w")


def test_compare_and_swap(store: MembershipStore) -> None:
    first = store.load("v")
    store.commit(member_failed(first, "c"), first.generation)
    with pytest.raises(ConflictError, match="expected generation 1, found 2") as lost:
        store.commit(member_failed(first, "b"), first.generation)  # a stale view
    assert (lost.value.expected, lost.value.current) == (1, 2)
    assert store.load("v").in_sync == {"a", "b"}
    with pytest.raises(ConflictError, match="expected generation None, found 2"):
        store.commit(Membership.new("v", ABC), None)  # created twice


def test_the_store_refuses_skipped_generations_and_older_epochs(
    store: MembershipStore, new_store: StoreFactory
) -> None:
    current = store.load("v")
    skipped = dataclasses.replace(member_failed(current, "c"), generation=5)
    with pytest.raises(InvalidMembershipError, match="generation 5 follows 1, expected 2"):
        store.commit(skipped, current.generation)
    with pytest.raises(InvalidMembershipError, match="generation 2 follows None, expected 1"):
        new_store().commit(member_failed(current, "c"), None)
    assert store.load("v") == current


def test_the_store_refuses_an_epoch_going_back(new_store: StoreFactory) -> None:
    store = new_store()
    store.commit(dataclasses.replace(Membership.new("v", ABC), epoch=4), None)
    older = dataclasses.replace(store.load("v"), epoch=3, generation=2)
    with pytest.raises(InvalidMembershipError, match="epoch 3 is older than 4"):
        store.commit(older, 1)


def test_take_epoch_commits_the_next_epoch(store: MembershipStore) -> None:
    taken = take_epoch(store, "v")
    assert (taken.epoch, taken.generation) == (1, 2)
    assert store.load("v") == taken
    assert take_epoch(store, "v").epoch == 2


def test_commit_change_retries_a_lost_swap_on_the_fresh_record(store: MembershipStore) -> None:
    mine = take_epoch(store, "v")
    # Another change of the same epoch lands first (say the resync of c's peer finished).
    store.commit(member_failed(mine, "c"), mine.generation)
    done = commit_change(store, mine, lambda m: member_failed(m, "b"))
    assert done.in_sync == {"a"}
    assert done.generation == mine.generation + 2
    assert store.load("v") == done


def test_commit_change_of_a_fenced_engine_fails(store: MembershipStore) -> None:
    old = take_epoch(store, "v")
    take_epoch(store, "v")  # a second engine attached the volume
    with pytest.raises(FencedError, match="volume v is at epoch 2; this engine holds epoch 1"):
        commit_change(store, old, lambda m: member_failed(m, "b"))
    assert store.load("v").in_sync == set(ABC)


def test_commit_change_under_contention(store: MembershipStore) -> None:
    """Threads of one engine fail different members at once: every change lands once."""
    mine = take_epoch(store, "v")
    store.commit(member_added(mine, "d"), mine.generation)
    store.commit(member_added(store.load("v"), "e"), mine.generation + 1)
    for member in ("d", "e"):
        for transition in (resync_started, resync_done):
            current = store.load("v")
            store.commit(transition(current, member), current.generation)
    errors: list[BaseException] = []

    def fail(member: str) -> None:
        try:
            commit_change(store, mine, lambda m: member_failed(m, member), attempts=100)
        except BaseException as err:  # the test reports it below
            errors.append(err)

    threads = [threading.Thread(target=fail, args=(x,)) for x in ("b", "c", "d", "e")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert store.load("v").in_sync == {"a"}


class ContendedStore(InMemoryMembershipStore):
    """Another thread of the same engine always commits just before us."""

    def commit(self, new: Membership, expected_generation: int | None) -> None:
        current = self.load(new.volume_id)
        rival = member_removed if "x" in current.members else member_added
        super().commit(rival(current, "x"), current.generation)
        super().commit(new, expected_generation)


def test_commit_change_gives_up_after_its_attempts() -> None:
    store = ContendedStore()
    InMemoryMembershipStore.commit(store, Membership.new("v", ABC), None)
    mine = store.load("v")
    with pytest.raises(ConflictError, match="expected generation 3, found 4"):
        commit_change(store, mine, lambda m: member_failed(m, "b"), attempts=3)
    assert store.load("v").in_sync == set(ABC)
