"""Errors of the protocol core.

    NBDError
     ├── ProtocolError       the peer broke the protocol; the connection must close
     ├── ExportUnavailableError   an export exists but cannot be served now (export tables)
     │    └── ExportForbiddenError    … nor ever to this client as it asked (a stale epoch)
     ├── RefusedError        the server refused an option the client needs (client role)
     └── LocalProtocolError  our caller misused the core (a bug in the server)

A request the spec lets us refuse (bad range, bad flags, …) is not an exception: it becomes a
:class:`~backend.nbd.events.Rejected` event that the server answers with the spec's error.
"""

from __future__ import annotations


class NBDError(Exception):
    """Base of the core's exceptions."""


class ProtocolError(NBDError):
    """The peer sent something we cannot answer in band: close the connection.

    ``reason`` is a short human-readable description for the log.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ExportUnavailableError(NBDError):
    """Raised by the server's export tables for an export that exists but cannot be served
    now (its storage is unreachable, or another server holds it writable).  The core never
    raises it: the session answers ``ExportRequested`` with ``export_refused(reason)``, and
    the client gets NBD_REP_ERR_UNKNOWN ("the requested export is not available")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ExportForbiddenError(ExportUnavailableError):
    """Raised by the server's export tables when the export exists but the server's policy
    refuses the client what it asked for (a fenced connection naming an epoch older than the
    one the volume promised).  The session answers ``export_refused(reason, forbidden=True)``
    and the client gets NBD_REP_ERR_POLICY, which tells it retrying will not help."""


class RefusedError(NBDError):
    """The server answered an option the client cannot do without (STARTTLS, GO) with an
    error reply: ``option`` and ``reply`` are the spec's names, ``message`` the server's."""

    def __init__(self, option: str, reply: str, message: str) -> None:
        super().__init__(f"{option} refused ({reply}){': ' + message if message else ''}")
        self.option = option
        self.reply = reply
        self.message = message


class LocalProtocolError(NBDError):
    """The server asked the core for something the current state does not allow."""
