"""The management API served for real: uvicorn on loopback (plain and TLS) and on a Unix
socket, over a VolumeService in tmp_path, driven with httpx and with RemoteVolumes.

The NBD side is real too where it matters: a backend.server Server serves the same catalogue
and libnbd holds a connection, so /v1/exports and deletes see it.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backend.api.app import create_app
from backend.api.client import RemoteVolumes, client_for
from backend.api.errors import UnauthorizedError, UnreachableError, UnsupportedError
from backend.api.local import load_or_create_token, socket_path, token_path
from backend.api.server import ApiServer
from backend.nbd import TLSPolicy
from backend.server.server import ServeError, Server, TCPAddress
from backend.server.tls import TLSFiles
from backend.storage import Storage
from backend.volumes import transfer
from backend.volumes.exports import VolumeExports
from backend.volumes.model import (
    AlreadyExistsError,
    CreateRequest,
    DependencyError,
    Holder,
    ImportRequest,
    InUseError,
    InvalidRequestError,
    NotFoundError,
)
from backend.volumes.service import Progress, VolumeService
from tests.integration.conftest import require_module, require_tool
from tests.unit.api.routes import EXPECTED as EXPECTED_ROUTES

MiB = 1 << 20


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def service(data_dir: Path) -> Iterator[VolumeService]:
    svc = VolumeService(data_dir)
    svc.start_serving()
    yield svc
    svc.close()


@pytest.fixture
def token(service: VolumeService) -> str:
    return load_or_create_token(token_path(service.data_dir))


@pytest.fixture
def serve(service: VolumeService, token: str) -> Iterator[Callable[..., ApiServer]]:
    """Factory: a started ApiServer over ``service`` (keyword arguments as ApiServer's;
    default: loopback port 0 and DATA/api.sock).  Stopped at teardown."""
    started: list[ApiServer] = []

    def start(**options: Any) -> ApiServer:
        options.setdefault("listen", [("127.0.0.1", 0)])
        options.setdefault("unix", socket_path(service.data_dir))
        server = ApiServer(create_app(service, token=token), **options)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop(grace=2)


@pytest.fixture
def api(serve: Callable[..., ApiServer]) -> ApiServer:
    return serve()


def tcp_url(server: ApiServer) -> str:
    return next(url for url in server.urls if url.startswith("http"))


@pytest.fixture
def http(api: ApiServer, token: str) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=tcp_url(api), headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as client:
        yield client


@pytest.fixture
def remote(api: ApiServer, token: str) -> Iterator[RemoteVolumes]:
    with RemoteVolumes(tcp_url(api), token) as client:
        yield client


def code(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


# ---------------------------------------------------------------------------- HTTP


def test_volume_lifecycle_over_http(http: httpx.Client) -> None:
    created = http.post("/v1/volumes", json={"name": "vm1", "size": "64MiB"})
    assert created.status_code == 201
    assert created.json()["size"] == 64 * MiB
    assert [v["name"] for v in http.get("/v1/volumes").json()] == ["vm1"]
    assert http.get("/v1/volumes/vm1").json()["size"] == 64 * MiB
    assert http.patch("/v1/volumes/vm1", json={"size": "128MiB"}).json()["size"] == 128 * MiB
    assert http.delete("/v1/volumes/vm1").status_code == 204
    assert http.get("/v1/volumes").json() == []


@pytest.mark.parametrize("name", ["-x", "a b", "x" * 256, "\u00e9t\u00e9"])
def test_bad_names_are_400(http: httpx.Client, service: VolumeService, name: str) -> None:
    assert code(http.post("/v1/volumes", json={"name": name, "size": MiB})) == (400, "invalid")
    assert service.list() == []


@pytest.mark.parametrize("size", ["0", "513", "lots", -512, "2EiB", 1.5])
def test_bad_sizes_are_400(http: httpx.Client, service: VolumeService, size: Any) -> None:
    assert code(http.post("/v1/volumes", json={"name": "v", "size": size})) == (400, "invalid")
    assert service.list() == []


def test_unknown_volumes_and_routes_are_404(http: httpx.Client) -> None:
    assert code(http.get("/v1/volumes/ghost")) == (404, "not-found")
    assert code(http.delete("/v1/volumes/ghost/snapshots/s")) == (404, "not-found")
    assert code(http.get("/v1/nothing-here")) == (404, "not-found")


MUTATIONS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/volumes", {"name": "intruder", "size": MiB}),
    ("PATCH", "/v1/volumes/keep", {"size": 2 * MiB}),
    ("DELETE", "/v1/volumes/keep?force=true", None),
    ("POST", "/v1/volumes/keep/snapshots", {"name": "s2"}),
    ("DELETE", "/v1/volumes/keep/snapshots/s?flatten_clones=true", None),
    ("POST", "/v1/volumes/keep/snapshots/s/clone", {"name": "c"}),
    ("POST", "/v1/volumes/imp/import", {"source": "/etc/hostname"}),
    ("POST", "/v1/gc", None),
]


@pytest.mark.parametrize("authorization", [None, "Bearer not-the-token", "Basic abc"])
def test_unauthenticated_requests_get_401_and_change_nothing(
    api: ApiServer, service: VolumeService, token: str, authorization: str | None
) -> None:
    service.create(CreateRequest("keep", MiB))
    service.snapshot("keep", "s")
    generation = service.generation()
    headers = {"Authorization": authorization} if authorization else {}
    with httpx.Client(base_url=tcp_url(api), headers=headers) as anonymous:
        for method, path, body in MUTATIONS:
            response = anonymous.request(method, path, json=body)
            assert response.status_code == 401, (method, path)
            assert response.headers["www-authenticate"].startswith("Bearer")
        assert anonymous.get("/v1/volumes").status_code == 401
    assert service.generation() == generation
    with RemoteVolumes(tcp_url(api), token) as right:
        [volume] = right.list()
        assert (volume.name, volume.size, volume.snapshots) == ("keep", MiB, ("s",))
        assert [s.name for s in right.snapshots()] == ["s"]


def test_a_wrong_token_raises_unauthorized(api: ApiServer, service: VolumeService) -> None:
    with RemoteVolumes(tcp_url(api), "wrong") as client:
        with pytest.raises(UnauthorizedError, match="wrong API token"):
            client.create(CreateRequest("v", MiB))
        with pytest.raises(UnauthorizedError):
            client.list()
    assert service.list() == []


def test_openapi_document_lists_every_route(api: ApiServer) -> None:
    document = httpx.get(f"{tcp_url(api)}/openapi.json").json()
    operations = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    assert operations == EXPECTED_ROUTES
    assert httpx.get(f"{tcp_url(api)}/healthz").json() == {"status": "ok"}


def test_concurrent_requests(http: httpx.Client, service: VolumeService) -> None:
    def create(i: int) -> int:
        return http.post("/v1/volumes", json={"name": f"v{i}", "size": MiB}).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(create, range(16))) == [201] * 16
    assert len(service.list()) == 16


# ---------------------------------------------------------------------------- RemoteVolumes


def test_remote_volumes_lifecycle(remote: RemoteVolumes, service: VolumeService) -> None:
    info = remote.create(CreateRequest("a", "8MiB", description="first", labels={"env": "test"}))
    assert info == service.info("a")
    remote.create(CreateRequest("b", 4 * MiB, read_only=True))
    assert [v.name for v in remote.list()] == ["a", "b"]
    assert remote.info("b").read_only
    assert remote.resize("a", "16MiB").size == 16 * MiB
    with pytest.raises(InvalidRequestError, match="shrink"):
        remote.resize("a", "8MiB")
    assert remote.resize("a", "8MiB", allow_shrink=True).size == 8 * MiB
    with pytest.raises(AlreadyExistsError):
        remote.create(CreateRequest("a", MiB))
    with pytest.raises(InvalidRequestError):
        remote.create(CreateRequest("c", "1000"))
    remote.delete("a")
    with pytest.raises(NotFoundError):
        remote.info("a")
    assert [v.name for v in service.list()] == ["b"]


def test_remote_snapshots_and_clones(remote: RemoteVolumes, service: VolumeService) -> None:
    remote.create(CreateRequest("base", "4MiB"))
    snap = remote.snapshot("base", "gold")
    assert (snap.volume, snap.name, snap.size, snap.clones) == ("base", "gold", 4 * MiB, ())
    clone = remote.clone("base", "gold", "vm1", description="from gold")
    assert (clone.origin, clone.description) == ("base@gold", "from gold")
    assert remote.snapshots("base")[0].clones == ("vm1",)
    assert remote.snapshots() == service.snapshots()
    with pytest.raises(DependencyError, match="has clones") as refused:
        remote.delete_snapshot("base", "gold")
    assert (refused.value.status, refused.value.code) == (409, "has-dependents")
    with pytest.raises(DependencyError):
        remote.delete("base")
    assert [s.name for s in service.snapshots("base")] == ["gold"]
    remote.delete_snapshot("base", "gold", flatten_clones=True)
    assert remote.snapshots() == []
    assert remote.info("vm1").origin is None
    with pytest.raises(NotFoundError):
        remote.clone("base", "gold", "vm2")
    assert remote.gc() == []


def test_remote_export_is_not_supported(remote: RemoteVolumes, tmp_path: Path) -> None:
    remote.create(CreateRequest("v", MiB))
    with pytest.raises(UnsupportedError) as refused:
        remote.export_image("v", tmp_path / "v.img")
    assert refused.value.status == 501
    assert not (tmp_path / "v.img").exists()


# ---------------------------------------------------------------------------- import


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 3 MiB raw image: a pattern at the start, a hole, a pattern at the end."""
    require_tool("qemu-img")
    path = tmp_path / "image.raw"
    with path.open("wb") as f:
        f.write(b"head" * 1024)
        f.seek(3 * MiB - 4096)
        f.write(b"tail" * 1024)
    return path


def test_import_streams_progress_over_http(
    http: httpx.Client, service: VolumeService, image: Path
) -> None:
    with http.stream(
        "POST", "/v1/volumes/img/import", json={"source": str(image), "labels": {"os": "t"}}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        events = [json.loads(line) for line in response.iter_lines() if line]
    *progress, last = events
    assert progress
    assert progress[-1] == {"done": 3 * MiB, "total": 3 * MiB}
    assert [e["done"] for e in progress] == sorted(e["done"] for e in progress)
    assert (last["volume"]["name"], last["volume"]["size"]) == ("img", 3 * MiB)
    assert last["volume"]["labels"] == {"os": "t"}
    view = service.open_view("img")
    try:
        assert view.read(0, 4096) == b"head" * 1024
        assert view.read(MiB, 4096) == bytes(4096)
        assert view.read(3 * MiB - 4096, 4096) == b"tail" * 1024
    finally:
        view.close()


def test_import_with_remote_volumes_feeds_progress(
    remote: RemoteVolumes, service: VolumeService, image: Path
) -> None:
    seen: list[tuple[int, int]] = []
    info = remote.import_image(
        ImportRequest(CreateRequest("img", "8MiB", description="d"), str(image)),
        progress=lambda d, t: seen.append((d, t)),
    )
    assert (info.name, info.size, info.description) == ("img", 8 * MiB, "d")
    assert seen[-1] == (3 * MiB, 3 * MiB)
    assert service.info("img") == info


def test_a_failed_import_reports_the_error_and_leaves_nothing(
    remote: RemoteVolumes, service: VolumeService, tmp_path: Path
) -> None:
    require_tool("qemu-img")
    big = tmp_path / "big.raw"
    big.write_bytes(b"x" * (2 * MiB))
    with pytest.raises(InvalidRequestError, match="larger than the volume"):
        remote.import_image(ImportRequest(CreateRequest("img", "1MiB"), str(big)))
    assert service.catalogue.volume("img") is None


def test_import_refusals_are_plain_errors(remote: RemoteVolumes, service: VolumeService) -> None:
    with pytest.raises(InvalidRequestError, match="absolute path"):
        remote.import_image(ImportRequest(CreateRequest("img", None), "relative.raw"))
    with pytest.raises(InvalidRequestError, match="unsupported source"):
        remote.import_image(
            ImportRequest(CreateRequest("img", None), "http://127.0.0.1:9/disk.img")
        )
    assert service.catalogue.volume("img") is None


class HeldCopy:
    """Stands in for transfer.import_image: reports progress, then waits to be released."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(
        self, storage: Storage, name: str, source: str, progress: Progress | None = None
    ) -> None:
        assert progress is not None
        progress(0, MiB)
        self.started.set()
        assert self.release.wait(30)
        progress(MiB, MiB)
        storage.flush()


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HeldCopy]:
    copy = HeldCopy()
    monkeypatch.setattr(transfer, "import_image", copy)
    monkeypatch.setattr(transfer, "image_size", lambda source: MiB)
    yield copy
    copy.release.set()


def test_a_client_going_away_does_not_cancel_an_import(
    http: httpx.Client, service: VolumeService, held: HeldCopy, image_file: Path
) -> None:
    with http.stream("POST", "/v1/volumes/img/import", json={"source": str(image_file)}) as r:
        assert json.loads(next(r.iter_lines())) == {"done": 0, "total": MiB}
    held.release.set()
    deadline = time.monotonic() + 10
    while not service.list() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [v.name for v in service.list()] == ["img"]


def test_stop_is_bounded_while_an_import_runs(
    api: ApiServer, token: str, service: VolumeService, held: HeldCopy, image_file: Path
) -> None:
    failures: list[BaseException] = []

    def run() -> None:
        try:
            with RemoteVolumes(tcp_url(api), token) as remote:
                remote.import_image(ImportRequest(CreateRequest("img", None), str(image_file)))
        except BaseException as err:
            failures.append(err)

    client = threading.Thread(target=run)
    client.start()
    assert held.started.wait(10)
    began = time.monotonic()
    assert not api.stop(grace=1)  # the import is still copying
    assert time.monotonic() - began < 5
    client.join(10)
    assert not client.is_alive()
    assert [type(f) for f in failures] == [UnreachableError]
    assert "may still be running on the server" in str(failures[0])
    # The copy goes on and completes; had the process exited, gc would remove the volume.
    held.release.set()
    deadline = time.monotonic() + 10
    while not service.list() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [v.name for v in service.list()] == ["img"]


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "held.raw"
    path.write_bytes(bytes(MiB))
    return path


# ---------------------------------------------------------------------------- NBD side


@pytest.fixture
def nbd_server(tmp_path: Path) -> Iterator[tuple[VolumeService, Server]]:
    """A real NBD server over its own catalogue, as ``nbs serve`` runs one."""
    ref: list[Server] = []

    def holders(name: str) -> list[Holder]:
        return [Holder(h.peer, h.writable, h.since) for h in ref[0].holders.of(name)]

    service = VolumeService(tmp_path / "nbd-data", holders=holders)
    service.start_serving()
    server = Server(VolumeExports(service, tls=TLSPolicy.OFF), tcp=[TCPAddress("127.0.0.1", 0)])
    ref.append(server)
    server.bind()
    server.start()
    yield service, server
    server.shutdown(grace=2)  # closes the service


def test_exports_status_and_in_use_with_a_real_nbd_client(
    nbd_server: tuple[VolumeService, Server], token: str
) -> None:
    nbd = require_module("nbd")
    service, server = nbd_server
    app = create_app(
        service,
        token=token,
        status=lambda: {"connections": server.session_count, "listeners": server.uris},
    )
    api = ApiServer(app, listen=[("127.0.0.1", 0)])
    api.start()
    client = nbd.NBD()
    try:
        with RemoteVolumes(tcp_url(api), token) as remote:
            remote.create(CreateRequest("vm1", "4MiB"))
            client.connect_uri(f"{server.uris[0]}/vm1")
            with httpx.Client(
                base_url=tcp_url(api), headers={"Authorization": f"Bearer {token}"}
            ) as http:
                [export] = http.get("/v1/exports").json()
                status = http.get("/v1/status").json()
            assert export == {
                "name": "vm1",
                "size": 4 * MiB,
                "read_only": False,
                "connections": 1,
                "uris": [f"{server.uris[0]}/vm1"],
            }
            assert (status["connections"], status["listeners"]) == (1, server.uris)
            assert remote.info("vm1").connections == 1
            with pytest.raises(InUseError):
                remote.delete("vm1")
            # A snapshot of a volume in use, taken by the server that serves it.
            client.pwrite(b"before", 0)
            client.flush()
            remote.snapshot("vm1", "s1")
            client.pwrite(b"after!", 0)
            client.flush()
            view = service.open_view("vm1", "s1")
            assert view.read(0, 6) == b"before"
            view.close()
    finally:
        client.shutdown()
        api.stop(grace=2)


# ---------------------------------------------------------------------------- transports


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A self-signed certificate for 127.0.0.1 and localhost, made by openssl."""
    openssl = require_tool("openssl")
    work = tmp_path_factory.mktemp("api-tls")
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return TLSFiles(cert, key)


def test_tls(
    serve: Callable[..., ApiServer], certificate: TLSFiles, token: str, service: VolumeService
) -> None:
    api = serve(tls=certificate)
    url = tcp_url(api)
    assert url.startswith("https://127.0.0.1:")
    with RemoteVolumes(url, token, verify=str(certificate.cert)) as trusted:
        trusted.create(CreateRequest("secure", MiB))
        assert [v.name for v in trusted.list()] == ["secure"]
    # The system's CAs do not know a self-signed certificate.
    with RemoteVolumes(url, token) as untrusting, pytest.raises(UnreachableError, match="CERT"):
        untrusting.list()
    with pytest.raises(httpx.HTTPError):
        httpx.get(url.replace("https", "http") + "/healthz", timeout=5)
    # The Unix socket beside it stays plain HTTP.
    with RemoteVolumes("", token, uds=socket_path(service.data_dir)) as local:
        assert [v.name for v in local.list()] == ["secure"]


def test_tls_with_unusable_files_fails_to_start(
    serve: Callable[..., ApiServer], tmp_path: Path
) -> None:
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ServeError, match="TLS"):
        serve(tls=TLSFiles(tmp_path / "bad.pem", tmp_path / "bad.pem"))


def test_unix_socket(api: ApiServer, service: VolumeService, token: str) -> None:
    path = socket_path(service.data_dir)
    assert f"unix:{path}" in api.urls
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    remote = client_for(service.data_dir, None, environ={})
    assert remote is not None
    with remote:
        assert remote.url == f"unix:{path}"
        remote.create(CreateRequest("local", MiB))
        assert service.info("local").size == MiB
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(path))) as raw:
        assert raw.get("http://nbs/v1/volumes").status_code == 401
    api.stop(grace=2)
    assert not path.exists()
    assert client_for(service.data_dir, None, environ={}) is None


def test_unix_only(serve: Callable[..., ApiServer], service: VolumeService, token: str) -> None:
    api = serve(listen=[])
    assert api.urls == [f"unix:{socket_path(service.data_dir)}"]
    with RemoteVolumes(api.urls[0], token, uds=socket_path(service.data_dir)) as remote:
        assert remote.list() == []


def test_port_zero_and_stop(api: ApiServer) -> None:
    url = tcp_url(api)
    port = int(url.rsplit(":", 1)[1])
    assert port > 0
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert api.stop(grace=2)
    assert api.stop(grace=2)  # idempotent
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 2):
        pass


def test_address_in_use(serve: Callable[..., ApiServer], tmp_path: Path) -> None:
    first = serve(unix=None)
    port = int(tcp_url(first).rsplit(":", 1)[1])
    with pytest.raises(ServeError, match="address already in use"):
        serve(listen=[("127.0.0.1", port)], unix=tmp_path / "other.sock")
    assert not (tmp_path / "other.sock").exists()


def test_a_live_socket_is_not_taken_over(api: ApiServer, service: VolumeService) -> None:
    with pytest.raises(ServeError, match="another server is listening"):
        ApiServer(api.app, unix=socket_path(service.data_dir)).start()
    assert socket_path(service.data_dir).exists()


def test_a_stale_socket_is_replaced(
    serve: Callable[..., ApiServer], service: VolumeService, token: str
) -> None:
    path = socket_path(service.data_dir)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    serve(listen=[])
    with RemoteVolumes("", token, uds=path) as remote:
        assert remote.list() == []


def test_nothing_listening_is_unreachable(token: str) -> None:
    with RemoteVolumes("http://127.0.0.1:9", token) as remote, pytest.raises(UnreachableError):
        remote.list()


def test_token_file_is_private(service: VolumeService, token: str) -> None:
    path = token_path(service.data_dir)
    assert path.read_text().strip() == token
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
