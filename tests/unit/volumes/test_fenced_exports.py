"""Fenced export names and volume identity in the catalogue (issue 12, replica side)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from backend.nbd import ExportForbiddenError, ExportUnavailableError, TLSPolicy
from backend.server.exports import Export
from backend.server.holders import Holders
from backend.storage import StorageError
from backend.volumes.catalogue import SCHEMA_VERSION, Catalogue, VolumeRow
from backend.volumes.exports import ExportName, VolumeExports, parse_export_name
from backend.volumes.model import CreateRequest
from backend.volumes.service import VolumeService

MiB = 1 << 20
UID = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("v", ExportName("v")),
        ("", ExportName("")),
        ("v;epoch=7", ExportName("v", 7)),
        (f"v;epoch=7;uid={UID}", ExportName("v", 7, UID)),
        (f"v;uid={UID};epoch=12", ExportName("v", 12, UID)),
        (f"v;uid={UID}", ExportName("v", None, UID)),
        ("v;epoch=9223372036854775807", ExportName("v", (1 << 63) - 1)),
    ],
)
def test_export_names_parse(name: str, parsed: ExportName) -> None:
    assert parse_export_name(name) == parsed


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("v;epoch=0", "epoch must be a whole number"),
        ("v;epoch=-1", "epoch must be a whole number"),
        ("v;epoch=07", "epoch must be a whole number"),
        ("v;epoch=", "epoch must be a whole number"),
        ("v;epoch=9223372036854775808", "epoch must be a whole number"),
        ("v;epoch=1;epoch=2", "repeated export parameter 'epoch=2'"),
        ("v;uid=ABC", "uid must be 32 lowercase hex digits"),
        (f"v;uid={UID.upper()}", "uid must be 32 lowercase hex digits"),
        ("v;generation=3", "unknown or repeated export parameter 'generation=3'"),
        ("v;epoch", "unknown or repeated export parameter 'epoch'"),
        ("v;", "unknown or repeated export parameter ''"),
    ],
)
def test_malformed_export_names_are_refused(name: str, error: str) -> None:
    with pytest.raises(ExportUnavailableError, match=error):
        parse_export_name(name)


@pytest.fixture
def exports(tmp_path: Path) -> Iterator[VolumeExports]:
    service = VolumeService(tmp_path / "data")
    service.create(CreateRequest("v", MiB))
    made = VolumeExports(service, tls=TLSPolicy.ALLOWED)
    yield made
    service.close()


def test_every_volume_gets_its_own_uid_and_epoch_zero(exports: VolumeExports) -> None:
    service = exports.service
    first = service.info("v")
    assert len(first.uid) == 32
    assert first.epoch == 0
    service.delete("v")
    service.create(CreateRequest("v", MiB))
    assert service.info("v").uid != first.uid  # a re-created volume is another volume


def test_a_wrong_uid_is_never_served(exports: VolumeExports) -> None:
    uid = exports.service.info("v").uid
    with pytest.raises(ExportUnavailableError, match=f"volume v has uid {uid}, not {UID}"):
        exports.get(f"v;epoch=1;uid={UID}")
    export = exports.get(f"v;epoch=1;uid={uid}")
    assert export is not None
    assert export.epoch == 1


def test_taking_an_epoch_persists_it_and_older_ones_are_refused(exports: VolumeExports) -> None:
    holders = Holders()
    export = exports.get("v;epoch=3")
    assert export is not None
    assert not export.exclusive
    holder, served = holders.admit("engine", export)
    assert holder.epoch == 3
    assert holder.writable
    assert not served.read_only
    assert cast(VolumeRow, exports.service.catalogue.volume("v")).epoch == 3
    with pytest.raises(ExportForbiddenError, match="promised epoch 3: epoch 2 is fenced out"):
        exports.get("v;epoch=2")
    plain = exports.get("v")
    assert plain is not None
    _, served = holders.admit("someone", plain)
    assert served.read_only  # only the engine writes a replica
    assert holders.preview(plain).read_only
    holders.release(holder)


def test_the_promised_epoch_survives_a_restart(tmp_path: Path) -> None:
    service = VolumeService(tmp_path / "data")
    service.create(CreateRequest("v", MiB))
    uid = service.info("v").uid
    assert service.catalogue.promise_epoch(uid, 5)
    assert not service.catalogue.promise_epoch(uid, 5)  # never twice
    assert not service.catalogue.promise_epoch(uid, 4)  # never down
    assert not service.catalogue.promise_epoch(UID, 9)  # no such volume
    service.close()
    again = VolumeService(tmp_path / "data")
    with pytest.raises(ExportForbiddenError, match="promised epoch 5: epoch 4"):
        VolumeExports(again, tls=TLSPolicy.ALLOWED).get("v;epoch=4")
    again.close()


def test_schema_3_catalogue_gets_uids_and_epoch_zero(tmp_path: Path) -> None:
    data = tmp_path / "d"
    service = VolumeService(data)
    service.create(CreateRequest("a", MiB))
    service.create(CreateRequest("b", MiB))
    service.close()
    db = sqlite3.connect(data / "catalogue.sqlite3")
    db.execute("ALTER TABLE volumes DROP COLUMN uid")
    db.execute("ALTER TABLE volumes DROP COLUMN epoch")
    db.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
    db.commit()
    db.close()
    catalogue = Catalogue(data / "catalogue.sqlite3")
    rows = catalogue.volumes()
    assert [r.epoch for r in rows] == [0, 0]
    assert len({r.uid for r in rows}) == 2
    assert all(len(r.uid) == 32 for r in rows)
    assert catalogue._schema() == str(SCHEMA_VERSION) == "5"
    catalogue.close()


def test_a_snapshot_is_served_read_only_and_shared_as_volume_at_snapshot(
    exports: VolumeExports,
) -> None:
    service = exports.service
    service.storage("v").write(0, b"before")
    service.snapshot("v", "s")
    service.storage("v").write(0, b"after!")
    uid = service.info("v").uid
    export = exports.get(f"v@s;uid={uid}")
    assert export is not None
    assert export.name == "v@s"
    assert export.read_only
    assert not export.exclusive  # never makes the volume's writer read-only, nor the reverse
    assert export.fence is None
    assert export.storage.read(0, 6) == b"before"
    assert exports.get("v@s") is not None
    assert cast(Export, exports.get("v@s")).storage is export.storage
    holders = Holders()
    _, served = holders.admit("reader", export)
    assert served.read_only
    live = exports.get("v")
    assert live is not None
    _, writer = holders.admit("vm", live)
    assert not writer.read_only  # the snapshot's reader holds nothing of the volume


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("v@s;epoch=3", "v@s is a snapshot: read-only, it takes no epoch"),
        (f"v@s;uid={UID}", f"has uid [0-9a-f]+, not {UID}"),
    ],
)
def test_a_snapshot_export_refuses_an_epoch_and_a_wrong_uid(
    exports: VolumeExports, name: str, error: str
) -> None:
    exports.service.snapshot("v", "s")
    with pytest.raises(ExportUnavailableError, match=error):
        exports.get(name)
    assert exports.service.info("v").epoch == 0  # nothing was promised


def test_unknown_or_deleted_snapshots_are_not_served(exports: VolumeExports) -> None:
    assert exports.get("v@nope") is None
    assert exports.get("nope@s") is None
    assert exports.get("v@bad/name") is None
    exports.service.snapshot("v", "s")
    export = exports.get("v@s")
    assert export is not None
    exports.service.delete_snapshot("v", "s")
    assert exports.get("v@s") is None
    with pytest.raises(StorageError):  # closed with the snapshot
        export.storage.read(0, 1)
