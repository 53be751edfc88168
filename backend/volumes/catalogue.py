"""The volume catalogue: SQLite metadata of volumes, their layers and snapshots.

A volume's data is a chain of copy-on-write layers (backend.storage.cow): its writable top
layer, whose ``parent`` is the layer below, and so on.  A snapshot names a frozen layer; a
clone is a volume whose top's parent is a snapshot's layer.  Layers no chain reaches are
garbage (removed by VolumeService.gc).

Each volume and layer records its storage (a StorageSpec, stored as JSON: the one place specs
become text, backend.volumes.storages):
layers of one chain always share it.  Schema 1 catalogues (before storages) are upgraded in
place: their volumes are on ``file``; schema 2 ones get ``shared`` (off: one writer at a time);
schema 3 ones get each volume's ``uid`` (made at migration) and ``epoch`` 0 (never fenced);
schema 4 ones get the (empty) ``memberships`` and ``replicas`` tables.

``memberships`` holds the membership record of each replicated volume this catalogue's engine
serves (backend.replication.membership; keyed by the engine volume's uid), changed only by
compare-and-swap on its generation (backend.volumes.memberships); ``replicas`` the replica
volumes a replicated volume's layer has on storage nodes (backend.volumes.replicated).

A volume's ``uid`` tells it from an earlier volume of the same name; its ``epoch`` is the
highest replication epoch it has promised (docs/replication.md, "Replica protocol").

Every change is one SQLite transaction and bumps ``generation``, which servers watch to pick
up volumes created, resized or deleted by another process.  The SQL lives in this module only:
callers read through :class:`Catalogue`'s methods and change rows through the named methods of
:class:`Changes`, the transaction :meth:`Catalogue.transaction` hands out.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from backend.replication.membership import Membership
from backend.volumes.storages import FILE, StorageSpec

SCHEMA_VERSION = 5
# The default column value of catalogues older than storages: FILE's JSON (a unit test checks).
FILE_STORAGE = '{"kind": "file", "layers": [], "params": {}}'
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layers (
    id TEXT PRIMARY KEY,
    parent TEXT REFERENCES layers(id),
    created REAL NOT NULL,
    storage TEXT NOT NULL DEFAULT '{"kind": "file", "layers": [], "params": {}}'
);
CREATE TABLE IF NOT EXISTS volumes (
    name TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '{}',
    read_only INTEGER NOT NULL DEFAULT 0,
    top TEXT NOT NULL REFERENCES layers(id),
    origin TEXT,
    state TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'deleting')),
    created REAL NOT NULL,
    storage TEXT NOT NULL DEFAULT '{"kind": "file", "layers": [], "params": {}}',
    shared INTEGER NOT NULL DEFAULT 0,
    uid TEXT NOT NULL DEFAULT '',
    epoch INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS snapshots (
    volume TEXT NOT NULL,
    name TEXT NOT NULL,
    layer TEXT NOT NULL REFERENCES layers(id),
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (volume, name)
);
CREATE TABLE IF NOT EXISTS memberships (
    volume_id TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    members TEXT NOT NULL,
    in_sync TEXT NOT NULL,
    resyncing TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS replicas (
    layer TEXT NOT NULL,
    node TEXT NOT NULL,
    volume TEXT NOT NULL,
    uid TEXT NOT NULL,
    PRIMARY KEY (layer, node)
);
"""


@dataclasses.dataclass(frozen=True)
class VolumeRow:
    name: str
    size: int
    description: str
    labels: dict[str, str]
    read_only: bool
    top: str
    origin: str | None
    state: str
    created: float
    storage: StorageSpec = FILE
    shared: bool = False  # several clients may hold it writable at once (multi-attach)
    uid: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    epoch: int = 0  # the highest replication epoch promised


@dataclasses.dataclass(frozen=True)
class ReplicaRow:
    """The replica of a replicated volume's ``layer`` on storage node ``node``: the volume
    ``volume`` there, whose uid is ``uid`` (its export name carries it: fencing)."""

    layer: str
    node: str
    volume: str
    uid: str


@dataclasses.dataclass(frozen=True)
class SnapshotRow:
    volume: str
    name: str
    layer: str
    size: int
    created: float


def _volume(row: sqlite3.Row) -> VolumeRow:
    return VolumeRow(
        name=row["name"],
        size=row["size"],
        description=row["description"],
        labels=json.loads(row["labels"]),
        read_only=bool(row["read_only"]),
        top=row["top"],
        origin=row["origin"],
        state=row["state"],
        created=row["created"],
        storage=StorageSpec.from_json(row["storage"]),
        shared=bool(row["shared"]),
        uid=row["uid"],
        epoch=row["epoch"],
    )


def _membership(row: sqlite3.Row) -> Membership:
    return Membership(
        volume_id=row["volume_id"],
        epoch=row["epoch"],
        generation=row["generation"],
        members=tuple(json.loads(row["members"])),
        in_sync=frozenset(json.loads(row["in_sync"])),
        resyncing=frozenset(json.loads(row["resyncing"])),
    )


def _snapshot(row: sqlite3.Row) -> SnapshotRow:
    return SnapshotRow(row["volume"], row["name"], row["layer"], row["size"], row["created"])


class Catalogue:
    """One SQLite file; safe to share between threads (one connection behind a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=10000")
        if self._schema() == str(SCHEMA_VERSION):
            return  # opening to read writes nothing (no generation bump for servers to see)
        with self._transaction() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema', ?), ('generation', '0')",
                (str(SCHEMA_VERSION),),
            )
            for table in ("layers", "volumes"):  # schema 1 → 2
                columns = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
                if "storage" not in columns:
                    db.execute(
                        f"ALTER TABLE {table} ADD COLUMN storage TEXT NOT NULL DEFAULT"
                        f" '{FILE_STORAGE}'"
                    )
            columns = {r["name"] for r in db.execute("PRAGMA table_info(volumes)")}
            if "shared" not in columns:  # schema 2 → 3
                db.execute("ALTER TABLE volumes ADD COLUMN shared INTEGER NOT NULL DEFAULT 0")
            # schema 4 → 5: the memberships table, made by _SCHEMA above
            if "uid" not in columns:  # schema 3 → 4
                db.execute("ALTER TABLE volumes ADD COLUMN uid TEXT NOT NULL DEFAULT ''")
                db.execute("ALTER TABLE volumes ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0")
                for (name,) in db.execute("SELECT name FROM volumes").fetchall():
                    db.execute(
                        "UPDATE volumes SET uid = ? WHERE name = ?", (uuid.uuid4().hex, name)
                    )
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))

    def _schema(self) -> str | None:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.OperationalError:  # no meta table: a new catalogue
            return None
        return str(row["value"]) if row else None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[Changes]:
        """An immediate (write-locked) transaction that bumps the generation on success; its
        changes are the methods of the :class:`Changes` it yields.  An exception rolls every
        one of them back."""
        with self._transaction() as db:
            yield Changes(db)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute(
                    "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'"
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def generation(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row["value"])

    # ------------------------------------------------------------------ reads

    def volumes(self, state: str | None = "ready") -> list[VolumeRow]:
        with self._lock:
            if state is None:
                rows = self._db.execute("SELECT * FROM volumes ORDER BY name").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM volumes WHERE state = ? ORDER BY name", (state,)
                ).fetchall()
        return [_volume(r) for r in rows]

    def volume(self, name: str) -> VolumeRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM volumes WHERE name = ?", (name,)).fetchone()
        return _volume(row) if row else None

    def snapshots(self, volume: str | None = None) -> list[SnapshotRow]:
        with self._lock:
            if volume is None:
                rows = self._db.execute(
                    "SELECT * FROM snapshots ORDER BY volume, created"
                ).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM snapshots WHERE volume = ? ORDER BY created", (volume,)
                ).fetchall()
        return [_snapshot(r) for r in rows]

    def snapshot(self, volume: str, name: str) -> SnapshotRow | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM snapshots WHERE volume = ? AND name = ?", (volume, name)
            ).fetchone()
        return _snapshot(row) if row else None

    def parents(self) -> dict[str, str | None]:
        with self._lock:
            rows = self._db.execute("SELECT id, parent FROM layers").fetchall()
        return {r["id"]: r["parent"] for r in rows}

    def chain(self, top: str) -> list[str]:
        """Layer ids from the bottom to ``top``."""
        parents = self.parents()
        out = [top]
        while (parent := parents.get(out[-1])) is not None:
            out.append(parent)
        return out[::-1]

    def promise_epoch(self, uid: str, epoch: int) -> bool:
        """Raise the epoch of the volume ``uid`` to ``epoch``, committed (synchronous=FULL)
        before this returns; False, changing nothing, if no volume has that uid or its epoch
        is already ``epoch`` or higher (a compare-and-set: epochs never go down)."""
        with self.transaction() as changes:
            return changes.raise_epoch(uid, epoch)

    def membership(self, volume_id: str) -> Membership | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM memberships WHERE volume_id = ?", (volume_id,)
            ).fetchone()
        return _membership(row) if row else None

    def replicas(self, layer: str) -> list[ReplicaRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM replicas WHERE layer = ? ORDER BY rowid", (layer,)
            ).fetchall()
        return [ReplicaRow(r["layer"], r["node"], r["volume"], r["uid"]) for r in rows]

    def layer_storage(self, layer: str) -> StorageSpec | None:
        with self._lock:
            row = self._db.execute("SELECT storage FROM layers WHERE id = ?", (layer,)).fetchone()
        return StorageSpec.from_json(row["storage"]) if row else None


class Changes:
    """The changes one transaction makes (from :meth:`Catalogue.transaction`, which commits
    them together or not at all); valid inside its ``with`` block only."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    # ------------------------------------------------------------------ layers

    def add_layer(self, layer: str, parent: str | None, storage: StorageSpec = FILE) -> None:
        self._db.execute(
            "INSERT INTO layers (id, parent, created, storage) VALUES (?, ?, ?, ?)",
            (layer, parent, time.time(), storage.to_json()),
        )

    def set_parent(self, layer: str, parent: str | None) -> None:
        """``None`` cuts the chain below ``layer`` (a flattened clone)."""
        self._db.execute("UPDATE layers SET parent = ? WHERE id = ?", (parent, layer))

    def remove_layer(self, layer: str) -> None:
        self._db.execute("DELETE FROM layers WHERE id = ?", (layer,))

    # ------------------------------------------------------------------ volumes

    def add_volume(self, row: VolumeRow) -> None:
        self._db.execute(
            "INSERT INTO volumes (name, size, description, labels, read_only, top, origin,"
            " state, created, storage, shared, uid, epoch)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.name,
                row.size,
                row.description,
                json.dumps(row.labels, sort_keys=True),
                int(row.read_only),
                row.top,
                row.origin,
                row.state,
                row.created,
                row.storage.to_json(),
                int(row.shared),
                row.uid,
                row.epoch,
            ),
        )

    def set_state(self, volume: str, state: str) -> None:
        """``state``: creating, ready or deleting (the schema refuses others)."""
        self._db.execute("UPDATE volumes SET state = ? WHERE name = ?", (state, volume))

    def set_size(self, volume: str, size: int) -> None:
        self._db.execute("UPDATE volumes SET size = ? WHERE name = ?", (size, volume))

    def set_top(self, volume: str, top: str) -> None:
        self._db.execute("UPDATE volumes SET top = ? WHERE name = ?", (top, volume))

    def set_origin(self, volume: str, origin: str | None) -> None:
        self._db.execute("UPDATE volumes SET origin = ? WHERE name = ?", (origin, volume))

    def raise_epoch(self, uid: str, epoch: int) -> bool:
        """Set the epoch of the volume ``uid`` if it is lower; whether it was."""
        cursor = self._db.execute(
            "UPDATE volumes SET epoch = ? WHERE uid = ? AND epoch < ?", (epoch, uid, epoch)
        )
        return cursor.rowcount == 1

    def remove_volume(self, volume: str) -> None:
        self._db.execute("DELETE FROM volumes WHERE name = ?", (volume,))

    # ------------------------------------------------------------------ snapshots

    def add_snapshot(self, row: SnapshotRow) -> None:
        self._db.execute(
            "INSERT INTO snapshots (volume, name, layer, size, created) VALUES (?, ?, ?, ?, ?)",
            (row.volume, row.name, row.layer, row.size, row.created),
        )

    def remove_snapshot(self, volume: str, name: str) -> None:
        self._db.execute("DELETE FROM snapshots WHERE volume = ? AND name = ?", (volume, name))

    def remove_snapshots(self, volume: str) -> None:
        """Every snapshot of ``volume`` (the volume is being deleted)."""
        self._db.execute("DELETE FROM snapshots WHERE volume = ?", (volume,))

    # ------------------------------------------------------------------ memberships

    def membership(self, volume_id: str) -> Membership | None:
        """The stored record, read inside this transaction (the compare of a swap)."""
        row = self._db.execute(
            "SELECT * FROM memberships WHERE volume_id = ?", (volume_id,)
        ).fetchone()
        return _membership(row) if row else None

    def put_membership(self, m: Membership) -> None:
        """Store ``m`` in place of the volume's record, if any."""
        self._db.execute(
            "INSERT OR REPLACE INTO memberships"
            " (volume_id, epoch, generation, members, in_sync, resyncing)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                m.volume_id,
                m.epoch,
                m.generation,
                json.dumps(list(m.members)),
                json.dumps(sorted(m.in_sync)),
                json.dumps(sorted(m.resyncing)),
            ),
        )

    def remove_membership(self, volume_id: str) -> None:
        self._db.execute("DELETE FROM memberships WHERE volume_id = ?", (volume_id,))

    # ------------------------------------------------------------------ replicas

    def add_replica(self, row: ReplicaRow) -> None:
        self._db.execute(
            "INSERT INTO replicas (layer, node, volume, uid) VALUES (?, ?, ?, ?)",
            (row.layer, row.node, row.volume, row.uid),
        )

    def remove_replica(self, layer: str, node: str) -> None:
        self._db.execute("DELETE FROM replicas WHERE layer = ? AND node = ?", (layer, node))
