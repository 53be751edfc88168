"""Who holds each export, and the one-writer rule for exclusive exports.

A connection becomes a holder of an export when its client selects it (GO / EXPORT_NAME) and
stops being one when the connection ends.  An *exclusive* export (a catalogue volume not
created ``--shared``) has at most one writable holder: while one connection holds it
writable, every other connection is served the export read-only, so a second writer (a VM
attached writable, ``qemu-io`` without ``-r``, …) fails at open instead of writing beside the
first one.  NBD has no way for a client to say it only wants to read, so the first
connection wins and later ones read (docs/decisions/0002-one-writer-per-volume.md).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from backend.server.exports import Export

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class Holder:
    """One connection using an export; compared by identity."""

    export: str
    peer: str
    writable: bool
    since: float  # time.time() when the client selected the export


class Holders:
    """The holders of every export of one server; thread safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_export: dict[str, list[Holder]] = {}

    def admit(self, peer: str, export: Export) -> tuple[Holder, Export]:
        """Record ``peer`` as a holder of ``export``; returns the holder and the export to
        serve it (made read-only when ``export`` is exclusive and someone holds it writable)."""
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
            writable = not export.read_only and not export.storage.capabilities.read_only
            holder = Holder(export.name, peer, writable, time.time())
            self._by_export.setdefault(export.name, []).append(holder)
        return holder, export

    def preview(self, export: Export) -> Export:
        """What :meth:`admit` would serve now, without admitting anyone (for NBD_OPT_INFO)."""
        with self._lock:
            writer = self._writer(export)
        return export if writer is None else dataclasses.replace(export, read_only=True)

    def _writer(self, export: Export) -> Holder | None:
        """The holder that keeps a new client of ``export`` from writing, if any (lock held)."""
        if not export.exclusive or export.read_only or export.storage.capabilities.read_only:
            return None
        return next((h for h in self._by_export.get(export.name, ()) if h.writable), None)

    def release(self, holder: Holder) -> None:
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
