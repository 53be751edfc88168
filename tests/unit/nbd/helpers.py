"""A minimal client side of the wire for feeding the core in tests (no sockets), and a
server side that answers the core's export questions from plain descriptions (no server)."""

from __future__ import annotations

import struct
import weakref
from collections.abc import Sequence
from typing import TypedDict, Unpack

from backend.nbd import (
    NEED_DATA,
    Event,
    ExportDescription,
    ExportListRequested,
    ExportRequested,
    ExportSelected,
    ExportUnavailableError,
    ServerConnection,
    TLSPolicy,
)
from backend.nbd import constants as c
from backend.nbd.constants import TransmissionFlag as TFlag
from backend.nbd.events import _NeedData

WRITABLE = (
    TFlag.HAS_FLAGS
    | TFlag.SEND_FLUSH
    | TFlag.SEND_FUA
    | TFlag.SEND_TRIM
    | TFlag.SEND_WRITE_ZEROES
    | TFlag.SEND_FAST_ZERO
    | TFlag.SEND_CACHE
    | TFlag.CAN_MULTI_CONN
)
SIZE = 1 << 20


class Directory:
    """Answers a connection's ExportRequested / ExportListRequested events the way a server's
    session does: look the name up once; for GO / EXPORT_NAME of an export the core will
    accept, ``select`` it (a session admits it as a holder there).  Subclasses override
    ``lookup`` / ``select``; raising ExportUnavailableError from either refuses with a reason.
    """

    def __init__(self, *exports: ExportDescription) -> None:
        self._exports = {e.name: e for e in exports}
        self.selected: list[str] = []
        self.asked: list[Event] = []

    def lookup(self, name: str) -> ExportDescription | None:
        return self._exports.get(name or next(iter(self._exports)))

    def exports(self) -> Sequence[ExportDescription]:
        return list(self._exports.values())

    def select(self, export: ExportDescription) -> ExportDescription:
        self.selected.append(export.name)
        return export

    def answer(self, conn: ServerConnection, event: Event) -> None:
        self.asked.append(event)
        if isinstance(event, ExportListRequested):
            conn.export_list(self.exports())
            return
        assert isinstance(event, ExportRequested)
        try:
            export = self.lookup(event.name)
            if export is not None and event.selects and conn.serves(export.tls):
                export = self.select(export)
        except ExportUnavailableError as err:
            conn.export_refused(err.reason)
            return
        if export is None:
            conn.export_refused()
        else:
            conn.export_chosen(export)


# The Directory answering each connection's questions inside events().
_ANSWERERS: weakref.WeakKeyDictionary[ServerConnection, Directory] = weakref.WeakKeyDictionary()


class ConnectionOptions(TypedDict, total=False):
    """ServerConnection's keyword arguments."""

    tls_available: bool
    max_request: int
    piece: int


def connection(directory: Directory, **kwargs: Unpack[ConnectionOptions]) -> ServerConnection:
    """A new connection whose export questions ``directory`` answers inside events()."""
    conn = ServerConnection(**kwargs)
    _ANSWERERS[conn] = directory
    return conn


class ExportFields(TypedDict, total=False):
    """ExportDescription's fields after its name."""

    size: int
    flags: TFlag
    description: str
    min_block: int
    preferred_block: int
    max_block: int
    tls: TLSPolicy


def export(name: str = "disk", **kwargs: Unpack[ExportFields]) -> ExportDescription:
    fields: ExportFields = {"size": SIZE, "flags": WRITABLE}
    fields.update(kwargs)
    return ExportDescription(name, **fields)


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", c.IHAVEOPT, opt, len(data)) + data


def info_payload(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_payload(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split handshake output into (option, reply type, payload)."""
    replies = []
    pos = 0
    while pos < len(data):
        magic, opt, kind, length = struct.unpack_from(">QIII", data, pos)
        assert magic == c.REPLY_MAGIC
        pos += 20
        replies.append((opt, kind, data[pos : pos + length]))
        pos += length
    return replies


def events(conn: ServerConnection, data: bytes = b"") -> list[Event]:
    """Feed ``data`` and collect events until NEED_DATA; the core's export questions are
    answered by the connection's Directory and left out (``Directory.asked`` has them)."""
    if data:
        conn.receive_data(data)
    out: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return out
        assert not isinstance(event, _NeedData)
        if isinstance(event, ExportRequested | ExportListRequested):
            _ANSWERERS[conn].answer(conn, event)
            continue
        out.append(event)
        if conn.state.value == "closed":
            return out


def negotiated(
    *exports: ExportDescription,
    structured: bool = True,
    meta: bool = True,
    block_size: bool = True,
    tls_available: bool = False,
    name: str = "disk",
    max_request: int = c.MAX_PAYLOAD,
) -> ServerConnection:
    """A connection already in transmission on ``name``."""
    directory = Directory(*(exports or (export(),)))
    conn = connection(directory, tls_available=tls_available, max_request=max_request)
    conn.data_to_send()
    data = struct.pack(">I", c.ClientFlag.C_FIXED_NEWSTYLE | c.ClientFlag.C_NO_ZEROES)
    if structured:
        data += option(c.Opt.STRUCTURED_REPLY)
    if meta:
        data += option(c.Opt.SET_META_CONTEXT, meta_payload(name, c.BASE_ALLOCATION))
    infos = (c.Info.BLOCK_SIZE,) if block_size else ()
    data += option(c.Opt.GO, info_payload(name, *infos))
    got = events(conn, data)
    assert isinstance(got[-1], ExportSelected), got
    conn.data_to_send()
    return conn


def request(cmd: int, cookie: int = 1, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", c.REQUEST_MAGIC, flags, cmd, cookie, offset, length)


__all__ = ["SIZE", "WRITABLE", "Directory", "TLSPolicy", "connection", "export"]
