"""Negotiation phase of the core, driven with bytes only."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from backend.nbd import (
    Aborted,
    ConnectionClosed,
    ExportDescription,
    ExportSelected,
    ExportUnavailableError,
    ProtocolError,
    Rejected,
    ServerConnection,
    StartTLS,
    State,
    TLSPolicy,
)
from backend.nbd import constants as c
from tests.unit.nbd.helpers import (
    SIZE,
    Directory,
    connection,
    events,
    export,
    info_payload,
    meta_payload,
    option,
    parse_option_replies,
    request,
)

FIXED = struct.pack(">I", c.ClientFlag.C_FIXED_NEWSTYLE | c.ClientFlag.C_NO_ZEROES)


def fresh(*exports: ExportDescription, tls_available: bool = False) -> ServerConnection:
    directory = Directory(*(exports or (export(),)))
    return connection(directory, tls_available=tls_available)


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    conn = fresh()
    magic, opt, flags = struct.unpack(">QQH", conn.data_to_send())
    assert (magic, opt) == (c.NBDMAGIC, c.IHAVEOPT)
    assert flags == c.HandshakeFlag.FIXED_NEWSTYLE | c.HandshakeFlag.NO_ZEROES


def test_unknown_client_flags_close_the_connection() -> None:
    conn = fresh()
    conn.receive_data(struct.pack(">I", 1 << 7))
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_bad_option_magic_closes_the_connection() -> None:
    conn = fresh()
    conn.receive_data(FIXED + struct.pack(">QII", 0x1234, c.Opt.GO, 0))
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_go_replies_info_export_and_block_size_then_ack() -> None:
    conn = fresh(export(description="a disk"))
    conn.data_to_send()
    got = events(conn, FIXED + option(c.Opt.GO, info_payload("disk", c.Info.DESCRIPTION)))
    assert isinstance(got[0], ExportSelected)
    replies = parse_option_replies(conn.data_to_send())
    kinds = [kind for _, kind, _ in replies]
    assert kinds == [c.Rep.INFO, c.Rep.INFO, c.Rep.INFO, c.Rep.ACK]
    info_type, size, flags = struct.unpack(">HQH", replies[0][2])
    assert (info_type, size) == (c.Info.EXPORT, SIZE)
    assert flags & c.TransmissionFlag.HAS_FLAGS
    assert not flags & c.TransmissionFlag.SEND_DF  # no structured replies negotiated
    assert replies[1][2] == struct.pack(">H", c.Info.DESCRIPTION) + b"a disk"
    assert struct.unpack(">HIII", replies[2][2]) == (c.Info.BLOCK_SIZE, 1, 4096, 64 << 20)
    assert conn.state is State.TRANSMISSION


def test_info_does_not_end_negotiation() -> None:
    conn = fresh()
    conn.data_to_send()
    assert events(conn, FIXED + option(c.Opt.INFO, info_payload("disk"))) == []
    assert conn.state is State.NEGOTIATING
    assert parse_option_replies(conn.data_to_send())[-1][1] == c.Rep.ACK


def test_go_for_unknown_export_is_err_unknown_and_negotiation_continues() -> None:
    conn = fresh()
    conn.data_to_send()
    assert events(conn, FIXED + option(c.Opt.GO, info_payload("nope"))) == []
    assert parse_option_replies(conn.data_to_send())[0][1] == c.Rep.ERR_UNKNOWN
    got = events(conn, option(c.Opt.GO, info_payload("disk")))
    assert isinstance(got[0], ExportSelected)


class _Unavailable(Directory):
    def lookup(self, name: str) -> ExportDescription | None:
        if name == "held":
            raise ExportUnavailableError("held writable by client.4242 at 127.0.0.1")
        return super().lookup(name)


def test_an_unavailable_export_is_err_unknown_with_the_reason() -> None:
    conn = connection(_Unavailable(export()))
    conn.data_to_send()
    assert events(conn, FIXED + option(c.Opt.GO, info_payload("held"))) == []
    reply = parse_option_replies(conn.data_to_send())[0]
    assert reply[1] == c.Rep.ERR_UNKNOWN
    assert b"held writable by client.4242" in reply[2]
    got = events(conn, option(c.Opt.GO, info_payload("disk")))  # negotiation goes on
    assert isinstance(got[0], ExportSelected)


class _Busy(Directory):
    def select(self, export: ExportDescription) -> ExportDescription:
        if export.name == "held":
            raise ExportUnavailableError("in use by 10.0.0.7:41000 (writable)")
        if export.name == "shared":
            return dataclasses.replace(export, flags=export.flags | c.TransmissionFlag.READ_ONLY)
        return super().select(export)


def test_a_go_refused_with_a_reason_is_err_unknown_and_info_only_looks() -> None:
    directory = _Busy(export("held"), export("disk"))
    conn = connection(directory)
    conn.data_to_send()
    # INFO only looks: it never selects, so a held export can still be inspected.
    assert events(conn, FIXED + option(c.Opt.INFO, info_payload("held"))) == []
    assert parse_option_replies(conn.data_to_send())[-1][1] == c.Rep.ACK
    assert events(conn, option(c.Opt.GO, info_payload("held"))) == []
    reply = parse_option_replies(conn.data_to_send())
    assert [r[1] for r in reply] == [c.Rep.ERR_UNKNOWN]  # no INFO before the refusal
    assert b"in use by 10.0.0.7:41000" in reply[0][2]
    got = events(conn, option(c.Opt.GO, info_payload("disk")))
    assert isinstance(got[0], ExportSelected)
    assert directory.selected == ["disk"]


def test_the_export_select_returns_is_the_one_served() -> None:
    conn = connection(_Busy(export("shared")))
    conn.data_to_send()
    got = events(conn, FIXED + option(c.Opt.GO, info_payload("shared")))
    assert isinstance(got[0], ExportSelected)
    assert got[0].export.flags & c.TransmissionFlag.READ_ONLY
    info = next(r for r in parse_option_replies(conn.data_to_send()) if r[1] == c.Rep.INFO)
    assert struct.unpack(">HQH", info[2][:12])[2] & c.TransmissionFlag.READ_ONLY
    rejected = events(conn, request(c.Cmd.WRITE, length=512) + bytes(512))
    assert isinstance(rejected[0], Rejected)
    assert rejected[0].error == c.Error.EPERM


def test_export_name_for_a_refused_export_closes() -> None:
    conn = connection(_Busy(export("held")))
    conn.data_to_send()
    with pytest.raises(ProtocolError, match="in use by"):
        events(conn, FIXED + option(c.Opt.EXPORT_NAME, b"held"))


def test_export_name_for_an_unavailable_export_closes() -> None:
    conn = connection(_Unavailable(export()))
    conn.data_to_send()
    with pytest.raises(ProtocolError, match="held writable"):
        events(conn, FIXED + option(c.Opt.EXPORT_NAME, b"held"))


def test_malformed_go_is_err_invalid() -> None:
    conn = fresh()
    conn.data_to_send()
    events(conn, FIXED + option(c.Opt.GO, b"\x00\x00\x00\x09abc"))
    assert parse_option_replies(conn.data_to_send())[0][1] == c.Rep.ERR_INVALID


@pytest.mark.parametrize("opt", [c.Opt.EXTENDED_HEADERS, c.Opt.PEEK_EXPORT, 99, 0x7FFF])
def test_unknown_options_are_err_unsup_after_their_payload(opt: int) -> None:
    conn = fresh()
    conn.data_to_send()
    events(conn, FIXED + option(opt, b"payload bytes") + option(c.Opt.STRUCTURED_REPLY))
    replies = parse_option_replies(conn.data_to_send())
    assert [(o, k) for o, k, _ in replies] == [
        (opt, c.Rep.ERR_UNSUP),
        (c.Opt.STRUCTURED_REPLY, c.Rep.ACK),
    ]


def test_oversized_option_is_drained_and_refused_as_too_big() -> None:
    conn = fresh()
    conn.data_to_send()
    big = 1 << 20
    conn.receive_data(FIXED + struct.pack(">QII", c.IHAVEOPT, c.Opt.INFO, big))
    for _ in range(big // 65536):
        conn.receive_data(bytes(65536))
        assert events(conn) == []
    got = events(conn, option(c.Opt.GO, info_payload("disk")))
    assert isinstance(got[0], ExportSelected)
    assert parse_option_replies(conn.data_to_send())[0][1] == c.Rep.ERR_TOO_BIG


def test_export_name_replies_size_flags_and_no_zeroes_when_asked() -> None:
    conn = fresh()
    conn.data_to_send()
    got = events(conn, FIXED + option(c.Opt.EXPORT_NAME, b"disk"))
    assert isinstance(got[0], ExportSelected)
    assert len(conn.data_to_send()) == 10


def test_export_name_pads_124_zeroes_without_no_zeroes() -> None:
    conn = fresh()
    conn.data_to_send()
    events(conn, struct.pack(">I", c.ClientFlag.C_FIXED_NEWSTYLE) + option(c.Opt.EXPORT_NAME))
    assert len(conn.data_to_send()) == 10 + 124


def test_export_name_for_unknown_export_closes() -> None:
    conn = fresh()
    with pytest.raises(ProtocolError, match="unknown export 'missing'"):
        events(conn, FIXED + option(c.Opt.EXPORT_NAME, b"missing"))


def test_abort_acks_and_closes() -> None:
    conn = fresh()
    conn.data_to_send()
    assert events(conn, FIXED + option(c.Opt.ABORT)) == [Aborted()]
    assert parse_option_replies(conn.data_to_send())[0][1] == c.Rep.ACK
    assert conn.state is State.CLOSED


def test_list_names_every_export() -> None:
    conn = fresh(export("a"), export("b"))
    conn.data_to_send()
    events(conn, FIXED + option(c.Opt.LIST))
    replies = parse_option_replies(conn.data_to_send())
    entries = [data for _, kind, data in replies if kind == c.Rep.SERVER]
    assert entries == [b"\x00\x00\x00\x01a", b"\x00\x00\x00\x01b"]
    assert replies[-1][1] == c.Rep.ACK


def test_list_entries_carry_the_description_after_the_name() -> None:
    conn = fresh(export("a", description="first disk"))
    conn.data_to_send()
    events(conn, FIXED + option(c.Opt.LIST))
    replies = parse_option_replies(conn.data_to_send())
    assert replies[0][1:] == (c.Rep.SERVER, b"\x00\x00\x00\x01a" + b"first disk")


def test_list_with_data_is_invalid() -> None:
    conn = fresh()
    conn.data_to_send()
    events(conn, FIXED + option(c.Opt.LIST, b"x"))
    assert parse_option_replies(conn.data_to_send())[0][1] == c.Rep.ERR_INVALID


def test_truncated_option_then_eof_is_an_unclean_close() -> None:
    conn = fresh()
    conn.data_to_send()
    conn.receive_data(FIXED + option(c.Opt.GO, info_payload("disk"))[:-3])
    assert events(conn) == []
    conn.receive_data(b"")
    assert events(conn) == [ConnectionClosed(clean=False)]


def test_set_meta_context_needs_structured_replies() -> None:
    conn = fresh()
    conn.data_to_send()
    events(conn, FIXED + option(c.Opt.SET_META_CONTEXT, meta_payload("disk", "base:allocation")))
    assert parse_option_replies(conn.data_to_send())[0][1] == c.Rep.ERR_INVALID


def test_set_meta_context_selects_base_allocation() -> None:
    conn = fresh()
    conn.data_to_send()
    data = FIXED + option(c.Opt.STRUCTURED_REPLY)
    data += option(c.Opt.SET_META_CONTEXT, meta_payload("disk", "base:allocation", "x:y"))
    data += option(c.Opt.GO, info_payload("disk"))
    got = events(conn, data)
    assert got == [ExportSelected(export(), structured_replies=True, block_status=True)]
    replies = parse_option_replies(conn.data_to_send())
    context = next(d for _, k, d in replies if k == c.Rep.META_CONTEXT)
    assert context == struct.pack(">I", c.BASE_ALLOCATION_ID) + b"base:allocation"


def test_meta_context_for_another_export_is_not_active() -> None:
    conn = fresh(export("a"), export("b"))
    conn.data_to_send()
    data = FIXED + option(c.Opt.STRUCTURED_REPLY)
    data += option(c.Opt.SET_META_CONTEXT, meta_payload("a", "base:allocation"))
    data += option(c.Opt.GO, info_payload("b"))
    got = events(conn, data)
    assert isinstance(got[0], ExportSelected)
    assert not got[0].block_status


@pytest.mark.parametrize(("meta_name", "go_name"), [("", ""), ("", "b"), ("b", "")])
def test_meta_context_for_the_default_export_is_active(meta_name: str, go_name: str) -> None:
    # The empty name is the default export ("b" here): a context set under either spelling
    # is the one GO selects, as qemu-img, nbdinfo and nbdcopy expect with a URI naming no export.
    conn = fresh(export("b"), export("a"))
    conn.data_to_send()
    data = FIXED + option(c.Opt.STRUCTURED_REPLY)
    data += option(c.Opt.SET_META_CONTEXT, meta_payload(meta_name, "base:allocation"))
    data += option(c.Opt.GO, info_payload(go_name))
    got = events(conn, data)
    assert got == [ExportSelected(export("b"), structured_replies=True, block_status=True)]


def test_no_default_export_is_err_unknown_saying_so() -> None:
    conn = connection(_NoDefault(export("a")))
    conn.data_to_send()
    events(conn, FIXED + option(c.Opt.GO, info_payload("")))
    [(_, kind, message)] = parse_option_replies(conn.data_to_send())
    assert kind == c.Rep.ERR_UNKNOWN
    assert b"no default export" in message


class _NoDefault(Directory):
    def lookup(self, name: str) -> ExportDescription | None:
        return super().lookup(name) if name else None


def test_list_meta_context_without_queries_lists_all() -> None:
    conn = fresh()
    conn.data_to_send()
    events(conn, FIXED + option(c.Opt.LIST_META_CONTEXT, meta_payload("disk")))
    replies = parse_option_replies(conn.data_to_send())
    assert [k for _, k, _ in replies] == [c.Rep.META_CONTEXT, c.Rep.ACK]


def test_starttls_unavailable_is_err_unsup() -> None:
    conn = fresh()
    conn.data_to_send()
    events(conn, FIXED + option(c.Opt.STARTTLS))
    assert parse_option_replies(conn.data_to_send())[0][1] == c.Rep.ERR_UNSUP


def test_starttls_acks_and_forgets_earlier_negotiation() -> None:
    conn = fresh(tls_available=True)
    conn.data_to_send()
    got = events(conn, FIXED + option(c.Opt.STRUCTURED_REPLY) + option(c.Opt.STARTTLS))
    assert got == [StartTLS()]
    assert conn.state is State.TLS_PENDING
    conn.tls_established()
    assert conn.tls_active
    assert not conn.structured_replies


def test_plaintext_after_starttls_before_tls_is_a_protocol_error() -> None:
    conn = fresh(tls_available=True)
    conn.data_to_send()
    events(conn, FIXED + option(c.Opt.STARTTLS))
    conn.receive_data(option(c.Opt.GO, info_payload("disk")))
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_plaintext_pipelined_behind_starttls_closes_without_ack() -> None:
    # In one read: nothing after STARTTLS may be taken for an option sent over TLS.
    conn = fresh(tls_available=True)
    conn.data_to_send()
    with pytest.raises(ProtocolError):
        events(conn, FIXED + option(c.Opt.STARTTLS) + option(c.Opt.STRUCTURED_REPLY))
    assert conn.data_to_send() == b""
    assert not conn.structured_replies


def test_tls_required_export_refused_in_plaintext() -> None:
    conn = fresh(export("secure", tls=TLSPolicy.REQUIRED), export("open"), tls_available=True)
    conn.data_to_send()
    events(conn, FIXED + option(c.Opt.GO, info_payload("secure")))
    assert parse_option_replies(conn.data_to_send())[0][1] == c.Rep.ERR_TLS_REQD


def test_forced_tls_refuses_every_option_but_starttls() -> None:
    conn = fresh(export("secure", tls=TLSPolicy.REQUIRED), tls_available=True)
    conn.tls_forced = True  # the server's decision: every export requires TLS
    conn.data_to_send()
    got = events(conn, FIXED + option(c.Opt.LIST) + option(c.Opt.STARTTLS))
    assert got == [StartTLS()]
    replies = parse_option_replies(conn.data_to_send())
    assert [k for _, k, _ in replies] == [c.Rep.ERR_TLS_REQD, c.Rep.ACK]


def test_plaintext_list_leaves_out_tls_required_exports() -> None:
    conn = fresh(export("secure", tls=TLSPolicy.REQUIRED), export("open"), tls_available=True)
    conn.data_to_send()
    events(conn, FIXED + option(c.Opt.LIST))
    replies = parse_option_replies(conn.data_to_send())
    assert [(k, d) for _, k, d in replies] == [
        (c.Rep.SERVER, struct.pack(">I", 4) + b"open"),
        (c.Rep.ACK, b""),
    ]
    assert b"secure" not in b"".join(d for _, _, d in replies)


def test_list_over_tls_names_tls_required_exports() -> None:
    conn = fresh(export("secure", tls=TLSPolicy.REQUIRED), export("open"), tls_available=True)
    conn.data_to_send()
    events(conn, FIXED + option(c.Opt.STARTTLS))
    conn.tls_established()
    conn.data_to_send()
    events(conn, option(c.Opt.LIST))
    replies = parse_option_replies(conn.data_to_send())
    assert [d[4:] for _, k, d in replies if k == c.Rep.SERVER] == [b"secure", b"open"]


def test_tls_off_export_is_refused_over_tls() -> None:
    conn = fresh(export("plain", tls=TLSPolicy.OFF), tls_available=True)
    conn.data_to_send()
    events(conn, FIXED + option(c.Opt.STARTTLS))
    conn.tls_established()
    events(conn, option(c.Opt.GO, info_payload("plain")))
    assert parse_option_replies(conn.data_to_send())[-1][1] == c.Rep.ERR_POLICY


def test_structured_reply_enables_df() -> None:
    conn = fresh()
    conn.data_to_send()
    events(conn, FIXED + option(c.Opt.STRUCTURED_REPLY) + option(c.Opt.INFO, info_payload("")))
    replies = parse_option_replies(conn.data_to_send())
    _, _, flags = struct.unpack(">HQH", replies[1][2])
    assert flags & c.TransmissionFlag.SEND_DF


def test_options_while_stopping_get_err_shutdown_and_abort_still_works() -> None:
    conn = fresh()
    conn.data_to_send()
    conn.stopping = True
    assert events(conn, FIXED + option(c.Opt.GO, info_payload("disk")) + option(c.Opt.ABORT)) == [
        Aborted()
    ]
    replies = parse_option_replies(conn.data_to_send())
    assert [k for _, k, _ in replies] == [c.Rep.ERR_SHUTDOWN, c.Rep.ACK]
