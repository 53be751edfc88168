"""One client must not exhaust the server: handshake deadline, connection limits, fd exhaustion.

Every test runs a real ``nbs serve`` and talks to it over loopback with raw sockets (to play a
misbehaving client) and libnbd (to show that well-behaved clients are still served).
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import signal
import socket
import struct
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.integration.conftest import NbsServer, require_module
from tests.integration.helpers import free_port, nbs

if TYPE_CHECKING:
    import nbd as libnbd  # for annotations: at run time require_module gives nbd

nbd = require_module("nbd")  # python3-libnbd, a Debian package

GREETING = 18  # NBDMAGIC, IHAVEOPT, handshake flags
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def greeting(sock: socket.socket, timeout: float = 10) -> bytes:
    """The server's first 18 bytes, or what arrived before it closed (b"": refused)."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while len(data) < GREETING:
            chunk = sock.recv(GREETING - len(data))
            if not chunk:
                break
            data += chunk
    return data


def greeted_within(sock: socket.socket, timeout: float) -> bool:
    try:
        return greeting(sock, timeout)[:8] == b"NBDMAGIC"
    except TimeoutError:
        return False


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True if the server closes ``sock`` within ``timeout`` seconds."""
    ready, _, _ = select.select([sock], [], [], timeout)
    if not ready:
        return False
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


@contextlib.contextmanager
def libnbd_client(server: NbsServer) -> Iterator[libnbd.NBD]:
    handle = nbd.NBD()
    handle.connect_uri(server.uri("disk"))
    try:
        yield handle
    finally:
        handle.shutdown()
        del handle


def still_serves(server: NbsServer, timeout: float = 10) -> None:
    """A well-behaved client is served (once the server has seen the others leave)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with libnbd_client(server) as handle:
                handle.pwrite(b"x" * 4096, 0)
                assert handle.pread(4096, 0) == b"x" * 4096
            return
        except nbd.Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def scrape(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in the metrics")


def test_handshake_deadline_cuts_a_client_that_trickles_bytes(
    nbs_server: Callable[..., NbsServer], disk: Path
) -> None:
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"disk={disk}",
                        "--handshake-timeout", "2")  # fmt: skip
    trickler = connect(server.port)
    started = time.monotonic()
    assert greeting(trickler)[:8] == b"NBDMAGIC"
    # Client flags, then an NBD_OPT_GO whose 1000 bytes of data never all arrive: one byte
    # every 0.3 s keeps any per-recv timeout from firing.
    message = struct.pack(">L8sLL", 3, b"IHAVEOPT", 7, 1000) + b"n" * 1000
    cut = False
    with trickler:
        for byte in message[:40]:
            try:
                trickler.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                cut = True
                break
            if closed_by_server(trickler, 0.3):
                cut = True
                break
    elapsed = time.monotonic() - started
    assert cut, "a client trickling bytes was still connected after 12 s"
    assert 1.5 < elapsed < 6, elapsed
    assert "handshake not finished within 2 s" in server.log()
    still_serves(server)


def test_connections_over_max_connections_are_closed_while_others_keep_working(
    nbs_server: Callable[..., NbsServer], disk: Path
) -> None:
    metrics_port = free_port()
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"disk={disk}",
                        "--max-connections", "3",
                        "--metrics-listen", f"127.0.0.1:{metrics_port}")  # fmt: skip
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(libnbd_client(server)) for _ in range(3)]
        for _ in range(5):
            with connect(server.port) as extra:
                assert greeting(extra) == b""  # closed before the greeting
        with pytest.raises(nbd.Error), libnbd_client(server):
            pass
        for i, handle in enumerate(clients):
            handle.pwrite(bytes([i]) * 512, i * 512)
            assert handle.pread(512, i * 512) == bytes([i]) * 512
        assert scrape(metrics_port, "nbs_connections_refused_total") == 6
    still_serves(server)
    refusals = [line for line in server.log().splitlines() if "connection refused" in line]
    # Logged once per interval with a count of what was left out, not once per connection.
    assert len(refusals) == 1, refusals
    assert "3 connections open (max_connections)" in refusals[0]


def test_per_client_limit_refuses_one_address_and_serves_another(
    nbs_server: Callable[..., NbsServer], disk: Path
) -> None:
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"disk={disk}",
                        "--max-connections-per-client", "2")  # fmt: skip
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(connect(server.port)) for _ in range(2)]
        assert all(greeting(sock)[:8] == b"NBDMAGIC" for sock in held)
        with connect(server.port) as third:
            assert greeting(third) == b""
        with connect(server.port, source="127.0.0.2") as other_client:
            assert greeting(other_client)[:8] == b"NBDMAGIC"
    # The held connections closed: the address may connect again.
    still_serves(server)
    assert "2 connections open from 127.0.0.1 (max_connections_per_client)" in server.log()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def test_out_of_fds_the_accept_loop_backs_off_and_recovers(
    nbs_server: Callable[..., NbsServer], disk: Path
) -> None:
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"disk={disk}")
    pid = server.process.pid
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    limit = in_use + 10
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
    with contextlib.ExitStack() as stack:
        # More connections than the server has fds: the rest wait in the listen backlog.
        socks = [stack.enter_context(connect(server.port)) for _ in range(30)]
        time.sleep(2)
        served = [sock for sock in socks if greeted_within(sock, 0.05)]
        waiting = [sock for sock in socks if sock not in served]
        assert 0 < len(served) <= 10
        assert waiting

        before = cpu_seconds(pid)
        time.sleep(4)
        busy = cpu_seconds(pid) - before
        failures = [line for line in server.log().splitlines() if "accept failed" in line]
        print(f"out of fds for 4 s: {busy:.2f} CPU-s, {len(failures)} log lines")
        assert busy < 0.5, f"{busy:.2f} CPU seconds in 4 s out of fds"
        assert 1 <= len(failures) <= 3, failures[:5]

        for sock in served:
            sock.close()
        # Freed fds let the queued clients in (after at most one pause of the backoff).
        assert all(greeting(sock)[:8] == b"NBDMAGIC" for sock in waiting[:5])
    still_serves(server)


def test_reload_applies_new_limits_to_new_connections(
    nbs_server: Callable[..., NbsServer], disk: Path, tmp_path: Path
) -> None:
    config = tmp_path / "nbs.yaml"
    config.write_text(f"exports: [{{name: disk, path: {disk}}}]\nmax_connections: 1\n")
    server = nbs_server("--listen", "127.0.0.1:0", "--config", str(config))
    with connect(server.port) as first:
        assert greeted_within(first, 10)
        with connect(server.port) as second:
            assert greeting(second) == b""
        config.write_text(f"exports: [{{name: disk, path: {disk}}}]\nmax_connections: 2\n")
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "reloaded" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        with connect(server.port) as second:
            assert greeted_within(second, 10)  # the open connection was kept all along


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--max-connections", "0"),
        ("--max-connections-per-client", "9" * 5000),
        ("--handshake-timeout", "nan"),
        ("--handshake-timeout", "-1"),
    ],
)
def test_bad_limits_are_one_line_and_exit_code_2(option: str, value: str) -> None:
    result = nbs("serve", "--listen", "127.0.0.1:0", option, value, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"nbs: error: argument {option}: expected ")
