"""Bearer-token auth: every route but /healthz and /openapi.json needs the token, and a
request without it changes nothing, whatever its method, path or body."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from backend.api.app import BearerAuth, create_app
from backend.volumes.model import CreateRequest
from backend.volumes.service import VolumeService
from tests.unit.api.conftest import TOKEN, MiB

MUTATIONS = [
    ("POST", "/v1/volumes", {"name": "new", "size": "1MiB"}),
    ("PATCH", "/v1/volumes/v", {"size": "2MiB"}),
    ("DELETE", "/v1/volumes/v?force=true", None),
    ("POST", "/v1/volumes/v/snapshots", {"name": "s2"}),
    ("DELETE", "/v1/volumes/v/snapshots/s", None),
    ("POST", "/v1/volumes/v/snapshots/s/clone", {"name": "c"}),
    ("POST", "/v1/volumes/v/import", {"source": "/etc/hostname"}),
    ("POST", "/v1/volumes/v/replicas", {"node": "a"}),
    ("DELETE", "/v1/volumes/v/replicas/a", None),
    ("POST", "/v1/gc", None),
]
READS = ["/v1/volumes", "/v1/volumes/v", "/v1/snapshots", "/v1/exports", "/v1/status"]
# Values of the Authorization header (None: no header).
WRONG: list[bytes | None] = [
    None,
    b"Bearer wrong",
    f"Bearer {TOKEN}x".encode(),
    f"Bearer {TOKEN[:-1]}".encode(),
    f"Basic {TOKEN}".encode(),
    TOKEN.encode(),
    b"Bearer",
    b"Bearer t\xe9st\xff",
]


@pytest.fixture
def populated(service: VolumeService) -> VolumeService:
    service.create(CreateRequest("v", MiB))
    service.snapshot("v", "s")
    return service


@pytest.mark.parametrize("authorization", WRONG, ids=range(len(WRONG)))
@pytest.mark.parametrize(("method", "path", "body"), MUTATIONS)
def test_mutation_without_the_token_is_refused_and_changes_nothing(
    *,
    anonymous: TestClient,
    populated: VolumeService,
    method: str,
    path: str,
    body: dict[str, str] | None,
    authorization: bytes | None,
) -> None:
    before = (populated.generation(), populated.list(), populated.snapshots())
    headers = {} if authorization is None else {b"authorization": authorization}
    response = anonymous.request(method, path, json=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith('Bearer realm="nbs"')
    assert response.json()["error"]["code"] == "unauthorized"
    assert (populated.generation(), populated.list(), populated.snapshots()) == before


@pytest.mark.parametrize("path", READS)
def test_reads_need_the_token(anonymous: TestClient, populated: VolumeService, path: str) -> None:
    response = anonymous.get(path)
    assert response.status_code == 401
    assert response.json() == {
        "error": {"code": "unauthorized", "message": "this request needs an API token"}
    }


def test_a_wrong_token_is_told_apart_from_a_missing_one(anonymous: TestClient) -> None:
    missing = anonymous.get("/v1/volumes")
    wrong = anonymous.get("/v1/volumes", headers={"Authorization": "Bearer nope"})
    assert missing.headers["www-authenticate"] == 'Bearer realm="nbs"'
    assert wrong.headers["www-authenticate"] == 'Bearer realm="nbs", error="invalid_token"'


def test_auth_comes_before_body_parsing_and_routing(
    anonymous: TestClient, service: VolumeService
) -> None:
    generation = service.generation()
    assert anonymous.post("/v1/volumes", content=b"{not json").status_code == 401
    assert anonymous.get("/v1/no/such/route").status_code == 401
    assert anonymous.get("/docs").status_code == 401
    assert service.generation() == generation


def test_the_scheme_is_case_insensitive(anonymous: TestClient) -> None:
    assert anonymous.get("/v1/volumes", headers={"Authorization": f"bearer {TOKEN}"}).is_success


@pytest.mark.parametrize("path", ["/healthz", "/openapi.json"])
def test_public_routes_need_no_token(anonymous: TestClient, path: str) -> None:
    assert anonymous.get(path).status_code == 200


def test_only_get_is_public(anonymous: TestClient) -> None:
    assert anonymous.post("/healthz").status_code == 401


def test_an_empty_token_is_refused(service: VolumeService) -> None:
    with pytest.raises(ValueError, match="empty"):
        create_app(service, token="")


def test_websockets_are_closed_without_the_token() -> None:
    sent: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("reached the app")

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {}

    auth = BearerAuth(app, token=TOKEN, public=frozenset())
    asyncio.run(auth({"type": "websocket", "path": "/v1/volumes", "headers": []}, receive, send))
    assert sent == [{"type": "websocket.close", "code": 1008}]
