"""Events the core hands to the server, named after the spec's own words.

Handshake: :class:`StartTLS`, :class:`ExportRequested` and :class:`ExportListRequested` (the
core needs to know an export: answer on the connection before the next ``next_event``),
:class:`ExportSelected`, :class:`Aborted`.
Transmission: :class:`Request` (every command but DISC), :class:`Rejected` (a request that
failed validation: answer it with ``error``), :class:`Disconnect`.
End of input: :class:`ConnectionClosed`.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple

from backend.nbd.constants import Cmd, Error, Opt, TransmissionFlag


class TLSPolicy(enum.Enum):
    """Per-export TLS policy."""

    OFF = "off"  # served only on plaintext connections
    ALLOWED = "allowed"  # served with or without TLS
    REQUIRED = "required"  # served only after STARTTLS


@dataclasses.dataclass(frozen=True, slots=True)
class ExportDescription:
    """What the handshake needs to know of an export (the server fills it from a volume)."""

    name: str
    size: int
    flags: TransmissionFlag
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 * 1024 * 1024
    tls: TLSPolicy = TLSPolicy.ALLOWED


class _Event:
    __slots__ = ()


class _NeedData(_Event):
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""Returned by ``next_event`` when more bytes must be received first."""


@dataclasses.dataclass(frozen=True, slots=True)
class StartTLS(_Event):
    """STARTTLS was acknowledged: send pending data, wrap the socket, call tls_established()."""


@dataclasses.dataclass(frozen=True, slots=True)
class ExportRequested(_Event):
    """The client named an export in ``option`` (INFO, GO, EXPORT_NAME, LIST_META_CONTEXT or
    SET_META_CONTEXT); ``name`` ``""`` means the default export.

    Answer with ``conn.export_chosen(description)`` or ``conn.export_refused(reason)`` before
    calling ``next_event`` again; the core then checks the export's TLS policy and writes the
    option's replies.  When ``selects`` (GO, EXPORT_NAME) an accepted answer starts
    transmission on exactly that description, so give the one the session will serve.
    """

    option: Opt
    name: str

    @property
    def selects(self) -> bool:
        return self.option in (Opt.GO, Opt.EXPORT_NAME)


@dataclasses.dataclass(frozen=True, slots=True)
class ExportListRequested(_Event):
    """NBD_OPT_LIST: answer with ``conn.export_list(descriptions)`` (every export; the core
    leaves out those the connection's TLS state hides) before calling ``next_event`` again."""


@dataclasses.dataclass(frozen=True, slots=True)
class ExportSelected(_Event):
    """Negotiation finished (GO or EXPORT_NAME): transmission starts on ``export``."""

    export: ExportDescription
    structured_replies: bool
    block_status: bool  # base:allocation was negotiated for this export


@dataclasses.dataclass(frozen=True, slots=True)
class Aborted(_Event):
    """The client sent NBD_OPT_ABORT: send pending data, then close."""


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionClosed(_Event):
    """The peer closed its side (``receive_data(b"")``)."""

    clean: bool  # False when the peer vanished mid-message


class Request(NamedTuple):
    """A validated transmission request.  ``payload`` is the WRITE data, else empty.

    A NamedTuple rather than a frozen dataclass: one is built per request on the hot path,
    and a tuple is built three times faster (measured: 0.3 vs 1.0 µs).
    """

    command: Cmd
    flags: int
    cookie: int
    offset: int
    length: int
    payload: bytes | bytearray = b""


class WritePiece(NamedTuple):
    """Part of a WRITE longer than the connection's piece size; the pieces come in order.

    Write ``data`` at ``offset``; once the ``last`` piece is written, reply to ``cookie``
    (with the first error any piece met).  ``length`` is that of the whole request.
    """

    flags: int
    cookie: int
    offset: int
    data: bytearray
    last: bool
    length: int


@dataclasses.dataclass(frozen=True, slots=True)
class Rejected(_Event):
    """A request that failed validation; reply with ``error`` (its payload was consumed)."""

    command: int
    cookie: int
    error: Error
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class Disconnect(_Event):
    """NBD_CMD_DISC: finish outstanding requests, then close."""


Event = (
    StartTLS
    | ExportRequested
    | ExportListRequested
    | ExportSelected
    | Aborted
    | ConnectionClosed
    | Request
    | WritePiece
    | Rejected
    | Disconnect
)
