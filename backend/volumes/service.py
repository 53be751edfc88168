"""The volume service: lifecycle of volumes, snapshots and clones in one data directory.

Data directory::

    catalogue.sqlite3        metadata (backend.volumes.catalogue)
    layers/ID.data, ID.map   copy-on-write layers (backend.storage.cow)
    mutate.lock              flock held while a process changes the catalogue
    serving.lock             flock held (shared) by a running `nbs serve`

Crash safety: layer files are created atomically before the catalogue row that uses them
(a crash leaves at most an unreferenced layer, which gc() removes); a volume being created
from an image is ``creating`` until the copy finished, one being deleted is ``deleting`` until
its files are gone; gc() (run at every start) finishes or rolls back both.

Snapshots of a volume that a server has open must be taken by that server (it owns the live
top layer): use the API; this class refuses when another process serves the data directory.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from backend.storage import StorageError
from backend.storage.cow import CowStorage, allocated_bytes, create_layer, flatten_into
from backend.volumes.catalogue import Catalogue, VolumeRow
from backend.volumes.model import (
    AlreadyExistsError,
    DependencyError,
    InUseError,
    InvalidRequestError,
    NotFoundError,
    SnapshotInfo,
    StorageFailureError,
    VolumeError,
    VolumeInfo,
    check_labels,
    check_name,
    parse_size,
)

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 64 * 1024
Progress = Callable[[int, int], None]


class ServedElsewhereError(VolumeError):
    status = 409
    code = "served"


class VolumeService:
    """Owns one data directory.  Thread safe; one instance per process.

    ``serving``: this process serves the directory (``nbs serve``); it takes the serving lock,
    and volumes it opens stay open until deleted or close() is called.
    ``in_use``: how many clients have a volume open (from the server), for delete checks.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        serving: bool = False,
        in_use: Callable[[str], int] | None = None,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        self.data_dir = data_dir
        self.layers = data_dir / "layers"
        self.layers.mkdir(parents=True, exist_ok=True)
        os.chmod(data_dir, 0o700)
        self.chunk_size = chunk_size
        self.in_use = in_use or (lambda name: 0)
        self._lock = threading.RLock()
        self._open: dict[str, CowStorage] = {}
        self._serving_fd: int | None = None
        if serving:
            self._serving_fd = self._take_serving_lock()
        self.catalogue = Catalogue(data_dir / "catalogue.sqlite3")
        if not self.served_elsewhere():  # a running server may be mid-create: not ours to undo
            with self._mutating():
                self._gc()

    # ------------------------------------------------------------------ locks

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
        if self._serving_fd is not None:
            return False
        fd = os.open(self.data_dir / "serving.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    @contextlib.contextmanager
    def _mutating(self) -> Iterator[None]:
        with self._lock:
            fd = os.open(
                self.data_dir / "mutate.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _check_local(self, what: str) -> None:
        if self.served_elsewhere():
            raise ServedElsewhereError(
                f"a running nbs serve owns {self.data_dir}: {what} through its API (--server)"
            )

    # ------------------------------------------------------------------ helpers

    def _stem(self, layer: str) -> Path:
        return self.layers / layer

    def _row(self, name: str) -> VolumeRow:
        row = self.catalogue.volume(check_name(name))
        if row is None or row.state != "ready":
            raise NotFoundError(f"no volume {name!r}")
        return row

    def _chain(self, top: str) -> builtins.list[Path]:
        return [self._stem(layer) for layer in self.catalogue.chain(top)]

    def _used(self, layer: str) -> int:
        try:
            return allocated_bytes(self._stem(layer))
        except StorageError:
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
            connections=self.in_use(row.name),
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

    def generation(self) -> int:
        return self.catalogue.generation()

    def storage(self, name: str) -> CowStorage:
        """The open storage of a volume (shared by every connection to it)."""
        with self._lock:
            row = self._row(name)
            storage = self._open.get(name)
            if storage is None:
                try:
                    storage = CowStorage(self._chain(row.top), read_only=row.read_only)
                except StorageError as err:
                    raise StorageFailureError(f"cannot open volume {name!r}: {err}") from err
                self._open[name] = storage
            return storage

    # ------------------------------------------------------------------ lifecycle

    def create(
        self,
        name: str,
        size: int | str,
        *,
        description: str = "",
        labels: dict[str, str] | None = None,
        read_only: bool = False,
        ready: bool = True,
    ) -> VolumeInfo:
        """A new, empty (sparse) volume.  ``ready=False`` keeps it hidden (``creating``) until
        :meth:`mark_ready`, for volumes being filled from an image."""
        check_name(name)
        nbytes = parse_size(size)
        labels = check_labels(dict(labels or {}))
        if len(description) > 4096 or "\0" in description:
            raise InvalidRequestError("description must be at most 4096 characters, no NUL")
        with self._mutating():
            if self.catalogue.volume(name) is not None:
                raise AlreadyExistsError(f"volume {name!r} already exists")
            layer = uuid.uuid4().hex
            try:
                create_layer(self._stem(layer), nbytes, self.chunk_size)
            except StorageError as err:
                raise StorageFailureError(f"cannot create volume {name!r}: {err}") from err
            row = VolumeRow(
                name,
                nbytes,
                description,
                labels,
                read_only,
                layer,
                None,
                "ready" if ready else "creating",
                time.time(),
            )
            with self.catalogue.transaction() as db:
                self.catalogue.add_layer(db, layer, None)
                self.catalogue.add_volume(db, row)
        log.info("created volume %s (%d bytes)", name, nbytes)
        return self._info(row)

    def mark_ready(self, name: str) -> VolumeInfo:
        with self._mutating(), self.catalogue.transaction() as db:
            db.execute("UPDATE volumes SET state = 'ready' WHERE name = ?", (name,))
        return self.info(name)

    def open_view(self, volume: str, snapshot: str | None = None) -> CowStorage:
        """A separate read-only storage of a volume or one of its snapshots (caller closes).

        A snapshot's view never changes; a volume's may, if it is written meanwhile.
        """
        row = self._row(volume)
        top = row.top
        if snapshot is not None:
            snap = self.catalogue.snapshot(volume, check_name(snapshot, "snapshot"))
            if snap is None:
                raise NotFoundError(f"no snapshot {volume}@{snapshot}")
            top = snap.layer
        try:
            return CowStorage(self._chain(top), read_only=True)
        except StorageError as err:
            raise StorageFailureError(f"cannot open {volume!r}: {err}") from err

    def open_creating(self, name: str) -> CowStorage:
        """The storage of a volume still ``creating`` (to fill it from an image)."""
        row = self.catalogue.volume(name)
        if row is None or row.state != "creating":
            raise NotFoundError(f"no volume {name!r} being created")
        return CowStorage(self._chain(row.top))

    def abandon(self, name: str) -> None:
        """Remove a volume that never became ready (a failed import)."""
        with self._mutating():
            row = self.catalogue.volume(name)
            if row is not None and row.state == "creating":
                self._remove_volume(row)

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
                storage = self.storage(name)
                try:
                    storage.resize(nbytes, allow_shrink=allow_shrink)
                except StorageError as err:
                    raise StorageFailureError(f"cannot resize {name!r}: {err}") from err
                with self.catalogue.transaction() as db:
                    db.execute("UPDATE volumes SET size = ? WHERE name = ?", (nbytes, name))
        return self.info(name)

    def _check_local_if_closed(self, name: str, what: str) -> None:
        if name not in self._open:
            self._check_local(what)

    def delete(self, name: str, *, force: bool = False) -> None:
        with self._mutating():
            row = self._row(name)
            self._check_local_if_closed(name, "delete")
            clients = self.in_use(name)
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
            with self.catalogue.transaction() as db:
                db.execute("UPDATE volumes SET state = 'deleting' WHERE name = ?", (name,))
                db.execute("DELETE FROM snapshots WHERE volume = ?", (name,))
            self._remove_volume(row)
        log.info("deleted volume %s", name)

    def _remove_volume(self, row: VolumeRow) -> None:
        storage = self._open.pop(row.name, None)
        if storage is not None:
            storage.close()
        with self.catalogue.transaction() as db:
            db.execute("DELETE FROM volumes WHERE name = ?", (row.name,))
        self._collect_layers()

    # ------------------------------------------------------------------ snapshots and clones

    def snapshot(self, volume: str, name: str) -> SnapshotInfo:
        """A crash-consistent point-in-time snapshot, taken while the volume is in use."""
        check_name(name, "snapshot")
        with self._mutating():
            row = self._row(volume)
            if self.catalogue.snapshot(volume, name) is not None:
                raise AlreadyExistsError(f"snapshot {volume}@{name} already exists")
            self._check_local_if_closed(volume, "snapshot")
            storage = self.storage(volume)
            new_top = uuid.uuid4().hex

            def commit(frozen: Path) -> None:
                # Runs while the volume's writes are held: the catalogue points at the new top
                # before any write can land in it.
                with self.catalogue.transaction() as db:
                    self.catalogue.add_layer(db, new_top, frozen.name)
                    db.execute("UPDATE volumes SET top = ? WHERE name = ?", (new_top, volume))
                    db.execute(
                        "INSERT INTO snapshots VALUES (?, ?, ?, ?, ?)",
                        (volume, name, frozen.name, row.size, time.time()),
                    )

            try:
                storage.snapshot(self._stem(new_top), commit=commit)
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
            layer = uuid.uuid4().hex
            try:
                create_layer(self._stem(layer), snap.size, self.chunk_size)
            except StorageError as err:
                raise StorageFailureError(f"cannot create clone {new_name!r}: {err}") from err
            row = VolumeRow(
                new_name,
                snap.size,
                description,
                check_labels(dict(labels or {})),
                False,
                layer,
                f"{volume}@{snapshot}",
                "ready",
                time.time(),
            )
            with self.catalogue.transaction() as db:
                self.catalogue.add_layer(db, layer, snap.layer)
                self.catalogue.add_volume(db, row)
        log.info("cloned %s@%s as %s", volume, snapshot, new_name)
        return self._info(row)

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
            with self.catalogue.transaction() as db:
                db.execute("DELETE FROM snapshots WHERE volume = ? AND name = ?", (volume, name))
            self._collect_layers()
        log.info("deleted snapshot %s@%s", volume, name)

    def _flatten(self, name: str, progress: Progress | None) -> None:
        """Copy everything a clone reads from below into its own layer, then cut the chain."""
        row = self._row(name)
        self._check_local_if_closed(name, "flatten")
        storage = self._open.get(name)
        try:
            if storage is not None:
                storage.flatten(progress)
            else:
                flatten_into(self._chain(row.top), progress)
        except StorageError as err:
            raise StorageFailureError(f"flattening {name!r} failed: {err}") from err
        with self.catalogue.transaction() as db:
            db.execute("UPDATE layers SET parent = NULL WHERE id = ?", (row.top,))
            db.execute("UPDATE volumes SET origin = NULL WHERE name = ?", (name,))
        log.info("flattened %s", name)

    # ------------------------------------------------------------------ garbage

    def gc(self) -> builtins.list[str]:
        """Finish or roll back what a crash interrupted; returns what was removed."""
        with self._mutating():
            return self._gc()

    def _gc(self) -> builtins.list[str]:
        removed = []
        for row in self.catalogue.volumes(state=None):
            if row.state in ("creating", "deleting"):
                log.warning("removing volume %s left %s by a crash", row.name, row.state)
                self._remove_volume(row)
                removed.append(f"volume {row.name}")
        removed += self._collect_layers()
        return removed

    def _collect_layers(self) -> builtins.list[str]:
        """Drop layers no volume or snapshot reaches, and layer files with no row."""
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
        if dead:
            with self.catalogue.transaction() as db:
                # Children before parents: a dead layer's parent may be dead too.
                for layer in sorted(dead, key=lambda x: -len(self.catalogue.chain(x))):
                    db.execute("DELETE FROM layers WHERE id = ?", (layer,))
        removed = []
        for path in sorted(self.layers.iterdir()):
            layer = path.name.split(".", 1)[0]
            if layer not in live:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                removed.append(path.name)
        return removed

    def close(self) -> None:
        with self._lock:
            for storage in self._open.values():
                with contextlib.suppress(StorageError):
                    storage.flush()
                storage.close()
            self._open.clear()
            self.catalogue.close()
            if self._serving_fd is not None:
                os.close(self._serving_fd)
                self._serving_fd = None
