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
* snapshot: the engine quiesced (no write in flight, all flushed), every replica is
  snapshotted through its node's API with one name ``s-UUID``; the snapshot's layer is
  ``LAYER@s-UUID`` and its replicas rows name ``r-LAYER@s-UUID``.  Refused while a replica
  is not in sync.  A clone is a new replicated volume whose replicas are clones, on the same
  nodes, of each replica's snapshot.
* replica add / remove / replace: through the engine if this process has the volume open
  (``ReplicatedStorage.add_member`` …, docs/decisions/0120), else committed to the
  catalogue; a new replica is made on its node first, a leaving one deleted after it left
  the membership (one whose node does not answer stays recorded, shown as ``leftover``,
  and ``collect_leftovers`` (gc) deletes it later).
* resize: grows only, through the engine (``ReplicatedStorage.resize``): every replica is
  resized through its node's API, at one point of the write stream, with every replica in
  sync.  Shrinking is refused in one line.
* read-only views (``nbs volume export``): no engine and no epoch.  A snapshot is read from
  one replica's snapshot (the node serves ``r-LAYER@s-UUID`` read-only), failing over to
  the next; the live volume through this process's engine if it has the volume open (a
  ReadOnlyStorage over it), else from a member in sync in the committed membership over a
  plain connection (``FailoverStorage``, docs/decisions/0132).

The membership's volume id is the volume's top layer id, as are the map's and replica's names.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import errno
import os
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from backend.replication.engine import ReplicatedStorage
from backend.replication.membership import (
    Membership,
    MembershipStore,
    TransitionError,
    UnknownVolumeError,
    check_min_insync,
    member_added,
    member_removed,
    member_replaced,
)
from backend.replication.policy import ReplicationPolicy, majority
from backend.replication.scrub import ScrubReport
from backend.replication.tracking import RegionMap, missed
from backend.storage.base import Storage, StorageError
from backend.storage.failover import FailoverStorage
from backend.storage.nbd import NbdStorage, NbdTarget
from backend.volumes.backends import Backend, Commit, Progress
from backend.volumes.model import (
    CreateRequest,
    InvalidRequestError,
    NotFoundError,
    ReplicaInfo,
    ReplicationInfo,
    ScrubInfo,
    ScrubMismatch,
    SnapshotInfo,
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

    def resize(self, name: str, size: int | str, *, allow_shrink: bool = False) -> VolumeInfo: ...

    def snapshot(self, volume: str, name: str) -> SnapshotInfo: ...

    def delete_snapshot(self, volume: str, name: str) -> None: ...

    def clone(
        self,
        volume: str,
        snapshot: str,
        new_name: str,
        *,
        description: str = "",
        labels: dict[str, str] | None = None,
    ) -> VolumeInfo: ...


@dataclasses.dataclass(frozen=True)
class NodeProbe:
    """Where a storage node is, and whether its API answered a status request just now."""

    api: str
    nbd: str
    reachable: bool
    version: str | None = None
    error: str | None = None


class StorageNodes(Protocol):
    """The storage nodes of the config (``nodes:``), as the composition layer wires them."""

    def names(self) -> Sequence[str]: ...

    def probe(self, node: str) -> NodeProbe:
        """Ask ``node``'s API for its status, within a few seconds; never raises for a node
        that does not answer (``reachable`` is false and ``error`` says why).
        InvalidRequestError if ``node`` is not configured."""

    def volumes(self, node: str) -> AbstractContextManager[NodeVolumes]:
        """A client of ``node``'s management API (closed when the block ends)."""

    def target(self, node: str, export: str) -> NbdTarget:
        """Where ``node`` serves the export named ``export``; StorageError if ``node`` is not
        configured (removed by a reload: its member cannot be opened, like a dead node's)."""


class NoNodes:
    """No ``nodes:`` configured: every replicated volume is refused in one line."""

    def names(self) -> Sequence[str]:
        return ()

    def probe(self, node: str) -> NodeProbe:
        raise InvalidRequestError(f"no storage node {node!r} is configured")

    def volumes(self, node: str) -> AbstractContextManager[NodeVolumes]:
        raise InvalidRequestError(f"no storage node {node!r} is configured")

    def target(self, node: str, export: str) -> NbdTarget:
        raise StorageError(
            errno.ENXIO, f"no storage node {node!r} is configured (--config names the nodes)"
        )


LEFTOVER = "left the volume, not deleted yet: `nbs volume gc` retries"


def min_insync_of(members: int, given: int | None) -> int:
    """The ``min_insync`` option, or its default: a majority of the ``members`` members."""
    return given or majority(members)


def scrub_info(volume: str, report: ScrubReport) -> ScrubInfo:
    """An engine's scrub report as the volume layer shows it (replicas by node name)."""
    return ScrubInfo(
        volume=volume,
        repair=report.repair,
        size=report.size,
        compared=report.compared,
        replicas=report.members,
        mismatches=tuple(
            ScrubMismatch(m.offset, m.length, m.members, m.majority, m.repaired)
            for m in report.mismatches
        ),
        failed=report.failed,
        unresolved=report.unresolved,
        seconds=report.seconds,
        finished=report.finished,
    )


def replication_info(
    catalogue: Catalogue,
    layer: str,
    min_insync: int | None,
    engine: ReplicatedStorage | None,
    *,
    volume: str,
) -> ReplicationInfo | None:
    """What ``nbs volume info`` shows: the live engine's view if it is open, else the
    catalogue's committed membership (None if the volume has none yet: being created).
    Replicas that left the membership but could not be deleted yet follow, as ``leftover``
    (``nbs volume gc`` retries them).  ``min_insync``: the option (None: a majority of the
    members); ``volume``: the volume's name, for its last scrub."""
    names = {r.node: r.volume for r in catalogue.replicas(layer)}
    membership = catalogue.membership(layer)
    leftovers = tuple(
        ReplicaInfo(node=node, volume=volume, state="leftover", last_error=LEFTOVER)
        for node, volume in names.items()
        if membership is not None and node not in membership.members
    )
    if engine is not None:
        status = engine.status()
        scrubbed = status.last_scrub
        return ReplicationInfo(
            epoch=status.epoch,
            generation=status.generation,
            min_insync=min_insync_of(len(status.members), min_insync),
            live=True,
            last_scrub=None if scrubbed is None else scrub_info(volume, scrubbed),
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
            )
            + leftovers,
        )
    if membership is None:
        return None
    return ReplicationInfo(
        epoch=membership.epoch,
        generation=membership.generation,
        min_insync=min_insync_of(len(membership.members), min_insync),
        live=False,
        replicas=tuple(
            ReplicaInfo(node=m, volume=names.get(m, ""), state=membership.state(m))
            for m in membership.members
        )
        + leftovers,
    )


def _clone(api: NodeVolumes, *, volume: str, snap: str, name: str) -> VolumeInfo:
    return api.clone(volume, snap, name)


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


def shown_layer(catalogue: Catalogue, layer: str) -> tuple[str, int] | None:
    """The name (``VOLUME`` or ``VOLUME@SNAPSHOT``) and size of the volume whose top is
    ``layer``, or of the snapshot of that layer; None if neither exists."""
    found = [(v.name, v.size) for v in catalogue.volumes() if v.top == layer]
    found += [(f"{s.volume}@{s.name}", s.size) for s in catalogue.snapshots() if s.layer == layer]
    return found[0] if found else None


class ReplicatedBackend(Backend[ReplicatedVolumeStorage]):
    """Replicated volumes on the storage nodes ``nodes`` (names from the config).

    ``reconnect``: how long a member's NbdStorage retries a dropped connection before its
    request fails.  It is kept short, under ``policy.child_timeout``: a node that is down
    must fail its requests, so the engine fails the member (committed) and the guest's write
    goes on with the others, rather than the write waiting for a node that may not return.
    The resync supervisor reopens the member later.
    """

    views_through_open = True  # never a second engine

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
        # Checked here, not when the backend is made: a volume whose nodes have since left
        # the config (a reload, docs/decisions/0125) must still open on the others.
        configured = self._directory.names()
        unknown = [n for n in self.nodes if n not in configured]
        if unknown:
            known = ", ".join(configured) or "none"
            raise InvalidRequestError(
                f"storage node {unknown[0]!r} is not in the config's nodes: (configured: {known})"
            )
        name = replica_name(layer)
        description = f"replica {layer}"
        for node in self.nodes:
            self._make_replica(
                layer,
                node,
                name,
                lambda api: api.create(CreateRequest(name, size, description=description)),
            )
        self._make_tracking(layer, size, self.nodes)

    def new_clone_layer(self) -> str:
        return uuid.uuid4().hex

    def clone(self, layer: str, parent: builtins.list[str], size: int) -> None:
        """A replica per replica of the snapshot ``parent[-1]``, cloned on its own node from
        that replica's snapshot (thin where the node's storage is)."""
        snapshot = parent[-1]
        name = replica_name(layer)
        nodes = []
        for source in self._catalogue().replicas(snapshot):
            volume, _, snap = source.volume.partition("@")
            self._make_replica(
                layer, source.node, name, partial(_clone, volume=volume, snap=snap, name=name)
            )
            nodes.append(source.node)
        if not nodes:
            raise StorageError(errno.ENOENT, f"snapshot layer {snapshot} has no replicas")
        self._make_tracking(layer, size, nodes)

    def _make_replica(
        self, layer: str, node: str, name: str, make: Callable[[NodeVolumes], VolumeInfo]
    ) -> None:
        """``make`` one replica on ``node``, then record it (so a failure later removes it)."""
        from backend.volumes.catalogue import ReplicaRow  # noqa: PLC0415

        try:
            with self._directory.volumes(node) as api:
                info = make(api)
        except InvalidRequestError as err:
            raise InvalidRequestError(f"storage node {node}: {err}") from None
        except VolumeError as err:
            raise StorageError(
                errno.EIO, f"storage node {node} could not make replica {name}: {err}"
            ) from None
        with self._catalogue().transaction() as changes:
            changes.add_replica(ReplicaRow(layer, node, name, info.uid))

    # -- replica changes: through the live engine if it is open, else in the catalogue ------

    def add_replica(
        self, layer: str, node: str, size: int, engine: ReplicatedStorage | None
    ) -> None:
        """A new replica on ``node``: made there, then a member, out, with a missed plane
        marking the whole volume; the resync supervisor copies everything to it (holes
        skipped) and makes it in sync.  ``engine``: the volume's engine if it is open (it
        takes the change while serving), else the change goes to the catalogue (the engine
        gives an out member with no plane a full one when it next opens)."""
        current = self._current(layer, engine)
        self._check_joining(current, node)
        self._new_replica(layer, node, size)
        self._change(
            layer,
            engine,
            lambda e: e.add_member(node),
            lambda m: member_added(m, node),
            joining=node,
        )

    def remove_replica(self, layer: str, node: str, engine: ReplicatedStorage | None) -> str | None:
        """``node`` leaves the volume (committed first; an open engine also ends every request
        of its own on it), then its replica is deleted.  Returns why the deletion failed (its
        row stays: ``nbs volume gc`` retries, ``collect_leftovers``), None if it was deleted."""
        current = self._current(layer, engine)
        self._check_leaving(current, node, lambda m: member_removed(m, node))
        self._change(
            layer,
            engine,
            lambda e: e.remove_member(node),
            lambda m: member_removed(m, node),
            leaving=node,
        )
        return self._delete_leftover(layer, node)

    def replace_replica(
        self, layer: str, old: str, new: str, size: int, engine: ReplicatedStorage | None
    ) -> str | None:
        """``new`` takes ``old``'s place in one committed change: a new replica made on
        ``new`` joins as in ``add_replica`` and ``old`` leaves as in ``remove_replica`` (its
        node may be dead: then the deletion fails, and the reason is returned)."""
        current = self._current(layer, engine)
        self._check_joining(current, new)
        self._check_leaving(current, old, lambda m: member_replaced(m, old, new))
        self._new_replica(layer, new, size)
        self._change(
            layer,
            engine,
            lambda e: e.replace_member(old, new),
            lambda m: member_replaced(m, old, new),
            joining=new,
            leaving=old,
        )
        return self._delete_leftover(layer, old)

    def _current(self, layer: str, engine: ReplicatedStorage | None) -> Membership:
        return engine.membership if engine is not None else self.memberships.load(layer)

    def _check_joining(self, current: Membership, node: str) -> None:
        if node not in self._directory.names():
            known = ", ".join(self._directory.names()) or "none"
            raise InvalidRequestError(f"no storage node {node!r} is configured (known: {known})")
        if node in current.members:
            raise InvalidRequestError(f"storage node {node} already holds a replica")

    def _check_leaving(
        self, current: Membership, node: str, change: Callable[[Membership], Membership]
    ) -> None:
        if node not in current.members:
            raise InvalidRequestError(f"storage node {node} holds no replica of this volume")
        try:
            needed = self.policy.required(len(current.members))  # what writes need before it
            check_min_insync(current, change(current), node, needed)
        except TransitionError as err:
            raise InvalidRequestError(str(err)) from None

    def _new_replica(self, layer: str, node: str, size: int) -> None:
        """A new, empty replica on ``node`` (a leftover of an earlier removal from the same
        node is deleted first: the name is the same)."""
        if any(r.node == node for r in self._catalogue().replicas(layer)):
            failed = self._delete_leftover(layer, node)
            if failed is not None:
                raise StorageError(errno.EIO, f"a replica left on {node} earlier: {failed}")
        name = replica_name(layer)
        description = f"replica {layer}"
        self._make_replica(
            layer,
            node,
            name,
            lambda api: api.create(CreateRequest(name, size, description=description)),
        )

    def _change(
        self,
        layer: str,
        engine: ReplicatedStorage | None,
        live: Callable[[ReplicatedStorage], Membership],
        closed: Callable[[Membership], Membership],
        *,
        joining: str | None = None,
        leaving: str | None = None,
    ) -> None:
        """Commit a change of members: ``live`` through the open engine, else ``closed``
        to the catalogue (the mutate lock keeps other changes out; a closed volume has no
        engine to race with).  On failure a joining replica is deleted again."""
        try:
            try:
                if engine is not None:
                    live(engine)
                else:
                    current = self.memberships.load(layer)
                    self.memberships.commit(closed(current), current.generation)
            except TransitionError as err:
                raise InvalidRequestError(str(err)) from None
        except BaseException:
            if joining is not None:
                with contextlib.suppress(StorageError):
                    self._delete_replicas(layer, [joining])
            raise
        if leaving is not None and engine is None:
            regions = RegionMap.open(self.map_path(layer))
            try:
                if missed(leaving) in regions.planes:
                    regions.remove_plane(missed(leaving))
            finally:
                regions.close()

    def _delete_leftover(self, layer: str, node: str) -> str | None:
        try:
            self._delete_replicas(layer, [node])
        except StorageError as err:
            return err.message
        return None

    def collect_leftovers(self, layer: str) -> builtins.list[str]:
        """Delete the replicas of ``layer`` whose node left the membership but whose deletion
        failed then (a dead node); returns those deleted, raises StorageError naming the
        ones that still fail.  For ``nbs volume gc``."""
        membership = self._catalogue().membership(layer)
        if membership is None:
            return []
        removed, failed = [], []
        for r in self._catalogue().replicas(layer):
            if r.node in membership.members:
                continue
            why = self._delete_leftover(layer, r.node)
            if why is None:
                removed.append(f"replica {r.volume} on {r.node}")
            else:
                failed.append(why)
        if failed:
            raise StorageError(errno.EIO, "; ".join(failed))
        return removed

    def _delete_replicas(self, layer: str, nodes: Sequence[str]) -> None:
        """Delete the recorded replicas of ``layer`` on ``nodes`` and their rows; raises
        StorageError naming the ones that could not be deleted (their rows stay)."""
        failed = []
        for replica in self._catalogue().replicas(layer):
            if replica.node not in nodes:
                continue
            volume, _, snap = replica.volume.partition("@")
            try:
                with (
                    self._directory.volumes(replica.node) as api,
                    contextlib.suppress(NotFoundError),  # gone already
                ):
                    if snap:
                        api.delete_snapshot(volume, snap)
                    else:
                        api.delete(volume, force=True)
            except VolumeError as err:
                failed.append(f"{replica.volume} on {replica.node}: {err}")
                continue
            with self._catalogue().transaction() as changes:
                changes.remove_replica(layer, replica.node)
        if failed:
            raise StorageError(errno.EIO, "cannot delete replica " + "; ".join(failed))

    def _make_tracking(self, layer: str, size: int, nodes: Sequence[str]) -> None:
        self._maps.mkdir(mode=0o700, exist_ok=True)
        try:
            RegionMap.create(self.map_path(layer), size, self.granularity).close()
        except (OSError, ValueError) as err:
            raise StorageError(errno.EIO, f"cannot create the region map: {err}") from err
        self.memberships.commit(Membership.new(layer, nodes), None)

    def open(self, chain: builtins.list[str], read_only: bool) -> ReplicatedVolumeStorage:
        layer = chain[-1]
        if read_only or "@" in layer:
            # Readers get open_view; an engine serving a volume read-only would still
            # take an epoch, and every replica change would need it to write.
            raise StorageError(
                errno.EOPNOTSUPP,
                "a replicated volume cannot be served read-only"
                " (nbs volume export reads it without serving it)",
            )

        def open_child(member: str, epoch: int) -> Storage:
            # Looked up each time: a member added while the engine serves has a row made
            # after the engine opened.
            replicas = {r.node: r for r in self._catalogue().replicas(layer)}
            if member not in replicas:
                raise StorageError(errno.ENOENT, f"no replica of {layer} on {member} recorded")
            export = replica_export(replicas[member], epoch)
            return NbdStorage(
                self._directory.target(member, export),
                request_timeout=self.policy.child_timeout,
                reconnect_deadline=self.reconnect,
                connect_timeout=min(self.policy.child_timeout, 5.0),
                # The node's address as configured now (SIGHUP may change or remove it);
                # the export names the replica's uid, so no other volume can answer.
                redial=partial(self._directory.target, member, export),
            )

        def resize_child(member: str, size: int) -> None:
            replicas = {r.node: r for r in self._catalogue().replicas(layer)}
            if member not in replicas:
                raise StorageError(errno.ENOENT, f"no replica of {layer} on {member} recorded")
            name = replicas[member].volume
            try:
                with self._directory.volumes(member) as api:
                    # Shrinking too: a replica is larger than the volume only after an
                    # earlier attempt failed part way, and nothing past the volume's end is
                    # ever read.
                    api.resize(name, size, allow_shrink=True)
            except VolumeError as err:
                raise StorageError(
                    errno.EIO, f"storage node {member} could not resize replica {name}: {err}"
                ) from None

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
                resize_child=resize_child,
            )
        except UnknownVolumeError as err:
            regions.close()
            raise StorageError(errno.EIO, f"replicated volume {layer}: {err}") from err

    def open_view(self, chain: builtins.list[str]) -> FailoverStorage:
        """A read-only view of ``layer`` that takes no epoch (docs/decisions/0132): a
        snapshot (``LAYER@s-UUID``) from any replica's snapshot, which are identical and
        never change; the live volume from a member the committed membership has in sync,
        over a plain connection (served read-only by a node whose volume has an epoch), a
        read counting only if the membership did not change while it ran.  Either fails over
        to the next replica on a StorageError."""
        layer = chain[-1]
        catalogue = self._catalogue()
        replicas = {r.node: r for r in catalogue.replicas(layer)}
        shown = shown_layer(catalogue, layer)
        if not replicas or shown is None:
            raise StorageError(errno.ENOENT, f"no replicas of {layer} are recorded")
        name, size = shown

        def open_copy(node: str) -> Storage:
            replica = replicas[node]
            target = self._directory.target(node, f"{replica.volume};uid={replica.uid}")
            return NbdStorage(
                target,
                request_timeout=self.policy.child_timeout,
                reconnect_deadline=self.reconnect,
                connect_timeout=min(self.policy.child_timeout, 5.0),
            )

        if "@" in layer:
            nodes = tuple(replicas)
            return FailoverStorage(name, size, lambda: (0, nodes), open_copy)

        def in_sync() -> tuple[int, Sequence[str]]:
            try:
                membership = self.memberships.load(layer)
            except UnknownVolumeError as err:
                raise StorageError(errno.ENOENT, f"replicated volume {layer}: {err}") from err
            except sqlite3.Error as err:
                raise StorageError(errno.EIO, f"the catalogue: {err}") from err
            members = [m for m in membership.members if m in membership.in_sync]
            return membership.generation, [m for m in members if m in replicas]

        return FailoverStorage(name, size, in_sync, open_copy)

    def snapshot(self, storage: ReplicatedVolumeStorage, top: str, commit: Commit) -> None:
        """Every replica snapshotted through its node's API under one name, at one point of
        the write stream (the engine quiesced: no write in flight, all flushed).  Refused
        while a replica is not in sync: a snapshot missing a replica could not be cloned
        with the volume's redundancy (docs/replication.md)."""
        from backend.volumes.catalogue import ReplicaRow  # noqa: PLC0415

        snap = f"s-{uuid.uuid4().hex}"
        frozen = f"{top}@{snap}"
        taken: list[ReplicaRow] = []
        with storage.quiesced() as membership:
            behind = sorted(set(membership.members) - membership.in_sync)
            if behind:
                raise InvalidRequestError(
                    f"a snapshot needs every replica in sync; {', '.join(behind)} is not"
                    " (wait for its resync, see nbs volume info)"
                )
            # Members only: a leftover replica (left, not deleted yet) is not the volume's.
            replicas = [r for r in self._catalogue().replicas(top) if r.node in membership.members]
            try:
                for replica in replicas:
                    with self._directory.volumes(replica.node) as api:
                        api.snapshot(replica.volume, snap)
                    taken.append(
                        ReplicaRow(frozen, replica.node, f"{replica.volume}@{snap}", replica.uid)
                    )
            except VolumeError as err:
                self._delete_snapshots(taken)
                raise StorageError(
                    errno.EIO, f"snapshot on storage node {replica.node} failed: {err}"
                ) from None
            with self._catalogue().transaction() as changes:
                for row in taken:
                    changes.add_replica(row)
            commit(frozen, top)

    def _delete_snapshots(self, rows: Sequence[ReplicaRow]) -> None:
        for row in rows:
            volume, _, snap = row.volume.partition("@")
            with contextlib.suppress(VolumeError), self._directory.volumes(row.node) as api:
                api.delete_snapshot(volume, snap)

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
        self._delete_replicas(layer, [r.node for r in self._catalogue().replicas(layer)])
        with self._catalogue().transaction() as changes:
            changes.remove_membership(layer)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.map_path(layer))
