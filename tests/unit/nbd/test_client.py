"""The client core against the server core, bytes pushed between them (no sockets)."""

from __future__ import annotations

from typing import Unpack, cast

import pytest

from backend.nbd import (
    NEED_DATA,
    ClientConnection,
    ConnectionClosed,
    ExportInfo,
    ProtocolError,
    RefusedError,
    Reply,
    Request,
    ServerConnection,
)
from backend.nbd import constants as c
from backend.nbd.client import ClientState
from backend.nbd.constants import Cmd, CmdFlag
from backend.nbd.constants import TransmissionFlag as TFlag
from tests.unit.nbd.helpers import (
    SIZE,
    WRITABLE,
    Directory,
    ExportFields,
    connection,
    events,
    export,
)


def handshake(server: ServerConnection, client: ClientConnection) -> ExportInfo:
    seen: list[object] = []
    server_out = server.data_to_send()
    client.receive_data(server_out)
    while True:
        event = client.next_event()
        if event is not NEED_DATA:
            seen.append(event)
            if isinstance(event, ExportInfo):
                return event
            continue
        out = client.data_to_send()
        assert out, f"client stuck in {client.state} after {seen}"
        events(server, out)
        client.receive_data(server.data_to_send())


def connected(
    **kwargs: Unpack[ExportFields],
) -> tuple[ClientConnection, ServerConnection, ExportInfo]:
    server = connection(Directory(export(**kwargs)))
    client = ClientConnection("disk")
    info = handshake(server, client)
    return client, server, info


def replies(client: ClientConnection, data: bytes) -> list[Reply]:
    client.receive_data(data)
    out: list[Reply] = []
    while (event := client.next_event()) is not NEED_DATA:
        assert isinstance(event, Reply), event
        out.append(event)
    return out


def test_handshake_reports_export_flags_block_sizes_and_contexts() -> None:
    client, _, info = connected(min_block=512, preferred_block=8192)
    assert client.state is ClientState.TRANSMISSION
    assert info.size == SIZE
    assert info.flags & WRITABLE == WRITABLE
    assert info.structured_replies
    assert info.block_status
    assert (info.min_block, info.preferred_block) == (512, 8192)
    assert info.max_block == c.MAX_PAYLOAD


def test_unknown_export_is_refused_with_the_servers_reason() -> None:
    server = connection(Directory(export("disk")))
    client = ClientConnection("nope")
    client.receive_data(server.data_to_send())
    assert client.next_event() is NEED_DATA
    events(server, client.data_to_send())
    client.receive_data(server.data_to_send())
    with pytest.raises(RefusedError) as excinfo:
        client.next_event()
    assert excinfo.value.option == "GO"
    assert excinfo.value.reply == "ERR_UNKNOWN"


def test_replies_are_matched_by_cookie_in_any_order() -> None:
    client, server, _ = connected()
    first, h1 = client.request(Cmd.WRITE, 0, 4)
    second, h2 = client.request(Cmd.READ, 4096, 8)
    server.receive_data(h1 + b"abcd" + h2)
    reqs = []
    while (event := server.next_event()) is not NEED_DATA:
        assert isinstance(event, Request)
        reqs.append(event)
    assert [r.command for r in reqs] == [Cmd.WRITE, Cmd.READ]
    assert reqs[0].payload == b"abcd"
    # The READ is answered first.
    out = b"".join(server.reply_read(second, 4096, b"12345678")) + server.reply_ok(first)
    got = replies(client, out)
    assert [(r.cookie, r.error) for r in got] == [(second, 0), (first, 0)]
    assert got[0].data == bytearray(b"12345678")
    assert got[1].data is None


def test_read_reply_arrives_byte_by_byte() -> None:
    client, server, _ = connected()
    cookie, _header = client.request(Cmd.READ, 0, 1000)
    data = bytes(range(250)) * 4
    out = b"".join(server.reply_read(cookie, 0, data))
    got: list[Reply] = []
    for byte in out:
        buffer = client.payload_buffer()
        if buffer is not None:
            buffer[0] = byte
            client.payload_received(1)
        else:
            client.receive_data(bytes([byte]))
        while (event := client.next_event()) is not NEED_DATA:
            assert isinstance(event, Reply)
            got.append(event)
    assert len(got) == 1
    assert got[0].data == bytearray(data)


def test_holes_read_as_zeroes() -> None:
    client, server, _ = connected()
    cookie, _ = client.request(Cmd.READ, 0, 3 * 4096)
    parts = [b"a" * 4096, None, b"b" * 4096]
    out = b"".join(server.reply_read_parts(cookie, _pieces(parts)))
    (reply,) = replies(client, out)
    assert reply.data == bytearray(b"a" * 4096 + bytes(4096) + b"b" * 4096)


def _pieces(parts: list[bytes | None]) -> list[tuple[int, int, bytes | None]]:
    pos, out = 0, []
    for part in parts:
        out.append((pos, 4096, part))
        pos += 4096
    return out


def test_errors_carry_the_spec_value_and_message() -> None:
    client, server, _ = connected()
    cookie, _ = client.request(Cmd.WRITE, 0, 1)
    (reply,) = replies(client, server.reply_error(cookie, Cmd.WRITE, c.Error.ENOSPC, "full"))
    assert reply.error == c.Error.ENOSPC  # a simple reply: no message
    cookie, _ = client.request(Cmd.READ, 0, 10)
    (reply,) = replies(client, server.reply_error(cookie, Cmd.READ, c.Error.EIO, "bad"))
    assert (reply.error, reply.message, reply.data) == (c.Error.EIO, "bad", None)


def test_block_status_descriptors() -> None:
    client, server, _ = connected()
    cookie, _ = client.request(Cmd.BLOCK_STATUS, 0, 8192)
    out = server.reply_block_status(cookie, [(4096, 0), (4096, 3)])
    (reply,) = replies(client, out)
    assert reply.extents == [(4096, 0), (4096, 3)]


def test_commands_the_export_lacks_are_refused_locally() -> None:
    client, _, _ = connected(flags=TFlag.HAS_FLAGS | TFlag.READ_ONLY)
    for command in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES):
        with pytest.raises(Exception, match=r"not advertised|read-only"):
            client.request(command, 0, 1)
    with pytest.raises(Exception, match="FUA"):
        client.request(Cmd.READ, 0, 1, int(CmdFlag.FUA))


def test_a_reply_to_an_unknown_cookie_is_a_protocol_error() -> None:
    client, server, _ = connected()
    with pytest.raises(ProtocolError, match="unknown cookie"):
        replies(client, server.reply_ok(99))


def test_eof_with_requests_in_flight_is_unclean() -> None:
    client, _, _ = connected()
    client.request(Cmd.FLUSH, 0, 0)
    client.receive_data(b"")
    event = client.next_event()
    assert type(event).__name__ == "ConnectionClosed"
    assert not cast(ConnectionClosed, event).clean
    assert client.take_pending() == [1]
    assert client.take_pending() == []
