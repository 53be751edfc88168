"""The volume service: lifecycle of volumes, snapshots and clones in one data directory.

Data directory::

    catalogue.sqlite3        metadata (backend.volumes.catalogue)
    layers/ID.data, ID.map   copy-on-write layers of volumes on ``file`` (backend.storage.cow)
    objects/                 chunks of volumes on ``dir`` without a path
    mutate.lock              flock held while a process changes the catalogue
    serving.lock             flock held (shared) by a running `nbs serve`
    creating/NAME            flock held by the process creating volume NAME (its lease)

Each volume lives on one storage (backend.volumes.storages; ``file`` by default), reached
through a backend (backend.volumes.backends) and wrapped in the spec's layers (cache, retry).

Crash safety: a new volume (or clone) is recorded ``creating`` before its storage is made,
and becomes ``ready`` after; its creator holds a lease on it all along (an import: the whole
copy; backend.volumes.leases).  One being deleted is ``deleting`` until its data is gone.
gc() (run when a server starts, and before the first change a command makes) removes the
``creating`` rows whose creator died and every ``deleting`` row, then layers no volume or
snapshot reaches (their data first, then the row), and layer files no row knows.

Commands that only read (list, info, snapshot list, export) change nothing in the data
directory: they neither collect nor create it (a missing one reads as empty) nor chmod it.

Snapshots of a volume that a server has open must be taken by that server (it owns the live
top layer): use the API; this class refuses when another process serves the data directory.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic

from backend.replication.engine import ReplicatedStorage
from backend.storage import Storage, StorageError
from backend.storage.layers import ReadOnlyStorage
from backend.volumes.backends import Backend, StorageT
from backend.volumes.catalogue import Catalogue, SnapshotRow, VolumeRow
from backend.volumes.kinds import KINDS, LAYERS
from backend.volumes.leases import LeaseHeldError, Leases, locked
from backend.volumes.locations import Backends
from backend.volumes.model import (
    AlreadyExistsError,
    CreateRequest,
    DependencyError,
    Holder,
    InUseError,
    InvalidRequestError,
    NodeInfo,
    NodeReplica,
    NotFoundError,
    ReplicationInfo,
    ScrubInfo,
    SnapshotInfo,
    StorageFailureError,
    VolumeError,
    VolumeInfo,
    check_labels,
    check_name,
    parse_size,
)
from backend.volumes.replicated import (
    NodeProbe,
    ReplicatedBackend,
    StorageNodes,
    replication_info,
    scrub_info,
)
from backend.volumes.storages import FILE, StorageSpec, parse_storage, prepare_location

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 64 * 1024
CATALOGUE = "catalogue.sqlite3"
MEMORY = Path(":memory:")  # an empty catalogue, for readers of a data directory not made yet
Progress = Callable[[int, int], None]


class ServedElsewhereError(VolumeError):
    status = 409
    code = "served"


class VolumeService:
    """Owns one data directory.  Thread safe; one instance per process.

    Constructing one touches nothing on disk (it opens an existing catalogue); the first
    change makes the directory, and :meth:`start_serving` makes this process its server.
    ``holders``: the clients that have a volume open (from the server), for delete checks
    and ``info``.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        holders: Callable[[str], Sequence[Holder]] | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        profiles: Mapping[str, StorageSpec] | None = None,
        default_storage: StorageSpec = FILE,
        paths_relative_to: Path | None = None,
        nodes: StorageNodes | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.layers = data_dir / "layers"
        self.chunk_size = chunk_size
        self.holders: Callable[[str], Sequence[Holder]] = holders or (lambda name: ())
        self.profiles = dict(profiles or {})
        self.default_storage = default_storage
        # Where relative ``dir`` paths of --storage start; None (the API): refused.
        self.paths_relative_to = paths_relative_to
        self.backends = Backends(
            data_dir, chunk_size, nodes=nodes, catalogue=lambda: self.catalogue
        )
        self.leases = Leases(data_dir / "creating")
        self._lock = threading.RLock()
        self._open: dict[str, _Opened[Any]] = {}
        # Snapshots served as exports (``VOL@SNAP``), by layer: read-only, shared by their
        # connections, closed when the snapshot goes.
        self._snapshot_views: dict[str, _Opened[Any]] = {}
        self._serving_fd: int | None = None
        self._writable = False  # the data directory is made and the catalogue open for writes
        self._collected = False  # crash leftovers were collected by this process
        catalogue = data_dir / CATALOGUE
        # Readers of a data directory that does not exist see an empty catalogue, in memory:
        # the first change creates the real one (_make_writable).
        self.catalogue = Catalogue(catalogue if catalogue.exists() else MEMORY)

    def start_serving(self) -> None:
        """Become the server of this data directory (``nbs serve``): make it, take
        ``serving.lock`` (ServedElsewhereError if another server holds it) and collect what
        crashes left.  Until :meth:`close`, volume commands elsewhere go through this
        process's API."""
        self._make_writable()
        self._serving_fd = self._take_serving_lock()
        self.gc()

    # ------------------------------------------------------------------ locks

    def _make_writable(self) -> None:
        """Make the data directory (mode 0700) and open the catalogue for changes: done by
        the first change, never by a command that only reads."""
        if self._writable:
            return
        self.layers.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        if self.catalogue.path == MEMORY:
            self.catalogue.close()
            self.catalogue = Catalogue(self.data_dir / CATALOGUE)
        self._writable = True

    def _take_serving_lock(self) -> int:
        fd = os.open(self.data_dir / "serving.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ServedElsewhereError(
                f"another nbs serve already serves {self.data_dir}"
            ) from None
        return fd

    def served_elsewhere(self) -> bool:
        """True when another process serves this data directory."""
        # No serving.lock: no server ever started here (it makes the file).
        return self._serving_fd is None and locked(self.data_dir / "serving.lock")

    @contextlib.contextmanager
    def _mutating(self) -> Iterator[None]:
        """The mutate lock, held by one thread of one process at a time.  The first change a
        process makes collects what crashes left (a ``creating`` row of an earlier attempt
        would refuse its name) unless a server runs here (it collects its own)."""
        with self._lock:
            self._make_writable()
            fd = os.open(
                self.data_dir / "mutate.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if not self._collected:
                    self._collected = True
                    if not self.served_elsewhere():
                        self._gc(quiet=True)
                yield
            finally:
                os.close(fd)

    def _check_local(self, what: str) -> None:
        if self.served_elsewhere():
            raise ServedElsewhereError(
                f"a running nbs serve owns {self.data_dir}: {what} through its API (--server)"
            )

    # ------------------------------------------------------------------ helpers

    def _backend(self, spec: StorageSpec) -> Backend[Any]:
        try:
            return self.backends.get(spec)
        except StorageError as err:
            raise StorageFailureError(str(err)) from err

    def _layer_spec(self, layer: str) -> StorageSpec:
        """The storage a layer's row records (the catalogue holds specs as JSON)."""
        return self.catalogue.layer_storage(layer) or FILE

    def _layer_backend(self, layer: str) -> Backend[Any]:
        return self._backend(self._layer_spec(layer))

    def _remove_layer_data(self, layer: str) -> None:
        """Remove a layer's data; a layer whose S3 bucket or RADOS pool does not exist is
        gone already (a create that named a wrong one leaves nothing to remove).  A missing
        ``dir`` is not: it may be a disk that is not mounted, and its data comes back."""
        spec = self._layer_spec(layer)
        try:
            backend = self.backends.get(spec)
        except StorageError as err:
            if err.errno == errno.ENOENT and KINDS[spec.kind].missing_container_is_empty:
                return
            raise StorageFailureError(str(err)) from err
        backend.remove(layer)

    def _open_chain(
        self, spec: StorageSpec, top: str, read_only: bool, *, view: bool = False
    ) -> _Opened[Any]:
        """The chain ending at ``top`` opened on its backend and wrapped in ``spec``'s layers
        (the volume row's spec); ``view``: a reader's view (``Backend.open_view``)."""
        backend = self._backend(spec)
        chain = self.catalogue.chain(top)
        base = backend.open_view(chain) if view else backend.open(chain, read_only)
        return _Opened(backend, base, _wrap(base, spec))

    def _row(self, name: str) -> VolumeRow:
        row = self.catalogue.volume(check_name(name))
        if row is None or row.state != "ready":
            raise NotFoundError(f"no volume {name!r}")
        return row

    def _used(self, layer: str) -> int:
        try:
            return self._layer_backend(layer).used(layer)
        except (StorageError, VolumeError):
            return 0

    def _info(self, row: VolumeRow) -> VolumeInfo:
        return VolumeInfo(
            name=row.name,
            size=row.size,
            description=row.description,
            labels=row.labels,
            read_only=row.read_only,
            created=row.created,
            used_bytes=self._used(row.top),
            origin=row.origin,
            snapshots=tuple(s.name for s in self.catalogue.snapshots(row.name)),
            connections=len(holders := tuple(self.holders(row.name))),
            storage=str(row.storage),
            shared=row.shared,
            holders=holders,
            uid=row.uid,
            epoch=row.epoch,
            replication=self._replication(row),
        )

    def add_replica(self, name: str, node: str) -> VolumeInfo:
        """A replicated volume gets a replica on ``node`` (resynced by ``nbs serve``)."""
        with self._mutating():
            row, backend, engine = self._replicated(name)
            try:
                backend.add_replica(row.top, node, self._replica_size(row, engine), engine)
            except StorageError as err:
                raise StorageFailureError(f"cannot add a replica to {name!r}: {err}") from err
        log.info("volume %s: replica added on %s", name, node)
        return self.info(name)

    def remove_replica(self, name: str, node: str) -> VolumeInfo:
        """A replicated volume's replica on ``node`` leaves it and is deleted."""
        with self._mutating():
            row, backend, engine = self._replicated(name)
            try:
                failed = backend.remove_replica(row.top, node, engine)
            except StorageError as err:
                raise StorageFailureError(f"cannot remove the replica of {name!r}: {err}") from err
        self._left(name, node, failed)
        log.info("volume %s: replica on %s removed", name, node)
        return self.info(name)

    def replace_replica(self, name: str, old: str, new: str) -> VolumeInfo:
        """A new replica on ``new`` takes the place of the one on ``old`` (which may be
        dead), in one membership change; the new one is resynced by ``nbs serve``."""
        with self._mutating():
            row, backend, engine = self._replicated(name)
            try:
                size = self._replica_size(row, engine)
                failed = backend.replace_replica(row.top, old, new, size, engine)
            except StorageError as err:
                raise StorageFailureError(f"cannot replace a replica of {name!r}: {err}") from err
        self._left(name, old, failed)
        log.info("volume %s: replica on %s replaced by one on %s", name, old, new)
        return self.info(name)

    @staticmethod
    def _replica_size(row: VolumeRow, engine: ReplicatedStorage | None) -> int:
        """The size of a new replica: the engine's, if it serves the volume (a grow that
        crashed before the catalogue learned the new size is still the size it serves)."""
        return engine.size if engine is not None else row.size

    def _left(self, name: str, node: str, failed: str | None) -> None:
        if failed is not None:
            # The change is done and committed; only the old replica's space is left.
            log.warning(
                "volume %s: the replica on %s left the volume but was not deleted (%s);"
                " `nbs volume gc` retries",
                name,
                node,
                failed,
            )

    def _replicated(
        self, name: str
    ) -> tuple[VolumeRow, ReplicatedBackend, ReplicatedStorage | None]:
        """A replicated volume's row, backend, and engine if this process has it open (it
        takes the change while serving); without one, the change goes to the catalogue
        (mutate lock held)."""
        row = self._row(name)
        backend = self._backend(row.storage)
        if not isinstance(backend, ReplicatedBackend):
            raise InvalidRequestError(f"volume {name!r} is not replicated ({row.storage})")
        self._check_local_if_closed(name, "change replicas of")
        opened = self._open.get(name)
        return row, backend, opened.base if opened is not None else None

    def _replication(self, row: VolumeRow) -> ReplicationInfo | None:
        if row.storage.kind != "replicated":
            return None
        params = KINDS["replicated"].resolved(dict(row.storage.params))
        with self._lock:
            opened = self._open.get(row.name)
        engine = opened.base if opened is not None else None
        return replication_info(
            self.catalogue, row.top, params["min_insync"], engine, volume=row.name
        )

    def _dependents(self, layer: str, owner: str) -> builtins.list[str]:
        """Volumes other than ``owner`` whose chain contains ``layer`` (its clones)."""
        return [
            v.name
            for v in self.catalogue.volumes(state=None)
            if v.name != owner and layer in self.catalogue.chain(v.top)
        ]

    # ------------------------------------------------------------------ queries

    def list(self) -> builtins.list[VolumeInfo]:
        return [self._info(row) for row in self.catalogue.volumes()]

    def info(self, name: str) -> VolumeInfo:
        return self._info(self._row(name))

    def snapshots(self, volume: str | None = None) -> builtins.list[SnapshotInfo]:
        if volume is not None:
            self._row(volume)
        return [
            SnapshotInfo(
                volume=s.volume,
                name=s.name,
                size=s.size,
                created=s.created,
                used_bytes=self._used(s.layer),
                clones=tuple(self._dependents(s.layer, s.volume)),
            )
            for s in self.catalogue.snapshots(volume)
        ]

    def scrub(
        self, name: str, *, repair: bool = False, progress: Progress | None = None
    ) -> ScrubInfo:
        """Compare a replicated volume's in-sync replicas (its engine's ``scrub``, opening the
        volume if this process has not); with ``repair``, write the majority's bytes over
        replicas that differ.  InvalidRequestError for a volume that is not replicated,
        InUseError if fewer than two replicas are in sync."""
        self.check_scrub(name)
        engine = self._opened(name).base
        if not isinstance(engine, ReplicatedStorage):  # the kind's backend always opens one
            raise StorageFailureError(f"volume {name!r} has no replication engine open")
        try:
            report = engine.scrub(repair=repair, progress=progress)
        except StorageError as err:
            if err.errno == errno.EBUSY:
                raise InUseError(f"cannot scrub {name!r}: {err.message}") from None
            raise StorageFailureError(f"cannot scrub {name!r}: {err}") from err
        return scrub_info(name, report)

    def check_scrub(self, name: str) -> None:
        """NotFoundError or InvalidRequestError if volume ``name`` cannot be scrubbed at all
        (what the API refuses before it starts streaming)."""
        if self._row(name).storage.kind != "replicated":
            raise InvalidRequestError(
                f"volume {name!r} is not replicated: scrub compares a replicated volume's replicas"
            )

    def nodes(self) -> builtins.list[NodeInfo]:
        """The storage nodes: each of the config's, with its status (asked of all at once,
        each within a few seconds), then any the config no longer names that the catalogue
        still records replicas on.  Each with the replicas it holds for this catalogue."""
        directory = self.backends.nodes
        names = builtins.list(directory.names())
        held = self._replicas_by_node()
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(names)))) as pool:
            probes = builtins.list(pool.map(directory.probe, names))
        found = [
            _node_info(name, probe, held.pop(name, ()))
            for name, probe in zip(names, probes, strict=True)
        ]
        return found + [_unconfigured(name, held[name]) for name in sorted(held)]

    def node(self, name: str) -> NodeInfo:
        """One storage node as :meth:`nodes` shows it; NotFoundError if neither the config
        names it nor the catalogue records a replica on it."""
        directory = self.backends.nodes
        held = self._replicas_by_node()
        if name in directory.names():
            return _node_info(name, directory.probe(name), held.get(name, ()))
        if name in held:
            return _unconfigured(name, held[name])
        raise NotFoundError(f"no storage node {name!r} is configured")

    def _replicas_by_node(self) -> dict[str, builtins.list[NodeReplica]]:
        """The replicas of this catalogue's volumes, by node (live states where an engine has
        the volume open, else the catalogue's)."""
        held: dict[str, builtins.list[NodeReplica]] = {}
        for row in self.catalogue.volumes():
            replication = self._replication(row)
            if replication is None:
                continue
            for replica in replication.replicas:
                held.setdefault(replica.node, []).append(
                    NodeReplica(row.name, replica.volume, replica.state)
                )
        return held

    def generation(self) -> int:
        return self.catalogue.generation()

    def replicated_engines(self) -> dict[str, ReplicatedStorage]:
        """The engines of the replicated volumes open now, by volume name."""
        with self._lock:
            return {
                name: opened.base
                for name, opened in self._open.items()
                if isinstance(opened.backend, ReplicatedBackend)
            }

    def storage(self, name: str) -> Storage:
        """The open storage of a volume (shared by every connection to it)."""
        return self._opened(name).top

    def _opened(self, name: str) -> _Opened[Any]:
        with self._lock:
            row = self._row(name)
            opened = self._open.get(name)
            if opened is None:
                try:
                    opened = self._open_chain(row.storage, row.top, row.read_only)
                except StorageError as err:
                    raise StorageFailureError(f"cannot open volume {name!r}: {err}") from err
                self._open[name] = opened
            return opened

    def snapshot_storage(self, volume: str, snapshot: str) -> Storage:
        """The read-only storage of ``volume@snapshot`` served as an export, shared by every
        connection to it like :meth:`storage`; closed when the snapshot or its volume is
        deleted, or the service closes."""
        with self._lock:
            row = self._row(volume)
            snap = self.catalogue.snapshot(volume, check_name(snapshot, "snapshot"))
            if snap is None:
                raise NotFoundError(f"no snapshot {volume}@{snapshot}")
            opened = self._snapshot_views.get(snap.layer)
            if opened is None:
                try:
                    opened = self._open_chain(row.storage, snap.layer, True, view=True)
                except StorageError as err:
                    raise StorageFailureError(
                        f"cannot open snapshot {volume}@{snapshot}: {err}"
                    ) from err
                self._snapshot_views[snap.layer] = opened
            return opened.top

    def _close_snapshot_view(self, layer: str) -> None:
        with self._lock:
            opened = self._snapshot_views.pop(layer, None)
        if opened is not None:
            with contextlib.suppress(StorageError):
                opened.top.close()

    def resolve_storage(self, storage: str | StorageSpec | None) -> StorageSpec:
        """A spec from ``--storage`` text (a profile name or inline), or the default."""
        if storage is None:
            return self.default_storage
        if isinstance(storage, StorageSpec):
            return storage
        return parse_storage(storage, self.profiles, self.paths_relative_to)

    # ------------------------------------------------------------------ lifecycle

    def create(self, request: CreateRequest, *, ready: bool = True) -> VolumeInfo:
        """A new, empty (sparse) volume on ``request.storage`` (see :meth:`resolve_storage`).
        ``ready=False`` keeps it hidden (``creating``) until :meth:`mark_ready`, for volumes
        being filled from an image.  ``request.size`` may be ``None`` only for an adopted RBD
        image (its size is the image's)."""
        name, size, description = check_name(request.name), request.size, request.description
        labels = check_labels(dict(request.labels))
        if len(description) > 4096 or "\0" in description:
            raise InvalidRequestError("description must be at most 4096 characters, no NUL")
        spec = prepare_location(self.resolve_storage(request.storage))
        with self._mutating():
            if self.catalogue.volume(name) is not None:
                raise AlreadyExistsError(f"volume {name!r} already exists")
            backend = self._backend(spec)
            layer = backend.new_layer()
            if self.catalogue.layer_storage(layer) is not None:
                raise AlreadyExistsError(f"storage {spec} is already a volume's")
            existing = backend.existing_size(layer)
            if size is None and existing is None:
                raise InvalidRequestError("a size is needed (e.g. --size 10GiB)")
            nbytes = existing if size is None else parse_size(size)
            assert nbytes is not None
            if existing is not None and nbytes != existing:
                raise InvalidRequestError(
                    f"storage {spec} holds {existing} bytes, not {nbytes}: leave the size out"
                )
            row = VolumeRow(
                name,
                nbytes,
                description,
                labels,
                request.read_only,
                layer,
                None,
                "creating",
                time.time(),
                spec,
                request.shared,
            )
            self._record_creating(row, None)
            self._make_ready(row, ready, lambda: backend.create(layer, nbytes))
        log.info("created volume %s (%d bytes on %s)", name, nbytes, spec)
        return self._info(self.catalogue.volume(name) or row)

    def _record_creating(self, row: VolumeRow, parent: str | None) -> None:
        """Take the lease of a new volume, then record it ``creating`` with its top layer
        over ``parent`` (mutate lock held)."""
        try:
            self.leases.take(row.name)
        except LeaseHeldError:
            raise AlreadyExistsError(f"volume {row.name!r} is being created") from None
        try:
            with self.catalogue.transaction() as changes:
                changes.add_layer(row.top, parent, row.storage)
                changes.add_volume(row)
        except BaseException:
            self.leases.release(row.name)
            raise

    def _make_ready(self, row: VolumeRow, ready: bool, make: Callable[[], None]) -> None:
        """Make a ``creating`` volume's storage, then mark it ready (if ``ready``; else its
        lease is kept until mark_ready or abandon); on failure remove it again (mutate lock
        held)."""
        try:
            make()
        except (StorageError, VolumeError) as err:
            self._remove_volume(row)
            self.leases.release(row.name)
            if isinstance(err, VolumeError):
                raise
            raise StorageFailureError(f"cannot create volume {row.name!r}: {err}") from err
        except BaseException:
            self.leases.release(row.name)  # the row stays for gc, as after a crash
            raise
        if ready:
            self._set_ready(row.name)

    def _set_ready(self, name: str) -> None:
        with self.catalogue.transaction() as changes:
            changes.set_state(name, "ready")
        self.leases.release(name)

    def mark_ready(self, name: str) -> VolumeInfo:
        with self._mutating():
            self._set_ready(name)
        return self.info(name)

    def open_view(self, volume: str, snapshot: str | None = None) -> Storage:
        """A separate read-only storage of a volume or one of its snapshots (caller closes).

        A snapshot's view never changes; a volume's may, if it is written meanwhile.  A view
        of a volume this process has open on a backend that ``views_through_open`` (a
        replicated volume's engine) reads through that open storage, never a second one.
        """
        row = self._row(volume)
        top = row.top
        if snapshot is None:
            with self._lock:
                opened = self._open.get(volume)
            if opened is not None and opened.backend.views_through_open:
                return ReadOnlyStorage(opened.top)
        else:
            snap = self.catalogue.snapshot(volume, check_name(snapshot, "snapshot"))
            if snap is None:
                raise NotFoundError(f"no snapshot {volume}@{snapshot}")
            top = snap.layer
        try:
            return self._open_chain(row.storage, top, True, view=True).top
        except StorageError as err:
            raise StorageFailureError(f"cannot open {volume!r}: {err}") from err

    def open_creating(self, name: str) -> Storage:
        """The storage of a volume still ``creating`` (to fill it from an image)."""
        row = self.catalogue.volume(name)
        if row is None or row.state != "creating":
            raise NotFoundError(f"no volume {name!r} being created")
        try:
            return self._open_chain(row.storage, row.top, read_only=False).top
        except StorageError as err:
            raise StorageFailureError(f"cannot open {name!r}: {err}") from err

    def abandon(self, name: str) -> None:
        """Remove a volume that never became ready (a failed import)."""
        with self._mutating():
            row = self.catalogue.volume(name)
            if row is not None and row.state == "creating":
                self._remove_volume(row)
            self.leases.release(name)

    def resize(self, name: str, size: int | str, *, allow_shrink: bool = False) -> VolumeInfo:
        nbytes = parse_size(size)
        with self._mutating():
            row = self._row(name)
            if nbytes < row.size and not allow_shrink:
                raise InvalidRequestError(
                    f"refusing to shrink {name!r} from {row.size} to {nbytes} bytes: data past"
                    " the new end would be lost (use --allow-shrink)"
                )
            if nbytes != row.size:
                self._check_local_if_closed(name, "resize")
                opened = self._opened(name)
                if not opened.top.capabilities.can_resize:
                    raise InvalidRequestError(
                        f"resizing is not possible on volume {name!r}: its storage cannot be"
                        " resized (docs/storage.md)"
                    )
                try:
                    # Through the layers: a cache drops what the new size makes stale.
                    opened.top.resize(nbytes, allow_shrink=allow_shrink)
                except StorageError as err:
                    # Refusals of this volume's kind or state (a replicated volume only grows,
                    # with every replica in sync) are the caller's to fix, not failures.
                    if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise InvalidRequestError(
                            f"cannot resize {name!r}: {err.message}"
                        ) from None
                    if err.errno == errno.EBUSY:
                        raise InUseError(f"cannot resize {name!r}: {err.message}") from None
                    raise StorageFailureError(f"cannot resize {name!r}: {err}") from err
                with self.catalogue.transaction() as changes:
                    changes.set_size(name, nbytes)
        return self.info(name)

    def _check_local_if_closed(self, name: str, what: str) -> None:
        if name not in self._open:
            self._check_local(what)

    def delete(self, name: str, *, force: bool = False) -> None:
        with self._mutating():
            row = self._row(name)
            self._check_local_if_closed(name, "delete")
            clients = len(self.holders(name))
            if clients and not force:
                raise InUseError(
                    f"volume {name!r} is open by {clients} client(s); detach it first or use"
                    " --force"
                )
            snaps = self.catalogue.snapshots(name)
            if snaps and not force:
                raise DependencyError(
                    f"volume {name!r} has snapshots ({', '.join(s.name for s in snaps)});"
                    " delete them first or use --force"
                )
            for snap in snaps:
                dependents = self._dependents(snap.layer, name)
                if dependents:
                    raise DependencyError(
                        f"snapshot {name}@{snap.name} has clones ({', '.join(dependents)})"
                    )
            with self.catalogue.transaction() as changes:
                changes.set_state(name, "deleting")
                changes.remove_snapshots(name)
            for snap in snaps:
                self._close_snapshot_view(snap.layer)
            self._remove_volume(row)
        log.info("deleted volume %s", name)

    def _remove_volume(self, row: VolumeRow, *, quiet: bool = False) -> None:
        opened = self._open.pop(row.name, None)
        if opened is not None:
            opened.top.close()
        own = self.catalogue.chain(row.top)
        with self.catalogue.transaction() as changes:
            changes.remove_volume(row.name)
        if quiet:
            self._collect_layers((), local_only=True)
        else:
            self._collect_layers(own)

    # ------------------------------------------------------------------ snapshots and clones

    def snapshot(self, volume: str, name: str) -> SnapshotInfo:
        """A crash-consistent point-in-time snapshot, taken while the volume is in use."""
        check_name(name, "snapshot")
        with self._mutating():
            row = self._row(volume)
            if self.catalogue.snapshot(volume, name) is not None:
                raise AlreadyExistsError(f"snapshot {volume}@{name} already exists")
            self._check_local_if_closed(volume, "snapshot")
            opened = self._opened(volume)

            def commit(frozen: str, new_top: str) -> None:
                # Runs while the volume's writes are held: the catalogue points at the new top
                # before any write can land in it.  On RBD the top stays and the snapshot is
                # a layer of its own above it (``IMAGE@SNAP``).
                with self.catalogue.transaction() as changes:
                    if new_top != row.top:
                        changes.add_layer(new_top, frozen, row.storage)
                        changes.set_top(volume, new_top)
                    else:
                        changes.add_layer(frozen, row.top, row.storage)
                    changes.add_snapshot(SnapshotRow(volume, name, frozen, row.size, time.time()))

            try:
                opened.top.flush()  # a write-back cache hands its dirty blocks down first
                opened.backend.snapshot(opened.base, row.top, commit)
            except StorageError as err:
                raise StorageFailureError(f"snapshot of {volume!r} failed: {err}") from err
        log.info("snapshot %s@%s taken", volume, name)
        return next(s for s in self.snapshots(volume) if s.name == name)

    def clone(
        self,
        volume: str,
        snapshot: str,
        new_name: str,
        *,
        description: str = "",
        labels: dict[str, str] | None = None,
    ) -> VolumeInfo:
        """A thin writable copy of ``volume@snapshot``: instant, sharing the snapshot's data."""
        check_name(new_name)
        with self._mutating():
            snap = self.catalogue.snapshot(volume, snapshot)
            if snap is None:
                raise NotFoundError(f"no snapshot {volume}@{snapshot}")
            if self.catalogue.volume(new_name) is not None:
                raise AlreadyExistsError(f"volume {new_name!r} already exists")
            storage = self.catalogue.layer_storage(snap.layer) or FILE
            backend = self._backend(storage)
            layer = backend.new_clone_layer()
            row = VolumeRow(
                new_name,
                snap.size,
                description,
                check_labels(dict(labels or {})),
                False,
                layer,
                f"{volume}@{snapshot}",
                "creating",
                time.time(),
                storage,
            )
            parent = self.catalogue.chain(snap.layer)
            self._record_creating(row, snap.layer)
            self._make_ready(row, True, lambda: backend.clone(layer, parent, snap.size))
        log.info("cloned %s@%s as %s", volume, snapshot, new_name)
        return self.info(new_name)

    def delete_snapshot(
        self,
        volume: str,
        name: str,
        *,
        flatten_clones: bool = False,
        progress: Progress | None = None,
    ) -> None:
        with self._mutating():
            snap = self.catalogue.snapshot(volume, name)
            if snap is None:
                raise NotFoundError(f"no snapshot {volume}@{name}")
            dependents = self._dependents(snap.layer, volume)
            if dependents and not flatten_clones:
                raise DependencyError(
                    f"snapshot {volume}@{name} has clones ({', '.join(dependents)}): delete"
                    " them, or flatten them with --flatten-clones"
                )
            for clone in dependents:
                self._flatten(clone, progress)
            with self.catalogue.transaction() as changes:
                changes.remove_snapshot(volume, name)
            self._close_snapshot_view(snap.layer)
            self._collect_layers([snap.layer])
        log.info("deleted snapshot %s@%s", volume, name)

    def _flatten(self, name: str, progress: Progress | None) -> None:
        """Copy everything a clone reads from below into its own layer, then cut the chain."""
        row = self._row(name)
        self._check_local_if_closed(name, "flatten")
        opened = self._open.get(name)
        try:
            chain = self.catalogue.chain(row.top)
            if opened is not None:
                opened.top.flush()
                opened.backend.flatten(opened.base, chain, progress)
            else:
                self._backend(row.storage).flatten(None, chain, progress)
        except StorageError as err:
            raise StorageFailureError(f"flattening {name!r} failed: {err}") from err
        with self.catalogue.transaction() as changes:
            changes.set_parent(row.top, None)
            changes.set_origin(name, None)
        log.info("flattened %s", name)

    # ------------------------------------------------------------------ garbage

    def gc(self) -> builtins.list[str]:
        """Finish or roll back what a crash interrupted; returns what was removed."""
        self._collected = True  # not twice in a row: _mutating would collect first
        with self._mutating():
            return self._gc()

    def _gc(self, *, quiet: bool = False) -> builtins.list[str]:
        """``quiet`` (before a command's first change): only layers on ``file`` are removed,
        and failures logged at debug level only, so that a leftover on a store that is down
        neither slows down nor warns in every command; `nbs volume gc` tries and says."""
        removed = []
        for row in self.catalogue.volumes(state=None):
            if row.state == "creating" and self.leases.held(row.name):
                continue  # its creator is alive and at work (an import being copied)
            if row.state in ("creating", "deleting"):
                log.warning("removing volume %s left %s by a crash", row.name, row.state)
                self._remove_volume(row, quiet=quiet)
                removed.append(f"volume {row.name}")
        removed += self._collect_layers((), local_only=True) if quiet else self._collect_layers()
        if not quiet:  # storage nodes over the network: only a real gc
            removed += self._collect_replicas()
        self.leases.remove_stale()
        return removed

    def _collect_replicas(self) -> builtins.list[str]:
        """Replicas that left a volume's membership but could not be deleted then (their
        node was down): deleted now if their node answers, else a warning again."""
        removed = []
        for row in self.catalogue.volumes():
            if row.storage.kind != "replicated":
                continue
            try:
                backend = self._backend(row.storage)
                if isinstance(backend, ReplicatedBackend):
                    removed += backend.collect_leftovers(row.top)
            except (StorageError, VolumeError) as err:
                log.warning("volume %s: `nbs volume gc` tries again: %s", row.name, err)
        return removed

    def _collect_layers(
        self, warn_for: Collection[str] | None = None, *, local_only: bool = False
    ) -> builtins.list[str]:
        """Drop layers no volume or snapshot reaches, and layer files with no row.  A layer
        whose data cannot be removed yet stays: a warning for those in ``warn_for`` (None:
        all), debug for others, so that an old leftover is not reported by every command.
        ``local_only``: leave layers on other storages than ``file`` for a real gc (a store
        that is down must not slow every command down by its retry deadline)."""
        parents = self.catalogue.parents()
        live: set[str] = set()
        roots = [v.top for v in self.catalogue.volumes(state=None)]
        roots += [s.layer for s in self.catalogue.snapshots()]
        for root in roots:
            layer: str | None = root
            while layer is not None and layer not in live:
                live.add(layer)
                layer = parents.get(layer)
        dead = [layer for layer in parents if layer not in live]
        removed = []
        # Children before parents (a dead layer's parent may be dead too, and an RBD image
        # goes after its snapshots); data first, then the row, so a crash between leaves a
        # dead row to remove again.
        for layer in sorted(dead, key=lambda x: -len(self.catalogue.chain(x))):
            if local_only and self.catalogue.layer_storage(layer) != FILE:
                continue
            try:
                self._remove_layer_data(layer)
            except (StorageError, VolumeError) as err:
                log.log(
                    logging.WARNING if warn_for is None or layer in warn_for else logging.DEBUG,
                    "cannot remove layer %s yet (`nbs volume gc` tries again): %s",
                    layer,
                    err,
                )
                continue
            with self.catalogue.transaction() as changes:
                changes.remove_layer(layer)
            removed.append(layer)
        files = self.backends.get(FILE.location)
        return removed + [f for f in files.orphans(live) if f.split(".", 1)[0] not in dead]

    def close(self) -> None:
        with self._lock:
            for opened in self._open.values():
                with contextlib.suppress(StorageError):
                    opened.top.flush()
                with contextlib.suppress(StorageError):
                    opened.top.close()
            self._open.clear()
            for opened in self._snapshot_views.values():
                with contextlib.suppress(StorageError):
                    opened.top.close()
            self._snapshot_views.clear()
            self.backends.close()
            self.leases.close()
            self.catalogue.close()
            if self._serving_fd is not None:
                os.close(self._serving_fd)
                self._serving_fd = None


class _Opened(Generic[StorageT]):
    """An open volume: ``top`` (its layers over the base) serves requests; ``base`` (what
    ``backend`` opened, typed as that backend's storage) takes snapshots and flattens."""

    __slots__ = ("backend", "base", "top")

    def __init__(self, backend: Backend[StorageT], base: StorageT, top: Storage) -> None:
        self.backend = backend
        self.base = base
        self.top = top


def _wrap(base: Storage, spec: StorageSpec) -> Storage:
    """``base`` wrapped in the spec's layers, the first outermost."""
    storage = base
    for layer in reversed(spec.layers):
        kind = LAYERS[layer.kind]
        storage = kind.wrap(storage, kind.resolved(dict(layer.params)))
    return storage


def _node_info(name: str, probe: NodeProbe, replicas: Sequence[NodeReplica]) -> NodeInfo:
    return NodeInfo(
        name=name,
        configured=True,
        api=probe.api,
        nbd=probe.nbd,
        reachable=probe.reachable,
        version=probe.version,
        error=probe.error,
        replicas=tuple(replicas),
    )


def _unconfigured(name: str, replicas: Sequence[NodeReplica]) -> NodeInfo:
    return NodeInfo(
        name=name,
        configured=False,
        api="",
        nbd="",
        reachable=False,
        version=None,
        error="not in the config's nodes: (removed by a reload?); replace its replicas",
        replicas=tuple(replicas),
    )
