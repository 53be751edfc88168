"""Requests over 32 MiB, up to the configured maximum (default 64 MiB), streamed to and from
storage in pieces; longer ones refused per the spec (issue 10, item 19).

Raw requests with simple replies, libnbd with structured replies, against a real ``nbs serve``.
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import NBS, NbsServer, require_module, require_tool
from tests.integration.rawnbd import (
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    EINVAL,
    REQUEST_MAGIC,
    RawClient,
)

nbd = require_module("nbd")

MiB = 1 << 20
DISK = 512 * MiB
CMD_WRITE_ZEROES = 6
ENOSPC = 28


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "big.img"
    with path.open("wb") as f:
        f.truncate(DISK)
    return path


@pytest.fixture
def server(nbs_server: Callable[..., NbsServer], disk: Path) -> NbsServer:
    return nbs_server("--listen", "127.0.0.1:0", "--export", f"disk={disk}")


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def connected(server: NbsServer) -> RawClient:
    c = RawClient(server.port)
    c.start()
    c.go("disk")
    return c


def test_64mib_write_and_read_with_simple_replies(server: NbsServer, disk: Path) -> None:
    data = random.Random(19).randbytes(64 * MiB)
    c = connected(server)
    try:
        c.request(CMD_WRITE, 1, 3 * MiB, len(data), payload=data)
        assert c.simple_reply() == (0, 1)
        assert c.read(2, 3 * MiB, len(data)) == data
        c.request(CMD_FLUSH, 3)
        assert c.simple_reply() == (0, 3)
    finally:
        c.close()
    assert file_bytes(disk, 3 * MiB, len(data)) == data


def test_64mib_write_and_read_with_structured_replies(server: NbsServer, disk: Path) -> None:
    data = random.Random(20).randbytes(40 * MiB)
    h = nbd.NBD()
    h.connect_uri(server.uri("disk"))
    try:
        assert h.get_structured_replies_negotiated()
        h.pwrite(data, 100 * MiB)
        # A 64 MiB read over data and a hole: several chunks, holes as holes.
        got = h.pread(64 * MiB, 90 * MiB)
        assert got == bytes(10 * MiB) + data + bytes(14 * MiB)
    finally:
        h.shutdown()
    assert file_bytes(disk, 100 * MiB, len(data)) == data


def test_write_zeroes_and_trim_longer_than_the_maximum(server: NbsServer, disk: Path) -> None:
    pattern = b"\x5a" * (8 * MiB)
    c = connected(server)
    try:
        for offset in (0, 150 * MiB, 299 * MiB):
            c.request(CMD_WRITE, 1, offset, len(pattern), payload=pattern)
            assert c.simple_reply() == (0, 1)
        c.request(CMD_WRITE_ZEROES, 2, 0, 200 * MiB)  # no payload: no length limit
        assert c.simple_reply() == (0, 2)
        c.request(CMD_TRIM, 3, 200 * MiB, 200 * MiB)
        assert c.simple_reply() == (0, 3)
        assert c.read(4, 150 * MiB, MiB) == bytes(MiB)
    finally:
        c.close()
    assert file_bytes(disk, 0, 8 * MiB) == bytes(8 * MiB)
    assert file_bytes(disk, 299 * MiB, 8 * MiB) == bytes(8 * MiB)


def test_requests_over_the_maximum_get_einval_and_the_connection_survives(
    server: NbsServer, disk: Path
) -> None:
    # The refused payload is made of valid TRIM requests: if the server parsed any of it as
    # requests, the pattern would be gone and stray replies would come back.
    pattern = b"\x3c" * 4096
    trim = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_TRIM, 0xBAD, 40 * MiB, 4096)
    over = 64 * MiB + 4096
    payload = (trim * (over // len(trim) + 1))[:over]
    c = connected(server)
    try:
        c.request(CMD_WRITE, 1, 40 * MiB, 4096, payload=pattern)
        assert c.simple_reply() == (0, 1)
        c.request(CMD_READ, 2, 0, over)
        assert c.simple_reply() == (EINVAL, 2)  # and no data follows
        c.request(CMD_WRITE, 3, 0, over, payload=payload)
        assert c.simple_reply() == (EINVAL, 3)
        c.request(CMD_WRITE, 4, DISK - MiB, 2 * MiB, payload=bytes(2 * MiB))
        assert c.simple_reply() == (ENOSPC, 4)  # past the end: the spec's ENOSPC
        assert c.read(5, 40 * MiB, 4096) == pattern
        c.request(CMD_DISC, 6)
        assert c.drain_until_closed() == b""
    finally:
        c.close()
    assert file_bytes(disk, 0, 4096) == bytes(4096)
    assert server.alive()


def test_client_leaving_mid_64mib_write_keeps_the_server_serving(server: NbsServer) -> None:
    c = connected(server)
    c.request(CMD_WRITE, 1, 0, 64 * MiB, payload=b"\x11" * (9 * MiB))  # two pieces and a bit
    c.close()
    h = nbd.NBD()
    h.connect_uri(server.uri("disk"))
    try:
        h.pwrite(b"\x22" * MiB, 0)
        assert h.pread(MiB, 0) == b"\x22" * MiB
    finally:
        h.shutdown()


def test_max_request_is_configurable_and_advertised(
    nbs_server: Callable[..., NbsServer], disk: Path
) -> None:
    server = nbs_server(
        "--listen", "127.0.0.1:0", "--export", f"disk={disk}", "--max-request", "128MiB"
    )
    info = subprocess.run(
        [require_tool("nbdinfo"), "--json", server.uri("disk")],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(info.stdout)["exports"][0]["block_size_maximum"] == 128 * MiB
    data = random.Random(21).randbytes(96 * MiB)
    c = connected(server)
    try:
        c.request(CMD_WRITE, 1, 0, len(data), payload=data)
        assert c.simple_reply() == (0, 1)
        assert c.read(2, 0, len(data)) == data
    finally:
        c.close()


def test_default_maximum_is_advertised(server: NbsServer) -> None:
    info = subprocess.run(
        [require_tool("nbdinfo"), "--json", server.uri("disk")],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(info.stdout)["exports"][0]["block_size_maximum"] == 64 * MiB


@pytest.mark.parametrize("value", ["3MiB", "2GiB", "512KiB", "lots"])
def test_bad_max_request_is_one_line_and_exit_code_2(value: str, disk: Path) -> None:
    result = subprocess.run(
        [
            *NBS,
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--export",
            f"disk={disk}",
            "--max-request",
            value,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "power of two" in result.stderr
