"""The catalogue as a membership store: what the shared contract tests
(tests/unit/replication/test_membership.py, parametrized over every store) cannot show:
records survive a reopen, two connections to one file race through SQLite's write lock,
and a schema 4 catalogue gains the table."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from backend.replication.membership import (
    ConflictError,
    Membership,
    UnknownVolumeError,
    member_failed,
    resync_started,
    take_epoch,
)
from backend.volumes.catalogue import SCHEMA_VERSION, Catalogue
from backend.volumes.memberships import CatalogueMembershipStore

ABC = ("a", "b", "c")


def test_a_committed_record_survives_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "catalogue.sqlite3"
    catalogue = Catalogue(path)
    store = CatalogueMembershipStore(catalogue)
    store.commit(Membership.new("v", ("c", "a", "b")), None)
    m = take_epoch(store, "v")
    m2 = member_failed(m, "b")
    store.commit(m2, m.generation)
    m3 = resync_started(m2, "b")
    store.commit(m3, m2.generation)
    catalogue.close()
    again = Catalogue(path)
    assert CatalogueMembershipStore(again).load("v") == m3
    assert again.membership("v") == m3
    assert m3.members == ("c", "a", "b")  # the configured order is kept
    again.close()


def test_two_connections_racing_on_one_file_commit_once(tmp_path: Path) -> None:
    """Two engines' catalogue handles (as two processes would hold) swap from the same
    generation: SQLite serialises them, exactly one wins, the loser changes nothing."""
    path = tmp_path / "catalogue.sqlite3"
    first, second = Catalogue(path), Catalogue(path)
    stores = [CatalogueMembershipStore(first), CatalogueMembershipStore(second)]
    stores[0].commit(Membership.new("v", ABC), None)
    base = stores[1].load("v")
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def swap(store: CatalogueMembershipStore, member: str) -> None:
        barrier.wait()
        try:
            store.commit(member_failed(base, member), base.generation)
            outcomes.append(member)
        except ConflictError:
            outcomes.append("lost")

    threads = [threading.Thread(target=swap, args=x) for x in zip(stores, ("b", "c"), strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(outcomes) == 2
    assert outcomes.count("lost") == 1
    winner = next(o for o in outcomes if o != "lost")
    stored = stores[0].load("v")
    assert stored.generation == base.generation + 1
    assert stored.out == {winner}
    first.close()
    second.close()


def test_remove_forgets_the_record(tmp_path: Path) -> None:
    catalogue = Catalogue(tmp_path / "catalogue.sqlite3")
    store = CatalogueMembershipStore(catalogue)
    store.commit(Membership.new("v", ABC), None)
    store.remove("v")
    with pytest.raises(UnknownVolumeError, match="no membership for volume v"):
        store.load("v")
    catalogue.close()


def test_schema_4_catalogue_gets_the_memberships_table(tmp_path: Path) -> None:
    path = tmp_path / "catalogue.sqlite3"
    Catalogue(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE memberships")
    db.execute("UPDATE meta SET value = '4' WHERE key = 'schema'")
    db.commit()
    db.close()
    catalogue = Catalogue(path)
    assert catalogue._schema() == str(SCHEMA_VERSION) == "5"
    store = CatalogueMembershipStore(catalogue)
    store.commit(Membership.new("v", ABC), None)
    assert store.load("v").generation == 1
    catalogue.close()
