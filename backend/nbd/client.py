"""The client side of one NBD connection, sans I/O.

Rules of this file (the mirror of ``connection.py``):

* It owns no socket, thread or clock: bytes go in through ``receive_data`` (``b""`` is EOF)
  or straight into ``payload_buffer()`` (``payload_received``), events come out of
  ``next_event``, handshake bytes come out of ``data_to_send`` and ``request`` builds a
  request header (the caller sends a WRITE's payload after it).
* Every state change goes through ``_transition`` and the ``_TRANSITIONS`` table below.
* The handshake is fixed newstyle: [STARTTLS], STRUCTURED_REPLY, SET_META_CONTEXT
  base:allocation, GO with NBD_INFO_BLOCK_SIZE; the three last are pipelined (spec,
  "Option haggling" lets a client send options without waiting).
* Replies may come in any order: they are matched to requests by cookie.  A READ's data is
  written into a buffer made when the request was built (holes are zeroes already), so a
  reply is handed out whole, once its last chunk arrived.
* ``request`` may be called by one thread at a time (the caller serialises sending) while
  another thread receives: the two share only the cookie table, whose single-key
  operations are atomic.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from typing import NamedTuple

from backend.nbd import constants as c
from backend.nbd import wire
from backend.nbd.errors import LocalProtocolError, ProtocolError, RefusedError
from backend.nbd.events import NEED_DATA, ConnectionClosed, _NeedData

Cmd = c.Cmd
TF = c.TransmissionFlag


class ClientState(enum.Enum):
    AWAIT_GREETING = "await-greeting"
    AWAIT_STARTTLS = "await-starttls"  # STARTTLS sent, its reply not yet in
    TLS_PENDING = "tls-pending"  # acknowledged: the caller wraps the socket
    NEGOTIATING = "negotiating"  # STRUCTURED_REPLY, SET_META_CONTEXT, GO in flight
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class ClientTrigger(enum.Enum):
    GREETING = "greeting"
    GREETING_TLS = "greeting-tls"  # greeting received, TLS wanted
    STARTTLS_ACK = "starttls-ack"
    TLS_ESTABLISHED = "tls-established"
    GO_ACK = "go-ack"
    CLOSE = "close"


_TRANSITIONS: dict[tuple[ClientState, ClientTrigger], ClientState] = {
    (ClientState.AWAIT_GREETING, ClientTrigger.GREETING): ClientState.NEGOTIATING,
    (ClientState.AWAIT_GREETING, ClientTrigger.GREETING_TLS): ClientState.AWAIT_STARTTLS,
    (ClientState.AWAIT_STARTTLS, ClientTrigger.STARTTLS_ACK): ClientState.TLS_PENDING,
    (ClientState.TLS_PENDING, ClientTrigger.TLS_ESTABLISHED): ClientState.NEGOTIATING,
    (ClientState.NEGOTIATING, ClientTrigger.GO_ACK): ClientState.TRANSMISSION,
    **{(state, ClientTrigger.CLOSE): ClientState.CLOSED for state in ClientState},
}

# The largest reply chunk payload other than READ data we accept (error messages, block
# status descriptors for one request): anything larger is a broken peer, not a reply.
MAX_CHUNK = 1 << 20
_DONE = int(c.ReplyFlag.DONE)
_ERROR_BIT = 1 << 15


@dataclasses.dataclass(frozen=True, slots=True)
class TLSReady:
    """STARTTLS was acknowledged: wrap the socket now, then call ``tls_established()``."""


@dataclasses.dataclass(frozen=True, slots=True)
class ExportInfo:
    """The export GO opened: what the server said of it."""

    size: int
    flags: TF
    structured_replies: bool
    block_status: bool  # base:allocation was agreed: BLOCK_STATUS may be sent
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 * 1024 * 1024


class Reply(NamedTuple):
    """The whole answer to one request.

    ``error`` is the spec's error value (0: success), ``message`` the server's text if any.
    ``data``: a READ's bytes (zeroes where the server sent holes).  ``extents``: BLOCK_STATUS
    descriptors (length, flags) of the base:allocation context.
    """

    cookie: int
    error: int
    message: str
    data: bytearray | None
    extents: list[tuple[int, int]] | None


ClientEvent = TLSReady | ExportInfo | Reply | ConnectionClosed


class _Pending:
    __slots__ = ("command", "data", "error", "extents", "length", "message", "offset")

    def __init__(self, command: int, offset: int, length: int) -> None:
        self.command = command
        self.offset = offset
        self.length = length
        self.data = bytearray(length) if command == Cmd.READ else None
        self.extents: list[tuple[int, int]] | None = None
        self.error = 0
        self.message = ""


class ClientConnection:
    """One client connection to ``export``, from greeting to disconnect.

    ``tls``: send STARTTLS first (a server that refuses it fails the handshake).
    ``structured_replies`` / ``block_status``: ask for them (the server may say no).
    """

    def __init__(
        self,
        export: str = "",
        *,
        tls: bool = False,
        structured_replies: bool = True,
        block_status: bool = True,
    ) -> None:
        self.export = export
        self._tls = tls
        self._want_structured = structured_replies
        self._want_block_status = block_status and structured_replies
        self.state = ClientState.AWAIT_GREETING
        self.info: ExportInfo | None = None
        self._buf = bytearray()
        self._pos = 0
        self._out = bytearray()
        self._eof = False
        # Option replies still owed, in the order the options were sent.
        self._awaiting: list[int] = []
        self._structured = False
        self._context_id: int | None = None
        self._size = 0
        self._flags = TF(0)
        self._block = (1, 4096, 32 * 1024 * 1024)
        self._pending: dict[int, _Pending] = {}
        self._cookies = itertools.count(1)
        # A data chunk being received into a READ buffer: its view, and the reply it ends.
        self._target: memoryview | None = None
        self._target_done: tuple[int, bool] | None = None

    def _transition(self, trigger: ClientTrigger) -> None:
        new = _TRANSITIONS.get((self.state, trigger))
        if new is None:
            raise LocalProtocolError(f"{trigger.value} not allowed in state {self.state.value}")
        self.state = new

    # ------------------------------------------------------------------ bytes in and out

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the server; ``b""`` means EOF."""
        if not data:
            self._eof = True
            return
        if self._target is not None and self._pos == len(self._buf):
            # Straight into the READ buffer: no copy through _buf.
            take = min(len(data), len(self._target))
            self._target[:take] = data[:take]
            self._advance_target(take)
            data = data[take:]
            if not data:
                return
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def payload_buffer(self) -> memoryview | None:
        """Where the next bytes may be received directly (``recv_into``), or None."""
        if self._target is not None and self._pos == len(self._buf):
            return self._target
        return None

    def payload_received(self, count: int) -> None:
        """``count`` bytes were received into ``payload_buffer()``."""
        self._advance_target(count)

    def _advance_target(self, count: int) -> None:
        assert self._target is not None
        self._target = self._target[count:] if count < len(self._target) else None

    def data_to_send(self) -> bytes:
        """Handshake bytes to send (empty when there is nothing)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def tls_established(self) -> None:
        """The caller finished the TLS handshake after a TLSReady event."""
        self._transition(ClientTrigger.TLS_ESTABLISHED)
        self._send_options()

    def close(self) -> None:
        """Forget the connection; pending requests are the caller's to fail."""
        if self.state is not ClientState.CLOSED:
            self._transition(ClientTrigger.CLOSE)

    def disconnect(self) -> bytes:
        """NBD_CMD_DISC: the last bytes to send before closing the socket."""
        if self.state is not ClientState.TRANSMISSION:
            raise LocalProtocolError("DISC outside transmission")
        self._transition(ClientTrigger.CLOSE)
        return wire.request(Cmd.DISC, 0, 0, 0)

    def take_pending(self) -> list[int]:
        """The cookies of every request without a reply (to retry elsewhere), forgotten."""
        cookies = list(self._pending)
        self._pending.clear()
        return cookies

    # ------------------------------------------------------------------ requests

    def request(self, command: Cmd, offset: int, length: int, flags: int = 0) -> tuple[int, bytes]:
        """A new request's cookie and header; a WRITE's ``length`` payload bytes follow it.

        Raises LocalProtocolError for a command the export did not advertise.
        """
        if self.state is not ClientState.TRANSMISSION:
            raise LocalProtocolError(f"request in state {self.state.value}")
        needs = _NEEDS_FLAG.get(command)
        if needs is not None and not self._flags & needs:
            raise LocalProtocolError(f"{command.name} not advertised by the server")
        if command == Cmd.BLOCK_STATUS and self._context_id is None:
            raise LocalProtocolError("BLOCK_STATUS without an agreed meta context")
        if command in _WRITING and self._flags & TF.READ_ONLY:
            raise LocalProtocolError(f"{command.name} on a read-only export")
        if flags & c.CmdFlag.FUA and not self._flags & TF.SEND_FUA:
            raise LocalProtocolError("FUA not advertised by the server")
        cookie = next(self._cookies)
        self._pending[cookie] = _Pending(command, offset, length)
        return cookie, wire.request(command, cookie, offset, length, flags=flags)

    def forget(self, cookie: int) -> None:
        """Stop waiting for ``cookie`` (its request was never sent); a reply to it later is
        a protocol error."""
        self._pending.pop(cookie, None)

    # ------------------------------------------------------------------ events

    def next_event(self) -> ClientEvent | _NeedData:
        """The next event, or NEED_DATA.  Raises ProtocolError (broken server: close) or
        RefusedError (the server said no to an option we need)."""
        if self.state is ClientState.CLOSED:
            return ConnectionClosed(clean=True)
        if self.state is ClientState.TRANSMISSION:
            return self._next_reply()
        if self.state is ClientState.AWAIT_GREETING:
            return self._greeting()
        if self.state is ClientState.TLS_PENDING:
            return NEED_DATA
        return self._next_option_reply()

    def _eof_event(self) -> ConnectionClosed | _NeedData:
        if not self._eof:
            return NEED_DATA
        clean = self._pos == len(self._buf) and self._target is None and not self._pending
        self._transition(ClientTrigger.CLOSE)
        return ConnectionClosed(clean=clean)

    def _take(self, size: int) -> bytes | None:
        if len(self._buf) - self._pos < size:
            return None
        data = bytes(self._buf[self._pos : self._pos + size])
        self._pos += size
        return data

    def _greeting(self) -> ClientEvent | _NeedData:
        raw = self._take(wire.GREETING.size)
        if raw is None:
            return self._eof_event()
        magic, ihaveopt, flags = wire.GREETING.unpack(raw)
        if magic != c.NBDMAGIC or ihaveopt != c.IHAVEOPT:
            raise ProtocolError("not a newstyle NBD server (bad greeting magic)")
        if not flags & c.HandshakeFlag.FIXED_NEWSTYLE:
            raise ProtocolError("server is not fixed newstyle")
        client = c.ClientFlag.C_FIXED_NEWSTYLE
        if flags & c.HandshakeFlag.NO_ZEROES:
            client |= c.ClientFlag.C_NO_ZEROES
        self._out += wire.CLIENT_FLAGS.pack(client)
        if self._tls:
            self._transition(ClientTrigger.GREETING_TLS)
            self._option(c.Opt.STARTTLS)
        else:
            self._transition(ClientTrigger.GREETING)
            self._send_options()
        return self.next_event()

    def _option(self, option: c.Opt, data: bytes = b"") -> None:
        self._out += wire.OPTION_HEADER.pack(c.IHAVEOPT, option, len(data)) + data
        self._awaiting.append(option)

    def _send_options(self) -> None:
        name = self.export.encode()
        if len(name) > c.MAX_STRING:
            raise LocalProtocolError("export name longer than the spec allows")
        named = wire.U32.pack(len(name)) + name
        if self._want_structured:
            self._option(c.Opt.STRUCTURED_REPLY)
        if self._want_block_status:
            query = c.BASE_ALLOCATION.encode()
            self._option(
                c.Opt.SET_META_CONTEXT, named + wire.U32.pack(1) + wire.U32.pack(len(query)) + query
            )
        self._option(c.Opt.GO, named + wire.U16.pack(1) + wire.U16.pack(c.Info.BLOCK_SIZE))

    def _next_option_reply(self) -> ClientEvent | _NeedData:
        while True:
            if len(self._buf) - self._pos < wire.OPTION_REPLY.size:
                return self._eof_event()
            magic, option, reply, length = wire.OPTION_REPLY.unpack_from(self._buf, self._pos)
            if magic != c.REPLY_MAGIC:
                raise ProtocolError(f"bad option reply magic {magic:#x}")
            if length > c.MAX_OPTION_LENGTH:
                raise ProtocolError(f"option reply of {length} bytes")
            if len(self._buf) - self._pos < wire.OPTION_REPLY.size + length:
                return self._eof_event()
            if not self._awaiting or option != self._awaiting[0]:
                raise ProtocolError(f"reply to option {option}, which was not asked")
            self._pos += wire.OPTION_REPLY.size
            data = self._take(length) or b""
            event = self._option_reply(option, reply, data)
            if event is not None:
                return event

    def _option_reply(self, option: int, reply: int, data: bytes) -> ClientEvent | None:
        final = reply == c.Rep.ACK or reply & (1 << 31)
        if final:
            self._awaiting.pop(0)
        if reply & (1 << 31):
            self._option_error(option, reply, data)
            return None
        if option == c.Opt.STARTTLS:
            if reply != c.Rep.ACK:
                raise ProtocolError(f"STARTTLS answered with reply type {reply}")
            self._transition(ClientTrigger.STARTTLS_ACK)
            return TLSReady()
        if option == c.Opt.STRUCTURED_REPLY:
            self._structured = reply == c.Rep.ACK
            return None
        if option == c.Opt.SET_META_CONTEXT:
            agreed = reply == c.Rep.META_CONTEXT and len(data) >= 4
            if agreed and data[4:].decode(errors="replace") == c.BASE_ALLOCATION:
                self._context_id = wire.U32.unpack_from(data)[0]
            return None
        return self._go_reply(reply, data)

    def _option_error(self, option: int, reply: int, data: bytes) -> None:
        message = data.decode(errors="replace")
        # Optional options: the server may not implement them; we do without.
        if option in (c.Opt.STRUCTURED_REPLY, c.Opt.SET_META_CONTEXT):
            if option == c.Opt.SET_META_CONTEXT:
                self._context_id = None
            return
        try:
            name = c.Rep(reply).name
        except ValueError:
            name = f"error {reply & 0x7FFFFFFF}"
        raise RefusedError(c.Opt(option).name, name, message)

    def _go_reply(self, reply: int, data: bytes) -> ExportInfo | None:
        if reply == c.Rep.INFO:
            if len(data) < 2:
                raise ProtocolError("empty NBD_REP_INFO")
            kind = wire.U16.unpack_from(data)[0]
            if kind == c.Info.EXPORT and len(data) == wire.INFO_EXPORT.size:
                _, self._size, flags = wire.INFO_EXPORT.unpack(data)
                self._flags = TF(flags)
            elif kind == c.Info.BLOCK_SIZE and len(data) == wire.INFO_BLOCK_SIZE.size:
                _, minimum, preferred, maximum = wire.INFO_BLOCK_SIZE.unpack(data)
                self._block = (minimum, preferred, maximum)
            return None
        if reply != c.Rep.ACK:
            raise ProtocolError(f"GO answered with reply type {reply}")
        if not self._flags & TF.HAS_FLAGS:
            raise ProtocolError("GO finished without NBD_INFO_EXPORT")
        self._transition(ClientTrigger.GO_ACK)
        minimum, preferred, maximum = self._block
        self.info = ExportInfo(
            size=self._size,
            flags=self._flags,
            structured_replies=self._structured,
            block_status=self._structured and self._context_id is not None,
            min_block=minimum,
            preferred_block=preferred,
            max_block=maximum,
        )
        if not self._structured:
            self._context_id = None
        return self.info

    # ------------------------------------------------------------------ replies

    def _next_reply(self) -> Reply | ConnectionClosed | _NeedData:
        while True:
            if self._target is not None:
                # Data chunk bytes buffered before the target was known move over now.
                have = len(self._buf) - self._pos
                if not have:
                    return self._eof_event()
                take = min(have, len(self._target))
                self._target[:take] = self._buf[self._pos : self._pos + take]
                self._pos += take
                self._advance_target(take)
                if self._target is not None:
                    return self._eof_event()
            if self._target_done is not None:
                cookie, done = self._target_done
                self._target_done = None
                if done:
                    return self._finish(cookie)
            have = len(self._buf) - self._pos
            if have < 4:
                return self._eof_event()
            magic = wire.U32.unpack_from(self._buf, self._pos)[0]
            if magic == c.SIMPLE_REPLY_MAGIC:
                event = self._simple_reply(have)
            elif magic == c.STRUCTURED_REPLY_MAGIC and self._structured:
                event = self._chunk(have)
            else:
                raise ProtocolError(f"bad reply magic {magic:#x}")
            if event is NEED_DATA:
                return self._eof_event()
            if event is not None:
                return event

    def _request_of(self, cookie: int) -> _Pending:
        pending = self._pending.get(cookie)
        if pending is None:
            raise ProtocolError(f"reply to unknown cookie {cookie}")
        return pending

    def _simple_reply(self, have: int) -> Reply | _NeedData | None:
        if have < wire.SIMPLE_REPLY.size:
            return NEED_DATA
        _, error, cookie = wire.SIMPLE_REPLY.unpack_from(self._buf, self._pos)
        pending = self._request_of(cookie)
        self._pos += wire.SIMPLE_REPLY.size
        pending.error = error
        if pending.data is not None and not error:
            if self._structured:
                raise ProtocolError("simple reply to a READ after structured replies")
            self._target = memoryview(pending.data)
            self._target_done = (cookie, True)
            return None
        return self._finish(cookie)

    def _finish(self, cookie: int) -> Reply:
        pending = self._pending.pop(cookie)
        data = pending.data if not pending.error else None
        return Reply(cookie, pending.error, pending.message, data, pending.extents)

    def _chunk(self, have: int) -> Reply | _NeedData | None:
        size = wire.STRUCTURED_REPLY.size
        if have < size:
            return NEED_DATA
        _, flags, kind, cookie, length = wire.STRUCTURED_REPLY.unpack_from(self._buf, self._pos)
        pending = self._request_of(cookie)
        done = bool(flags & _DONE)
        if kind == c.ReplyType.OFFSET_DATA:
            if have < size + 8:
                return NEED_DATA
            offset = wire.U64.unpack_from(self._buf, self._pos + size)[0]
            start, count = offset - pending.offset, length - 8
            if pending.data is None or length < 8 or start < 0 or start + count > pending.length:
                raise ProtocolError(f"OFFSET_DATA chunk outside its READ (cookie {cookie})")
            self._pos += size + 8
            self._target = memoryview(pending.data)[start : start + count] if count else None
            self._target_done = (cookie, done)
            return None
        if length > MAX_CHUNK:
            raise ProtocolError(f"reply chunk of {length} bytes")
        if have < size + length:
            return NEED_DATA
        body = bytes(self._buf[self._pos + size : self._pos + size + length])
        self._pos += size + length
        if kind == c.ReplyType.OFFSET_HOLE:
            self._hole(pending, body, cookie)
        elif kind == c.ReplyType.BLOCK_STATUS:
            if pending.command != Cmd.BLOCK_STATUS or length < 12 or (length - 4) % 8:
                raise ProtocolError(f"malformed BLOCK_STATUS chunk (cookie {cookie})")
            if wire.U32.unpack_from(body)[0] == self._context_id:
                pending.extents = [
                    wire.DESCRIPTOR.unpack_from(body, pos) for pos in range(4, length, 8)
                ]
        elif kind & _ERROR_BIT:
            if length < 6:
                raise ProtocolError(f"malformed error chunk (cookie {cookie})")
            error, text = wire.ERROR_CHUNK.unpack_from(body)
            # The first error wins; a server may send one per failed part of a READ.
            if not pending.error:
                pending.error = error or int(c.Error.EIO)
                pending.message = body[6 : 6 + text].decode(errors="replace")
        elif kind != c.ReplyType.NONE:
            raise ProtocolError(f"unknown reply chunk type {kind} (cookie {cookie})")
        return self._finish(cookie) if done else None

    @staticmethod
    def _hole(pending: _Pending, body: bytes, cookie: int) -> None:
        if pending.data is None or len(body) != wire.HOLE.size:
            raise ProtocolError(f"malformed OFFSET_HOLE chunk (cookie {cookie})")
        offset, length = wire.HOLE.unpack(body)
        if offset < pending.offset or offset + length > pending.offset + pending.length:
            raise ProtocolError(f"OFFSET_HOLE chunk outside its READ (cookie {cookie})")
        # The buffer started as zeroes; a hole after a data chunk for the same bytes would
        # break the spec, which forbids overlapping chunks, so there is nothing to clear.


_NEEDS_FLAG: dict[int, TF] = {
    Cmd.FLUSH: TF.SEND_FLUSH,
    Cmd.TRIM: TF.SEND_TRIM,
    Cmd.CACHE: TF.SEND_CACHE,
    Cmd.WRITE_ZEROES: TF.SEND_WRITE_ZEROES,
}
_WRITING = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})
