"""The core asks for exports by events and waits for the answer (issue 11 item 3): it never
looks anything up itself, and writes an option's replies only once the server answered."""

from __future__ import annotations

import struct

import pytest

from backend.nbd import (
    NEED_DATA,
    ExportListRequested,
    ExportRequested,
    ExportSelected,
    LocalProtocolError,
    ProtocolError,
    ServerConnection,
    State,
    TLSPolicy,
)
from backend.nbd import constants as c
from tests.unit.nbd.helpers import export, info_payload, meta_payload, option, parse_option_replies

FIXED = struct.pack(">I", c.ClientFlag.C_FIXED_NEWSTYLE | c.ClientFlag.C_NO_ZEROES)


def asked(data: bytes, **kwargs: bool) -> tuple[ServerConnection, object]:
    """A connection fed ``data`` and the first event it emits."""
    conn = ServerConnection(**kwargs)
    conn.data_to_send()
    conn.receive_data(data)
    return conn, conn.next_event()


def state_of(conn: ServerConnection) -> State:
    """The connection's state read afresh (mypy keeps ``conn.state`` narrowed by an earlier
    assert across the calls that change it)."""
    return conn.state


def test_info_asks_for_the_named_export_and_replies_only_once_answered() -> None:
    data = FIXED + option(c.Opt.INFO, info_payload("disk")) + option(c.Opt.STRUCTURED_REPLY)
    conn, event = asked(data)
    assert event == ExportRequested(c.Opt.INFO, "disk")
    assert isinstance(event, ExportRequested)
    assert not event.selects
    assert conn.state is State.EXPORT_PENDING
    # Nothing is written, and nothing pipelined behind the option is parsed, until answered.
    assert conn.data_to_send() == b""
    assert not conn.structured_replies
    conn.export_chosen(export(description="a disk"))
    assert conn.next_event() is NEED_DATA
    replies = parse_option_replies(conn.data_to_send())
    assert [(o, k) for o, k, _ in replies] == [
        (c.Opt.INFO, c.Rep.INFO),
        (c.Opt.INFO, c.Rep.INFO),
        (c.Opt.INFO, c.Rep.ACK),
        (c.Opt.STRUCTURED_REPLY, c.Rep.ACK),
    ]
    assert state_of(conn) is State.NEGOTIATING


@pytest.mark.parametrize("opt", [c.Opt.GO, c.Opt.EXPORT_NAME])
def test_go_and_export_name_select_and_start_transmission_on_the_answer(opt: int) -> None:
    payload = info_payload("") if opt == c.Opt.GO else b""
    conn, event = asked(FIXED + option(opt, payload))
    assert event == ExportRequested(c.Opt(opt), "")
    assert isinstance(event, ExportRequested)
    assert event.selects
    served = export("default-disk", flags=export().flags | c.TransmissionFlag.READ_ONLY)
    conn.export_chosen(served)
    selected = conn.next_event()
    assert isinstance(selected, ExportSelected)
    assert selected.export == served
    assert conn.export == served
    assert conn.state is State.TRANSMISSION


def test_meta_contexts_ask_for_the_export_they_name() -> None:
    data = FIXED + option(c.Opt.STRUCTURED_REPLY)
    data += option(c.Opt.SET_META_CONTEXT, meta_payload("b", c.BASE_ALLOCATION))
    conn, event = asked(data)
    assert event == ExportRequested(c.Opt.SET_META_CONTEXT, "b")
    conn.export_chosen(export("b"))
    assert conn.next_event() is NEED_DATA
    kinds = [k for _, k, _ in parse_option_replies(conn.data_to_send())]
    assert kinds == [c.Rep.ACK, c.Rep.META_CONTEXT, c.Rep.ACK]


def test_list_asks_for_every_export_and_lists_what_the_connection_may_see() -> None:
    conn, event = asked(FIXED + option(c.Opt.LIST), tls_available=True)
    assert event == ExportListRequested()
    conn.export_list([export("open"), export("secure", tls=TLSPolicy.REQUIRED)])
    assert conn.next_event() is NEED_DATA
    replies = parse_option_replies(conn.data_to_send())
    assert [(k, d[4:]) for _, k, d in replies] == [(c.Rep.SERVER, b"open"), (c.Rep.ACK, b"")]


def test_a_refusal_without_reason_means_no_such_export() -> None:
    conn, _ = asked(FIXED + option(c.Opt.GO, info_payload("nope")))
    conn.export_refused()
    assert conn.next_event() is NEED_DATA
    [(_, kind, message)] = parse_option_replies(conn.data_to_send())
    assert (kind, message) == (c.Rep.ERR_UNKNOWN, b"no export named 'nope'")
    assert conn.state is State.NEGOTIATING


def test_a_refusal_with_a_reason_says_the_export_is_not_available() -> None:
    conn, _ = asked(FIXED + option(c.Opt.INFO, info_payload("held")))
    conn.export_refused("its storage is unreachable")
    conn.next_event()
    [(_, kind, message)] = parse_option_replies(conn.data_to_send())
    assert kind == c.Rep.ERR_UNKNOWN
    assert message == b"export 'held' is not available: its storage is unreachable"


def test_a_forbidden_export_is_refused_by_policy() -> None:
    # Issue 12: a stale replication epoch; ERR_POLICY tells the client retrying won't help.
    conn, _ = asked(FIXED + option(c.Opt.GO, info_payload("v;epoch=1")))
    conn.export_refused("volume v promised epoch 2: epoch 1 is fenced out", forbidden=True)
    conn.next_event()
    [(_, kind, message)] = parse_option_replies(conn.data_to_send())
    assert kind == c.Rep.ERR_POLICY
    assert message == (
        b"export 'v;epoch=1' refused: volume v promised epoch 2: epoch 1 is fenced out"
    )
    assert conn.state is State.NEGOTIATING


def test_a_refused_export_name_closes() -> None:
    conn, _ = asked(FIXED + option(c.Opt.EXPORT_NAME, b"held"))
    conn.export_refused("in use")
    with pytest.raises(ProtocolError, match="EXPORT_NAME for 'held', not available: in use"):
        conn.next_event()


def test_an_undecodable_export_name_closes_without_asking() -> None:
    conn = ServerConnection()
    conn.receive_data(FIXED + option(c.Opt.EXPORT_NAME, b"a\0b"))
    with pytest.raises(ProtocolError, match="unknown export"):
        conn.next_event()


def test_next_event_before_the_answer_is_api_misuse() -> None:
    conn, _ = asked(FIXED + option(c.Opt.GO, info_payload("disk")))
    with pytest.raises(LocalProtocolError, match="before the ExportRequested was answered"):
        conn.next_event()
    conn.export_chosen(export())  # the question still stands: answering later works
    assert isinstance(conn.next_event(), ExportSelected)


def test_answers_out_of_turn_are_api_misuse() -> None:
    conn = ServerConnection()
    with pytest.raises(LocalProtocolError, match="no ExportRequested to answer"):
        conn.export_chosen(export())
    conn.receive_data(FIXED + option(c.Opt.LIST))
    assert conn.next_event() == ExportListRequested()
    with pytest.raises(LocalProtocolError, match="ExportListRequested answered as"):
        conn.export_refused()
    conn.export_list([])
    with pytest.raises(LocalProtocolError, match="answered twice"):
        conn.export_list([])


def test_serves_follows_the_tls_policy_and_state() -> None:
    conn, _ = asked(FIXED + option(c.Opt.STARTTLS), tls_available=True)
    assert conn.serves(TLSPolicy.OFF)
    assert conn.serves(TLSPolicy.ALLOWED)
    assert not conn.serves(TLSPolicy.REQUIRED)
    conn.tls_established()
    assert not conn.serves(TLSPolicy.OFF)
    assert conn.serves(TLSPolicy.ALLOWED)
    assert conn.serves(TLSPolicy.REQUIRED)


def test_a_go_refused_by_tls_policy_after_the_answer_stays_in_negotiation() -> None:
    conn, _ = asked(FIXED + option(c.Opt.GO, info_payload("secure")), tls_available=True)
    conn.export_chosen(export("secure", tls=TLSPolicy.REQUIRED))
    assert conn.next_event() is NEED_DATA
    [(_, kind, _)] = parse_option_replies(conn.data_to_send())
    assert kind == c.Rep.ERR_TLS_REQD
    assert conn.state is State.NEGOTIATING
    assert conn.export is None
