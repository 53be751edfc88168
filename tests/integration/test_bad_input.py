"""Raw-socket clients that break the NBD protocol (doc/proto.md) in many ways.

Every message is built here from the spec, byte by byte.  After each misbehaving client the
server must still be running, serve a fresh nbdinfo and libnbd client, and still hold the
data written (and flushed) before the bad client came.
"""

from __future__ import annotations

import random
import socket
import struct

import pytest

from tests.integration.conftest import require_module
from tests.integration.rawnbd import (
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_READ,
    CMD_WRITE,
    EINVAL,
    ERR_INVALID,
    ERR_POLICY,
    ERR_TOO_BIG,
    ERR_UNKNOWN,
    ERR_UNSUP,
    FLAG_FIXED_NEWSTYLE,
    IHAVEOPT,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_EXTENDED_HEADERS,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    PATTERN,
    PATTERN_OFFSET,
    REP_ACK,
    REP_SERVER,
    REQUEST_MAGIC,
    SIZE,
    Target,
    target,
)

nbd = require_module("nbd")  # python3-libnbd, a Debian package

__all__ = ["target"]  # the fixture (tests.integration.rawnbd)

KiB = 1 << 10
MiB = 1 << 20


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
