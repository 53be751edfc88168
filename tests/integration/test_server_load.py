"""One client must not hurt the others: memory given back, workers never held by a slow
reader (issue 10, items 9 and 10).  Real ``nbs serve`` processes, raw and libnbd clients,
loopback only; bounds on time are generous and only make a hang fail."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import NbsServer, require_module
from tests.integration.rawnbd import CMD_READ, CMD_WRITE, REQUEST_MAGIC, RawClient
from tests.integration.serverproc import open_sockets, rss_bytes, wait_for_sockets

nbd = require_module("nbd")

MiB = 1 << 20


@pytest.fixture
def server(nbs_server: Callable[..., NbsServer], tmp_path: Path) -> NbsServer:
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(512 * MiB)
    return nbs_server("--listen", "127.0.0.1:0", "--export", f"disk={disk}")


def ordinary_session(server: NbsServer, data: bytes, offset: int) -> None:
    h = nbd.NBD()
    h.connect_uri(server.uri("disk"))
    try:
        h.pwrite(data, offset)
        assert h.pread(len(data), offset) == data
    finally:
        h.shutdown()


def test_memory_returns_near_idle_after_abandoned_large_writes_and_many_sessions(
    server: NbsServer,
) -> None:
    pid = server.process.pid
    ordinary_session(server, b"\x01" * MiB, 0)  # warm up: pool threads, imports
    idle_sockets = open_sockets(pid)
    idle = rss_bytes(pid)
    figures = [idle]
    for _ in range(4):
        clients = [RawClient(server.port) for _ in range(16)]
        for c in clients:
            c.start()
            c.go("disk")
            # A 32 MiB WRITE announced, one byte of it sent, then the client leaves.
            c.sock.sendall(
                struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 1, 0, 32 * MiB) + b"x"
            )
        time.sleep(0.5)  # let every session take its byte
        for c in clients:
            c.close()
        wait_for_sockets(pid, idle_sockets)
        figures.append(rss_bytes(pid))
    data = b"\x02" * MiB
    for i in range(400):
        ordinary_session(server, data, (i % 64) * MiB)
    wait_for_sockets(pid, idle_sockets)
    figures.append(rss_bytes(pid))
    print("RSS MiB: idle, after each of 4 rounds, after 400 sessions:", [f // MiB for f in figures])
    assert max(figures) - idle < 32 * MiB, [f // MiB for f in figures]
    assert server.alive()


def test_slow_reader_does_not_stall_other_clients_large_io(server: NbsServer) -> None:
    slow = RawClient(server.port)
    slow.start()
    slow.go("disk")
    slow.sock.sendall(
        b"".join(
            struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, i, (i % 64) * 4 * MiB, 4 * MiB)
            for i in range(64)
        )
    )  # and never reads a reply: 256 MiB of replies wait on its socket
    time.sleep(1)
    latencies: list[float] = []
    other = RawClient(server.port)  # its socket times out after 20 s: a stall fails the test
    try:
        other.start()
        other.go("disk")
        data = b"\x07" * MiB
        for i in range(20):
            start = time.monotonic()
            offset = 300 * MiB + i * MiB
            other.request(CMD_WRITE, 100 + i, offset, MiB, payload=data)
            assert other.simple_reply() == (0, 100 + i)
            assert other.read(200 + i, offset, MiB) == data
            latencies.append(time.monotonic() - start)
    finally:
        other.close()
        slow.close()
    print(
        "other client's 1 MiB write+read with a slow reader present, ms:"
        f" max {max(latencies) * 1000:.1f}, median {sorted(latencies)[10] * 1000:.1f}"
    )
    assert server.alive()
