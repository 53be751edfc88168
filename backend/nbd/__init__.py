"""Sans-IO NBD protocol core: the server role (bytes in, events out, replies to bytes) and
the client role (``ClientConnection``: handshake and request bytes out, replies in)."""

from backend.nbd.client import ClientConnection, ExportInfo, Reply, TLSReady
from backend.nbd.connection import DF_MAX, ServerConnection, State
from backend.nbd.errors import (
    ExportForbiddenError,
    ExportUnavailableError,
    LocalProtocolError,
    NBDError,
    ProtocolError,
    RefusedError,
)
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
)

__all__ = [
    "DF_MAX",
    "NEED_DATA",
    "Aborted",
    "ClientConnection",
    "ConnectionClosed",
    "Disconnect",
    "Event",
    "ExportDescription",
    "ExportForbiddenError",
    "ExportInfo",
    "ExportListRequested",
    "ExportRequested",
    "ExportSelected",
    "ExportUnavailableError",
    "LocalProtocolError",
    "NBDError",
    "ProtocolError",
    "RefusedError",
    "Rejected",
    "Reply",
    "Request",
    "ServerConnection",
    "StartTLS",
    "State",
    "TLSPolicy",
    "TLSReady",
    "WritePiece",
]
