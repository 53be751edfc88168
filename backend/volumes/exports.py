"""Serving the volume catalogue: every ready volume is an export of the same name.

Lookups go to the catalogue each time, so volumes created, resized or deleted while the server
runs appear, change or disappear for new connections without a restart.

A replication engine opens a *fenced* connection by naming the epoch it took, and the volume
it means, after the name: ``NAME;epoch=7;uid=0f3a…`` (docs/replication.md, "Replica
protocol"; volume names never contain ``;``).  Either part may be left out; each at most once.

A snapshot is served read-only as ``VOLUME@SNAPSHOT`` (names never contain ``@``): not
exclusive, never fenced (an ``;epoch=`` is refused: a snapshot never changes, so no engine
writes it), ``;uid=`` naming its volume's uid.  A replicated volume's engine reads its
snapshots' replicas this way (docs/replication.md, "Read-only views and snapshots").
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import weakref
from collections.abc import Sequence

from backend.nbd import ExportDescription, ExportUnavailableError, TLSPolicy
from backend.server.exports import Export, transmission_flags
from backend.server.fencing import Fence
from backend.storage import Capabilities
from backend.volumes.model import StorageFailureError, VolumeError
from backend.volumes.service import VolumeService

log = logging.getLogger(__name__)
_LISTED = Capabilities(can_fast_zero=True)
# The volume a client asking for the empty export name gets (docs/decisions/0010).
DEFAULT_VOLUME = "default"
# An epoch is stored in SQLite's signed 64-bit INTEGER.
MAX_EPOCH = (1 << 63) - 1
_EPOCH = re.compile(r"[1-9][0-9]{0,18}")
_UID = re.compile(r"[0-9a-f]{32}")


@dataclasses.dataclass(frozen=True)
class ExportName:
    """What a client asked for: a volume, and for a fenced connection its epoch and uid."""

    volume: str
    epoch: int | None = None  # None: a plain connection
    uid: str | None = None  # None: whichever volume has that name


def parse_export_name(name: str) -> ExportName:
    """Split ``NAME[;epoch=N][;uid=HEX]`` (parameters in any order); raises
    :class:`ExportUnavailableError` naming what is wrong with a malformed one."""
    volume, *params = name.split(";")
    epoch: int | None = None
    uid: str | None = None
    for param in params:
        key, sep, value = param.partition("=")
        if key == "epoch" and sep and epoch is None:
            if not _EPOCH.fullmatch(value) or int(value) > MAX_EPOCH:
                raise ExportUnavailableError(f"epoch must be a whole number 1..{MAX_EPOCH}")
            epoch = int(value)
        elif key == "uid" and sep and uid is None:
            if not _UID.fullmatch(value):
                raise ExportUnavailableError("uid must be 32 lowercase hex digits")
            uid = value
        else:
            # Refused, not ignored: a parameter we do not know may be one that fences.
            raise ExportUnavailableError(
                f"unknown or repeated export parameter {param!r} (known: epoch=N, uid=HEX)"
            )
    return ExportName(volume, epoch, uid)


class VolumeExports:
    """Implements backend.server.exports.Exports over a VolumeService.

    ``default``: the volume a client asking for the empty name gets; when no volume has that
    name the empty name is unknown, never some other volume (a client that names no export
    must not write into whichever volume happens to sort first).
    """

    def __init__(
        self, service: VolumeService, *, tls: TLSPolicy, default: str = DEFAULT_VOLUME
    ) -> None:
        self.service = service
        self.tls = tls
        self.default = default
        # One fence per volume uid while any session or export uses it; made again from the
        # catalogue's epoch after that (this process is the only one that raises it).
        self._fences: weakref.WeakValueDictionary[str, Fence] = weakref.WeakValueDictionary()
        self._fences_lock = threading.Lock()

    def get(self, name: str) -> Export | None:
        """The export ``name`` asks for, opening its storage; ``None`` if there is no such
        volume, :class:`ExportUnavailableError` if its storage cannot be opened now (unreachable,
        or an RBD image another server holds writable), if the name is malformed or names
        another uid, :class:`ExportForbiddenError` if it names an epoch older than promised."""
        asked = parse_export_name(name)
        name = asked.volume or self.default
        if "@" in name:
            return self._snapshot(asked, name)
        try:
            row = self.service.catalogue.volume(name)
            if row is None or row.state != "ready":
                return None
            storage = self.service.storage(name)
        except StorageFailureError as err:
            log.warning("volume %s cannot be served: %s", name, err)
            raise ExportUnavailableError(str(err)) from err
        except VolumeError:
            return None
        if asked.uid is not None and asked.uid != row.uid:
            raise ExportUnavailableError(f"volume {name} has uid {row.uid}, not {asked.uid}")
        fence = self._fence(name, row.uid)
        if asked.epoch is not None:
            fence.check(asked.epoch)
        return Export(
            name=name,
            storage=storage,
            description=row.description,
            tls=self.tls,
            read_only=row.read_only,
            # Sessions of one epoch all write (holders.py); plain ones follow the volume.
            exclusive=not row.shared and asked.epoch is None,
            fence=fence,
            epoch=asked.epoch,
        )

    def _snapshot(self, asked: ExportName, name: str) -> Export | None:
        """The snapshot ``VOLUME@SNAPSHOT``, read-only and shared; None if there is none."""
        if asked.epoch is not None:
            raise ExportUnavailableError(f"{name} is a snapshot: read-only, it takes no epoch")
        volume, _, snapshot = name.partition("@")
        try:
            row = self.service.catalogue.volume(volume)
            if row is None or row.state != "ready":
                return None
            storage = self.service.snapshot_storage(volume, snapshot)
        except StorageFailureError as err:
            log.warning("snapshot %s cannot be served: %s", name, err)
            raise ExportUnavailableError(str(err)) from err
        except VolumeError:
            return None
        if asked.uid is not None and asked.uid != row.uid:
            raise ExportUnavailableError(f"volume {volume} has uid {row.uid}, not {asked.uid}")
        return Export(
            name=name, storage=storage, description=row.description, tls=self.tls, read_only=True
        )

    def _fence(self, name: str, uid: str) -> Fence:
        with self._fences_lock:
            fence = self._fences.get(uid)
            if fence is None:
                # Read now, not with the lookup: a take finished since is committed by now
                # (no take runs without its fence alive, and so in this dictionary).
                catalogue = self.service.catalogue
                row = catalogue.volume(name)
                if row is None or row.uid != uid:
                    raise ExportUnavailableError(f"volume {name} was replaced meanwhile")
                fence = Fence(name, row.epoch, lambda new: catalogue.promise_epoch(uid, new))
                self._fences[uid] = fence
            return fence

    def exports(self) -> Sequence[ExportDescription]:
        """Every volume, described from the catalogue alone (for NBD_OPT_LIST).

        Opening each volume's storage here would cost two files per layer for every volume
        (thousands of descriptors for a large catalogue) just to print names; the flags are
        the ones a copy-on-write volume declares, exact ones come with INFO/GO.
        """
        return [
            ExportDescription(
                name=row.name,
                size=row.size,
                flags=transmission_flags(
                    _LISTED, read_only=row.read_only, exclusive=not row.shared
                ),
                description=row.description,
                tls=self.tls,
            )
            for row in self.service.catalogue.volumes()
        ]

    def close(self) -> bool:
        self.service.close()
        return True
