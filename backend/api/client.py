"""The volume operations of a running server, through its management API.

:class:`RemoteVolumes` has LocalVolumes' methods (backend.volume_clients) with their
signatures and results: VolumeInfo and SnapshotInfo, and the VolumeError subclass the server
answered with (backend.api.errors).  :func:`client_for` decides whether a command talks to a
server at all.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import logging
import os
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from backend.api.errors import UnauthorizedError, UnreachableError, UnsupportedError, from_answer
from backend.api.local import accepts_connections, is_loopback, socket_path, token_path
from backend.volumes.datadir import default_data_dir
from backend.volumes.model import (
    CreateRequest,
    Holder,
    ImportRequest,
    InvalidRequestError,
    NodeInfo,
    NodeReplica,
    ReplicaInfo,
    ReplicationInfo,
    ScrubInfo,
    ScrubMismatch,
    SnapshotInfo,
    VolumeError,
    VolumeInfo,
    check_name,
)
from backend.volumes.service import Progress

log = logging.getLogger(__name__)

TOKEN_ENV = "NBS_API_TOKEN"
CA_ENV = "NBS_API_CA"
TIMEOUT = httpx.Timeout(300.0, connect=10.0)
# Imports and flattening take as long as their data: wait for them without a read timeout.
LONG = httpx.Timeout(None, connect=10.0)
_UNIX_HOST = "http://nbs"  # the host part of URLs sent over a Unix socket; never resolved


def _volume(data: dict[str, Any]) -> VolumeInfo:
    holders = tuple(Holder(**h) for h in data.get("holders", ()))
    replication = data.get("replication")
    if replication is not None:
        replicas = tuple(ReplicaInfo(**r) for r in replication["replicas"])
        scrubbed = replication.get("last_scrub")
        replication = ReplicationInfo(
            **{
                **replication,
                "replicas": replicas,
                "last_scrub": None if scrubbed is None else _scrub(scrubbed),
            }
        )
    return VolumeInfo(
        **{
            **data,
            "snapshots": tuple(data["snapshots"]),
            "holders": holders,
            "replication": replication,
        }
    )


def _scrub(data: dict[str, Any]) -> ScrubInfo:
    mismatches = tuple(
        ScrubMismatch(**{**m, "replicas": tuple(m["replicas"])}) for m in data["mismatches"]
    )
    return ScrubInfo(
        **{
            **data,
            "replicas": tuple(data["replicas"]),
            "failed": tuple(data["failed"]),
            "mismatches": mismatches,
        }
    )


def _node(data: dict[str, Any]) -> NodeInfo:
    replicas = tuple(NodeReplica(**r) for r in data["replicas"])
    return NodeInfo(**{**data, "replicas": replicas})


def _snapshot(data: dict[str, Any]) -> SnapshotInfo:
    return SnapshotInfo(**{**data, "clones": tuple(data["clones"])})


def _volume_path(name: str) -> str:
    # Checked here, with the local messages: "a/b" or ".." must not become another route.
    return f"/volumes/{quote(check_name(name), safe='')}"


def _snapshot_path(volume: str, snapshot: str) -> str:
    return f"{_volume_path(volume)}/snapshots/{quote(check_name(snapshot, 'snapshot'), safe='')}"


class RemoteVolumes:
    """The volume operations on the server at ``url`` (``https://host:port``), or over the
    Unix socket ``uds`` (``url`` is then ignored but for messages).

    ``verify``: True checks the server's certificate against the system's CAs, a path against
    that CA bundle (InvalidRequestError if it cannot be used), False not at all.  Every method
    raises what the local one raises, plus UnauthorizedError (the token was refused) and
    UnreachableError (no answer at all).
    Owns one HTTP connection pool: close() it, or use the object as a context manager.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        uds: Path | None = None,
        verify: str | bool = True,
    ) -> None:
        self.url = f"unix:{uds}" if uds is not None else url.rstrip("/")
        self._uds = uds
        context: ssl.SSLContext | bool = verify if isinstance(verify, bool) else _ca(verify)
        transport = httpx.HTTPTransport(uds=str(uds) if uds else None, verify=context)
        self._http = httpx.Client(
            base_url=(_UNIX_HOST if uds is not None else url.rstrip("/")) + "/v1",
            transport=transport,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=TIMEOUT,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RemoteVolumes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transport

    @contextmanager
    def _exchange(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        timeout: httpx.Timeout = TIMEOUT,
    ) -> Iterator[httpx.Response]:
        """The streamed answer to one request; raises the VolumeError of an error answer."""
        try:
            with self._http.stream(
                method, path, json=body, params=params, timeout=timeout
            ) as response:
                if response.is_error:
                    response.read()
                    try:
                        answer = response.json()
                    except ValueError:
                        answer = None
                    raise from_answer(response.status_code, answer)
                yield response
        except (httpx.ConnectError, httpx.ConnectTimeout) as err:
            raise UnreachableError(f"cannot reach the NBS API at {self.url}: {err}") from err
        except httpx.TransportError as err:
            raise UnreachableError(f"the connection to {self.url} broke: {err}") from err

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        timeout: httpx.Timeout = TIMEOUT,
    ) -> Any:
        """The decoded JSON answer (None for an empty one)."""
        with self._exchange(method, path, body=body, params=params, timeout=timeout) as answer:
            answer.read()
        if not answer.content:
            return None
        try:
            return answer.json()
        except ValueError as err:
            raise VolumeError(f"the NBS API at {self.url} answered something not JSON") from err

    # ------------------------------------------------------------------ queries

    def status(self, timeout: float = 300.0) -> dict[str, Any]:
        """The server's ``GET /v1/status``: version, uptime, connections, listeners."""
        answer = self._call("GET", "/status", timeout=httpx.Timeout(timeout))
        if not isinstance(answer, dict):
            raise VolumeError(f"the NBS API at {self.url} sent a bad status")
        return answer

    def list(self) -> list[VolumeInfo]:
        return [_volume(v) for v in self._call("GET", "/volumes")]

    def info(self, name: str) -> VolumeInfo:
        return _volume(self._call("GET", _volume_path(name)))

    def snapshots(self, volume: str | None = None) -> builtins.list[SnapshotInfo]:
        path = "/snapshots" if volume is None else f"{_volume_path(volume)}/snapshots"
        return [_snapshot(s) for s in self._call("GET", path)]

    # ------------------------------------------------------------------ lifecycle

    def create(self, request: CreateRequest) -> VolumeInfo:
        return _volume(self._call("POST", "/volumes", body=request.to_json()))

    def resize(self, name: str, size: int | str, *, allow_shrink: bool = False) -> VolumeInfo:
        body = {"size": size, "allow_shrink": allow_shrink}
        return _volume(self._call("PATCH", _volume_path(name), body=body))

    def delete(self, name: str, *, force: bool = False) -> None:
        params = {"force": "true"} if force else None
        self._call("DELETE", _volume_path(name), params=params)

    def add_replica(self, name: str, node: str) -> VolumeInfo:
        path = f"{_volume_path(name)}/replicas"
        return _volume(self._call("POST", path, body={"node": node}))

    def remove_replica(self, name: str, node: str) -> VolumeInfo:
        path = f"{_volume_path(name)}/replicas/{quote(node, safe='')}"
        return _volume(self._call("DELETE", path))

    def replace_replica(self, name: str, old: str, new: str) -> VolumeInfo:
        path = f"{_volume_path(name)}/replicas/{quote(old, safe='')}/replace"
        return _volume(self._call("POST", path, body={"node": new}))

    def nodes(self) -> builtins.list[NodeInfo]:
        return [_node(n) for n in self._call("GET", "/nodes")]

    def node(self, name: str) -> NodeInfo:
        return _node(self._call("GET", f"/nodes/{quote(name, safe='')}"))

    def snapshot(self, volume: str, name: str) -> SnapshotInfo:
        path = f"{_volume_path(volume)}/snapshots"
        return _snapshot(self._call("POST", path, body={"name": name}))

    def clone(
        self,
        volume: str,
        snapshot: str,
        new_name: str,
        *,
        description: str = "",
        labels: dict[str, str] | None = None,
    ) -> VolumeInfo:
        path = f"{_snapshot_path(volume, snapshot)}/clone"
        body = {"name": new_name, "description": description, "labels": labels or {}}
        return _volume(self._call("POST", path, body=body))

    def delete_snapshot(
        self,
        volume: str,
        name: str,
        *,
        flatten_clones: bool = False,
        progress: Progress | None = None,
    ) -> None:
        """As the local one; ``progress`` is not called: the API reports no flattening
        progress, and the call returns when the flattening is done."""
        path = _snapshot_path(volume, name)
        params = {"flatten_clones": "true"} if flatten_clones else None
        self._call("DELETE", path, params=params, timeout=LONG)

    def gc(self) -> builtins.list[str]:
        removed: builtins.list[str] = self._call("POST", "/gc")["removed"]
        return removed

    # ------------------------------------------------------------------ images

    def import_image(
        self, request: ImportRequest, *, progress: Progress | None = None
    ) -> VolumeInfo:
        """A new volume holding the image at ``request.source``, read by the server: a path
        on the server's machine or an NBD URI.  Over the local socket a relative path is
        taken relative to this process's directory, as the local command would."""
        if self._uds is not None and "://" not in request.source:
            request = dataclasses.replace(request, source=str(Path(request.source).absolute()))
        name, body = request.volume.name, request.to_json()
        still_running = (
            f"the import of {name!r} may still be running on the server (see `nbs volume list`)"
        )
        result = self._stream(
            f"{_volume_path(name)}/import",
            body,
            "volume",
            what="import",
            still_running=still_running,
            progress=progress,
        )
        return _volume(result)

    def scrub(
        self, name: str, *, repair: bool = False, progress: Progress | None = None
    ) -> ScrubInfo:
        """The server's scrub of ``name`` (its engine compares the replicas)."""
        still_running = f"the scrub of {name!r} may still be running on the server (its log says)"
        result = self._stream(
            f"{_volume_path(name)}/scrub",
            {"repair": repair},
            "scrub",
            what="scrub",
            still_running=still_running,
            progress=progress,
        )
        try:
            return _scrub(result)
        except (KeyError, TypeError) as err:
            raise VolumeError(f"the NBS API at {self.url} sent a bad scrub report") from err

    def _stream(
        self,
        path: str,
        body: Mapping[str, Any],
        key: str,
        *,
        what: str,
        still_running: str,
        progress: Progress | None,
    ) -> dict[str, Any]:
        """POST ``body`` to ``path`` and follow its NDJSON events (backend.api.imports.Job):
        progress to ``progress``, then the result under ``key``, or the error raised."""
        streaming = False
        try:
            with self._exchange("POST", path, body=body, timeout=LONG) as answer:
                streaming = True
                for line in answer.iter_lines():
                    event = json.loads(line) if line.strip() else {}
                    if key in event:
                        result: dict[str, Any] = event[key]
                        return result
                    if "error" in event:
                        raise from_answer(500, event)
                    if "done" in event and progress is not None:
                        progress(int(event["done"]), int(event["total"]))
        except UnreachableError as err:
            if streaming:
                raise UnreachableError(f"{err.message}; {still_running}") from err
            raise
        except (ValueError, KeyError, TypeError) as err:
            raise VolumeError(f"the NBS API at {self.url} sent a bad {what} event") from err
        raise UnreachableError(f"the answer from {self.url} ended early; {still_running}")

    def export_image(
        self, name: str, dest: Path, *, fmt: str = "raw", progress: Progress | None = None
    ) -> None:
        """Not offered by the API (the image would be written on the server's machine):
        raises UnsupportedError."""
        raise UnsupportedError(
            f"exporting {name} to an image file is not supported through the management API"
            f" of {self.url}: the server would have to write the file"
        )


def _ca(path: str) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as err:
        raise InvalidRequestError(f"cannot use the CA file {path}: {err}") from err


def read_token(path: Path) -> str:
    """The token stored in ``path``; UnauthorizedError if it cannot be read or is empty."""
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not text"
        raise UnauthorizedError(f"cannot read the API token file {path}: {reason}") from err
    if not token:
        raise UnauthorizedError(f"the API token file {path} is empty")
    return token


def client_for(
    data_dir: Path | None,
    server_url: str | None,
    token: str | None = None,
    token_file: Path | None = None,
    *,
    ca_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> RemoteVolumes | None:
    """The API client a volume command should use, or None to act on the data directory
    in this process (LocalVolumes).

    - ``server_url`` (``https://host:port``, ``http://…``, ``unix:/path/api.sock``): that
      server, with ``token``, else $NBS_API_TOKEN, else the contents of ``token_file``;
      certificates are checked against ``ca_file``, else $NBS_API_CA, else the system's CAs.
      No token is InvalidRequestError.
    - else, when a server listens on DATA/api.sock (``data_dir`` or the default data
      directory): that server, with the token in DATA/api-token (UnauthorizedError if this
      user cannot read it).
    - else None.
    """
    env = os.environ if environ is None else environ
    if server_url:
        secret = token or env.get(TOKEN_ENV) or (read_token(token_file) if token_file else None)
        if not secret:
            raise InvalidRequestError(
                f"--server needs a token: set {TOKEN_ENV} or pass --token-file"
            )
        if server_url.startswith("unix:"):
            return RemoteVolumes(server_url, secret, uds=Path(server_url.removeprefix("unix:")))
        scheme = urlsplit(server_url).scheme
        if scheme not in ("http", "https"):
            raise InvalidRequestError(
                f"--server must be an http://, https:// or unix: URL, got {server_url!r}"
            )
        if scheme == "http" and not is_loopback(urlsplit(server_url).hostname or ""):
            log.warning("the API token is sent to %s unencrypted: use https://", server_url)
        ca = ca_file or (Path(env[CA_ENV]) if env.get(CA_ENV) else None)
        return RemoteVolumes(server_url, secret, verify=str(ca) if ca else True)
    data = data_dir or default_data_dir()
    sock = socket_path(data)
    if not accepts_connections(sock):
        return None
    return RemoteVolumes(f"unix:{sock}", read_token(token_path(data)), uds=sock)
