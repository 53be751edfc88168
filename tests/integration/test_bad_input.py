"""Raw-socket clients that break the NBD protocol (doc/proto.md) in many ways.

Every message is built here from the spec, byte by byte.  After each misbehaving client the
server must still be running, serve a fresh nbdinfo and libnbd client, and still hold the
data written (and flushed) before the bad client came.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import NbsServer, require_tool

try:
    import nbd
except ImportError:  # pragma: no cover - depends on the machine
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("python3-libnbd is not installed (run scripts/setup)", allow_module_level=True)

KiB = 1 << 10
MiB = 1 << 20
SIZE = 64 * MiB

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

PATTERN_OFFSET = 1 * MiB
PATTERN = random.Random(41).randbytes(64 * KiB)


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
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"disk={disk}")
    h = nbd.NBD()
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


# ---------------------------------------------------------------------- handshake


def test_unknown_client_flags_close_the_connection(target: Target) -> None:
    with target.raw() as c:
        c.start(FLAG_FIXED_NEWSTYLE | 1 << 31)
        assert c.drain_until_closed() == b""
    target.assert_healthy()


def test_bad_option_magic_closes_the_connection(target: Target) -> None:
    with target.raw() as c:
        c.start()
        c.sock.sendall(b"NOTMAGIC" + struct.pack(">II", OPT_LIST, 0))
        assert c.drain_until_closed() == b""
    target.assert_healthy()


def test_truncated_option_then_close(target: Target) -> None:
    with target.raw() as c:
        c.start()
        c.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, 100) + b"\0" * 10)
        c.sock.shutdown(socket.SHUT_WR)
        # Half an option is not answered; the server just closes.
        assert c.drain_until_closed() == b""
    target.assert_healthy()


def test_option_longer_than_64k_gets_err_too_big_and_negotiation_continues(
    target: Target,
) -> None:
    with target.raw() as c:
        c.start()
        name = b"d" * (70_000 - 6)
        c.send_option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        [(reply, message)] = c.option_replies(OPT_GO)
        assert reply == ERR_TOO_BIG, f"{reply:#x} {message!r}"
        # The oversized payload was skipped: the next option is parsed normally.
        c.send_option(OPT_LIST)
        replies = c.option_replies(OPT_LIST)
        assert replies[-1][0] == REP_ACK
        names = [data[4 : 4 + struct.unpack_from(">I", data)[0]] for r, data in replies[:-1]]
        assert all(r == REP_SERVER for r, _ in replies[:-1])
        assert names == [b"disk"]
        size, _ = c.go("disk")
        assert size == SIZE
        assert c.read(1, PATTERN_OFFSET, len(PATTERN)) == PATTERN
    target.assert_healthy()


def test_unknown_option_gets_err_unsup_and_go_still_works(target: Target) -> None:
    with target.raw() as c:
        c.start()
        c.send_option(0x4242, b"hello")
        [(reply, _)] = c.option_replies(0x4242)
        assert reply == ERR_UNSUP
        size, flags = c.go("disk")
        assert size == SIZE
        assert flags & 1  # NBD_FLAG_HAS_FLAGS
        assert c.read(1, PATTERN_OFFSET, 4096) == PATTERN[:4096]
    target.assert_healthy()


def test_extended_headers_option_is_unsupported(target: Target) -> None:
    with target.raw() as c:
        c.start()
        c.send_option(OPT_EXTENDED_HEADERS)
        [(reply, _)] = c.option_replies(OPT_EXTENDED_HEADERS)
        assert reply == ERR_UNSUP
        c.go("disk")
        # Compact request headers and simple replies are still what is spoken.
        assert c.read(1, PATTERN_OFFSET, 512) == PATTERN[:512]
    target.assert_healthy()


def test_option_errors_leave_negotiation_usable(target: Target) -> None:
    with target.raw() as c:
        c.start()
        c.send_option(OPT_LIST, b"junk")
        assert [r for r, _ in c.option_replies(OPT_LIST)] == [ERR_INVALID]
        missing = b"no-such-export"
        c.send_option(OPT_GO, struct.pack(">I", len(missing)) + missing + b"\0\0")
        assert [r for r, _ in c.option_replies(OPT_GO)] == [ERR_UNKNOWN]
        c.send_option(OPT_GO, b"\0\0")  # truncated GO payload
        assert [r for r, _ in c.option_replies(OPT_GO)] == [ERR_INVALID]
        c.send_option(OPT_STARTTLS)  # no TLS configured
        [(reply, _)] = c.option_replies(OPT_STARTTLS)
        assert reply in (ERR_UNSUP, ERR_POLICY)
        query = b"base:allocation"
        payload = struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, len(query)) + query
        c.send_option(OPT_SET_META_CONTEXT, payload)  # before structured replies
        assert [r for r, _ in c.option_replies(OPT_SET_META_CONTEXT)] == [ERR_INVALID]
        c.send_option(OPT_INFO, struct.pack(">I", 4) + b"disk" + b"\0\0")
        replies = c.option_replies(OPT_INFO)
        assert replies[-1][0] == REP_ACK
        assert c.go("disk")[0] == SIZE
        assert c.read(2, PATTERN_OFFSET, 512) == PATTERN[:512]
    target.assert_healthy()


def test_abort_is_acknowledged_then_closed(target: Target) -> None:
    with target.raw() as c:
        c.start()
        c.send_option(OPT_ABORT)
        assert c.option_reply() == (OPT_ABORT, REP_ACK, b"")
        assert c.drain_until_closed() == b""
    target.assert_healthy()


def test_export_name_for_unknown_export_closes(target: Target) -> None:
    with target.raw() as c:
        c.start()
        c.send_option(OPT_EXPORT_NAME, b"no-such-export")
        # EXPORT_NAME cannot be answered with an error: the server hangs up.
        assert c.drain_until_closed() == b""
    target.assert_healthy()


# ---------------------------------------------------------------------- transmission


def test_bad_request_magic_disconnects(target: Target) -> None:
    with target.raw() as c:
        c.start()
        c.go("disk")
        assert c.read(1, PATTERN_OFFSET, 512) == PATTERN[:512]
        c.request(CMD_READ, 2, 0, 512, magic=0xDEADBEEF)
        assert c.drain_until_closed() == b""
    target.assert_healthy()


def test_unknown_command_gets_einval_and_the_connection_continues(target: Target) -> None:
    with target.raw() as c:
        c.start()
        c.go("disk")
        c.request(0x42, 0x1122334455667788, 0, 512)
        assert c.simple_reply() == (EINVAL, 0x1122334455667788)
        assert c.read(2, PATTERN_OFFSET, 4096) == PATTERN[:4096]
    target.assert_healthy()


@pytest.mark.parametrize("flags", [1 << 7, 1 << 15, 1 << 1], ids=["0x80", "0x8000", "no-hole"])
def test_read_with_invalid_flags_gets_einval_without_payload(target: Target, flags: int) -> None:
    with target.raw() as c:
        c.start()
        c.go("disk")
        c.request(CMD_READ, 5, PATTERN_OFFSET, 512, flags=flags)
        # A failed simple READ reply carries no data: the next reply follows directly.
        assert c.simple_reply() == (EINVAL, 5)
        assert c.read(6, PATTERN_OFFSET, 512) == PATTERN[:512]
    target.assert_healthy()


def test_block_status_without_meta_context_gets_einval(target: Target) -> None:
    with target.raw() as c:
        c.start()
        c.go("disk")
        c.request(CMD_BLOCK_STATUS, 3, 0, MiB)
        assert c.simple_reply() == (EINVAL, 3)
        assert c.read(4, PATTERN_OFFSET, 512) == PATTERN[:512]
    target.assert_healthy()


def test_garbage_after_handshake_disconnects(target: Target) -> None:
    garbage = bytearray(random.Random(42).randbytes(4096))
    garbage[:4] = b"\xde\xad\xbe\xef"
    with target.raw() as c:
        c.start()
        c.go("disk")
        c.sock.sendall(garbage)
        assert c.drain_until_closed() == b""
    target.assert_healthy()


def test_garbage_instead_of_a_handshake(target: Target) -> None:
    with target.raw() as c:
        c.greeting()
        c.sock.sendall(random.Random(43).randbytes(1000))
        assert c.drain_until_closed() == b""
    target.assert_healthy()


def test_client_vanishing_mid_write_writes_nothing(target: Target) -> None:
    offset = 32 * MiB
    with target.raw() as c:
        c.start()
        c.go("disk")
        c.request(CMD_WRITE, 9, offset, MiB, payload=b"\xee" * (512 * KiB))
    target.assert_healthy()
    h = nbd.NBD()
    h.connect_uri(target.uri)
    try:
        assert h.pread(MiB, offset) == bytes(MiB)
    finally:
        h.shutdown()


def test_client_vanishing_after_a_request_header(target: Target) -> None:
    with target.raw() as c:
        c.start()
        c.go("disk")
        c.sock.sendall(struct.pack(">IHHQ", REQUEST_MAGIC, 0, CMD_READ, 1))  # half a header
    target.assert_healthy()


def test_disconnect_request_closes_cleanly(target: Target) -> None:
    with target.raw() as c:
        c.start()
        c.go("disk")
        c.request(CMD_DISC, 1)
        assert c.drain_until_closed() == b""
    target.assert_healthy()
