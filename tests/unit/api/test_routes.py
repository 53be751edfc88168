"""The /v1 routes over a real VolumeService: results, status codes and the error shape."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from backend.api.app import SnapshotOut, VolumeOut, create_app, export_uris
from backend.volumes.model import Holder, SnapshotInfo, VolumeInfo
from backend.volumes.service import VolumeService
from tests.unit.api.conftest import AUTH, TOKEN, MiB


def error(response: Any) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    return response.status_code, body["error"]["code"]


def test_create_list_info(api: TestClient) -> None:
    created = api.post(
        "/v1/volumes",
        json={"name": "a", "size": "8MiB", "description": "first", "labels": {"env": "t"}},
    )
    assert created.status_code == 201
    assert created.headers["location"] == "/v1/volumes/a"
    body = created.json()
    assert (body["name"], body["size"], body["labels"], body["origin"]) == (
        "a",
        8 * MiB,
        {"env": "t"},
        None,
    )
    api.post("/v1/volumes", json={"name": "b", "size": 4 * MiB, "read_only": True})
    assert [v["name"] for v in api.get("/v1/volumes").json()] == ["a", "b"]
    assert api.get("/v1/volumes/b").json()["read_only"] is True
    assert api.get("/v1/volumes/a").json() == body


def test_results_mirror_the_service(api: TestClient, service: VolumeService) -> None:
    api.post("/v1/volumes", json={"name": "a", "size": MiB})
    api.post("/v1/volumes/a/snapshots", json={"name": "s"})
    expected = service.info("a").to_json() | {"snapshots": ["s"], "holders": []}
    assert api.get("/v1/volumes/a").json() == expected
    assert api.get("/v1/snapshots").json() == [
        s.to_json() | {"clones": list(s.clones)} for s in service.snapshots()
    ]


@pytest.mark.parametrize(
    ("model", "dataclass"), [(VolumeOut, VolumeInfo), (SnapshotOut, SnapshotInfo)]
)
def test_response_models_have_the_dataclass_fields(
    model: type[BaseModel], dataclass: type[Any]
) -> None:
    assert list(model.model_fields) == [f.name for f in dataclasses.fields(dataclass)]


def test_resize(api: TestClient) -> None:
    api.post("/v1/volumes", json={"name": "a", "size": "8MiB"})
    assert api.patch("/v1/volumes/a", json={"size": "16MiB"}).json()["size"] == 16 * MiB
    assert error(api.patch("/v1/volumes/a", json={"size": "4MiB"})) == (400, "invalid")
    shrunk = api.patch("/v1/volumes/a", json={"size": "4MiB", "allow_shrink": True})
    assert shrunk.json()["size"] == 4 * MiB


def test_delete(api: TestClient) -> None:
    api.post("/v1/volumes", json={"name": "a", "size": MiB})
    api.post("/v1/volumes/a/snapshots", json={"name": "s"})
    assert error(api.delete("/v1/volumes/a")) == (409, "has-dependents")
    response = api.delete("/v1/volumes/a", params={"force": "true"})
    assert (response.status_code, response.content) == (204, b"")
    assert api.get("/v1/volumes").json() == []
    assert error(api.delete("/v1/volumes/a")) == (404, "not-found")


def test_delete_refuses_a_volume_in_use(service: VolumeService) -> None:
    app = create_app(service, token=TOKEN)
    service.holders = lambda name: [Holder("unix pid 7", True, 0.0), Holder("unix", False, 1.0)]
    with TestClient(app, headers=AUTH) as api:
        api.post("/v1/volumes", json={"name": "a", "size": MiB})
        assert error(api.delete("/v1/volumes/a")) == (409, "in-use")
        assert api.delete("/v1/volumes/a?force=1").status_code == 204


def test_snapshot_clone_and_dependents(api: TestClient, service: VolumeService) -> None:
    api.post("/v1/volumes", json={"name": "base", "size": MiB})
    snap = api.post("/v1/volumes/base/snapshots", json={"name": "gold"})
    assert snap.status_code == 201
    assert snap.headers["location"] == "/v1/volumes/base/snapshots/gold"
    assert (snap.json()["volume"], snap.json()["name"], snap.json()["clones"]) == (
        "base",
        "gold",
        [],
    )
    clone = api.post(
        "/v1/volumes/base/snapshots/gold/clone", json={"name": "vm1", "description": "d"}
    )
    assert clone.status_code == 201
    assert (clone.json()["origin"], clone.json()["description"]) == ("base@gold", "d")
    assert api.get("/v1/volumes/base/snapshots").json()[0]["clones"] == ["vm1"]
    assert error(api.delete("/v1/volumes/base/snapshots/gold")) == (409, "has-dependents")
    assert [s.name for s in service.snapshots("base")] == ["gold"]
    flattened = api.delete("/v1/volumes/base/snapshots/gold", params={"flatten_clones": True})
    assert flattened.status_code == 204
    assert api.get("/v1/volumes/base/snapshots").json() == []
    assert api.get("/v1/volumes/vm1").json()["origin"] is None


def test_conflicts(api: TestClient) -> None:
    api.post("/v1/volumes", json={"name": "a", "size": MiB})
    api.post("/v1/volumes/a/snapshots", json={"name": "s"})
    assert error(api.post("/v1/volumes", json={"name": "a", "size": MiB})) == (409, "exists")
    assert error(api.post("/v1/volumes/a/snapshots", json={"name": "s"})) == (409, "exists")
    clone = api.post("/v1/volumes/a/snapshots/s/clone", json={"name": "a"})
    assert error(clone) == (409, "exists")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/volumes/nope", None),
        ("PATCH", "/v1/volumes/nope", {"size": MiB}),
        ("DELETE", "/v1/volumes/nope", None),
        ("GET", "/v1/volumes/nope/snapshots", None),
        ("POST", "/v1/volumes/nope/snapshots", {"name": "s"}),
        ("DELETE", "/v1/volumes/a/snapshots/nope", None),
        ("POST", "/v1/volumes/a/snapshots/nope/clone", {"name": "c"}),
        ("GET", "/v1/no-such-route", None),
        ("GET", "/v1/volumes/", None),
    ],
)
def test_not_found(api: TestClient, method: str, path: str, body: Any) -> None:
    api.post("/v1/volumes", json={"name": "a", "size": MiB})
    assert error(api.request(method, path, json=body)) == (404, "not-found")


@pytest.mark.parametrize("name", ["", "-lead", "sp ace", "x" * 256, "\u00fc", "a\u0000b", 7, None])
def test_bad_names_are_400(api: TestClient, service: VolumeService, name: Any) -> None:
    assert error(api.post("/v1/volumes", json={"name": name, "size": MiB})) == (400, "invalid")
    assert service.list() == []


@pytest.mark.parametrize(
    "size",
    [
        "0",
        "-1",
        "1000",
        "12 parsecs",
        "2EiB",
        "1" * 5000,  # int() of it raises ValueError: more than 4300 digits
        10**30,
        0,
        -512,
        513,
        1.5,
        True,
        None,
        [512],
    ],
)
def test_bad_sizes_are_400(api: TestClient, service: VolumeService, size: Any) -> None:
    assert error(api.post("/v1/volumes", json={"name": "v", "size": size})) == (400, "invalid")
    assert service.list() == []


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'{"name": "v"}',
        b'{"name": "v", "size": 512, "readOnly": true}',
        b'{"name": "v", "size": 512, "labels": {"bad key": "x"}}',
        b'{"name": "v", "size": 512, "labels": ["x"]}',
    ],
)
def test_bad_bodies_are_400(api: TestClient, service: VolumeService, body: bytes) -> None:
    response = api.post("/v1/volumes", content=body, headers={"content-type": "application/json"})
    assert error(response) == (400, "invalid")
    assert service.list() == []


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ("file:chunk_size=32MiB", "power of two from 512B to 16MiB"),
        ("file+retry:deadline=nan", "must be seconds"),
        ("file+retry:attempts=100000000000000000000000", "from 1 to 1000"),
        ("dir:path=chunks", "must be an absolute path"),
        ("dir:path=/nonexistent/nbs-chunks", "does not exist"),
    ],
)
def test_bad_storages_are_400_with_one_line(
    api: TestClient, service: VolumeService, storage: str, message: str, tmp_path: Path
) -> None:
    image = tmp_path / "image.raw"
    image.write_bytes(bytes(4096))
    for path, body in [
        ("/v1/volumes", {"name": "v", "size": "1GiB", "storage": storage}),
        ("/v1/volumes/v/import", {"source": str(image), "storage": storage, "size": "1MiB"}),
    ]:
        response = api.post(path, json=body)
        assert error(response) == (400, "invalid")
        assert message in response.json()["error"]["message"]
        assert "\n" not in response.json()["error"]["message"]
    assert service.catalogue.volumes(state=None) == []


def test_huge_sizes_are_400_for_resize_and_import(api: TestClient, tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    image.write_bytes(bytes(4096))
    api.post("/v1/volumes", json={"name": "a", "size": "8MiB"})
    response = api.patch("/v1/volumes/a", json={"size": "9" * 5000})
    assert error(response) == (400, "invalid")
    assert len(response.json()["error"]["message"]) < 200
    response = api.post("/v1/volumes/b/import", json={"source": str(image), "size": "9" * 5000})
    assert error(response) == (400, "invalid")


def test_a_misspelt_option_is_refused_not_ignored(api: TestClient) -> None:
    api.post("/v1/volumes", json={"name": "a", "size": "8MiB"})
    response = api.patch("/v1/volumes/a", json={"size": "4MiB", "allowShrink": True})
    assert error(response) == (400, "invalid")
    assert "allowShrink" in response.json()["error"]["message"]
    assert api.get("/v1/volumes/a").json()["size"] == 8 * MiB


def test_wrong_method_is_405(api: TestClient) -> None:
    assert error(api.put("/v1/volumes")) == (405, "method-not-allowed")


def test_unexpected_failures_are_500_without_details(service: VolumeService) -> None:
    def broken() -> list[VolumeInfo]:
        raise RuntimeError("secret internals")

    service.list = broken  # type: ignore[method-assign]
    with TestClient(
        create_app(service, token=TOKEN), headers=AUTH, raise_server_exceptions=False
    ) as api:
        response = api.get("/v1/volumes")
    assert error(response) == (500, "internal")
    assert "secret" not in response.text


def test_gc(api: TestClient, service: VolumeService) -> None:
    (service.layers / "0123.data").write_bytes(b"orphan")
    assert api.post("/v1/gc").json() == {"removed": ["0123.data"]}
    assert api.post("/v1/gc").json() == {"removed": []}


@pytest.fixture
def observed(service: VolumeService) -> Iterator[TestClient]:
    def status() -> dict[str, Any]:
        return {
            "connections": 3,
            "listeners": ["nbd://127.0.0.1:10809", "nbd+unix:///?socket=/run/nbs.sock"],
            "api": ["https://127.0.0.1:8443"],
        }

    app = create_app(service, token=TOKEN, status=status, connections=len)
    with TestClient(app, headers=AUTH) as client:
        yield client


def test_exports_list_every_volume_with_connections_and_uris(observed: TestClient) -> None:
    observed.post("/v1/volumes", json={"name": "vm1", "size": MiB, "read_only": True})
    observed.post("/v1/volumes", json={"name": "data", "size": 2 * MiB})
    assert observed.get("/v1/exports").json() == [
        {
            "name": "data",
            "size": 2 * MiB,
            "read_only": False,
            "connections": 4,
            "uris": ["nbd://127.0.0.1:10809/data", "nbd+unix:///data?socket=/run/nbs.sock"],
        },
        {
            "name": "vm1",
            "size": MiB,
            "read_only": True,
            "connections": 3,
            "uris": ["nbd://127.0.0.1:10809/vm1", "nbd+unix:///vm1?socket=/run/nbs.sock"],
        },
    ]


def test_status_reports_the_callable_version_and_uptime(observed: TestClient) -> None:
    status = observed.get("/v1/status").json()
    assert status.pop("uptime") >= 0
    assert status.pop("version")
    assert status == {
        "connections": 3,
        "listeners": ["nbd://127.0.0.1:10809", "nbd+unix:///?socket=/run/nbs.sock"],
        "api": ["https://127.0.0.1:8443"],
    }


def test_status_without_a_callable(api: TestClient) -> None:
    status = api.get("/v1/status").json()
    assert (status["connections"], status["listeners"], status["api"]) == (0, [], [])


def test_export_uris_of_ipv6_and_unix_listeners() -> None:
    assert export_uris(["nbd://[::1]:10809", "nbd+unix:///?socket=/s"], "v") == [
        "nbd://[::1]:10809/v",
        "nbd+unix:///v?socket=/s",
    ]


def test_healthz(anonymous: TestClient) -> None:
    assert anonymous.get("/healthz").json() == {"status": "ok"}


def test_service_is_left_open(tmp_path: Path) -> None:
    service = VolumeService(tmp_path / "d")
    app: FastAPI = create_app(service, token=TOKEN)
    with TestClient(app, headers=AUTH) as api:
        api.get("/v1/volumes")
    assert service.list() == []
    service.close()


def test_replica_changes_of_a_volume_that_is_not_replicated_are_a_4xx(api: TestClient) -> None:
    api.post("/v1/volumes", json={"name": "a", "size": MiB})
    response = api.post("/v1/volumes/a/replicas", json={"node": "n"})
    assert error(response) == (400, "invalid")
    assert "volume 'a' is not replicated" in response.json()["error"]["message"]
    assert error(api.delete("/v1/volumes/a/replicas/n"))[0] == 400
    assert error(api.post("/v1/volumes/zz/replicas", json={"node": "n"})) == (404, "not-found")
    assert error(api.post("/v1/volumes/a/replicas", json={"nod": "n"}))[0] == 400
    assert error(api.post("/v1/volumes/a/replicas/n/replace", json={"node": "m"}))[0] == 400
    assert error(api.post("/v1/volumes/zz/replicas/n/replace", json={"node": "m"}))[0] == 404
    assert error(api.post("/v1/volumes/a/replicas/n/replace", json={}))[0] == 400
