"""The management API: a FastAPI application over one VolumeService.

Contract (docs/api.md has the reference and examples):

- Every route is under ``/v1`` and needs ``Authorization: Bearer TOKEN``, except
  ``GET /healthz`` and ``GET /openapi.json`` (the document describes the API, never data).
  The token is checked before anything else, so a request without it gets 401 with
  ``WWW-Authenticate: Bearer`` whatever its path or body, and changes nothing.
- Every error answer is ``{"error": {"code": CODE, "message": TEXT}}``: a VolumeError gives
  its own status and code, a request that does not fit the schema 400 ``invalid``, an unknown
  route 404 ``not-found``, an unexpected failure 500 ``internal`` (details only in the log).
- The service blocks, so routes are plain functions that FastAPI runs on its thread pool.
- ``POST /v1/volumes/{name}/import`` answers refusals with their status, then streams
  ``application/x-ndjson`` events from backend.api.imports.
"""

from __future__ import annotations

import hmac
import importlib.metadata
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Annotated, Any
from urllib.parse import quote

import anyio.to_thread
from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from backend.api.errors import UnauthorizedError, code_for_status, error_body
from backend.api.imports import Imports, Job
from backend.api.imports import scrub as start_scrub
from backend.volumes.model import (
    NAME_RULE,
    CreateRequest,
    ImportRequest,
    NodeInfo,
    SnapshotInfo,
    VolumeError,
    VolumeInfo,
)
from backend.volumes.service import VolumeService

PREFIX = "/v1"
PUBLIC = frozenset({("GET", "/healthz"), ("GET", "/openapi.json")})
NDJSON = "application/x-ndjson"


def nbs_version() -> str:
    try:
        return importlib.metadata.version("nbs")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------- schema


class _Request(BaseModel):
    # A misspelt option must not be ignored silently ("allowShrink": true shrinking nothing).
    model_config = ConfigDict(extra="forbid")


Size = Annotated[
    StrictInt | StrictStr,
    Field(
        description="bytes, or with a binary unit (10GiB, 512MiB); a multiple of 512",
        examples=["10GiB", 1073741824],
    ),
]
Name = Annotated[str, Field(description=NAME_RULE, examples=["vm1-root"])]
Labels = Annotated[dict[str, str], Field(default_factory=dict, examples=[{"env": "prod"}])]


StorageField = Annotated[
    str | None,
    Field(
        description="where the data lives: a profile name from the server's `storages:`, or"
        " inline (file, dir:…, s3:bucket=…, rados:pool=…, rbd:pool=…[,image=…], +cache:…,"
        " +retry:…); default: the server's default storage",
        examples=["rbd:pool=rbd", "s3:bucket=nbs+cache:size=256MiB"],
    ),
]


class VolumeCreate(_Request):
    name: Name
    size: Size | None = Field(None, description="required unless adopting an RBD image")
    description: str = ""
    labels: Labels
    read_only: bool = False
    storage: StorageField = None
    shared: bool = Field(False, description="let several clients hold it writable at once")

    def request(self) -> CreateRequest:
        return CreateRequest(**self.model_dump())


class VolumeResize(_Request):
    size: Size
    allow_shrink: bool = Field(False, description="allow a smaller size (data past it is lost)")


class VolumeImport(_Request):
    source: str = Field(
        description="absolute path of an image file or block device on the server, or an"
        " nbd:// / nbd+unix:// URI; any format qemu-img reads",
        examples=["/srv/images/debian-12.qcow2"],
    )
    size: Size | None = Field(None, description="default: the image's virtual size")
    description: str = ""
    labels: Labels
    read_only: bool = False
    storage: StorageField = None
    shared: bool = Field(False, description="let several clients hold it writable at once")

    def request(self, name: str) -> ImportRequest:
        """The import into a new volume ``name`` (from the path)."""
        options = self.model_dump(exclude={"source"})
        return ImportRequest(CreateRequest(name, **options), self.source)


class ReplicaAdd(_Request):
    node: str = Field(description="a storage node named in the serving engine's nodes: config")


class SnapshotCreate(_Request):
    name: Name


class CloneCreate(_Request):
    name: Name = Field(description="the new volume's name; " + NAME_RULE)
    description: str = ""
    labels: Labels


class HolderOut(BaseModel):
    """Mirrors backend.volumes.model.Holder."""

    peer: str = Field(description='"HOST:PORT", or "unix pid N"')
    writable: bool = Field(description="false: served read-only, another client holds it")
    since: float = Field(description="Unix time it opened the volume")
    epoch: int | None = Field(
        default=None, description="the replication epoch it named; null: a plain connection"
    )


class ReplicaOut(BaseModel):
    """Mirrors backend.volumes.model.ReplicaInfo."""

    node: str = Field(description="the storage node (a name from the engine's nodes: config)")
    volume: str = Field(description="the replica volume's name on that node")
    state: str = Field(
        description="in_sync, resyncing, out, or leftover (left the volume, not deleted yet)"
    )
    in_flight: int = Field(description="requests outstanding on it (live engine only)")
    resync_done: int | None = Field(description="bytes handled of resync_total, while resyncing")
    resync_total: int | None = Field(description="bytes its resync has to handle")
    last_error: str | None = Field(description="why it is out, when the live engine knows")


class ScrubMismatchOut(BaseModel):
    """Mirrors backend.volumes.model.ScrubMismatch."""

    offset: int
    length: int
    replicas: list[str] = Field(
        description="nodes whose replicas hold other bytes than the majority (every replica"
        " compared, if there is no majority)"
    )
    majority: bool = Field(description="a majority of the replicas agree on these bytes")
    repaired: bool = Field(description="the majority's bytes were written over the others")


class ScrubOut(BaseModel):
    """Mirrors backend.volumes.model.ScrubInfo."""

    volume: str
    repair: bool
    size: int
    compared: int = Field(description="bytes compared on at least two replicas")
    replicas: list[str] = Field(description="the nodes whose replicas were in sync at the start")
    mismatches: list[ScrubMismatchOut]
    failed: list[str] = Field(description="replicas whose read or repair failed (now out)")
    unresolved: int = Field(description="mismatches not repaired")
    seconds: float
    finished: float = Field(description="Unix time")


class ReplicationOut(BaseModel):
    """Mirrors backend.volumes.model.ReplicationInfo."""

    epoch: int
    generation: int = Field(description="the committed membership generation")
    min_insync: int
    live: bool = Field(description="true: from the serving engine; false: the catalogue's")
    replicas: list[ReplicaOut]
    last_scrub: ScrubOut | None = Field(
        default=None, description="the serving engine's last finished scrub (live only)"
    )


class VolumeOut(BaseModel):
    """Mirrors backend.volumes.model.VolumeInfo."""

    name: str
    size: int
    description: str
    labels: dict[str, str]
    read_only: bool
    created: float = Field(description="Unix time")
    used_bytes: int = Field(description="space held by the volume's own writable layer")
    origin: str | None = Field(description='"VOLUME@SNAPSHOT" for clones')
    snapshots: list[str]
    connections: int = Field(description="NBD clients that have the volume open")
    storage: str = Field(description="where the data lives (inline storage spec)")
    shared: bool = Field(description="several clients may hold it writable at once")
    holders: list[HolderOut] = Field(description="the NBD clients that have it open now")
    uid: str = Field(description="tells the volume from an earlier one of the same name")
    epoch: int = Field(description="the highest replication epoch the volume promised")
    replication: ReplicationOut | None = Field(
        default=None, description="a replicated volume's membership and replicas"
    )

    @classmethod
    def of(cls, info: VolumeInfo) -> VolumeOut:
        return cls(**info.to_json())


class SnapshotOut(BaseModel):
    """Mirrors backend.volumes.model.SnapshotInfo."""

    volume: str
    name: str
    size: int
    created: float = Field(description="Unix time")
    used_bytes: int = Field(description="space held by this snapshot's own layer")
    clones: list[str] = Field(description="volumes cloned from it")

    @classmethod
    def of(cls, info: SnapshotInfo) -> SnapshotOut:
        return cls(**info.to_json())


class NodeReplicaOut(BaseModel):
    """Mirrors backend.volumes.model.NodeReplica."""

    volume: str = Field(description="the replicated volume, by its name on this server")
    replica: str = Field(description="the replica volume's name on the node")
    state: str = Field(description="in_sync, resyncing, out, or leftover")


class NodeOut(BaseModel):
    """Mirrors backend.volumes.model.NodeInfo."""

    name: str
    configured: bool = Field(
        description="false: the config no longer names it (a reload removed it) but replicas"
        " of this server's volumes are still recorded there"
    )
    api: str = Field(description="its management API URL")
    nbd: str = Field(description="its NBD listener URI")
    reachable: bool = Field(description="its API answered a status request just now")
    version: str | None = Field(description="the nbs version it reported")
    error: str | None = Field(description="why it did not answer")
    replicas: list[NodeReplicaOut] = Field(
        description="the replicas it holds for this server's volumes"
    )

    @classmethod
    def of(cls, info: NodeInfo) -> NodeOut:
        return cls(**info.to_json())


class GcOut(BaseModel):
    removed: list[str] = Field(description="what a crash had left behind and is now gone")


class ExportOut(BaseModel):
    name: str
    size: int
    read_only: bool
    connections: int = Field(description="NBD clients that have it open now")
    uris: list[str] = Field(description="NBD URIs of the export, one per NBD listener")


class StatusOut(BaseModel):
    version: str
    uptime: float = Field(description="seconds since the API started")
    connections: int = Field(description="open NBD connections")
    listeners: list[str] = Field(description="NBD listener URIs")
    api: list[str] = Field(default_factory=list, description="API listener URLs")


class HealthOut(BaseModel):
    status: str = "ok"


class ErrorDetail(BaseModel):
    code: str = Field(examples=["not-found"])
    message: str


class ErrorOut(BaseModel):
    error: ErrorDetail


class ImportEvent(BaseModel):
    """One line of an import's NDJSON stream: exactly one of the three forms."""

    done: int | None = Field(None, description="bytes copied so far (with total)")
    total: int | None = Field(None, description="bytes to copy (with done)")
    volume: VolumeOut | None = Field(None, description="the last line of a successful import")
    error: ErrorDetail | None = Field(None, description="the last line of a failed import")


class ScrubEvent(BaseModel):
    """One line of a scrub's NDJSON stream: exactly one of the three forms."""

    done: int | None = Field(None, description="bytes compared so far (with total)")
    total: int | None = Field(None, description="the volume's size (with done)")
    scrub: ScrubOut | None = Field(None, description="the last line of a finished scrub")
    error: ErrorDetail | None = Field(None, description="the last line of a failed scrub")


class VolumeScrub(_Request):
    repair: bool = Field(
        False, description="write the majority's bytes over replicas that differ from it"
    )


class NDJSONResponse(StreamingResponse):
    """A stream of JSON objects, one per line."""

    media_type = NDJSON


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorOut} for code in codes}


def export_uris(listeners: list[str], name: str) -> list[str]:
    """The URIs of export ``name`` given the server's listener URIs (nbd://H:P, nbd+unix:///?…)."""
    uris = []
    for listener in listeners:
        base, sep, query = listener.partition("?")
        slash = "" if base.endswith("/") else "/"
        uris.append(f"{base}{slash}{quote(name)}{sep}{query}")
    return uris


# ---------------------------------------------------------------------------- auth and errors


def _error_response(
    status_code: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status_code, headers=headers)


class BearerAuth:
    """ASGI middleware: requests other than ``public`` (method, path) pairs need the token.

    It runs before routing and before the body is read, so a request without the token
    reaches no route and costs the server no more than its headers.
    """

    def __init__(self, app: ASGIApp, *, token: str, public: frozenset[tuple[str, str]]) -> None:
        self.app = app
        self.token = token.encode()
        self.public = public

    def authorized(self, scope: Scope) -> bool:
        scheme, _, presented = Headers(scope=scope).get("authorization", "").partition(" ")
        # compare_digest takes as long for every wrong token of a length: no timing oracle.
        return scheme.lower() == "bearer" and hmac.compare_digest(
            presented.strip().encode("utf-8", "surrogateescape"), self.token
        )

    def admitted(self, scope: Scope) -> bool:
        if scope["type"] == "lifespan":
            return True
        public = scope["type"] == "http" and (scope["method"], scope["path"]) in self.public
        return public or self.authorized(scope)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.admitted(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            present = "authorization" in Headers(scope=scope)
            challenge = 'Bearer realm="nbs"' + (', error="invalid_token"' if present else "")
            message = "wrong API token" if present else "this request needs an API token"
            response = _error_response(
                UnauthorizedError.status,
                UnauthorizedError.code,
                message,
                headers={"WWW-Authenticate": challenge},
            )
            await response(scope, receive, send)


def _install_error_handlers(app: FastAPI) -> None:
    async def volume_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, VolumeError)
        return _error_response(exc.status, exc.code, exc.message)

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = [
            f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg', '')}"
            for error in exc.errors()
        ]
        return _error_response(400, "invalid", "; ".join(problems) or "invalid request")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code < 400:
            return Response(status_code=exc.status_code, headers=exc.headers)
        return _error_response(
            exc.status_code, code_for_status(exc.status_code), str(exc.detail), exc.headers
        )

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback (uvicorn.error); the client learns nothing internal.
        return _error_response(500, "internal", "internal error; see the server's log")

    app.add_exception_handler(VolumeError, volume_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal)


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The OpenAPI document, amended with what FastAPI cannot infer: the bearer scheme on /v1,
    and 400 (not FastAPI's 422) for requests that do not fit the schema."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {})
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for name in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(name, None)
        error = {"$ref": "#/components/schemas/ErrorOut"}
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                for answer in responses.values():
                    # FastAPI types every non-JSON body "string", even beside a $ref.
                    answer.get("content", {}).get(NDJSON, {}).get("schema", {}).pop("type", None)
                if responses.pop("422", None) is not None:
                    responses["400"] = {
                        "description": "Invalid request",
                        "content": {"application/json": {"schema": error}},
                    }
                if path.startswith(PREFIX + "/"):
                    operation["security"] = [{"bearer": []}]
                    responses["401"] = {
                        "description": "No token, or the wrong one",
                        "content": {"application/json": {"schema": error}},
                    }
        app.openapi_schema = schema
        return schema

    return build


# ---------------------------------------------------------------------------- the app


def create_app(
    service: VolumeService,
    *,
    token: str,
    status: Callable[[], Mapping[str, Any]] | None = None,
    connections: Callable[[str], int] | None = None,
) -> FastAPI:
    """The API over ``service``, which stays the caller's to close.

    ``token``: the bearer token every /v1 request must present (not empty).
    ``status``: what GET /v1/status reports beyond version and uptime: a mapping with
    ``connections`` (open NBD connections), ``listeners`` (NBD listener URIs) and ``api`` (the
    API's URLs); missing keys report 0 or nothing.  Called on the thread pool, so it must be
    thread safe.
    ``connections``: how many NBD clients have a volume open (default: its holders).

    ``app.state.imports`` (backend.api.imports.Imports) tracks running imports, so that
    whoever stops the server can wait for them (ApiServer.stop does).
    """
    if not token:
        raise ValueError("the API token must not be empty")
    started = time.monotonic()
    in_use = connections or (lambda name: len(service.holders(name)))
    imports = Imports()
    app = FastAPI(
        title="NBS management API",
        version=nbs_version(),
        description="Volumes, snapshots, clones, exports and status of one NBS server.",
        openapi_url="/openapi.json",
        docs_url=None,  # the interactive pages load scripts from a CDN: not on a storage host
        redoc_url=None,
        redirect_slashes=False,  # "/v1/volumes/" is not the list of volumes, nor is it a name
        responses=_errors(500),
    )
    app.state.imports = imports
    app.add_middleware(BearerAuth, token=token, public=PUBLIC)
    _install_error_handlers(app)
    app.openapi = _openapi(app)  # type: ignore[method-assign]  # FastAPI's documented hook

    @app.get("/healthz", tags=["status"])
    def healthz() -> HealthOut:
        """Liveness, without a token."""
        return HealthOut()

    @app.get("/v1/volumes", tags=["volumes"])
    def list_volumes() -> list[VolumeOut]:
        return [VolumeOut.of(info) for info in service.list()]

    @app.post("/v1/volumes", status_code=201, tags=["volumes"], responses=_errors(409))
    def create_volume(body: VolumeCreate, response: Response) -> VolumeOut:
        """A new, empty (sparse) volume."""
        info = service.create(body.request())
        response.headers["Location"] = f"{PREFIX}/volumes/{quote(info.name)}"
        return VolumeOut.of(info)

    @app.get("/v1/volumes/{name}", tags=["volumes"], responses=_errors(404))
    def get_volume(name: str) -> VolumeOut:
        return VolumeOut.of(service.info(name))

    @app.patch("/v1/volumes/{name}", tags=["volumes"], responses=_errors(404, 409))
    def resize_volume(name: str, body: VolumeResize) -> VolumeOut:
        """Resize (live); shrinking needs ``allow_shrink``."""
        return VolumeOut.of(service.resize(name, body.size, allow_shrink=body.allow_shrink))

    @app.delete(
        "/v1/volumes/{name}",
        status_code=204,
        response_class=Response,
        response_model=None,
        tags=["volumes"],
        responses=_errors(404, 409),
    )
    def delete_volume(
        name: str,
        force: Annotated[bool, Query(description="even if open or with snapshots")] = False,
    ) -> None:
        service.delete(name, force=force)

    @app.post(
        "/v1/volumes/{name}/import",
        tags=["volumes"],
        response_class=NDJSONResponse,
        responses={
            200: {
                "model": ImportEvent,
                "description": (
                    "One JSON object per line: {done, total} while copying, then"
                    " {volume} or {error}"
                ),
            },
            **_errors(409),
        },
    )
    def import_volume(name: str, body: VolumeImport) -> NDJSONResponse:
        """A new volume holding an image the server reads: refusals are answered with their
        status; once the copy started, progress streams as NDJSON.  Disconnecting does not
        cancel the copy."""
        job = imports.start(service, body.request(name))
        return NDJSONResponse(_ndjson(job))

    @app.post(
        "/v1/volumes/{name}/scrub",
        tags=["volumes"],
        response_class=NDJSONResponse,
        responses={
            200: {
                "model": ScrubEvent,
                "description": (
                    "One JSON object per line: {done, total} while comparing, then"
                    " {scrub} or {error}"
                ),
            },
            **_errors(404),
        },
    )
    def scrub_volume(name: str, body: VolumeScrub) -> NDJSONResponse:
        """Compare a replicated volume's in-sync replicas; with ``repair``, write the
        majority's bytes over those that differ.  A volume that is not replicated is refused
        with its status; then progress streams as NDJSON.  Disconnecting does not cancel it."""
        job = start_scrub(service, name, body.repair)
        imports.add(job)
        return NDJSONResponse(_ndjson(job))

    @app.get("/v1/snapshots", tags=["snapshots"])
    def list_all_snapshots() -> list[SnapshotOut]:
        """The snapshots of every volume."""
        return [SnapshotOut.of(s) for s in service.snapshots()]

    @app.get("/v1/volumes/{name}/snapshots", tags=["snapshots"], responses=_errors(404))
    def list_snapshots(name: str) -> list[SnapshotOut]:
        return [SnapshotOut.of(s) for s in service.snapshots(name)]

    @app.post(
        "/v1/volumes/{name}/snapshots",
        status_code=201,
        tags=["snapshots"],
        responses=_errors(404, 409),
    )
    def create_snapshot(name: str, body: SnapshotCreate, response: Response) -> SnapshotOut:
        """A crash-consistent point-in-time snapshot, taken while the volume is in use."""
        snap = service.snapshot(name, body.name)
        response.headers["Location"] = (
            f"{PREFIX}/volumes/{quote(name)}/snapshots/{quote(snap.name)}"
        )
        return SnapshotOut.of(snap)

    @app.delete(
        "/v1/volumes/{name}/snapshots/{snapshot}",
        status_code=204,
        response_class=Response,
        response_model=None,
        tags=["snapshots"],
        responses=_errors(404, 409),
    )
    def delete_snapshot(
        name: str,
        snapshot: str,
        flatten_clones: Annotated[
            bool, Query(description="copy its data into the clones that depend on it first")
        ] = False,
    ) -> None:
        """409 ``has-dependents`` while clones depend on it, unless ``flatten_clones``."""
        service.delete_snapshot(name, snapshot, flatten_clones=flatten_clones)

    @app.post(
        "/v1/volumes/{name}/snapshots/{snapshot}/clone",
        status_code=201,
        tags=["snapshots"],
        responses=_errors(404, 409),
    )
    def clone_snapshot(
        name: str, snapshot: str, body: CloneCreate, response: Response
    ) -> VolumeOut:
        """A thin, instant, writable copy of the snapshot, as a new volume."""
        info = service.clone(
            name, snapshot, body.name, description=body.description, labels=body.labels
        )
        response.headers["Location"] = f"{PREFIX}/volumes/{quote(info.name)}"
        return VolumeOut.of(info)

    @app.post(
        "/v1/volumes/{name}/replicas",
        status_code=201,
        tags=["volumes"],
        responses=_errors(404, 409),
    )
    def add_replica(name: str, body: ReplicaAdd) -> VolumeOut:
        """A replicated volume gets a replica on another storage node, resynced in the
        background (attached or not)."""
        return VolumeOut.of(service.add_replica(name, body.node))

    @app.delete("/v1/volumes/{name}/replicas/{node}", tags=["volumes"], responses=_errors(404, 409))
    def remove_replica(name: str, node: str) -> VolumeOut:
        """A replicated volume's replica on ``node`` leaves it and is deleted (attached or
        not; never the last in-sync replica, never below min_insync)."""
        return VolumeOut.of(service.remove_replica(name, node))

    @app.post(
        "/v1/volumes/{name}/replicas/{node}/replace",
        tags=["volumes"],
        responses=_errors(404, 409),
    )
    def replace_replica(name: str, node: str, body: ReplicaAdd) -> VolumeOut:
        """A new replica on ``body.node`` takes the place of the one on ``node`` (whose node
        may be dead), resynced in the background; the old one is deleted, or left for
        ``POST /v1/gc`` if its node does not answer (shown as ``leftover``)."""
        return VolumeOut.of(service.replace_replica(name, node, body.node))

    @app.get("/v1/nodes", tags=["nodes"])
    def list_nodes() -> list[NodeOut]:
        """The storage nodes of this server's config, each asked for its status (a few
        seconds at most), with the replicas it holds; then nodes the config no longer names
        that still hold replicas."""
        return [NodeOut.of(info) for info in service.nodes()]

    @app.get("/v1/nodes/{name}", tags=["nodes"], responses=_errors(404))
    def get_node(name: str) -> NodeOut:
        return NodeOut.of(service.node(name))

    @app.post("/v1/gc", tags=["volumes"])
    def gc() -> GcOut:
        """Finish or roll back what a crash interrupted."""
        return GcOut(removed=service.gc())

    @app.get("/v1/exports", tags=["status"])
    def exports() -> list[ExportOut]:
        """Every volume as the NBD export it is served as, with its open connections."""
        listeners = [str(uri) for uri in (status() if status else {}).get("listeners", [])]
        return [
            ExportOut(
                name=v.name,
                size=v.size,
                read_only=v.read_only,
                connections=in_use(v.name),
                uris=export_uris(listeners, v.name),
            )
            for v in service.list()
        ]

    @app.get("/v1/status", tags=["status"])
    def server_status() -> StatusOut:
        report = dict(status() if status else {})
        return StatusOut(
            version=app.version,
            uptime=time.monotonic() - started,
            connections=report.get("connections", 0),
            listeners=report.get("listeners", []),
            api=report.get("api", []),
        )

    return app


async def _ndjson(job: Job) -> AsyncIterator[bytes]:
    # abandon_on_cancel: when the client goes away the response stops at once; the thread
    # still waiting for the next event returns when the import reports one (it always ends).
    while (
        event := await anyio.to_thread.run_sync(job.next_event, abandon_on_cancel=True)
    ) is not None:
        yield json.dumps(event).encode() + b"\n"
