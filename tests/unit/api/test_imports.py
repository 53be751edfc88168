"""Imports through the API with the copy faked (qemu-img is exercised by the integration
tests): refusals before the stream starts, the NDJSON events, rollback of a failed copy."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from backend.api import imports
from backend.api.imports import Imports, check_source
from backend.storage import Storage
from backend.volumes import transfer
from backend.volumes.model import (
    CreateRequest,
    ImportRequest,
    InvalidRequestError,
    StorageFailureError,
)
from backend.volumes.service import Progress, VolumeService
from tests.unit.api.conftest import MiB

IMAGE_SIZE = 3 * MiB + 100  # not a multiple of 512: the volume is rounded up


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "image.raw"
    path.write_bytes(b"\1" * IMAGE_SIZE)
    return path


class FakeCopy:
    """Stands in for transfer.import_image: writes a pattern, reporting progress in steps."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.release = threading.Event()
        self.release.set()

    def __call__(
        self, storage: Storage, name: str, source: str, progress: Progress | None = None
    ) -> None:
        total = Path(source).stat().st_size
        assert progress is not None
        for step in range(4):
            progress(total * step // 4, total)
            self.release.wait(10)
        if self.fail is not None:
            raise self.fail
        storage.write(0, b"imported")
        storage.flush()  # as the real one does: closing a storage flushes nothing
        progress(total, total)


@pytest.fixture
def copy(monkeypatch: pytest.MonkeyPatch) -> FakeCopy:
    fake = FakeCopy()
    monkeypatch.setattr(transfer, "import_image", fake)
    monkeypatch.setattr(transfer, "image_size", lambda source: Path(source).stat().st_size)
    return fake


def events(response: Any) -> list[dict[str, Any]]:
    assert response.headers["content-type"] == "application/x-ndjson"
    return [json.loads(line) for line in response.text.splitlines()]


def test_import_streams_progress_then_the_volume(
    api: TestClient, service: VolumeService, image: Path, copy: FakeCopy
) -> None:
    response = api.post(
        "/v1/volumes/img/import",
        json={"source": str(image), "description": "from a file", "labels": {"os": "x"}},
    )
    assert response.status_code == 200
    *progress, last = events(response)
    assert progress == [
        {"done": IMAGE_SIZE * step // 4, "total": IMAGE_SIZE} for step in range(4)
    ] + [{"done": IMAGE_SIZE, "total": IMAGE_SIZE}]
    volume = last["volume"]
    assert (volume["name"], volume["size"]) == ("img", IMAGE_SIZE + 412)
    assert (volume["description"], volume["labels"]) == ("from a file", {"os": "x"})
    assert service.info("img").size == IMAGE_SIZE + 412
    view = service.open_view("img")
    assert view.read(0, 8) == b"imported"
    view.close()


def test_an_explicit_size_wins(
    api: TestClient, service: VolumeService, image: Path, copy: FakeCopy
) -> None:
    response = api.post("/v1/volumes/img/import", json={"source": str(image), "size": "8MiB"})
    assert events(response)[-1]["volume"]["size"] == 8 * MiB


def test_a_failed_copy_ends_with_an_error_and_leaves_nothing(
    api: TestClient, service: VolumeService, image: Path, copy: FakeCopy
) -> None:
    copy.fail = StorageFailureError("qemu-img convert failed: boom")
    last = events(api.post("/v1/volumes/img/import", json={"source": str(image)}))[-1]
    assert last == {"error": {"code": "storage", "message": "qemu-img convert failed: boom"}}
    assert service.catalogue.volume("img") is None
    assert list(service.layers.iterdir()) == []


def test_an_unexpected_failure_is_reported_as_storage(
    api: TestClient, service: VolumeService, image: Path, copy: FakeCopy
) -> None:
    copy.fail = OSError("disk on fire")
    last = events(api.post("/v1/volumes/img/import", json={"source": str(image)}))[-1]
    assert last["error"]["code"] == "storage"
    assert "disk on fire" in last["error"]["message"]
    assert service.catalogue.volume("img") is None


def test_the_volume_is_hidden_until_the_copy_completed(
    api: TestClient, service: VolumeService, image: Path, copy: FakeCopy
) -> None:
    copy.release.clear()
    job = Imports().start(service, ImportRequest(CreateRequest("img", None), str(image)))
    assert job.next_event() == {"done": 0, "total": IMAGE_SIZE}
    assert service.list() == []
    assert api.get("/v1/volumes/img").status_code == 404
    # The name is taken while the copy runs.
    taken = api.post("/v1/volumes", json={"name": "img", "size": MiB})
    assert (taken.status_code, taken.json()["error"]["code"]) == (409, "exists")
    copy.release.set()
    while (event := job.next_event()) is not None and "volume" not in event:
        pass
    assert event is not None
    assert [v.name for v in service.list()] == ["img"]
    assert job.next_event() is None


def test_wait_for_running_imports(service: VolumeService, image: Path, copy: FakeCopy) -> None:
    copy.release.clear()
    running = Imports()
    running.start(service, ImportRequest(CreateRequest("img", None), str(image)))
    assert not running.wait(0.05)
    copy.release.set()
    assert running.wait(10)
    assert Imports().wait(0)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"source": "relative.img"}, "invalid"),
        ({"source": "/no/such/image"}, "invalid"),
        ({"source": "/"}, "invalid"),
        ({"source": 'json:{"driver": "file"}'}, "invalid"),
        ({"source": "http://example.invalid/disk.img"}, "invalid"),
        ({"source": "nbds://127.0.0.1/x"}, "invalid"),
        ({"source": "IMAGE", "size": "1000"}, "invalid"),
        ({"source": "IMAGE", "sizee": 512}, "invalid"),
        ({}, "invalid"),
    ],
)
def test_refusals_are_answered_before_anything_streams(
    *,
    api: TestClient,
    service: VolumeService,
    image: Path,
    copy: FakeCopy,
    body: dict[str, Any],
    code: str,
) -> None:
    body = {k: str(image) if v == "IMAGE" else v for k, v in body.items()}
    response = api.post("/v1/volumes/img/import", json=body)
    assert (response.status_code, response.json()["error"]["code"]) == (400, code)
    assert service.catalogue.volume("img") is None


def test_an_existing_name_is_409(
    api: TestClient, service: VolumeService, image: Path, copy: FakeCopy
) -> None:
    service.create(CreateRequest("img", MiB))
    response = api.post("/v1/volumes/img/import", json={"source": str(image)})
    assert (response.status_code, response.json()["error"]["code"]) == (409, "exists")
    assert service.info("img").size == MiB


def test_a_bad_name_is_400(api: TestClient, image: Path, copy: FakeCopy) -> None:
    response = api.post("/v1/volumes/-x/import", json={"source": str(image)})
    assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid")


@pytest.mark.parametrize(
    "uri", ["nbd://127.0.0.1:10809/vm", "nbd+unix:///vm?socket=/run/nbs.sock", "nbd+tcp://h/e"]
)
def test_nbd_uris_are_sources(uri: str) -> None:
    assert check_source(uri) == uri


def test_a_directory_is_not_a_source(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="not a regular file"):
        check_source(str(tmp_path))


def test_imports_module_names_the_schemes() -> None:
    assert imports.NBD_SCHEMES == ("nbd", "nbd+tcp", "nbd+unix")
