"""Exports: a name, the storage behind it and how it is offered (TLS policy, description)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from backend.nbd import ExportDescription, TLSPolicy
from backend.nbd.constants import TransmissionFlag
from backend.storage import Capabilities, Storage, StorageError

if TYPE_CHECKING:
    from backend.server.fencing import Fence

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Export:
    """One export served by this process; the storage is shared by all its connections."""

    name: str
    storage: Storage
    description: str = ""
    tls: TLSPolicy = TLSPolicy.ALLOWED
    read_only: bool = False
    # Alignment requested by the operator on top of what the storage needs.
    min_block: int = 1
    # At most one connection may hold it writable (backend/server/holders.py); such an
    # export never advertises CAN_MULTI_CONN, as a client's second connection would read only.
    exclusive: bool = False
    # The volume's epoch fence (catalogue volumes: backend/server/fencing.py), and the epoch
    # this client named to take it (None: a plain connection).
    fence: Fence | None = None
    epoch: int | None = None

    def describe(self) -> ExportDescription:
        caps = self.storage.capabilities
        return ExportDescription(
            name=self.name,
            size=self.storage.size,
            flags=transmission_flags(caps, read_only=self.read_only, exclusive=self.exclusive),
            description=self.description,
            min_block=max(self.min_block, caps.min_block),
            preferred_block=max(caps.preferred_block, self.min_block, caps.min_block),
            max_block=caps.max_block,
            tls=self.tls,
        )


def transmission_flags(
    caps: Capabilities, *, read_only: bool, exclusive: bool = False
) -> TransmissionFlag:
    """The flags an export advertises, derived from what its storage declares."""
    flags = TransmissionFlag.HAS_FLAGS
    if read_only or caps.read_only:
        flags |= TransmissionFlag.READ_ONLY
    else:
        if caps.can_trim:
            flags |= TransmissionFlag.SEND_TRIM
        if caps.can_zero:
            flags |= TransmissionFlag.SEND_WRITE_ZEROES
            if caps.can_fast_zero:
                flags |= TransmissionFlag.SEND_FAST_ZERO
    if caps.can_flush:
        flags |= TransmissionFlag.SEND_FLUSH
    if caps.can_fua:
        flags |= TransmissionFlag.SEND_FUA
    if caps.can_cache:
        flags |= TransmissionFlag.SEND_CACHE
    if caps.can_multi_conn and not exclusive:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    if caps.rotational:
        flags |= TransmissionFlag.ROTATIONAL
    return flags


class Exports(Protocol):
    """What a server serves; sessions answer the protocol core's export questions from it."""

    def get(self, name: str) -> Export | None:
        """The export for ``name`` (``""``: the default one), or None.  May raise
        :class:`~backend.nbd.ExportUnavailableError` for one that cannot be served now."""

    def exports(self) -> Sequence[ExportDescription]:
        """Every export, for NBD_OPT_LIST."""

    def close(self) -> bool:
        """Flush and close every storage; False if a flush failed."""


def close_storages(exports: Sequence[Export]) -> bool:
    """Flush (when writable) and close each export's storage; False if a flush failed."""
    clean = True
    for export in exports:
        try:
            if not export.read_only and export.storage.capabilities.can_flush:
                export.storage.flush()
        except StorageError as err:
            log.error("flushing export %r failed: %s", export.name, err)
            clean = False
        export.storage.close()
    return clean


class ExportTable:
    """A fixed set of exports (``nbs serve --export``); implements :class:`Exports`.

    ``default`` names the export a client gets when it asks for the empty name.
    """

    def __init__(self, exports: Sequence[Export], default: str | None = None) -> None:
        self._lock = threading.Lock()
        self._exports = {e.name: e for e in exports}
        self._default = default if default is not None else (exports[0].name if exports else "")

    def get(self, name: str) -> Export | None:
        with self._lock:
            if name == "" and "" not in self._exports:
                name = self._default
            return self._exports.get(name)

    def exports(self) -> Sequence[ExportDescription]:
        with self._lock:
            current = list(self._exports.values())
        return [e.describe() for e in current]

    def all(self) -> list[Export]:
        with self._lock:
            return list(self._exports.values())

    def close(self) -> bool:
        return close_storages(self.all())
