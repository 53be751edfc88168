"""Storage specs (inline and YAML profiles), volumes on several storages in one catalogue, and
the upgrade of a schema-1 catalogue."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from backend.config import ConfigError, load_config, parse_config
from backend.storage.chunked import ChunkedStorage
from backend.storage.cow import CowStorage
from backend.storage.layers import CachingStorage, RetryingStorage
from backend.volumes.model import CreateRequest, InvalidRequestError, StorageFailureError
from backend.volumes.service import VolumeService
from backend.volumes.storages import FILE, StorageSpec, parse_storage

MiB = 1 << 20


def test_inline_specs_round_trip() -> None:
    spec = parse_storage(
        "s3:bucket=nbs,endpoint=http://127.0.0.1:8333,chunk_size=1MiB"
        "+cache:size=256MiB,mode=write-back+retry:attempts=3,deadline=10s"
    )
    assert spec.kind == "s3"
    assert spec.get("bucket") == "nbs"
    assert spec.get("chunk_size") == MiB
    assert [layer.kind for layer in spec.layers] == ["cache", "retry"]
    assert spec.layers[0].get("mode") == "write-back"
    assert spec.layers[1].get("deadline") == 10.0
    assert StorageSpec.from_json(spec.to_json()) == spec
    assert parse_storage(str(spec)) == spec
    assert spec.location.layers == ()
    assert parse_storage("file") == FILE


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tape", "unknown storage 'tape'"),
        ("s3", "s3 needs bucket"),
        ("s3:bucket=b,colour=red", "s3 has no option 'colour'"),
        ("dir:chunk_size=3MiB", "power of two"),
        ("dir:chunk_size=16KiB", "power of two"),
        ("rados:pool=p+zip", "unknown layer 'zip'"),
        ("file+cache:mode=sometimes", "write-through or write-back"),
        ("rbd:pool", "expected KEY=VALUE"),
        ("file+retry:attempts=0", "must be a whole number from 1 to 1000"),
    ],
)
def test_bad_specs_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        parse_storage(text)


def test_yaml_profiles_and_default_storage() -> None:
    config = parse_config(
        {
            "storages": {
                "cold": {
                    "type": "dir",
                    "path": "/srv/objects",
                    "chunk_size": "1MiB",
                    "layers": [{"cache": {"size": "64MiB"}}, "retry"],
                },
                "ceph": {"type": "rbd", "pool": "rbd"},
            },
            "default_storage": "ceph",
        },
        "nbs.yaml",
    )
    cold = config.storages["cold"]
    assert (cold.kind, cold.get("path"), cold.get("chunk_size")) == ("dir", "/srv/objects", MiB)
    assert [layer.kind for layer in cold.layers] == ["cache", "retry"]
    assert config.default_storage == config.storages["ceph"]
    # A profile name, optionally with more layers.
    assert parse_storage("cold", config.storages) == cold
    more = parse_storage("ceph+retry:attempts=2", config.storages)
    assert (more.kind, [la.kind for la in more.layers]) == ("rbd", ["retry"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"storages": []}, "storages: expected a mapping"),
        ({"storages": {"x": {"pool": "p"}}}, "storages.x: expected 'type'"),
        ({"storages": {"s3": {"type": "file"}}}, "not a storage kind"),
        ({"storages": {"x": {"type": "dir", "layers": [{"cache": 5}]}}}, "expected a mapping"),
        ({"storages": {"x": {"type": "dir", "layers": ["cache", "zip"]}}}, "unknown layer"),
        ({"default_storage": "nowhere"}, "default_storage: .*unknown storage"),
    ],
)
def test_bad_storage_config_is_refused(data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data, "nbs.yaml")


def _base(storage: object) -> object:
    while isinstance(storage, CachingStorage | RetryingStorage):
        storage = storage._inner
    return storage


def test_volumes_on_different_storages_in_one_catalogue(tmp_path: Path) -> None:
    svc = VolumeService(tmp_path / "d", profiles={"objs": parse_storage("dir:chunk_size=64KiB")})
    svc.create(CreateRequest("f", MiB))
    svc.create(CreateRequest("o", MiB, storage="objs"))
    svc.create(
        CreateRequest("c", MiB, storage="dir:chunk_size=128KiB+cache:size=1MiB,mode=write-back")
    )
    assert isinstance(svc.storage("f"), CowStorage)
    assert isinstance(svc.storage("o"), ChunkedStorage)
    assert isinstance(svc.storage("c"), CachingStorage)
    assert isinstance(_base(svc.storage("c")), ChunkedStorage)
    assert svc.info("o").storage == "dir:chunk_size=65536"
    assert svc.info("f").storage == "file"
    # A write-back cache's dirty blocks reach the snapshot.
    svc.storage("c").write(0, b"cached")
    svc.snapshot("c", "s")
    svc.storage("c").write(0, b"CHANGE")
    clone = svc.clone("c", "s", "c2")
    assert clone.storage == svc.info("c").storage
    assert svc.storage("c2").read(0, 6) == b"cached"
    # Clones keep their origin's storage; deleting everything leaves nothing behind.
    svc.delete("c2")
    svc.delete("c", force=True)
    svc.delete("o")
    svc.delete("f")
    assert [p for p in (tmp_path / "d" / "objects").rglob("*") if p.is_file()] == []
    assert list((tmp_path / "d" / "layers").iterdir()) == []
    svc.close()


def test_unknown_profile_is_refused_and_nothing_is_created(tmp_path: Path) -> None:
    svc = VolumeService(tmp_path / "d")
    with pytest.raises(InvalidRequestError, match="unknown storage 'gold'"):
        svc.create(CreateRequest("v", MiB, storage="gold"))
    assert svc.list() == []
    svc.close()


def test_a_storage_that_cannot_be_reached_leaves_no_volume(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    svc = VolumeService(tmp_path / "d")
    with pytest.raises(InvalidRequestError, match=r"cannot create .*: Not a directory"):
        svc.create(CreateRequest("v", MiB, storage=f"dir:path={blocker}/objects,create=true"))
    assert svc.catalogue.volumes(state=None) == []
    svc.close()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # The layer files hold 512 B to 16 MiB chunks, the object stores 64 KiB to 32 MiB.
        (
            "file:chunk_size=32MiB",
            "file chunk_size='32MiB': must be a power of two from 512B to 16MiB",
        ),
        ("file:chunk_size=256", "must be a multiple of 512 bytes"),
        ("dir:chunk_size=64MiB", "from 64KiB to 32MiB"),
        ("file+retry:deadline=nan", "retry deadline='nan': must be seconds from 0 up to 86400"),
        ("file+retry:deadline=inf", "must be seconds"),
        ("file+retry:deadline=1e999", "must be seconds"),
        ("file+retry:deadline=-1", "must be seconds"),
        ("file+retry:backoff=3600", "up to 60"),
        ("file+retry:attempts=100000000000000000000000", "from 1 to 1000"),
        ("file+retry:attempts=10^23", "from 1 to 1000"),
        ("file+retry:attempts=" + "9" * 5000, "from 1 to 1000"),
        ("s3:bucket=b,timeout=0", "more than 0 and up to 3600"),
        ("s3:bucket=b,attempts=1001", "from 1 to 1000"),
        ("rbd:pool=p,timeout=nan", "must be seconds"),
        ("file+cache:size=2TiB", "at most 1TiB"),
        ("file+cache:size=" + "1" * 5000, "invalid size"),
        ("file+cache:block=64MiB", "from 512B to 32MiB"),
        ("dir:path=/srv,create=maybe", "must be true or false"),
    ],
)
def test_every_number_is_bounded_by_what_the_storage_can_do(text: str, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(message)) as caught:
        parse_storage(text)
    assert len(caught.value.message) < 300
    assert "\n" not in caught.value.message


def test_limits_accept_what_the_storages_accept(tmp_path: Path) -> None:
    svc = VolumeService(tmp_path / "d")
    svc.create(CreateRequest("big", MiB, storage="file:chunk_size=16MiB"))
    svc.create(CreateRequest("small", MiB, storage="file:chunk_size=512"))
    svc.create(
        CreateRequest("objects", MiB, storage="dir:chunk_size=32MiB+retry:attempts=1000,deadline=0")
    )
    for name in ("big", "small", "objects"):
        svc.storage(name).write(0, b"x" * 512)
        assert svc.storage(name).read(0, 512) == b"x" * 512
    svc.close()


def test_a_relative_dir_path_is_stored_absolute(tmp_path: Path) -> None:
    (tmp_path / "chunks").mkdir()
    svc = VolumeService(tmp_path / "d", paths_relative_to=tmp_path)
    svc.create(CreateRequest("v", MiB, storage="dir:path=chunks"))
    assert svc.info("v").storage == f"dir:path={tmp_path / 'chunks'}"
    svc.close()


def test_a_relative_dir_path_is_refused_without_a_base(tmp_path: Path) -> None:
    svc = VolumeService(tmp_path / "d")  # as the API's: the client's directory is unknown
    with pytest.raises(InvalidRequestError, match="path='chunks' must be an absolute path"):
        svc.create(CreateRequest("v", MiB, storage="dir:path=chunks"))
    svc.close()


def test_a_missing_dir_is_refused_unless_create_is_asked(tmp_path: Path) -> None:
    svc = VolumeService(tmp_path / "d")
    where = tmp_path / "new" / "chunks"
    with pytest.raises(InvalidRequestError, match=r"does not exist \(add create=true"):
        svc.create(CreateRequest("v", MiB, storage=f"dir:path={where}"))
    assert not where.exists()
    assert svc.catalogue.volumes(state=None) == []
    svc.create(CreateRequest("v", MiB, storage=f"dir:path={where},create=true"))
    assert where.is_dir()
    assert svc.info("v").storage == f"dir:path={where}"  # create is not recorded
    svc.close()


def test_a_vanished_dir_is_not_recreated_empty(tmp_path: Path) -> None:
    where = tmp_path / "mnt"
    where.mkdir()
    svc = VolumeService(tmp_path / "d")
    svc.create(CreateRequest("v", MiB, storage=f"dir:path={where}"))
    svc.storage("v").write(0, b"data")
    svc.close()
    where.rename(tmp_path / "unmounted")
    svc = VolumeService(tmp_path / "d")
    with pytest.raises(StorageFailureError, match=f"directory {where} does not exist"):
        svc.storage("v")
    assert not where.exists()
    svc.close()


def test_config_profiles_resolve_relative_paths_against_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "nbs.yaml"
    config.parent.mkdir()
    config.write_text("storages:\n  local:\n    type: dir\n    path: chunks\n")
    profiles = load_config(config).storages
    assert profiles["local"].get("path") == str(tmp_path / "etc" / "chunks")


def test_schema_1_catalogue_is_upgraded(tmp_path: Path) -> None:
    data = tmp_path / "d"
    svc = VolumeService(data)
    svc.create(CreateRequest("old", MiB))
    svc.storage("old").write(0, b"before")
    svc.close()
    # Make it look like a catalogue written before storages existed.
    db = sqlite3.connect(data / "catalogue.sqlite3")
    for table in ("volumes", "layers"):
        db.execute(f"ALTER TABLE {table} DROP COLUMN storage")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    db.commit()
    db.close()
    svc = VolumeService(data)
    assert svc.info("old").storage == "file"
    assert svc.storage("old").read(0, 6) == b"before"
    svc.create(CreateRequest("new", MiB, storage="dir"))
    assert svc.info("new").storage == "dir"
    svc.close()
