"""Where the server of a data directory publishes its management API to users on its machine.

    DATA/api.sock     the API over HTTP on a Unix socket, mode 0600 (the server's user only)
    DATA/api-token    the bearer token, mode 0600, made on the first start and kept after

A CLI that can open both acts on the running server through them instead of opening the
catalogue itself (backend.api.client.client_for).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import socket
import stat
from pathlib import Path

from backend.server.server import ServeError

SOCKET_NAME = "api.sock"
TOKEN_NAME = "api-token"
TOKEN_BYTES = 32  # 256 bits of randomness, 43 URL-safe characters


def socket_path(data_dir: Path) -> Path:
    return data_dir / SOCKET_NAME


def token_path(data_dir: Path) -> Path:
    return data_dir / TOKEN_NAME


def load_or_create_token(path: Path) -> str:
    """The token kept in ``path``; a new random one written there (mode 0600) if it is missing.

    For ``nbs serve``.  Raises ServeError when the file cannot be read or written, is empty,
    or can be read by other users (a token anyone can read protects nothing).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return _read_existing(path)
    except OSError as err:
        raise ServeError(f"cannot create the API token file {path}: {err.strerror}") from err
    token = secrets.token_urlsafe(TOKEN_BYTES)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        with contextlib.suppress(OSError):
            path.unlink()
        raise ServeError(f"cannot write the API token file {path}: {err.strerror}") from err
    return token


def _read_existing(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ServeError(f"cannot read the API token file {path}: {err}") from err
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ServeError(
            f"the API token file {path} is accessible to other users: chmod 600 it, or delete"
            " it to get a new token"
        )
    if not token:
        raise ServeError(f"the API token file {path} is empty: delete it to get a new token")
    return token


def accepts_connections(path: Path, timeout: float = 1.0) -> bool:
    """True if a process listens on the Unix socket ``path`` and lets this user connect."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1): traffic to them
    never leaves the machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
