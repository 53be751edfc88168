"""A raw NBD client for tests that must send exactly the bytes they choose (bad ones too).

Built from the spec (doc/proto.md in NetworkBlockDevice/nbd), never from backend.nbd, so the
server is checked against an independent reading of the protocol.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import NbsServer, require_module, require_tool

KiB = 1 << 10
MiB = 1 << 20
SIZE = 64 * MiB  # the conftest ``disk`` fixture's size
PATTERN_OFFSET = 1 * MiB
PATTERN = random.Random(41).randbytes(64 * KiB)

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR = 1 << 31
ERR_UNSUP = REP_ERR | 1
ERR_POLICY = REP_ERR | 2
ERR_INVALID = REP_ERR | 3
ERR_UNKNOWN = REP_ERR | 6
ERR_TOO_BIG = REP_ERR | 9

INFO_EXPORT = 0

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_BLOCK_STATUS = 7

EINVAL = 22


class RawClient:
    """A blocking NBD client that sends exactly the bytes it is told to."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)

    def close(self) -> None:
        self.sock.close()

    def recv_exact(self, size: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            chunk = self.sock.recv(size - len(chunks))
            if not chunk:
                raise EOFError(f"server closed after {len(chunks)} of {size} bytes")
            chunks += chunk
        return bytes(chunks)

    # handshake

    def greeting(self) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBDMAGIC
        assert opt_magic == IHAVEOPT
        assert flags & FLAG_FIXED_NEWSTYLE
        return int(flags)

    def start(self, client_flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> None:
        self.greeting()
        self.sock.sendall(struct.pack(">I", client_flags))

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPTION_REPLY_MAGIC, f"bad option reply magic {magic:#x}"
        return option, reply, self.recv_exact(length)

    def option_replies(self, option: int) -> list[tuple[int, bytes]]:
        """Every reply to ``option`` up to and including the final ACK or error."""
        replies = []
        while True:
            got, reply, data = self.option_reply()
            assert got == option, f"reply for option {got}, expected {option}"
            replies.append((reply, data))
            if reply == REP_ACK or reply & REP_ERR:
                return replies

    def go(self, name: str = "disk") -> tuple[int, int]:
        raw = name.encode()
        self.send_option(OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        replies = self.option_replies(OPT_GO)
        assert replies[-1][0] == REP_ACK, replies
        for reply, data in replies:
            if reply == REP_INFO and struct.unpack_from(">H", data)[0] == INFO_EXPORT:
                _, size, flags = struct.unpack(">HQH", data)
                return size, flags
        raise AssertionError(f"no NBD_INFO_EXPORT in {replies}")

    # transmission

    def request(
        self,
        command: int,
        cookie: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        payload: bytes = b"",
        magic: int = REQUEST_MAGIC,
    ) -> None:
        header = struct.pack(">IHHQQI", magic, flags, command, cookie, offset, length)
        self.sock.sendall(header + payload)

    def simple_reply(self) -> tuple[int, int]:
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        return error, cookie

    def read(self, cookie: int, offset: int, length: int) -> bytes:
        self.request(CMD_READ, cookie, offset, length)
        assert self.simple_reply() == (0, cookie)
        return self.recv_exact(length)

    def drain_until_closed(self, timeout: float = 10) -> bytes:
        """Everything the server sends until it closes; fails if it keeps the link open."""
        self.sock.settimeout(timeout)
        received = bytearray()
        try:
            while chunk := self.sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            pytest.fail(f"server kept the connection open ({len(received)} bytes received)")
        return bytes(received)


@dataclasses.dataclass
class Target:
    server: NbsServer
    disk: Path

    @property
    def uri(self) -> str:
        return self.server.uri("disk")

    @contextlib.contextmanager
    def raw(self) -> Iterator[RawClient]:
        client = RawClient(self.server.port)
        try:
            yield client
        finally:
            client.close()

    def assert_healthy(self) -> None:
        """Still serving (nbdinfo, libnbd), and the pattern written first is intact."""
        nbd = require_module("nbd")
        assert self.server.alive(), self.server.log()
        result = subprocess.run(
            [require_tool("nbdinfo"), "--size", self.uri],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert int(result.stdout) == SIZE
        h = nbd.NBD()
        h.connect_uri(self.uri)
        try:
            assert h.pread(len(PATTERN), PATTERN_OFFSET) == PATTERN
        finally:
            h.shutdown()
        with self.disk.open("rb") as f:
            f.seek(PATTERN_OFFSET)
            assert f.read(len(PATTERN)) == PATTERN


@pytest.fixture
def target(nbs_server: Callable[..., NbsServer], disk: Path) -> Iterator[Target]:
    """A server with export ``disk`` holding PATTERN at PATTERN_OFFSET, healthy before and
    after the test (import the fixture into the test module)."""
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"disk={disk}")
    h = require_module("nbd").NBD()
    h.connect_uri(server.uri("disk"))
    try:
        h.pwrite(PATTERN, PATTERN_OFFSET)
        h.flush()
    finally:
        h.shutdown()
    t = Target(server, disk)
    t.assert_healthy()
    yield t
    t.assert_healthy()
