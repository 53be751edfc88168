"""``nbs serve`` started the way systemd starts it: socket activation and sd_notify.

No systemd runs here; the test plays its part.  It opens the listening socket and hands it over
as fd 3 with LISTEN_PID/LISTEN_FDS (a small wrapper sets LISTEN_PID to the server's own PID
and execs it, as systemd does after fork), reads the server's notifications from a
NOTIFY_SOCKET datagram socket, and talks NBD through the passed socket with nbdinfo.  The unit
files are checked with ``systemd-analyze verify``.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest
import yaml

from backend.server.systemd import notify
from tests.integration.conftest import NBS, require_tool

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
SIZE = 64 << 20
O_CLOEXEC = 0o2000000  # the flag as /proc/PID/fdinfo shows it (octal)


class Notifications:
    """The service manager's end of $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[str] = []

    def wait_for(self, state: str, timeout: float = 20) -> list[str]:
        """Messages up to and including the first that has the line ``state``."""
        deadline = time.monotonic() + timeout
        messages: list[str] = []
        while True:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                raise AssertionError(f"no {state} within {timeout}s; got {messages}") from None
            messages.append(message)
            self.received.append(message)
            if state in message.split("\n"):
                return messages

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notifications(tmp_path: Path) -> Iterator[Notifications]:
    listener = Notifications(tmp_path / "notify")
    yield listener
    listener.close()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(SIZE)
    return path


# What systemd does between fork and exec: move the sockets to fds 3, 4, ... and set LISTEN_PID
# to the PID that execs nbs (sh cannot: dash redirects only fds 0-9).
_WRAPPER = """\
import os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
for i, fd in enumerate(fds):
    os.dup2(fd, 3 + i)
for fd in fds:
    if fd >= 3 + len(fds):
        os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES="nbd")
os.execv(sys.argv[2], sys.argv[2:])
"""


class Activated:
    """``nbs serve ARGS`` with ``sockets`` passed as fds 3, 4, ... and NOTIFY_SOCKET set."""

    def __init__(self, tmp_path: Path, sockets: list[socket.socket], notify_path: Path, *args: str):
        # Above every fd the wrapper writes to, so that moving one cannot clobber another.
        high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 10) for s in sockets]
        self.log_path = tmp_path / "nbs.log"
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WRAPPER, ",".join(map(str, high)), *NBS, "serve", *args],
                pass_fds=high,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
                cwd=ROOT,
            )
        for fd in high:
            os.close(fd)

    def fd_flags(self, fd: int) -> int:
        for line in Path(f"/proc/{self.process.pid}/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
        raise AssertionError(f"no flags for fd {fd}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


class Activate(Protocol):
    """The ``activate`` fixture: start ``nbs serve`` as systemd would, passing ``sockets``."""

    def __call__(
        self, sockets: list[socket.socket], notify_path: Path, *args: str
    ) -> Activated: ...


@pytest.fixture
def activate(tmp_path: Path) -> Iterator[Activate]:
    started: list[Activated] = []

    def start(sockets: list[socket.socket], notify_path: Path, *args: str) -> Activated:
        server = Activated(tmp_path, sockets, notify_path, *args)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def test_socket_activated_server_notifies_readiness_and_serves_the_passed_socket(
    activate: Activate, notifications: Notifications, disk: Path
) -> None:
    nbdinfo = require_tool("nbdinfo")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = activate([listener], notifications.path, "--export", f"disk={disk}")
    listener.close()  # from now on only the server holds it, as after systemd's exec

    messages = notifications.wait_for("READY=1")
    status = [line for line in messages[-1].split("\n") if line.startswith("STATUS=")]
    assert status == [f"STATUS=serving disk on nbd://127.0.0.1:{port}"]
    assert server.fd_flags(3) & O_CLOEXEC  # no child process inherits the listener
    assert f"listening on nbd://127.0.0.1:{port} " in server.log()
    assert "using 1 socket(s) from socket activation (nbd)" in server.log()

    result = subprocess.run(
        [nbdinfo, "--json", f"nbd://127.0.0.1:{port}/disk"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["exports"][0]["export-size"] == SIZE

    server.process.send_signal(signal.SIGTERM)
    notifications.wait_for("STOPPING=1")
    assert server.stop() == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_reload_is_announced_with_reloading_then_ready(
    activate: Activate, notifications: Notifications, disk: Path, tmp_path: Path
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    config = tmp_path / "nbs.yaml"
    config.write_text(f"exports: [{{name: disk, path: {disk}}}]\n")
    server = activate([listener], notifications.path, "--config", str(config))
    listener.close()
    notifications.wait_for("READY=1")

    server.process.send_signal(signal.SIGHUP)
    reloading = notifications.wait_for("RELOADING=1")[-1].split("\n")
    assert any(line.startswith("MONOTONIC_USEC=") for line in reloading)
    assert notifications.wait_for("READY=1")[-1].startswith("READY=1\nSTATUS=serving disk")

    config.write_text("exports: [{name: disk}]\n")  # broken: no path
    server.process.send_signal(signal.SIGHUP)
    notifications.wait_for("RELOADING=1")
    ready = notifications.wait_for("READY=1")[-1]
    assert "STATUS=reload failed: " in ready
    assert "exports[0].path: required" in ready
    assert server.stop() == 0


def test_accept_yes_sockets_are_refused_with_a_clear_error(
    activate: Activate, notifications: Notifications, disk: Path
) -> None:
    left, right = socket.socketpair()  # a connection, as Accept=yes would pass
    with left, right:
        server = activate([left], notifications.path, "--export", f"disk={disk}")
        assert server.process.wait(30) == 2
    assert "not a listening stream socket" in server.log()
    assert notifications.received == []


def test_notify_reaches_path_and_abstract_sockets(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as path_socket:
        path_socket.bind(str(tmp_path / "n"))
        assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "n")})
        assert path_socket.recv(64) == b"READY=1"
    name = f"nbs-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract:
        abstract.bind(f"\0{name}")
        assert notify("STATUS=x\nSTOPPING=1", {"NOTIFY_SOCKET": f"@{name}"})
        assert abstract.recv(64) == b"STATUS=x\nSTOPPING=1"


def test_notify_without_a_service_manager_is_a_no_op(tmp_path: Path) -> None:
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert not notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"})


def test_socket_unit_and_ansible_role_listen_on_loopback_only() -> None:
    """Plain NBD has no authentication: nothing but this host may reach the shipped port."""
    streams = [
        line.removeprefix("ListenStream=")
        for line in (UNITS / "nbs.socket").read_text().splitlines()
        if line.startswith("ListenStream=")
    ]
    assert streams == ["127.0.0.1:10809"]
    defaults = ROOT / "ansible" / "roles" / "nbs_storage" / "defaults" / "main.yml"
    assert yaml.safe_load(defaults.read_text())["nbs_storage_nbd_listen"] == streams


def test_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    nbs = Path(sys.executable).with_name("nbs")
    if not nbs.exists():
        nbs = Path(shutil.which("nbs") or "/usr/local/bin/nbs")
    # verify wants ExecStart= to exist: point it at this environment's nbs.
    service = (UNITS / "nbs.service").read_text()
    assert "ExecStart=/usr/local/bin/nbs serve --config /etc/nbs/nbs.yaml\n" in service
    (tmp_path / "nbs.service").write_text(service.replace("/usr/local/bin/nbs", str(nbs)))
    shutil.copy(UNITS / "nbs.socket", tmp_path / "nbs.socket")
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "nbs.service"), str(tmp_path / "nbs.socket")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # unknown keys and bad values are warnings: none allowed
