"""Serving the volume catalogue: every ready volume is an export of the same name.

Lookups go to the catalogue each time, so volumes created, resized or deleted while the server
runs appear, change or disappear for new connections without a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from backend.nbd import ExportDescription, ExportUnavailableError, TLSPolicy
from backend.server.exports import Export, transmission_flags
from backend.storage import Capabilities
from backend.volumes.model import StorageFailureError, VolumeError
from backend.volumes.service import VolumeService

log = logging.getLogger(__name__)
_LISTED = Capabilities(can_fast_zero=True)
# The volume a client asking for the empty export name gets (docs/decisions/0010).
DEFAULT_VOLUME = "default"


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

    def get(self, name: str) -> Export | None:
        """The export of volume ``name``, opening its storage; ``None`` if there is no such
        volume, :class:`ExportUnavailableError` if its storage cannot be opened now (unreachable,
        or an RBD image another server holds writable)."""
        if name == "":
            name = self.default
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
        return Export(
            name=name,
            storage=storage,
            description=row.description,
            tls=self.tls,
            read_only=row.read_only,
            exclusive=not row.shared,
        )

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
