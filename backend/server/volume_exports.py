"""Serving the volume catalogue: every ready volume is an export of the same name.

Lookups go to the catalogue each time, so volumes created, resized or deleted while the server
runs appear, change or disappear for new connections without a restart.
"""

from __future__ import annotations

from collections.abc import Sequence

from backend.nbd import ExportDescription, TLSPolicy
from backend.server.exports import Export
from backend.volumes.model import VolumeError
from backend.volumes.service import VolumeService


class VolumeExports:
    """Implements backend.server.exports.Exports over a VolumeService.

    ``default``: the volume a client asking for the empty name gets (None: the first one).
    """

    def __init__(
        self, service: VolumeService, *, tls: TLSPolicy, default: str | None = None
    ) -> None:
        self.service = service
        self.tls = tls
        self.default = default

    def get(self, name: str) -> Export | None:
        if name == "":
            names = [v.name for v in self.service.catalogue.volumes()]
            name = self.default if self.default in names else (names[0] if names else "")
        try:
            row = self.service.catalogue.volume(name)
            if row is None or row.state != "ready":
                return None
            storage = self.service.storage(name)
        except VolumeError:
            return None
        return Export(
            name=name,
            storage=storage,
            description=row.description,
            tls=self.tls,
            read_only=row.read_only,
        )

    def lookup(self, name: str) -> ExportDescription | None:
        export = self.get(name)
        return export.describe() if export is not None else None

    def exports(self) -> Sequence[ExportDescription]:
        found = (self.get(v.name) for v in self.service.catalogue.volumes())
        return [e.describe() for e in found if e is not None]

    def close(self) -> bool:
        self.service.close()
        return True
