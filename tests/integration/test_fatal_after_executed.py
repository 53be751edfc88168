"""A fatal message (bad magic, an over-long EXPORT_NAME) that arrives in the same read as
options or requests the server already executed: their replies must reach the client before
the server hangs up.  Each client sends everything in one ``sendall``."""

from __future__ import annotations

import struct

from tests.integration.rawnbd import (
    CMD_FLUSH,
    CMD_WRITE,
    EINVAL,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    OPT_EXPORT_NAME,
    OPT_INFO,
    OPT_LIST,
    REP_ACK,
    REP_INFO,
    REP_SERVER,
    REQUEST_MAGIC,
    Target,
    target,
)

__all__ = ["target"]  # the fixture (tests.integration.rawnbd)

KiB = 1 << 10
MiB = 1 << 20
FLAGS = struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
BAD_OPTION = struct.pack(">QII", 0x0BAD0BAD0BAD0BAD, OPT_LIST, 0)
BAD_REQUEST = struct.pack(">IHHQQI", 0xDEADBEEF, 0, CMD_FLUSH, 99, 0, 0)


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def request(command: int, cookie: int, offset: int = 0, payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, command, cookie, offset, len(payload)) + payload


def on_disk(target: Target, offset: int, length: int) -> bytes:
    with target.disk.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def test_list_reply_is_sent_before_closing_on_bad_option_magic(target: Target) -> None:
    with target.raw() as c:
        c.greeting()
        c.sock.sendall(FLAGS + option(OPT_LIST) + BAD_OPTION)
        replies = c.option_replies(OPT_LIST)
        assert replies == [(REP_SERVER, struct.pack(">I", 4) + b"disk"), (REP_ACK, b"")]
        assert c.drain_until_closed() == b""
    target.assert_healthy()


def test_info_reply_is_sent_before_closing_on_an_over_long_export_name(target: Target) -> None:
    info = option(OPT_INFO, struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0))
    too_long = struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, 1 << 20) + b"x" * KiB
    with target.raw() as c:
        c.greeting()
        c.sock.sendall(FLAGS + info + too_long)
        replies = c.option_replies(OPT_INFO)
        assert [kind for kind, _ in replies][-1] == REP_ACK
        assert REP_INFO in [kind for kind, _ in replies]
        assert c.drain_until_closed() == b""
    target.assert_healthy()


def test_write_and_flush_replies_are_sent_before_closing_on_bad_request_magic(
    target: Target,
) -> None:
    offset = 8 * MiB
    data = b"\x6b" * (4 * KiB)
    with target.raw() as c:
        c.start()
        c.go("disk")
        c.sock.sendall(request(CMD_WRITE, 1, offset, data) + request(CMD_FLUSH, 2) + BAD_REQUEST)
        assert {c.simple_reply(), c.simple_reply()} == {(0, 1), (0, 2)}
        assert c.drain_until_closed() == b""
    assert on_disk(target, offset, len(data)) == data
    target.assert_healthy()


def test_large_write_reply_is_sent_before_closing_on_bad_request_magic(target: Target) -> None:
    offset = 16 * MiB
    data = b"\x2d" * MiB  # served by the worker pool, not inline
    with target.raw() as c:
        c.start()
        c.go("disk")
        c.sock.sendall(request(CMD_WRITE, 3, offset, data) + BAD_REQUEST)
        assert c.simple_reply() == (0, 3)
        assert c.drain_until_closed() == b""
    assert on_disk(target, offset, len(data)) == data
    target.assert_healthy()


def test_refused_request_is_answered_before_closing_on_bad_request_magic(target: Target) -> None:
    with target.raw() as c:
        c.start()
        c.go("disk")
        c.sock.sendall(request(0x42, 4) + BAD_REQUEST)
        assert c.simple_reply() == (EINVAL, 4)
        assert c.drain_until_closed() == b""
    target.assert_healthy()
