"""The volume operations as one declared interface.

``nbs volume`` and ``nbs snapshot`` run them on whichever side owns the data directory:
backend.volume_clients.LocalVolumes (this process, over VolumeService) or
backend.api.client.RemoteVolumes (a running server's API).  Both implement this Protocol, and
mypy checks them against it where backend.volume_clients.open_client returns one; the
parameters match VolumeService's (tests/unit/api/test_client.py compares them).  What a new
volume is to be travels as one CreateRequest (ImportRequest for an image), never as a copy
of its argument list.
"""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from backend.volumes.model import (
    CreateRequest,
    ImportRequest,
    NodeInfo,
    ScrubInfo,
    SnapshotInfo,
    VolumeInfo,
)

if TYPE_CHECKING:
    from backend.volumes.service import Progress


class VolumeOperations(Protocol):
    """What a volume command may ask of the catalogue.  Errors are VolumeError subclasses
    (the API client raises the same ones from the server's answers)."""

    def list(self) -> builtins.list[VolumeInfo]: ...

    def info(self, name: str) -> VolumeInfo: ...

    def snapshots(self, volume: str | None = None) -> builtins.list[SnapshotInfo]: ...

    def create(self, request: CreateRequest) -> VolumeInfo: ...

    def resize(self, name: str, size: int | str, *, allow_shrink: bool = False) -> VolumeInfo: ...

    def delete(self, name: str, *, force: bool = False) -> None: ...

    def snapshot(self, volume: str, name: str) -> SnapshotInfo: ...

    def clone(
        self,
        volume: str,
        snapshot: str,
        new_name: str,
        *,
        description: str = "",
        labels: dict[str, str] | None = None,
    ) -> VolumeInfo: ...

    def delete_snapshot(
        self,
        volume: str,
        name: str,
        *,
        flatten_clones: bool = False,
        progress: Progress | None = None,
    ) -> None: ...

    def gc(self) -> builtins.list[str]: ...

    def add_replica(self, name: str, node: str) -> VolumeInfo: ...

    def remove_replica(self, name: str, node: str) -> VolumeInfo: ...

    def replace_replica(self, name: str, old: str, new: str) -> VolumeInfo: ...

    def scrub(
        self, name: str, *, repair: bool = False, progress: Progress | None = None
    ) -> ScrubInfo: ...

    def nodes(self) -> builtins.list[NodeInfo]: ...

    def node(self, name: str) -> NodeInfo: ...

    def import_image(
        self, request: ImportRequest, *, progress: Progress | None = None
    ) -> VolumeInfo: ...

    def export_image(
        self, name: str, dest: Path, *, fmt: str = "raw", progress: Progress | None = None
    ) -> None: ...

    def close(self) -> None: ...
