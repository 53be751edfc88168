"""How the volume commands reach the catalogue: in this process, or through a server's API.

Part of the composition layer: it chooses between backend.volumes (LocalVolumes) and
backend.api.client (RemoteVolumes), so it lives above both.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Mapping
from pathlib import Path

from backend.config import load_config
from backend.node_clients import ConfiguredNodes, ListedNodes
from backend.storage import StorageError
from backend.volumes import transfer
from backend.volumes.datadir import default_data_dir
from backend.volumes.model import ImportRequest, InvalidRequestError, VolumeInfo
from backend.volumes.operations import VolumeOperations
from backend.volumes.replicated import StorageNodes
from backend.volumes.service import Progress, VolumeService
from backend.volumes.storages import StorageSpec


class LocalVolumes:
    """The volume operations on a data directory, done in this process."""

    def __init__(
        self,
        data_dir: Path,
        profiles: Mapping[str, StorageSpec] | None = None,
        nodes: StorageNodes | None = None,
    ) -> None:
        # A relative --storage dir:path is the user's, relative to where the command runs.
        self.service = VolumeService(
            data_dir, profiles=profiles, paths_relative_to=Path.cwd(), nodes=nodes
        )
        self.list = self.service.list
        self.info = self.service.info
        self.create = self.service.create
        self.resize = self.service.resize
        self.delete = self.service.delete
        self.snapshot = self.service.snapshot
        self.snapshots = self.service.snapshots
        self.clone = self.service.clone
        self.delete_snapshot = self.service.delete_snapshot
        self.gc = self.service.gc
        self.add_replica = self.service.add_replica
        self.remove_replica = self.service.remove_replica
        self.replace_replica = self.service.replace_replica
        self.scrub = self.service.scrub
        self.nodes = self.service.nodes
        self.node = self.service.node
        self.close = self.service.close

    def import_image(
        self, request: ImportRequest, *, progress: Progress | None = None
    ) -> VolumeInfo:
        """A new volume holding the image at ``request.source`` (hidden until the copy is
        complete)."""
        transfer.begin_import(self.service, request)
        return transfer.finish_import(self.service, request, progress)

    def export_image(
        self, name: str, dest: Path, *, fmt: str = "raw", progress: Progress | None = None
    ) -> None:
        volume, _, snapshot = name.partition("@")
        if dest.exists():
            raise InvalidRequestError(f"{dest} exists; refusing to overwrite it")
        storage = self.service.open_view(volume, snapshot or None)
        try:
            transfer.export_image(storage, name.replace("@", "-"), dest, fmt, progress)
        except BaseException:
            with contextlib.suppress(OSError):
                dest.unlink()
            raise
        finally:
            with contextlib.suppress(StorageError):
                storage.close()


def open_client(args: argparse.Namespace) -> VolumeOperations:
    """The server named by --server, else the one serving the data directory, else the data
    directory itself (see backend.api.client.client_for)."""
    from backend.api.client import client_for  # noqa: PLC0415 - httpx only when needed

    remote = client_for(args.data_dir, args.server, None, args.token_file, ca_file=args.ca_file)
    if remote is not None:
        return remote
    return local_client(args)


def export_client(args: argparse.Namespace) -> LocalVolumes:
    """For ``nbs volume export``, which reads in this process even beside a server: the data
    directory with --config's storage nodes, else with those of the server running there, as
    its API lists them (a replicated volume is read from its replicas' nodes)."""
    if getattr(args, "config", None):
        return local_client(args)
    from backend.api.client import client_for  # noqa: PLC0415 - httpx only when needed

    remote = client_for(args.data_dir, None, None, args.token_file, ca_file=args.ca_file)
    if remote is None:
        return local_client(args)
    try:
        nodes = ListedNodes(remote.nodes())
    finally:
        remote.close()
    return LocalVolumes(args.data_dir or default_data_dir(), nodes=nodes)


def local_client(args: argparse.Namespace) -> LocalVolumes:
    """The data directory in this process, with --config's storage profiles and nodes."""
    if not getattr(args, "config", None):
        return LocalVolumes(args.data_dir or default_data_dir())
    config = load_config(args.config)
    return LocalVolumes(
        args.data_dir or default_data_dir(), config.storages, ConfiguredNodes(config.nodes)
    )
