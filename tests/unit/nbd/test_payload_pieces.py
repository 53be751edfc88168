"""Large WRITE payloads come out in bounded pieces, allocated only as their bytes arrive
(issue 10 items 9 and 19)."""

from __future__ import annotations

import struct
from typing import cast

from backend.nbd import NEED_DATA, Rejected, Request, ServerConnection, WritePiece
from backend.nbd import constants as c
from backend.nbd.constants import Cmd, Error
from tests.unit.nbd.helpers import (
    Directory,
    connection,
    events,
    export,
    info_payload,
    negotiated,
    option,
    parse_option_replies,
    request,
)

MiB = 1 << 20
PIECE = c.PAYLOAD_PIECE


def recording(conn: ServerConnection) -> list[int]:
    """Sizes of the payload buffers the connection allocates."""
    sizes: list[int] = []

    def allocate(size: int) -> bytearray:
        sizes.append(size)
        return bytearray(size)

    conn.allocate_payload = allocate
    return sizes


def test_long_write_comes_out_in_pieces_in_order() -> None:
    conn = negotiated(export(size=64 * MiB))
    payload = bytes(range(256)) * (9 * MiB // 256)
    got = events(conn, request(Cmd.WRITE, 7, MiB, len(payload)))
    for pos in range(0, len(payload), 300_000):  # chunks that straddle piece boundaries
        got += events(conn, payload[pos : pos + 300_000])
    assert [type(e) for e in got] == [WritePiece] * 3
    pieces = [e for e in got if isinstance(e, WritePiece)]
    assert [(p.offset, len(p.data), p.last) for p in pieces] == [
        (MiB, PIECE, False),
        (MiB + PIECE, PIECE, False),
        (MiB + 2 * PIECE, MiB, True),
    ]
    assert {(p.cookie, p.length) for p in pieces} == {(7, 9 * MiB)}
    assert b"".join(p.data for p in pieces) == payload


def test_write_of_one_piece_is_still_one_request() -> None:
    conn = negotiated(export(size=64 * MiB))
    got = events(conn, request(Cmd.WRITE, 1, 0, PIECE) + bytes(PIECE))
    assert [type(e) for e in got] == [Request]


def test_announced_write_commits_no_buffer_before_its_bytes_arrive() -> None:
    conn = negotiated(export(size=64 * MiB))
    sizes = recording(conn)
    assert events(conn, request(Cmd.WRITE, 1, 0, 32 * MiB)) == []
    assert sizes == []  # a header alone allocates nothing
    assert events(conn, b"x") == []
    assert sizes == [PIECE]  # one piece, not 32 MiB
    assert conn.payload_buffer() is not None
    conn.receive_data(b"")
    closed = conn.next_event()
    assert not getattr(closed, "clean", True)


def test_payload_buffer_allocates_the_next_piece_lazily() -> None:
    conn = negotiated(export(size=64 * MiB))
    sizes = recording(conn)
    assert events(conn, request(Cmd.WRITE, 1, 0, 6 * MiB)) == []
    assert conn.next_event() is NEED_DATA
    view = conn.payload_buffer()
    assert view is not None
    assert len(view) == PIECE
    view[:] = bytes(PIECE)
    conn.payload_received(PIECE)
    first = conn.next_event()
    assert isinstance(first, WritePiece)
    assert not first.last
    assert conn.next_event() is NEED_DATA
    view = conn.payload_buffer()
    assert view is not None
    assert len(view) == 2 * MiB
    assert sizes == [PIECE, 2 * MiB]


def test_requests_up_to_max_request_are_accepted() -> None:
    conn = negotiated(export(size=256 * MiB), max_request=128 * MiB)
    got = events(conn, request(Cmd.READ, 1, 0, 128 * MiB))
    assert [type(e) for e in got] == [Request]
    got = events(conn, request(Cmd.READ, 2, 0, 128 * MiB + 512))
    assert [type(e) for e in got] == [Rejected]
    assert cast(Rejected, got[0]).error == Error.EINVAL


def test_max_request_is_advertised_as_the_maximum_block_size() -> None:
    conn = connection(Directory(export(size=256 * MiB)), max_request=128 * MiB)
    conn.data_to_send()
    events(
        conn,
        struct.pack(">I", c.ClientFlag.C_FIXED_NEWSTYLE)
        + option(c.Opt.GO, info_payload("disk", c.Info.BLOCK_SIZE)),
    )
    replies = parse_option_replies(conn.data_to_send())
    sizes = [r[2] for r in replies if r[1] == c.Rep.INFO and r[2][:2] == b"\0\3"]
    assert struct.unpack(">HIII", sizes[0])[3] == 128 * MiB
