"""RemoteVolumes' interface, and how client_for picks local or remote (no server needed)."""

from __future__ import annotations

import inspect
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from backend.api.client import RemoteVolumes, client_for, read_token
from backend.api.errors import UnauthorizedError, UnsupportedError
from backend.api.local import socket_path, token_path
from backend.volume_clients import LocalVolumes
from backend.volumes.model import InvalidRequestError
from backend.volumes.operations import VolumeOperations
from backend.volumes.service import VolumeService

SERVICE_METHODS = [
    "list",
    "info",
    "create",
    "resize",
    "delete",
    "snapshot",
    "snapshots",
    "clone",
    "delete_snapshot",
    "gc",
]
INTERNAL = {"ready"}  # VolumeService.create(ready=False) is for imports, not for callers


def parameters(function: Callable[..., object]) -> list[tuple[str, object, object]]:
    return [
        (p.name, p.kind, p.default)
        for p in inspect.signature(function).parameters.values()
        if p.name not in ("self", *INTERNAL)
    ]


@pytest.mark.parametrize("name", SERVICE_METHODS)
def test_methods_take_what_the_local_ones_take(name: str) -> None:
    assert parameters(getattr(RemoteVolumes, name)) == parameters(getattr(VolumeService, name))


@pytest.mark.parametrize("name", ["import_image", "export_image"])
def test_image_methods_take_what_the_local_ones_take(name: str) -> None:
    assert parameters(getattr(RemoteVolumes, name)) == parameters(getattr(LocalVolumes, name))


DECLARED = sorted(
    name for name, value in vars(VolumeOperations).items() if callable(value) and name[0] != "_"
)


def test_the_interface_declares_every_operation() -> None:
    assert set(SERVICE_METHODS) | {"import_image", "export_image", "close"} <= set(DECLARED)


@pytest.mark.parametrize("name", DECLARED)
def test_both_clients_implement_the_declared_interface(tmp_path: Path, name: str) -> None:
    local = LocalVolumes(tmp_path / "data")
    try:
        declared = parameters(getattr(VolumeOperations, name))
        assert parameters(getattr(RemoteVolumes, name)) == declared
        assert parameters(getattr(local, name)) == declared
    finally:
        local.close()


def test_export_is_refused_clearly(tmp_path: Path) -> None:
    with (
        RemoteVolumes("https://nbs.example:8443", "t") as remote,
        pytest.raises(UnsupportedError, match="not supported through the management API"),
    ):
        remote.export_image("v", tmp_path / "v.img")


@pytest.mark.parametrize(
    ("call", "args"),
    [("info", ("a/b",)), ("delete", ("..",)), ("resize", ("", 512)), ("snapshots", ("-x",))],
)
def test_names_are_checked_before_anything_is_sent(call: str, args: tuple[object, ...]) -> None:
    # Nothing listens at this address: a request would be UnreachableError.
    with RemoteVolumes("http://127.0.0.1:9", "t") as remote, pytest.raises(InvalidRequestError):
        getattr(remote, call)(*args)


# ---------------------------------------------------------------------------- client_for


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def listening(data_dir: Path) -> Iterator[socket.socket]:
    """Something accepting connections on DATA/api.sock, as a running server would."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path(data_dir)))
    listener.listen(8)
    yield listener
    listener.close()


def test_no_server_means_local(data_dir: Path) -> None:
    assert client_for(data_dir, None, environ={}) is None


def test_a_stale_socket_means_local(data_dir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(socket_path(data_dir)))
    stale.close()
    assert client_for(data_dir, None, environ={}) is None


def test_a_local_server_is_used_over_its_socket(data_dir: Path, listening: socket.socket) -> None:
    token_path(data_dir).write_text("local-token\n")
    remote = client_for(data_dir, None, environ={})
    assert remote is not None
    assert remote.url == f"unix:{socket_path(data_dir)}"
    remote.close()


def test_a_local_server_whose_token_is_unreadable(data_dir: Path, listening: socket.socket) -> None:
    with pytest.raises(UnauthorizedError, match="api-token"):
        client_for(data_dir, None, environ={})


def test_the_default_data_directory(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, listening: socket.socket
) -> None:
    monkeypatch.setenv("NBS_DATA_DIR", str(data_dir))
    token_path(data_dir).write_text("t")
    remote = client_for(None, None, environ={})
    assert remote is not None
    remote.close()


@pytest.mark.parametrize(
    ("token", "env", "file_text", "expected"),
    [
        ("arg", {"NBS_API_TOKEN": "env"}, "file", "arg"),
        (None, {"NBS_API_TOKEN": "env"}, "file", "env"),
        (None, {}, "file\n", "file"),
    ],
)
def test_token_sources_in_order(
    *,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    token: str | None,
    env: dict[str, str],
    file_text: str,
    expected: str,
) -> None:
    seen: list[str] = []
    original = RemoteVolumes.__init__

    def spy(self: RemoteVolumes, url: str, secret: str, **options: Any) -> None:
        seen.append(secret)
        original(self, url, secret, **options)

    monkeypatch.setattr(RemoteVolumes, "__init__", spy)
    token_file = tmp_path / "token"
    token_file.write_text(file_text)
    remote = client_for(None, "https://nbs.example:8443", token, token_file, environ=env)
    assert remote is not None
    assert remote.url == "https://nbs.example:8443"
    assert seen == [expected]
    remote.close()


def test_a_server_without_a_token_is_a_usage_error() -> None:
    with pytest.raises(InvalidRequestError, match="NBS_API_TOKEN"):
        client_for(None, "https://nbs.example:8443", environ={})


@pytest.mark.parametrize("url", ["ftp://host/", "nbs.example:8443", "nbd://host:10809"])
def test_a_server_url_must_be_http_https_or_unix(url: str) -> None:
    with pytest.raises(InvalidRequestError, match="http"):
        client_for(None, url, "t", environ={})


def test_a_unix_server_url(tmp_path: Path) -> None:
    remote = client_for(None, f"unix:{tmp_path}/api.sock", "t", environ={})
    assert remote is not None
    assert remote.url == f"unix:{tmp_path}/api.sock"
    remote.close()


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("http://127.0.0.1:8080", False),
        ("http://[::1]:8080", False),
        ("http://localhost:8080", False),
        ("http://nbs.example:8080", True),
        ("https://nbs.example:8443", False),
    ],
)
def test_plain_http_to_another_host_warns(
    caplog: pytest.LogCaptureFixture, url: str, warned: bool
) -> None:
    remote = client_for(None, url, "t", environ={})
    assert remote is not None
    remote.close()
    assert ("unencrypted" in caplog.text) == warned


def test_a_missing_ca_file_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="CA file"):
        client_for(None, "https://h:1", "t", ca_file=tmp_path / "nope.pem", environ={})


def test_read_token(tmp_path: Path) -> None:
    (tmp_path / "t").write_text(" abc \n")
    assert read_token(tmp_path / "t") == "abc"
    (tmp_path / "empty").write_text("")
    with pytest.raises(UnauthorizedError, match="empty"):
        read_token(tmp_path / "empty")
    with pytest.raises(UnauthorizedError, match="cannot read"):
        read_token(tmp_path / "missing")
