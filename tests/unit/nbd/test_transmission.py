"""Transmission phase of the core: request validation and reply encoding."""

from __future__ import annotations

import struct
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backend.nbd import (
    DF_MAX,
    ConnectionClosed,
    Disconnect,
    Event,
    ProtocolError,
    Rejected,
    Request,
    ServerConnection,
    State,
)
from backend.nbd import constants as c
from backend.nbd.constants import Cmd, CmdFlag, Error
from backend.nbd.constants import TransmissionFlag as TFlag
from tests.unit.nbd.helpers import SIZE, events, export, negotiated, request


def one(conn: ServerConnection, data: bytes) -> Event:
    got = events(conn, data)
    assert len(got) == 1, got
    return got[0]


def rejected(conn: ServerConnection, data: bytes) -> Error:
    event = one(conn, data)
    assert isinstance(event, Rejected), event
    return event.error


def test_read_request_becomes_an_event() -> None:
    conn = negotiated()
    event = one(conn, request(Cmd.READ, cookie=7, offset=4096, length=512))
    assert event == Request(Cmd.READ, 0, 7, 4096, 512)


def test_write_carries_its_payload_even_when_split_across_receives() -> None:
    conn = negotiated()
    data = bytes(range(256)) * 16
    wire = request(Cmd.WRITE, cookie=3, offset=0, length=len(data), flags=CmdFlag.FUA) + data
    for i in range(0, len(wire) - 1, 1000):
        assert events(conn, wire[i : min(i + 1000, len(wire) - 1)]) == []
    event = one(conn, wire[-1:])
    assert isinstance(event, Request)
    assert (event.command, event.cookie, event.flags) == (Cmd.WRITE, 3, CmdFlag.FUA)
    assert bytes(event.payload) == data


def test_write_payload_received_in_place() -> None:
    conn = negotiated()
    data = b"\xab" * 100_000
    assert events(conn, request(Cmd.WRITE, 9, 0, len(data)) + data[:10]) == []
    target = conn.payload_buffer()
    assert target is not None
    assert len(target) == len(data) - 10
    target[:] = data[10:]
    conn.payload_received(len(data) - 10)
    event = one(conn, b"")
    assert isinstance(event, Request)
    assert bytes(event.payload) == data
    assert conn.payload_buffer() is None


def test_several_pipelined_requests_come_out_in_order() -> None:
    conn = negotiated()
    wire = b"".join(request(Cmd.READ, cookie=i, offset=i * 512, length=512) for i in range(16))
    got = cast(list[Request], events(conn, wire))  # reads the core accepts
    assert [e.cookie for e in got] == list(range(16))


def test_disc_closes() -> None:
    conn = negotiated()
    assert events(conn, request(Cmd.DISC)) == [Disconnect()]
    assert conn.state is State.CLOSED


def test_bad_magic_is_a_protocol_error() -> None:
    conn = negotiated()
    conn.receive_data(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_eof_between_requests_is_clean_and_mid_request_is_not() -> None:
    conn = negotiated()
    conn.receive_data(b"")
    assert events(conn) == [ConnectionClosed(clean=True)]
    conn = negotiated()
    conn.receive_data(request(Cmd.WRITE, 1, 0, 4096) + b"x" * 100)
    conn.receive_data(b"")
    assert events(conn) == [ConnectionClosed(clean=False)]


@pytest.mark.parametrize(
    ("cmd", "offset", "length", "flags", "error"),
    [
        (Cmd.READ, SIZE - 511, 512, 0, Error.EINVAL),  # past the end
        (Cmd.WRITE, SIZE - 511, 512, 0, Error.ENOSPC),  # write past the end
        (Cmd.WRITE_ZEROES, SIZE, 512, 0, Error.ENOSPC),
        (Cmd.TRIM, SIZE, 512, 0, Error.EINVAL),
        (Cmd.BLOCK_STATUS, SIZE, 1, 0, Error.EINVAL),
        (Cmd.READ, 0, 0, 0, Error.EINVAL),  # zero length
        (Cmd.READ, 0, 512, 1 << 9, Error.EINVAL),  # unknown flag
        (Cmd.READ, 0, 512, CmdFlag.NO_HOLE, Error.EINVAL),  # flag of another command
        (Cmd.WRITE, 0, 512, CmdFlag.DF, Error.EINVAL),
        (Cmd.TRIM, 0, 512, CmdFlag.REQ_ONE, Error.EINVAL),
        (Cmd.READ, 0, 512, CmdFlag.PAYLOAD_LEN, Error.EINVAL),  # extended headers only
        (Cmd.RESIZE, 0, 512, 0, Error.EINVAL),  # not negotiated
        (42, 0, 512, 0, Error.EINVAL),  # unknown command
        (Cmd.READ, 0, DF_MAX + 1, CmdFlag.DF, Error.EOVERFLOW),
        (Cmd.READ, 0, 65 << 20, 0, Error.EINVAL),  # over the maximum block size
    ],
)
def test_invalid_requests_get_the_spec_error(
    cmd: int, offset: int, length: int, flags: int, error: Error
) -> None:
    conn = negotiated(export(size=128 << 20) if length > SIZE else export())
    if length > SIZE:
        offset = 0
    data = request(cmd, 5, offset, length, flags)
    if cmd == Cmd.WRITE:
        data += bytes(length)
    assert rejected(conn, data) == error


def test_df_read_up_to_the_limit_is_allowed() -> None:
    conn = negotiated()
    event = one(conn, request(Cmd.READ, 1, 0, DF_MAX, CmdFlag.DF))
    assert isinstance(event, Request)


def test_df_needs_structured_replies() -> None:
    conn = negotiated(structured=False, meta=False)
    assert rejected(conn, request(Cmd.READ, 1, 0, 512, CmdFlag.DF)) == Error.EINVAL


def test_block_status_needs_a_negotiated_context() -> None:
    conn = negotiated(meta=False)
    assert rejected(conn, request(Cmd.BLOCK_STATUS, 1, 0, 512)) == Error.EINVAL


def test_read_only_export_refuses_every_write_kind_with_eperm() -> None:
    ro = export(flags=TFlag.HAS_FLAGS | TFlag.READ_ONLY | TFlag.SEND_FLUSH)
    conn = negotiated(ro)
    assert rejected(conn, request(Cmd.WRITE, 1, 0, 512) + bytes(512)) == Error.EPERM
    # TRIM and WRITE_ZEROES are not advertised there, yet the spec asks for EPERM.
    assert rejected(conn, request(Cmd.TRIM, 2, 0, 512)) == Error.EPERM
    assert rejected(conn, request(Cmd.WRITE_ZEROES, 4, 0, 512)) == Error.EPERM
    assert isinstance(one(conn, request(Cmd.READ, 3, 0, 512)), Request)


def test_fua_only_when_advertised() -> None:
    flags = TFlag.HAS_FLAGS | TFlag.SEND_FLUSH
    conn = negotiated(export(flags=flags))
    assert rejected(conn, request(Cmd.WRITE, 1, 0, 1, CmdFlag.FUA) + b"x") == Error.EINVAL


def test_fast_zero_only_when_advertised() -> None:
    flags = TFlag.HAS_FLAGS | TFlag.SEND_WRITE_ZEROES
    conn = negotiated(export(flags=flags))
    assert rejected(conn, request(Cmd.WRITE_ZEROES, 1, 0, 1, CmdFlag.FAST_ZERO)) == Error.EINVAL


def test_misaligned_requests_rejected_when_block_size_was_agreed() -> None:
    conn = negotiated(export(min_block=512))
    assert rejected(conn, request(Cmd.READ, 1, 100, 512)) == Error.EINVAL
    assert rejected(conn, request(Cmd.WRITE, 2, 0, 100) + bytes(100)) == Error.EINVAL
    assert isinstance(one(conn, request(Cmd.READ, 3, 512, 1024)), Request)


def test_alignment_not_enforced_when_client_did_not_ask_for_block_sizes() -> None:
    conn = negotiated(export(min_block=512), block_size=False)
    assert isinstance(one(conn, request(Cmd.READ, 1, 100, 3)), Request)


def test_rejected_write_payload_is_drained_before_the_rejection_is_reported() -> None:
    conn = negotiated(export(size=256 << 20))
    big = 65 << 20
    assert events(conn, request(Cmd.WRITE, 1, 0, big)) == []
    chunk = bytes(1 << 20)
    for _ in range(big // len(chunk) - 1):
        assert events(conn, chunk) == []
        assert len(conn._buf) - conn._pos == 0  # nothing of the payload is kept
    # Only once the whole payload is consumed: libnbd refuses replies to a command whose
    # payload it is still sending.
    got = events(conn, chunk + request(Cmd.READ, 2, 0, 512))
    assert [type(e) for e in got] == [Rejected, Request]
    assert cast(Rejected, got[0]).error == Error.EINVAL
    assert cast(Request, got[1]).cookie == 2


def test_eof_while_draining_a_refused_write_drops_its_reply() -> None:
    conn = negotiated()
    conn.receive_data(request(Cmd.WRITE, 1, SIZE, 4096) + bytes(100))
    conn.receive_data(b"")
    assert events(conn) == [ConnectionClosed(clean=False)]


def test_stopping_answers_eshutdown_but_disc_still_works() -> None:
    conn = negotiated()
    conn.stopping = True
    assert rejected(conn, request(Cmd.READ, 1, 0, 512)) == Error.ESHUTDOWN
    assert events(conn, request(Cmd.DISC)) == [Disconnect()]


def test_flush_accepted_and_unadvertised_commands_refused() -> None:
    conn = negotiated(export(flags=TFlag.HAS_FLAGS))
    assert rejected(conn, request(Cmd.FLUSH, 1)) == Error.EINVAL
    assert rejected(conn, request(Cmd.CACHE, 2, 0, 512)) == Error.EINVAL
    conn = negotiated()
    assert isinstance(one(conn, request(Cmd.FLUSH, 3)), Request)


# ---------------------------------------------------------------------- replies


def test_simple_read_reply() -> None:
    conn = negotiated(structured=False, meta=False)
    header, data = conn.reply_read(9, 0, b"abc")
    assert struct.unpack(">IIQ", header) == (c.SIMPLE_REPLY_MAGIC, 0, 9)
    assert data == b"abc"


def test_structured_read_reply_is_one_offset_data_chunk() -> None:
    conn = negotiated()
    header, data = conn.reply_read(9, 4096, b"abc")
    magic, flags, kind, cookie, length = struct.unpack_from(">IHHQI", header)
    assert (magic, flags, kind, cookie, length) == (
        c.STRUCTURED_REPLY_MAGIC,
        c.ReplyFlag.DONE,
        c.ReplyType.OFFSET_DATA,
        9,
        8 + 3,
    )
    assert struct.unpack_from(">Q", header, 20) == (4096,)
    assert data == b"abc"


def test_read_parts_become_data_and_hole_chunks() -> None:
    conn = negotiated()
    out = b"".join(conn.reply_read_parts(1, [(0, 3, b"abc"), (3, 100, None)]))
    first = struct.unpack_from(">IHHQI", out)
    assert first[1:3] == (0, c.ReplyType.OFFSET_DATA)
    hole = struct.unpack_from(">IHHQIQI", out, 20 + 8 + 3)
    assert hole[1:3] == (c.ReplyFlag.DONE, c.ReplyType.OFFSET_HOLE)
    assert hole[5:] == (3, 100)


def test_read_parts_without_structured_replies_send_zeroes() -> None:
    conn = negotiated(structured=False, meta=False)
    out = b"".join(conn.reply_read_parts(1, [(0, 3, b"abc"), (3, 5, None)]))
    assert out[16:] == b"abc" + bytes(5)


def test_read_error_is_an_error_chunk_with_message() -> None:
    conn = negotiated()
    out = conn.reply_error(4, Cmd.READ, Error.EIO, "disk on fire")
    _, flags, kind, cookie, _ = struct.unpack_from(">IHHQI", out)
    assert (kind, cookie, flags) == (c.ReplyType.ERROR, 4, c.ReplyFlag.DONE)
    error, msglen = struct.unpack_from(">IH", out, 20)
    assert (error, out[26 : 26 + msglen]) == (Error.EIO, b"disk on fire")


def test_write_error_is_a_simple_reply() -> None:
    conn = negotiated()
    assert struct.unpack(">IIQ", conn.reply_error(4, Cmd.WRITE, Error.ENOSPC)) == (
        c.SIMPLE_REPLY_MAGIC,
        Error.ENOSPC,
        4,
    )


def test_block_status_reply() -> None:
    conn = negotiated()
    out = conn.reply_block_status(2, [(4096, 0), (8192, 3)])
    header = struct.unpack_from(">IHHQI", out)
    assert header[2] == c.ReplyType.BLOCK_STATUS
    assert struct.unpack_from(">IIIII", out, 20) == (c.BASE_ALLOCATION_ID, 4096, 0, 8192, 3)


# ---------------------------------------------------------------------- round trips

requests = st.tuples(
    st.sampled_from([Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE, Cmd.FLUSH]),
    st.integers(0, 2**64 - 1),
    st.integers(0, SIZE - 1),
    st.integers(1, 8192),
)


@given(st.lists(requests, max_size=20), st.integers(1, 64))
def test_any_valid_request_stream_round_trips_in_any_split(
    items: list[tuple[int, int, int, int]], split: int
) -> None:
    conn = negotiated()
    wire = b""
    expected = []
    for cmd, cookie, start, size in items:
        offset, length = (0, 0) if cmd == Cmd.FLUSH else (start, min(size, SIZE - start))
        payload = bytes([cookie % 251]) * length if cmd == Cmd.WRITE else b""
        wire += request(cmd, cookie, offset, length) + payload
        expected.append(Request(Cmd(cmd), 0, cookie, offset, length, payload))
    got: list[Request] = []
    for i in range(0, len(wire), split):
        got += cast(list[Request], events(conn, wire[i : i + split]))  # requests the core accepts
    assert [(e.command, e.cookie, e.offset, e.length, bytes(e.payload)) for e in got] == [
        (e.command, e.cookie, e.offset, e.length, bytes(e.payload)) for e in expected
    ]


@given(st.binary(min_size=28, max_size=512))
def test_garbage_after_handshake_never_crashes_the_core(data: bytes) -> None:
    conn = negotiated()
    try:
        for event in events(conn, data):
            assert isinstance(event, Request | Rejected | Disconnect)
    except ProtocolError:
        pass
