"""The ``replicated`` storage kind: a volume whose data lives in N replica volumes on storage
nodes (other ``nbs serve`` processes), fanned out by this process's engine
(backend.replication.engine.ReplicatedStorage).  docs/replication.md, "Replicated volumes".

What each catalogue operation does:

* create: one replica volume per node through the node's management API (named
  ``r-LAYER``: a layer id is unique, so names never clash between engines or with a
  re-created volume), each recorded in the catalogue's ``replicas`` table as soon as it
  exists; then the region map ``DATA/replication/LAYER.map`` and the membership (every
  member in sync: new replicas are all zeroes).  A failure part way raises, and the volume
  service removes the volume again, which removes the replicas recorded so far (``remove``);
  a replica that cannot be deleted keeps its row, and ``nbs volume gc`` tries again.
* open: the engine over one NbdStorage per member, each opened with the export name
  ``REPLICA;epoch=E;uid=UID`` (the node refuses older epochs: fencing).
* remove: deletes every recorded replica through its node's API, then the map and membership.
* snapshots, clones, resizing and read-only views: refused in one line (not built yet).

The membership's volume id is the volume's top layer id, as are the map's and replica's names.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from backend.replication.engine import ReplicatedStorage
from backend.replication.membership import Membership, MembershipStore, UnknownVolumeError
from backend.replication.policy import ReplicationPolicy
from backend.replication.tracking import RegionMap
from backend.storage.base import Storage, StorageError
from backend.storage.nbd import NbdStorage, NbdTarget
from backend.volumes.backends import Backend, Commit, Progress
from backend.volumes.model import (
    CreateRequest,
    InvalidRequestError,
    NotFoundError,
    ReplicaInfo,
    ReplicationInfo,
    VolumeError,
    VolumeInfo,
)

if TYPE_CHECKING:  # at run time imported where used: the catalogue imports the registry
    from backend.volumes.catalogue import Catalogue, ReplicaRow

__all__ = ["NodeVolumes", "ReplicatedBackend", "StorageNodes", "replica_export"]


class NodeVolumes(Protocol):
    """The volume operations the engine asks of one storage node (a subset of
    VolumeOperations; errors are VolumeError subclasses)."""

    def create(self, request: CreateRequest) -> VolumeInfo: ...

    def delete(self, name: str, *, force: bool = False) -> None: ...


class StorageNodes(Protocol):
    """The storage nodes of the config (``nodes:``), as the composition layer wires them."""

    def names(self) -> Sequence[str]: ...

    def volumes(self, node: str) -> AbstractContextManager[NodeVolumes]:
        """A client of ``node``'s management API (closed when the block ends)."""

    def target(self, node: str, export: str) -> NbdTarget:
        """Where ``node`` serves the export named ``export``."""


class NoNodes:
    """No ``nodes:`` configured: every replicated volume is refused in one line."""

    def names(self) -> Sequence[str]:
        return ()

    def volumes(self, node: str) -> AbstractContextManager[NodeVolumes]:
        raise InvalidRequestError(f"no storage node {node!r} is configured")

    def target(self, node: str, export: str) -> NbdTarget:
        raise InvalidRequestError(f"no storage node {node!r} is configured")


def min_insync_of(nodes: Sequence[str], given: int | None) -> int:
    """The ``min_insync`` option, or its default: a majority of the nodes."""
    return given or len(nodes) // 2 + 1


def replication_info(
    catalogue: Catalogue, layer: str, min_insync: int, engine: ReplicatedStorage | None
) -> ReplicationInfo | None:
    """What ``nbs volume info`` shows: the live engine's view if it is open, else the
    catalogue's committed membership (None if the volume has none yet: being created)."""
    names = {r.node: r.volume for r in catalogue.replicas(layer)}
    if engine is not None:
        status = engine.status()
        return ReplicationInfo(
            epoch=status.epoch,
            generation=status.generation,
            min_insync=min_insync,
            live=True,
            replicas=tuple(
                ReplicaInfo(
                    node=m.member,
                    volume=names.get(m.member, ""),
                    state=m.state,
                    in_flight=m.in_flight,
                    resync_done=m.resync.bytes_done if m.resync else None,
                    resync_total=m.resync.bytes_total if m.resync else None,
                    last_error=m.last_error if m.state != "in_sync" else None,
                )
                for m in status.members
            ),
        )
    membership = catalogue.membership(layer)
    if membership is None:
        return None
    return ReplicationInfo(
        epoch=membership.epoch,
        generation=membership.generation,
        min_insync=min_insync,
        live=False,
        replicas=tuple(
            ReplicaInfo(node=m, volume=names.get(m, ""), state=membership.state(m))
            for m in membership.members
        ),
    )


def replica_name(layer: str) -> str:
    return f"r-{layer}"


def replica_export(replica: ReplicaRow, epoch: int) -> str:
    """The export name that opens ``replica`` at ``epoch`` (docs/replication.md, "Replica
    protocol")."""
    return f"{replica.volume};epoch={epoch};uid={replica.uid}"


class ReplicatedVolumeStorage(ReplicatedStorage):
    """The engine, owning its region map (closed with it)."""

    def __init__(self, regions: RegionMap, *args: object, **kwargs: object) -> None:
        self._own_regions = regions
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._own_regions.close()


class ReplicatedBackend(Backend[ReplicatedVolumeStorage]):
    """Replicated volumes on the storage nodes ``nodes`` (names from the config).

    ``reconnect``: how long a member's NbdStorage retries a dropped connection before its
    request fails.  It is kept short, under ``policy.child_timeout``: a node that is down
    must fail its requests, so the engine fails the member (committed) and the guest's write
    goes on with the others, rather than the write waiting for a node that may not return.
    The resync supervisor reopens the member later.
    """

    def __init__(
        self,
        nodes: Sequence[str],
        policy: ReplicationPolicy,
        granularity: int,
        reconnect: float,
        *,
        directory: StorageNodes,
        data_dir: Path,
        catalogue: Callable[[], Catalogue],
    ) -> None:
        self.nodes = tuple(nodes)
        self.policy = policy
        self.granularity = granularity
        self.reconnect = reconnect
        self._directory = directory
        self._maps = data_dir / "replication"
        self._catalogue = catalogue

    @property
    def memberships(self) -> MembershipStore:
        from backend.volumes.memberships import CatalogueMembershipStore  # noqa: PLC0415

        return CatalogueMembershipStore(self._catalogue())

    def map_path(self, layer: str) -> Path:
        return self._maps / f"{layer}.map"

    def create(self, layer: str, size: int) -> None:
        from backend.volumes.catalogue import ReplicaRow  # noqa: PLC0415

        name = replica_name(layer)
        for node in self.nodes:
            try:
                with self._directory.volumes(node) as api:
                    info = api.create(CreateRequest(name, size, description=f"replica {layer}"))
            except InvalidRequestError as err:
                raise InvalidRequestError(f"storage node {node}: {err}") from None
            except VolumeError as err:
                raise StorageError(
                    errno.EIO, f"storage node {node} could not create replica {name}: {err}"
                ) from None
            with self._catalogue().transaction() as changes:
                changes.add_replica(ReplicaRow(layer, node, name, info.uid))
        self._maps.mkdir(mode=0o700, exist_ok=True)
        try:
            RegionMap.create(self.map_path(layer), size, self.granularity).close()
        except (OSError, ValueError) as err:
            raise StorageError(errno.EIO, f"cannot create the region map: {err}") from err
        self.memberships.commit(Membership.new(layer, self.nodes), None)

    def open(self, chain: builtins.list[str], read_only: bool) -> ReplicatedVolumeStorage:
        if read_only or len(chain) != 1:
            # A second engine on the volume would take a new epoch and fence the first.
            raise StorageError(
                errno.EOPNOTSUPP,
                "a read-only view or snapshot of a replicated volume is not supported yet",
            )
        layer = chain[0]
        replicas = {r.node: r for r in self._catalogue().replicas(layer)}

        def open_child(member: str, epoch: int) -> Storage:
            replica = replicas[member]
            target = self._directory.target(member, replica_export(replica, epoch))
            return NbdStorage(
                target,
                request_timeout=self.policy.child_timeout,
                reconnect_deadline=self.reconnect,
                connect_timeout=min(self.policy.child_timeout, 5.0),
            )

        try:
            regions = RegionMap.open(self.map_path(layer))
        except OSError as err:
            raise StorageError.from_os_error(err, f"region map of {layer}") from err
        try:
            return ReplicatedVolumeStorage(
                regions,
                layer,
                regions.size,
                self.memberships,
                regions,
                open_child,
                policy=self.policy,
            )
        except UnknownVolumeError as err:
            regions.close()
            raise StorageError(errno.EIO, f"replicated volume {layer}: {err}") from err

    def snapshot(self, storage: ReplicatedVolumeStorage, top: str, commit: Commit) -> None:
        raise InvalidRequestError("snapshots of replicated volumes are not supported yet")

    def flatten(
        self,
        storage: ReplicatedVolumeStorage | None,
        chain: builtins.list[str],
        progress: Progress | None,
    ) -> None:
        """Nothing under the one layer."""

    def used(self, layer: str) -> int:
        return 0  # held on the storage nodes; each node's info says

    def remove(self, layer: str) -> None:
        """Delete every recorded replica; a node that fails keeps its row (and this raises),
        so ``nbs volume gc`` tries again and says which node failed."""
        failed = []
        for replica in self._catalogue().replicas(layer):
            try:
                with (
                    self._directory.volumes(replica.node) as api,
                    contextlib.suppress(NotFoundError),  # gone already
                ):
                    api.delete(replica.volume, force=True)
            except VolumeError as err:
                failed.append(f"{replica.volume} on {replica.node}: {err}")
                continue
            with self._catalogue().transaction() as changes:
                changes.remove_replica(layer, replica.node)
        if failed:
            raise StorageError(errno.EIO, "cannot delete replica " + "; ".join(failed))
        with self._catalogue().transaction() as changes:
            changes.remove_membership(layer)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.map_path(layer))
