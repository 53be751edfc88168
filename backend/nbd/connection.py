"""The server side of one NBD connection, sans I/O.

Rules of this file:

* It owns no socket, thread or clock: bytes go in through ``receive_data`` (``b""`` is EOF),
  events come out of ``next_event``, handshake bytes come out of ``data_to_send`` and replies
  are built by the ``reply_*`` methods, which are pure and safe to call from any thread.
* It never calls out.  When an option needs to know an export it emits ``ExportRequested``
  or ``ExportListRequested`` and waits in EXPORT_PENDING until the server answers with
  ``export_chosen``, ``export_refused`` or ``export_list``; the next ``next_event`` writes the
  option's replies (docs/decisions/0012-export-requests-as-events.md).
* Every state change goes through ``_transition`` and the ``_TRANSITIONS`` table below.
* Every request is validated here, once, with the error the spec asks for (doc/proto.md,
  "Error values"); the server and the storage behind it may assume valid requests.
* A request we refuse is answered, never dropped, and its WRITE payload is consumed so the
  stream stays in sync; only a broken frame (bad magic, truncated message) closes the link.
* A WRITE payload is held in buffers of at most ``piece`` bytes, each allocated only when its
  first byte arrives: a WRITE longer than that comes out as ``WritePiece`` events, so neither
  a large request nor a client that announces one and leaves commits its whole length.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from backend.nbd import constants as c
from backend.nbd import wire
from backend.nbd.errors import LocalProtocolError, ProtocolError
from backend.nbd.events import (
    NEED_DATA,
    Aborted,
    ConnectionClosed,
    Disconnect,
    Event,
    ExportDescription,
    ExportListRequested,
    ExportRequested,
    ExportSelected,
    Rejected,
    Request,
    StartTLS,
    TLSPolicy,
    WritePiece,
    _NeedData,
)

Cmd = c.Cmd
CmdFlag = c.CmdFlag
TF = c.TransmissionFlag


class State(enum.Enum):
    AWAIT_CLIENT_FLAGS = "await-client-flags"
    NEGOTIATING = "negotiating"
    EXPORT_PENDING = "export-pending"  # asked the server about exports; awaiting its answer
    TLS_PENDING = "tls-pending"  # STARTTLS acknowledged; waiting for the server to wrap
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class Trigger(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    STARTTLS = "starttls"
    TLS_ESTABLISHED = "tls-established"
    EXPORT_REQUESTED = "export-requested"  # an option needs an export (or the list of them)
    EXPORT_ANSWERED = "export-answered"  # its replies are written; negotiation goes on
    EXPORT_CHOSEN = "export-chosen"  # GO or EXPORT_NAME accepted the answer
    CLOSE = "close"  # ABORT, DISC, EOF or a protocol error


_TRANSITIONS: dict[tuple[State, Trigger], State] = {
    (State.AWAIT_CLIENT_FLAGS, Trigger.CLIENT_FLAGS): State.NEGOTIATING,
    (State.NEGOTIATING, Trigger.STARTTLS): State.TLS_PENDING,
    (State.TLS_PENDING, Trigger.TLS_ESTABLISHED): State.NEGOTIATING,
    (State.NEGOTIATING, Trigger.EXPORT_REQUESTED): State.EXPORT_PENDING,
    (State.EXPORT_PENDING, Trigger.EXPORT_ANSWERED): State.NEGOTIATING,
    (State.EXPORT_PENDING, Trigger.EXPORT_CHOSEN): State.TRANSMISSION,
    **{(state, Trigger.CLOSE): State.CLOSED for state in State},
}

# Reads at most this long must be served unfragmented when the client sets DF (spec,
# NBD_CMD_READ); longer DF reads get EOVERFLOW, which leaves us free to send holes as
# OFFSET_HOLE chunks in every other large read.
DF_MAX = 64 * 1024

# Flags each command accepts (spec, "Command flags"); FUA is valid on every command.
_FLAGS_FOR: dict[int, c.CmdFlag] = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}
# The transmission flag that must have been advertised before a command may be sent.
_NEEDS_FLAG: dict[int, TF] = {
    Cmd.FLUSH: TF.SEND_FLUSH,
    Cmd.TRIM: TF.SEND_TRIM,
    Cmd.CACHE: TF.SEND_CACHE,
    Cmd.WRITE_ZEROES: TF.SEND_WRITE_ZEROES,
}
_MUTATING = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})
_ENOSPC_PAST_END = frozenset({Cmd.WRITE, Cmd.WRITE_ZEROES})
_CMDS = {int(cmd): cmd for cmd in Cmd}
_REQUEST_SIZE = wire.REQUEST.size
_UNPACK_REQUEST = wire.REQUEST.unpack_from
_HAS_PAYLOAD = int(Cmd.WRITE)
_DISC = int(Cmd.DISC)


class _Asked(NamedTuple):
    """The question the core waits on in EXPORT_PENDING, with what the option asked for."""

    event: ExportRequested | ExportListRequested
    infos: frozenset[int] = frozenset()  # INFO/GO: the NBD_INFO types requested
    queries: tuple[str, ...] = ()  # LIST_/SET_META_CONTEXT: the context queries


@dataclasses.dataclass(frozen=True, slots=True)
class _Refused:
    reason: str | None  # None: no such export
    forbidden: bool = False  # NBD_REP_ERR_POLICY: the server's policy refuses this client


_Answer = ExportDescription | _Refused | list[ExportDescription]


class ServerConnection:
    """One connection, from greeting to disconnect.

    ``tls_available``: the server holds a certificate and may accept STARTTLS.
    ``max_request``: the longest READ or WRITE accepted, advertised as the maximum block size.
    ``piece``: WRITE payloads longer than this come out as ``WritePiece`` events this long.
    """

    def __init__(
        self,
        *,
        tls_available: bool = False,
        max_request: int = c.MAX_PAYLOAD,
        piece: int = c.PAYLOAD_PIECE,
    ) -> None:
        if not 0 < piece <= max_request:
            raise LocalProtocolError(f"piece {piece} not within 1..max_request {max_request}")
        self._max_request = max_request
        self._piece = piece
        self._tls_available = tls_available
        self.state = State.AWAIT_CLIENT_FLAGS
        self._out = bytearray(wire.greeting())
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self.no_zeroes = False
        self.tls_active = False
        self.structured_replies = False
        self._meta_export: str | None = None  # export base:allocation was set for
        self.export: ExportDescription | None = None
        self.block_status = False
        self._block_sizes_agreed = False
        self._drain = 0  # bytes of a refused WRITE payload still to discard
        # Its Rejected event: emitted once the payload is gone, because clients (libnbd)
        # reject a reply to a command whose payload they are still sending.
        self._drained_event: Rejected | None = None
        # A valid WRITE whose payload is still arriving: its header, how much of its payload
        # was handed out already, and the piece being filled (None until its bytes arrive).
        self._write_header: tuple[int, int, int, int] | None = None
        self._write_done = 0
        self._payload: bytearray | None = None
        self._payload_got = 0
        self._allowed: dict[int, int] = {}
        self._size = 0
        self._read_only = False
        self._align = 1
        self._max_block = max_request
        self.stopping = False  # set by the server on shutdown: new requests get ESHUTDOWN
        # Set by the server while no export can be reached without TLS (the spec's "forced
        # TLS" mode); read as each option arrives, so the server may keep it current.
        self.tls_forced = False
        self._asked: _Asked | None = None
        self._answer: _Answer | None = None
        # Where large WRITE payloads are collected; the server may recycle buffers.
        self.allocate_payload: Callable[[int], bytearray] = bytearray

    # ------------------------------------------------------------------ plumbing

    def _transition(self, trigger: Trigger) -> None:
        try:
            self.state = _TRANSITIONS[(self.state, trigger)]
        except KeyError:
            raise LocalProtocolError(f"{trigger.value} not allowed in {self.state.value}") from None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
            return
        if self._payload is not None:
            # Finish the WRITE payload being collected first; the rest is buffered.
            take = min(len(data), len(self._payload) - self._payload_got)
            self._payload[self._payload_got : self._payload_got + take] = data[:take]
            self._payload_got += take
            data = data[take:]
            if not data:
                return
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > 1 << 20:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not parsed yet (the start of the next request, if any)."""
        return len(self._buf) - self._pos

    def payload_buffer(self) -> memoryview | None:
        """Where the rest of a WRITE payload should be received, or None.

        Lets the server ``recv_into`` large payloads in place instead of passing them through
        ``receive_data``; report what arrived with :meth:`payload_received`.  Only offered
        when :meth:`next_event` returned NEED_DATA (nothing buffered is left to parse).
        """
        if self._write_header is None or self._pos < len(self._buf):
            return None
        if self._payload is None:
            self._payload = self._next_piece()
        return memoryview(self._payload)[self._payload_got :]

    def payload_received(self, count: int) -> None:
        """``count`` bytes were written into :meth:`payload_buffer`; 0 means EOF."""
        if count == 0:
            self._eof = True
        self._payload_got += count

    def data_to_send(self) -> bytes:
        """Handshake bytes queued for the peer (replies during transmission are returned by
        the ``reply_*`` methods instead)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def _closed(self) -> ConnectionClosed:
        clean = self._pos == len(self._buf) and not self._drain and self._write_header is None
        self._transition(Trigger.CLOSE)
        return ConnectionClosed(clean=clean)

    def next_event(self) -> Event | _NeedData:
        """The next event, or NEED_DATA.  Raises ProtocolError when the link must close."""
        if self.state is State.TRANSMISSION:
            return self._next_request()
        if self.state is State.NEGOTIATING:
            return self._next_option()
        if self.state is State.EXPORT_PENDING:
            return self._answered()
        if self.state is State.AWAIT_CLIENT_FLAGS:
            return self._client_flags()
        if self.state is State.TLS_PENDING:
            if len(self._buf) > self._pos:
                # The client must wait for our ACK and the TLS handshake (spec, STARTTLS).
                raise ProtocolError("data sent after STARTTLS before the TLS handshake")
            return self._closed() if self._eof else NEED_DATA
        raise LocalProtocolError("next_event() on a closed connection")

    # ------------------------------------------------------------------ handshake

    def _take(self, size: int) -> bytes | None:
        if len(self._buf) - self._pos < size:
            return None
        data = bytes(self._buf[self._pos : self._pos + size])
        self._pos += size
        return data

    def _client_flags(self) -> Event | _NeedData:
        raw = self._take(wire.CLIENT_FLAGS.size)
        if raw is None:
            return self._closed() if self._eof else NEED_DATA
        (flags,) = wire.CLIENT_FLAGS.unpack(raw)
        known = int(c.ClientFlag.C_FIXED_NEWSTYLE | c.ClientFlag.C_NO_ZEROES)
        if flags & ~known:
            # Spec: a server MUST close the connection on unknown client flags.
            raise ProtocolError(f"unknown client flags {flags:#x}")
        self.no_zeroes = bool(flags & c.ClientFlag.C_NO_ZEROES)
        self._transition(Trigger.CLIENT_FLAGS)
        return self._next_option()

    def tls_established(self) -> None:
        """The server finished the TLS handshake after a StartTLS event."""
        self._transition(Trigger.TLS_ESTABLISHED)
        self.tls_active = True
        # Spec (STARTTLS): everything negotiated before TLS is forgotten.
        self.structured_replies = False
        self._meta_export = None

    def _next_option(self) -> Event | _NeedData:
        while True:
            if self._drain:
                if not self._discard():
                    return self._closed() if self._eof else NEED_DATA
                continue
            have = len(self._buf) - self._pos
            if have < wire.OPTION_HEADER.size:
                return self._closed() if self._eof else NEED_DATA
            magic, option, length = wire.OPTION_HEADER.unpack_from(self._buf, self._pos)
            if magic != c.IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > c.MAX_OPTION_LENGTH:
                if option == c.Opt.EXPORT_NAME:
                    raise ProtocolError("export name longer than the spec allows")
                self._pos += wire.OPTION_HEADER.size
                self._drain = length
                self._out += wire.option_error(option, c.Rep.ERR_TOO_BIG, "option too long")
                continue
            if have < wire.OPTION_HEADER.size + length:
                return self._closed() if self._eof else NEED_DATA
            self._pos += wire.OPTION_HEADER.size
            data = self._take(length) or b""
            event = self._option(option, data)
            if event is not None:
                return event

    def _discard(self) -> bool:
        """Drop refused payload bytes; True once all of it is gone."""
        take = min(self._drain, len(self._buf) - self._pos)
        self._pos += take
        self._drain -= take
        return self._drain == 0

    def _tls_forced(self) -> bool:
        return self.tls_forced and self._tls_available and not self.tls_active

    def _reply(self, option: int, reply: c.Rep, data: bytes = b"") -> None:
        self._out += wire.option_reply(option, reply, data)

    def _error(self, option: int, reply: c.Rep, message: str) -> None:
        self._out += wire.option_error(option, reply, message)

    def _option(self, option: int, data: bytes) -> Event | None:
        if self.stopping and option != c.Opt.ABORT:
            if option == c.Opt.EXPORT_NAME:
                raise ProtocolError("EXPORT_NAME while the server shuts down")
            self._error(option, c.Rep.ERR_SHUTDOWN, "server is shutting down")
            return None
        if self._tls_forced() and option not in (c.Opt.STARTTLS, c.Opt.ABORT):
            if option == c.Opt.EXPORT_NAME:
                raise ProtocolError("EXPORT_NAME before STARTTLS on a TLS-only server")
            self._error(option, c.Rep.ERR_TLS_REQD, "this server requires TLS")
            return None
        if option == c.Opt.EXPORT_NAME:
            return self._opt_export_name(data)
        if option == c.Opt.ABORT:
            self._reply(option, c.Rep.ACK)
            self._transition(Trigger.CLOSE)
            return Aborted()
        if option == c.Opt.LIST:
            return self._opt_list(data)
        if option == c.Opt.STARTTLS:
            return self._opt_starttls(data)
        if option in (c.Opt.INFO, c.Opt.GO):
            return self._opt_info(option, data)
        if option in (c.Opt.LIST_META_CONTEXT, c.Opt.SET_META_CONTEXT):
            return self._opt_meta_context(option, data)
        if option == c.Opt.STRUCTURED_REPLY:
            if data:
                self._error(option, c.Rep.ERR_INVALID, "STRUCTURED_REPLY takes no data")
            else:
                self.structured_replies = True
                self._reply(option, c.Rep.ACK)
        else:
            # EXTENDED_HEADERS included: unsupported, and the client falls back.
            self._error(option, c.Rep.ERR_UNSUP, f"option {option} is not supported")
        return None

    def _tls_refusal(self, tls: TLSPolicy) -> c.Rep | None:
        """The error for an export with policy ``tls`` on this connection now, or None."""
        if tls is TLSPolicy.REQUIRED and not self.tls_active:
            return c.Rep.ERR_TLS_REQD
        if tls is TLSPolicy.OFF and self.tls_active:
            return c.Rep.ERR_POLICY
        return None

    def serves(self, tls: TLSPolicy) -> bool:
        """Whether an export with TLS policy ``tls`` would be accepted on this connection now.

        Lets the server commit to an export for GO / EXPORT_NAME (admit a writer) only when
        the core will not refuse the answer by its TLS policy.
        """
        return self._tls_refusal(tls) is None

    def _listed(self, export: ExportDescription) -> bool:
        # Spec (NBD_OPT_LIST): in selective TLS mode a TLS-only export may be left out before
        # TLS.  We leave it out, so a plaintext client does not learn the names TLS protects.
        return self.serves(export.tls)

    def _ask(self, asked: _Asked) -> Event:
        self._asked = asked
        self._answer = None
        self._transition(Trigger.EXPORT_REQUESTED)
        return asked.event

    def _opt_list(self, data: bytes) -> Event | None:
        if data:
            self._error(c.Opt.LIST, c.Rep.ERR_INVALID, "LIST takes no data")
            return None
        return self._ask(_Asked(ExportListRequested()))

    def _opt_starttls(self, data: bytes) -> Event | None:
        if data:
            self._error(c.Opt.STARTTLS, c.Rep.ERR_INVALID, "STARTTLS takes no data")
        elif self.tls_active:
            self._error(c.Opt.STARTTLS, c.Rep.ERR_INVALID, "TLS is already active")
        elif not self._tls_available:
            self._error(c.Opt.STARTTLS, c.Rep.ERR_UNSUP, "TLS is not configured")
        elif len(self._buf) > self._pos:
            # Bytes pipelined behind STARTTLS were sent in plaintext, maybe injected by a man
            # in the middle; run after the TLS handshake they would pass for protected
            # options (the attack of CVE-2021-3716 on nbdkit).  A client must wait for our ACK.
            raise ProtocolError("data sent after STARTTLS before the TLS handshake")
        else:
            self._reply(c.Opt.STARTTLS, c.Rep.ACK)
            self._transition(Trigger.STARTTLS)
            return StartTLS()
        return None

    def _opt_info(self, option: int, data: bytes) -> Event | None:
        parsed = _parse_info_request(data)
        if parsed is None:
            self._error(option, c.Rep.ERR_INVALID, "malformed INFO/GO request")
            return None
        name, requests = parsed
        return self._ask(_Asked(ExportRequested(c.Opt(option), name), frozenset(requests)))

    def _opt_export_name(self, name_bytes: bytes) -> Event:
        name = _decode(name_bytes)
        if name is None:
            # EXPORT_NAME has no error reply: the spec says to close the connection.
            raise ProtocolError(f"EXPORT_NAME for unknown export {name!r}")
        return self._ask(_Asked(ExportRequested(c.Opt.EXPORT_NAME, name)))

    def _opt_meta_context(self, option: int, data: bytes) -> Event | None:
        parsed = _parse_meta_request(data)
        if parsed is None:
            self._error(option, c.Rep.ERR_INVALID, "malformed meta context request")
            return None
        name, queries = parsed
        if option == c.Opt.SET_META_CONTEXT and not self.structured_replies:
            self._error(option, c.Rep.ERR_INVALID, "SET_META_CONTEXT needs structured replies")
            return None
        return self._ask(_Asked(ExportRequested(c.Opt(option), name), queries=tuple(queries)))

    # ------------------------------------------------------------------ the server's answers

    def export_chosen(self, export: ExportDescription) -> None:
        """Answer :class:`ExportRequested`: the name resolves to ``export``.  For GO and
        EXPORT_NAME it is what transmission serves if the core accepts it (its TLS policy)."""
        self._answer_with(ExportRequested, export)

    def export_refused(self, reason: str | None = None, *, forbidden: bool = False) -> None:
        """Answer :class:`ExportRequested`: no export has that name (``reason`` None), or it
        exists but cannot be served now because of ``reason``.  The client gets
        NBD_REP_ERR_UNKNOWN with the reason, or NBD_REP_ERR_POLICY when ``forbidden`` (the
        server's policy refuses this client, e.g. a stale epoch); after EXPORT_NAME the
        connection closes."""
        self._answer_with(ExportRequested, _Refused(reason, forbidden))

    def export_list(self, exports: Iterable[ExportDescription]) -> None:
        """Answer :class:`ExportListRequested` with every export, in the order to list them."""
        self._answer_with(ExportListRequested, list(exports))

    def _answer_with(self, kind: type[Event], answer: _Answer) -> None:
        asked = self._asked
        if self.state is not State.EXPORT_PENDING or asked is None:
            raise LocalProtocolError(f"no {kind.__name__} to answer in {self.state.value}")
        if not isinstance(asked.event, kind):
            raise LocalProtocolError(f"{type(asked.event).__name__} answered as {kind.__name__}")
        if self._answer is not None:
            raise LocalProtocolError(f"{kind.__name__} answered twice")
        self._answer = answer

    def _answered(self) -> Event | _NeedData:
        """Write the replies of the option waiting in EXPORT_PENDING, now that it is answered."""
        asked, answer = self._asked, self._answer
        if asked is None or answer is None:
            pending = type(asked.event).__name__ if asked is not None else "question"
            raise LocalProtocolError(f"next_event() before the {pending} was answered")
        self._asked = self._answer = None
        if isinstance(answer, list):
            self._list(answer)
        else:
            assert isinstance(asked.event, ExportRequested)  # checked by _answer_with
            event = self._requested(asked.event, answer, asked)
            if event is not None:
                return event
        self._transition(Trigger.EXPORT_ANSWERED)
        return self._next_option()

    def _list(self, exports: list[ExportDescription]) -> None:
        for export in exports:
            if self._listed(export):
                self._reply(
                    c.Opt.LIST, c.Rep.SERVER, wire.server_entry(export.name, export.description)
                )
        self._reply(c.Opt.LIST, c.Rep.ACK)

    def _requested(
        self, event: ExportRequested, answer: ExportDescription | _Refused, asked: _Asked
    ) -> Event | None:
        option, name = event.option, event.name
        if option == c.Opt.EXPORT_NAME:
            # EXPORT_NAME has no error reply: the spec says to close the connection.
            if isinstance(answer, _Refused):
                if answer.reason is None:
                    raise ProtocolError(f"EXPORT_NAME for unknown export {name!r}")
                raise ProtocolError(f"EXPORT_NAME for {name!r}, not available: {answer.reason}")
            if not self.serves(answer.tls):
                raise ProtocolError(f"EXPORT_NAME for {name!r} refused by its TLS policy")
            reply = wire.EXPORT_NAME_REPLY.pack(answer.size, self._flags_for(answer))
            self._out += reply if self.no_zeroes else reply + bytes(c.EXPORT_NAME_ZEROES)
            return self._enter_transmission(answer)
        export = self._usable(option, name, answer)
        if export is None:
            return None
        if option in (c.Opt.INFO, c.Opt.GO):
            return self._info(option, export, asked.infos)
        self._meta_context(option, export, asked.queries)
        return None

    def _usable(
        self, option: int, name: str, answer: ExportDescription | _Refused
    ) -> ExportDescription | None:
        """The answered export for INFO/GO/meta contexts, or None after replying the error."""
        if isinstance(answer, _Refused):
            if answer.reason is None:
                self._error(option, c.Rep.ERR_UNKNOWN, _unknown(name))
            elif answer.forbidden:
                self._error(option, c.Rep.ERR_POLICY, f"export {name!r} refused: {answer.reason}")
            else:
                message = f"export {name!r} is not available: {answer.reason}"
                self._error(option, c.Rep.ERR_UNKNOWN, message)
            return None
        refusal = self._tls_refusal(answer.tls)
        if refusal is c.Rep.ERR_TLS_REQD:
            self._error(option, refusal, f"export {name!r} requires TLS")
            return None
        if refusal is c.Rep.ERR_POLICY:
            self._error(option, refusal, f"export {name!r} is not served over TLS")
            return None
        return answer

    def _info(
        self, option: int, export: ExportDescription, requests: frozenset[int]
    ) -> Event | None:
        flags = self._flags_for(export)
        self._reply(option, c.Rep.INFO, wire.info_export(export.size, flags))
        if c.Info.NAME in requests:
            self._reply(option, c.Rep.INFO, wire.info_string(c.Info.NAME, export.name))
        if c.Info.DESCRIPTION in requests and export.description:
            self._reply(
                option, c.Rep.INFO, wire.info_string(c.Info.DESCRIPTION, export.description)
            )
        self._reply(
            option,
            c.Rep.INFO,
            wire.info_block_size(
                export.min_block, min(export.preferred_block, self._max_request), self._max_request
            ),
        )
        self._reply(option, c.Rep.ACK)
        if option == c.Opt.INFO:
            return None
        self._block_sizes_agreed = c.Info.BLOCK_SIZE in requests
        return self._enter_transmission(export)

    def _meta_context(
        self, option: int, export: ExportDescription, queries: tuple[str, ...]
    ) -> None:
        # base:allocation is the only context we serve; "base:" asks for every base context.
        wanted = (not queries and option == c.Opt.LIST_META_CONTEXT) or any(
            q in (c.BASE_ALLOCATION, "base:") for q in queries
        )
        if option == c.Opt.SET_META_CONTEXT:
            # The export the name resolves to, not the name: "" (the default export) in
            # SET_META_CONTEXT and GO must match the export GO selects under its own name.
            self._meta_export = export.name if wanted else None
        if wanted:
            ctx = c.BASE_ALLOCATION_ID if option == c.Opt.SET_META_CONTEXT else 0
            self._reply(option, c.Rep.META_CONTEXT, wire.meta_context(ctx, c.BASE_ALLOCATION))
        self._reply(option, c.Rep.ACK)

    def _flags_for(self, export: ExportDescription) -> int:
        flags = export.flags | TF.HAS_FLAGS
        if not self.structured_replies:
            flags &= ~TF.SEND_DF
        else:
            flags |= TF.SEND_DF
        return int(flags)

    def _enter_transmission(self, export: ExportDescription) -> ExportSelected:
        flags = self._flags_for(export)
        self.export = export
        self.block_status = self.structured_replies and self._meta_export == export.name
        self._size = export.size
        self._read_only = bool(flags & TF.READ_ONLY)
        self._align = export.min_block if self._block_sizes_agreed else 1
        # The storage's own max_block does not bound requests: they reach it in pieces.
        self._max_block = self._max_request
        allowed: dict[int, int] = {}
        unusable = 0
        if not flags & TF.SEND_FUA:
            unusable |= CmdFlag.FUA
        if not flags & TF.SEND_DF:
            unusable |= CmdFlag.DF
        if not flags & TF.SEND_FAST_ZERO:
            unusable |= CmdFlag.FAST_ZERO
        for cmd, mask in _FLAGS_FOR.items():
            needs = _NEEDS_FLAG.get(cmd)
            if needs is not None and not flags & needs:
                continue
            if cmd == Cmd.BLOCK_STATUS and not self.block_status:
                continue
            allowed[cmd] = int(mask) & ~int(unusable)  # plain ints: ~ on IntFlag drops bits
        self._allowed = allowed
        self._transition(Trigger.EXPORT_CHOSEN)
        return ExportSelected(export, self.structured_replies, self.block_status)

    # ------------------------------------------------------------------ transmission

    def _next_request(self) -> Event | _NeedData:
        if self._write_header is not None:
            return self._continue_write()
        if self._drain and not self._discard():
            return self._closed() if self._eof else NEED_DATA
        if self._drained_event is not None:
            event, self._drained_event = self._drained_event, None
            return event
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < _REQUEST_SIZE:
            return self._closed() if self._eof else NEED_DATA
        magic, flags, command, cookie, offset, length = _UNPACK_REQUEST(buf, pos)
        if magic != c.REQUEST_MAGIC:
            raise ProtocolError(f"bad request magic {magic:#x}")
        pos += _REQUEST_SIZE
        self._pos = pos
        if command == _HAS_PAYLOAD:
            error = self._validate(command, flags, offset, length)
            if error is not None:
                self._drain = length  # consumed as it arrives, never buffered whole
                self._drained_event = Rejected(command, cookie, error[0], error[1])
                return self._next_request()
            end = pos + length
            if length <= self._piece and len(buf) >= end:
                self._pos = end
                return Request(Cmd.WRITE, flags, cookie, offset, length, bytes(buf[pos:end]))
            # Collect the payload in piece buffers so it is copied once, not per recv.
            self._write_header = (flags, cookie, offset, length)
            self._write_done = 0
            return self._continue_write()
        if command == _DISC:
            self._transition(Trigger.CLOSE)
            return Disconnect()
        error = self._validate(command, flags, offset, length)
        if error is not None:
            return Rejected(command, cookie, error[0], error[1])
        return Request(_CMDS[command], flags, cookie, offset, length)

    def _next_piece(self) -> bytearray:
        assert self._write_header is not None
        self._payload_got = 0
        return self.allocate_payload(min(self._piece, self._write_header[3] - self._write_done))

    def _continue_write(self) -> Event | _NeedData:
        assert self._write_header is not None
        buffered = len(self._buf) - self._pos
        if self._payload is None:
            if not buffered:  # allocated by payload_buffer() or here once bytes arrive
                return self._closed() if self._eof else NEED_DATA
            self._payload = self._next_piece()
        payload = self._payload
        if buffered:
            take = min(buffered, len(payload) - self._payload_got)
            with memoryview(self._buf) as view:
                payload[self._payload_got : self._payload_got + take] = view[
                    self._pos : self._pos + take
                ]
            self._pos += take
            self._payload_got += take
        if self._payload_got < len(payload):
            return self._closed() if self._eof else NEED_DATA
        flags, cookie, offset, length = self._write_header
        self._payload = None
        start = offset + self._write_done
        self._write_done += len(payload)
        last = self._write_done == length
        if last:
            self._write_header = None
        if len(payload) == length:
            return Request(Cmd.WRITE, flags, cookie, offset, length, payload)
        return WritePiece(flags, cookie, start, payload, last, length)

    def _validate(
        self, command: int, flags: int, offset: int, length: int
    ) -> tuple[c.Error, str] | None:
        """The spec's error for a request, or None when it is valid (doc/proto.md,
        "Request types" and "Error values")."""
        if self.stopping:
            return c.Error.ESHUTDOWN, "server is shutting down"
        # Before the negotiation check: TRIM and WRITE_ZEROES are never advertised on a
        # read-only export, yet the spec asks for EPERM there ("Error values").
        if self._read_only and command in _MUTATING:
            return c.Error.EPERM, "export is read-only"
        allowed = self._allowed.get(command)
        if allowed is None:
            if command in _CMDS:
                return c.Error.EINVAL, f"command {_CMDS[command].name} was not negotiated"
            return c.Error.EINVAL, f"unknown command {command}"
        if flags & ~allowed:
            return c.Error.EINVAL, f"flags {flags:#x} not valid for this command"
        if command == Cmd.FLUSH:
            return None
        if length == 0:
            return c.Error.EINVAL, "zero-length request"
        if offset + length > self._size:
            if command in _ENOSPC_PAST_END:
                return c.Error.ENOSPC, "request ends past the end of the export"
            return c.Error.EINVAL, "request ends past the end of the export"
        if self._align > 1 and (offset % self._align or length % self._align):
            return c.Error.EINVAL, f"request not aligned to {self._align} bytes"
        if command in (Cmd.READ, Cmd.WRITE) and length > self._max_block:
            if command == Cmd.READ and flags & CmdFlag.DF:
                return c.Error.EOVERFLOW, f"DF read longer than {DF_MAX} bytes"
            return c.Error.EINVAL, f"request longer than {self._max_block} bytes"
        if command == Cmd.READ and flags & CmdFlag.DF and length > DF_MAX:
            return c.Error.EOVERFLOW, f"DF read longer than {DF_MAX} bytes"
        return None

    # ------------------------------------------------------------------ replies (thread-safe)

    def reply_ok(self, cookie: int) -> bytes:
        """Success reply of any command but READ and BLOCK_STATUS."""
        return wire.simple_reply(cookie)

    def reply_error(self, cookie: int, command: int, error: int, message: str = "") -> bytes:
        """Error reply; READ and BLOCK_STATUS get an error chunk when structured replies are on."""
        if self.structured_replies and command in (Cmd.READ, Cmd.BLOCK_STATUS):
            return wire.error_chunk(cookie, error, message)
        return wire.simple_reply(cookie, error)

    def reply_read(
        self, cookie: int, offset: int, data: bytes, *, first: bool = True, last: bool = True
    ) -> list[bytes]:
        """Reply to READ with the data in one piece (buffers to send in order).

        A long read may be answered in several calls, in order, the first with ``first`` and
        the final one with ``last``: simple replies send their header once, structured ones
        a chunk per call.
        """
        if self.structured_replies:
            return [wire.offset_data_header(cookie, offset, len(data), last), data]
        return [wire.simple_reply(cookie), data] if first else [data]

    def reply_read_parts(
        self,
        cookie: int,
        parts: Sequence[tuple[int, int, bytes | None]],
        *,
        first: bool = True,
        last: bool = True,
    ) -> list[bytes]:
        """Reply to READ as ``(offset, length, data or None for a hole)`` parts, in order.

        With structured replies holes become OFFSET_HOLE chunks; otherwise zeroes are sent.
        ``first`` and ``last`` as for :meth:`reply_read`.
        """
        out: list[bytes] = []
        final = len(parts) - 1 if last else -1
        if not self.structured_replies:
            if first:
                out.append(wire.simple_reply(cookie))
            out.extend(data if data is not None else bytes(length) for _, length, data in parts)
            return out
        for i, (offset, length, data) in enumerate(parts):
            if data is None:
                out.append(wire.offset_hole(cookie, offset, length, i == final))
            else:
                out.append(wire.offset_data_header(cookie, offset, length, i == final))
                out.append(data)
        return out

    def reply_block_status(self, cookie: int, descriptors: Iterable[tuple[int, int]]) -> bytes:
        """Reply to BLOCK_STATUS with ``(length, state flags)`` descriptors."""
        return wire.block_status(cookie, c.BASE_ALLOCATION_ID, descriptors)


def _unknown(name: str) -> str:
    if name == "":
        return "this server has no default export: name an export (NBD_OPT_LIST shows them)"
    return f"no export named {name!r}"


def _decode(raw: bytes) -> str | None:
    if len(raw) > c.MAX_STRING or b"\0" in raw:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


def _read_string(data: bytes, pos: int) -> tuple[str, int] | None:
    if pos + 4 > len(data):
        return None
    (size,) = wire.U32.unpack_from(data, pos)
    pos += 4
    if pos + size > len(data):
        return None
    text = _decode(data[pos : pos + size])
    return None if text is None else (text, pos + size)


def _parse_info_request(data: bytes) -> tuple[str, set[int]] | None:
    """INFO/GO payload: u32 name length, name, u16 count, count x u16 info type."""
    head = _read_string(data, 0)
    if head is None:
        return None
    name, pos = head
    if pos + 2 > len(data):
        return None
    (count,) = wire.U16.unpack_from(data, pos)
    pos += 2
    if pos + 2 * count != len(data):
        return None
    requests = {wire.U16.unpack_from(data, pos + 2 * i)[0] for i in range(count)}
    return name, requests


def _parse_meta_request(data: bytes) -> tuple[str, list[str]] | None:
    """LIST/SET_META_CONTEXT payload: u32 len, export name, u32 count, count x (u32 len, query)."""
    head = _read_string(data, 0)
    if head is None or head[1] + 4 > len(data):
        return None
    name, pos = head
    (count,) = wire.U32.unpack_from(data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        item = _read_string(data, pos)
        if item is None:
            return None
        query, pos = item
        queries.append(query)
    return (name, queries) if pos == len(data) else None
