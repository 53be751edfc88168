"""Sans-IO NBD protocol core (server role): bytes in, events out, replies to bytes."""

from backend.nbd.connection import DF_MAX, ServerConnection, State
from backend.nbd.errors import (
    ExportForbiddenError,
    ExportUnavailableError,
    LocalProtocolError,
    NBDError,
    ProtocolError,
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
    "ConnectionClosed",
    "Disconnect",
    "Event",
    "ExportDescription",
    "ExportForbiddenError",
    "ExportListRequested",
    "ExportRequested",
    "ExportSelected",
    "ExportUnavailableError",
    "LocalProtocolError",
    "NBDError",
    "ProtocolError",
    "Rejected",
    "Request",
    "ServerConnection",
    "StartTLS",
    "State",
    "TLSPolicy",
    "WritePiece",
]
