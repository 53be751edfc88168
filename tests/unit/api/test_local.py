"""The token file and the Unix-socket probe that let a local CLI find its server."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from backend.api.local import (
    TOKEN_BYTES,
    accepts_connections,
    is_loopback,
    load_or_create_token,
    socket_path,
    token_path,
)
from backend.server.server import ServeError


def test_a_new_token_is_random_private_and_kept(tmp_path: Path) -> None:
    path = token_path(tmp_path)
    token = load_or_create_token(path)
    assert len(token) >= TOKEN_BYTES * 4 // 3
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(path) == token
    assert load_or_create_token(tmp_path / "other") != token


def test_an_existing_token_is_used_as_written(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  chosen-by-the-operator\n")
    path.chmod(0o400)
    assert load_or_create_token(path) == "chosen-by-the-operator"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_token_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "token"
    path.write_text("secret")
    path.chmod(mode)
    with pytest.raises(ServeError, match="chmod 600"):
        load_or_create_token(path)


def test_an_empty_token_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("\n")
    path.chmod(0o600)
    with pytest.raises(ServeError, match="empty"):
        load_or_create_token(path)


def test_an_unwritable_directory_is_a_serve_error(tmp_path: Path) -> None:
    with pytest.raises(ServeError, match="cannot create"):
        load_or_create_token(tmp_path / "missing" / "token")


def test_paths_are_in_the_data_directory(tmp_path: Path) -> None:
    assert (socket_path(tmp_path), token_path(tmp_path)) == (
        tmp_path / "api.sock",
        tmp_path / "api-token",
    )


def test_accepts_connections(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    assert not accepts_connections(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    assert not accepts_connections(path)  # bound, not listening: a dead server's leftover
    listener.listen(1)
    assert accepts_connections(path)
    listener.close()
    assert not accepts_connections(path)
    os.unlink(path)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("nbs.example", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected
