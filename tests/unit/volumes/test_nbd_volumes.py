"""Volumes of kind ``nbd``: a remote export adopted as a volume (in-process server on
loopback, MemoryStorage behind it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.server.exports import Export, ExportTable
from backend.server.server import Server, TCPAddress
from backend.storage import MemoryStorage
from backend.storage.layers import RetryingStorage
from backend.storage.nbd import NbdStorage
from backend.volumes.model import AlreadyExistsError, CreateRequest, InvalidRequestError
from backend.volumes.service import VolumeService
from backend.volumes.storages import StorageSpec, parse_storage
from tests.unit.server.clients import port_of

MiB = 1 << 20


@pytest.fixture
def remote() -> Iterator[tuple[MemoryStorage, str]]:
    memory = MemoryStorage(4 * MiB)
    server = Server(ExportTable([Export("vol", memory)]), tcp=[TCPAddress("127.0.0.1", 0)])
    server.bind()
    server.start()
    yield memory, f"nbd://127.0.0.1:{port_of(server)}/vol"
    server.shutdown(grace=5)


def test_specs_take_nbd_uris_with_plus_signs_and_layers() -> None:
    spec = parse_storage(
        "nbd:url=nbd+unix:///vol?socket=/run/x.sock,connections=4+retry:attempts=3"
    )
    assert spec.kind == "nbd"
    assert spec.get("url") == "nbd+unix:///vol?socket=/run/x.sock"
    assert spec.get("connections") == 4
    assert [layer.kind for layer in spec.layers] == ["retry"]
    assert parse_storage(str(spec)) == spec
    assert StorageSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nbd", "nbd needs url"),
        ("nbd:url=http://h/v", "scheme must be one of"),
        ("nbd:url=nbd+unix:///v", "needs \\?socket=PATH"),
        ("nbd:url=nbd://h/v,connections=99", "from 1 to 16"),
    ],
)
def test_bad_nbd_specs_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        parse_storage(text)


def test_an_export_is_adopted_with_its_size_and_never_removed(
    tmp_path: Path, remote: tuple[MemoryStorage, str]
) -> None:
    memory, url = remote
    svc = VolumeService(tmp_path / "d")
    try:
        with pytest.raises(InvalidRequestError, match="not 1048576"):
            svc.create(CreateRequest("sized", MiB, storage=f"nbd:url={url},connections=2"))
        info = svc.create(CreateRequest("px", None, storage=f"nbd:url={url}+retry:attempts=2"))
        assert info.size == 4 * MiB
        storage = svc.storage("px")
        assert isinstance(storage, RetryingStorage)
        storage.write(4096, b"through the proxy")
        storage.flush()
        assert memory.read(4096, 17) == b"through the proxy"
        with pytest.raises(AlreadyExistsError, match="already a volume's"):
            svc.create(CreateRequest("again", None, storage=f"nbd:url={url}"))
        with pytest.raises(InvalidRequestError, match="snapshot is not possible"):
            svc.snapshot("px", "s1")
        with pytest.raises(InvalidRequestError, match="resizing is not possible"):
            svc.resize("px", 8 * MiB)
        svc.delete("px")
        assert memory.read(4096, 17) == b"through the proxy"  # the export is not nbs's
    finally:
        svc.close()


def test_an_export_that_does_not_answer_is_refused(tmp_path: Path) -> None:
    svc = VolumeService(tmp_path / "d")
    try:
        with pytest.raises(InvalidRequestError, match=r"cannot connect to nbd://127\.0\.0\.1:1/v"):
            svc.create(CreateRequest("px", None, storage="nbd:url=nbd://127.0.0.1:1/v"))
        assert svc.list() == []
    finally:
        svc.close()


def test_the_volume_storage_is_an_nbd_storage(
    tmp_path: Path, remote: tuple[MemoryStorage, str]
) -> None:
    _, url = remote
    svc = VolumeService(tmp_path / "d")
    try:
        svc.create(CreateRequest("px", None, storage=f"nbd:url={url},timeout=5,reconnect=2"))
        storage = svc.storage("px")
        assert isinstance(storage, NbdStorage)
        assert storage.capabilities.thread_safe
    finally:
        svc.close()
