"""Who holds each export, and the one-writer rule for exclusive exports.

A connection becomes a holder of an export when its client selects it (GO / EXPORT_NAME) and
stops being one when the connection ends.  An *exclusive* export (a catalogue volume not
created ``--shared``) has at most one writable holder: while one connection holds it
writable, every other connection is served the export read-only, so a second writer (a VM
attached writable, ``qemu-io`` without ``-r``, …) fails at open instead of writing beside the
first one.  NBD has no way for a client to say it only wants to read, so the first
connection wins and later ones read (docs/decisions/0002-one-writer-per-volume.md).

Fenced connections (an export naming a replication epoch, backend/server/fencing.py) are
exempt among themselves: all sessions of the current epoch write.  A volume that promised an
epoch is served read-only to every plain connection, so only its engine writes it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from backend.server.exports import Export
from backend.server.fencing import Pass

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class Holder:
    """One connection using an export; compared by identity."""

    export: str
    peer: str
    writable: bool
    since: float  # time.time() when the client selected the export
    epoch: int | None = None  # the replication epoch it took (None: a plain connection)
    ticket: Pass | None = None  # its admission to the export's fence, if it has one


class Holders:
    """The holders of every export of one server; thread safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_export: dict[str, list[Holder]] = {}

    def admit(
        self, peer: str, export: Export, on_revoked: Callable[[], None] = lambda: None
    ) -> tuple[Holder, Export]:
        """Record ``peer`` as a holder of ``export``; returns the holder and the export to
        serve it (made read-only when ``export`` is exclusive and someone holds it writable,
        or when it is fenced and ``peer`` named no epoch).

        An export naming an epoch takes it first (:meth:`Fence.take`: may raise
        ExportForbiddenError, and waits for older sessions to drain); ``on_revoked`` is
        called when a later epoch, or the first one for a plain writer, revokes the holder.
        """
        fence = export.fence
        if fence is not None and export.epoch is not None:
            taken = fence.take(export.epoch, on_revoked)
            writable = not export.read_only and not export.storage.capabilities.read_only
            holder = Holder(export.name, peer, writable, time.time(), export.epoch, taken)
            with self._lock:
                self._by_export.setdefault(export.name, []).append(holder)
            return holder, export
        with self._lock:
            writer = self._writer(export)
            if writer is not None:
                log.warning(
                    "%s: volume %r is held writable by %s since %s: serving it read-only",
                    peer,
                    export.name,
                    writer.peer,
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(writer.since)),
                )
                export = dataclasses.replace(export, read_only=True)
            elif fence is not None and fence.epoch > 0:
                export = dataclasses.replace(export, read_only=True)
            writable = not export.read_only and not export.storage.capabilities.read_only
            ticket: Pass | None = None
            if writable and fence is not None:
                ticket = fence.plain(on_revoked)
                if ticket is None:  # an epoch was taken since the check above
                    export = dataclasses.replace(export, read_only=True)
                    writable = False
            holder = Holder(export.name, peer, writable, time.time(), None, ticket)
            self._by_export.setdefault(export.name, []).append(holder)
        return holder, export

    def preview(self, export: Export) -> Export:
        """What :meth:`admit` would serve now, without admitting anyone (for NBD_OPT_INFO)."""
        if export.fence is not None and export.epoch is None and export.fence.epoch > 0:
            return dataclasses.replace(export, read_only=True)
        with self._lock:
            writer = self._writer(export)
        return export if writer is None else dataclasses.replace(export, read_only=True)

    def _writer(self, export: Export) -> Holder | None:
        """The holder that keeps a new client of ``export`` from writing, if any (lock held)."""
        if not export.exclusive or export.read_only or export.storage.capabilities.read_only:
            return None  # fenced exports are not exclusive: their epoch decides
        return next((h for h in self._by_export.get(export.name, ()) if h.writable), None)

    def release(self, holder: Holder) -> None:
        if holder.ticket is not None:
            holder.ticket.release()
        with self._lock:
            held = self._by_export.get(holder.export, [])
            if holder in held:
                held.remove(holder)
            if not held:
                self._by_export.pop(holder.export, None)

    def of(self, name: str) -> list[Holder]:
        """The holders of export ``name``, oldest first."""
        with self._lock:
            return list(self._by_export.get(name, ()))

    def counts(self) -> dict[str, int]:
        """Open connections per export name."""
        with self._lock:
            return {name: len(held) for name, held in self._by_export.items()}
