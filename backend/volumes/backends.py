"""Volume backends: how the catalogue's layers map onto one kind of storage.

The catalogue (backend.volumes.catalogue) knows volumes as chains of *layers*: a volume's
writable top, the frozen layers under it, snapshots naming frozen layers and clones whose top
sits on a snapshot's layer.  A :class:`Backend` turns layer ids into storage:

* :class:`FileBackend`: each layer is a pair of local files (backend.storage.cow).
* :class:`ChunkedBackend`: each layer is a key prefix in an object store (a directory, S3,
  RADOS), with copy-on-write between layers (backend.storage.chunked).
* :class:`RbdBackend`: a top layer is an RBD image, a snapshot layer ``IMAGE@SNAP`` an RBD
  snapshot, a clone an RBD clone: snapshots and clones are Ceph's own.
* :class:`NbdBackend`: the one layer is a remote NBD export, adopted (backend.storage.nbd).

Snapshots differ in shape: on files and objects the frozen layer is the old top and the volume
continues in a new top; on RBD the top stays and the snapshot is a new layer under it in name
only.  :meth:`Backend.snapshot` reports both through ``commit(frozen, new_top)``.

A backend is generic over the storage it opens (``Backend[CowStorage]``...): snapshot and
flatten are that engine's own abilities, so they take the storage its ``open`` returned, typed,
and never check what it is (docs/decisions/0080-declared-storage-abilities.md).  Resizing is an
ability every Storage declares (``Capabilities.can_resize``), so it needs no backend.
"""

from __future__ import annotations

import abc
import builtins
import contextlib
import errno
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from backend.storage.base import Storage, StorageError
from backend.storage.chunked import (
    ChunkedStorage,
    layer_keys,
    open_chain,
    read_layer,
    remove_layer,
)
from backend.storage.chunked import (
    create_layer as create_chunked_layer,
)
from backend.storage.cow import (
    CowStorage,
    allocated_bytes,
    flatten_into,
    layer_files,
)
from backend.storage.cow import (
    create_layer as create_cow_layer,
)
from backend.storage.nbd import NbdStorage, NbdTarget
from backend.storage.objects.base import ObjectStore
from backend.volumes.model import InvalidRequestError

if TYPE_CHECKING:
    from backend.storage.rbd import RbdStorage

Progress = Callable[[int, int], None]
Commit = Callable[[str, str], None]

StorageT = TypeVar("StorageT", bound=Storage)


class Backend(abc.ABC, Generic[StorageT]):
    """One storage location; shared by every volume on it.  Thread safe.  ``StorageT`` is the
    storage its ``open`` returns, which ``snapshot`` and ``flatten`` take back."""

    # A read-only view of a volume this process has open reads through the open storage
    # (ReadOnlyStorage over it) rather than a second ``open``: where a second open of the
    # volume would take it over (a replicated volume's engine takes a new epoch).
    views_through_open = False

    def new_layer(self) -> str:
        """An id for a new volume's top layer."""
        return uuid.uuid4().hex

    def new_clone_layer(self) -> str:
        """An id for a clone's top layer."""
        return uuid.uuid4().hex

    def existing_size(self, layer: str) -> int | None:
        """The size of data already at ``layer`` (an adopted image), else ``None``."""
        return None

    @abc.abstractmethod
    def create(self, layer: str, size: int) -> None:
        """A new empty top layer."""

    def clone(self, layer: str, parent: builtins.list[str], size: int) -> None:
        """A new top layer over the chain ``parent`` (bottom first; its last is a snapshot's)."""
        self.create(layer, size)

    @abc.abstractmethod
    def open(self, chain: builtins.list[str], read_only: bool) -> StorageT:
        """The storage of the chain ``chain`` (bottom first, top last)."""

    def open_view(self, chain: builtins.list[str]) -> Storage:
        """A read-only storage of the chain ``chain`` for a reader (an export to an image
        file, a snapshot served to a client): it must not take the volume over."""
        return self.open(chain, read_only=True)

    @abc.abstractmethod
    def snapshot(self, storage: StorageT, top: str, commit: Commit) -> None:
        """Freeze what ``storage`` (open on ``top``) holds; ``commit(frozen, new_top)`` records
        it while no write can land in between."""

    @abc.abstractmethod
    def flatten(
        self, storage: StorageT | None, chain: builtins.list[str], progress: Progress | None
    ) -> None:
        """Make the top of ``chain`` hold everything (the open ``storage``, if any)."""

    @abc.abstractmethod
    def used(self, layer: str) -> int:
        """Bytes the layer holds (allocation, not size)."""

    @abc.abstractmethod
    def remove(self, layer: str) -> None:
        """Delete a layer's data; nothing happens if it is gone."""

    def orphans(self, live: set[str]) -> builtins.list[str]:
        """Remove data of layers no catalogue row knows (left by a crash); returns names."""
        return []

    def close(self) -> None:
        """Release connections."""


class FileBackend(Backend[CowStorage]):
    """Layers as copy-on-write files in ``directory``."""

    def __init__(self, directory: Path, chunk_size: int) -> None:
        self.directory = directory
        self.chunk_size = chunk_size

    def _stem(self, layer: str) -> Path:
        return self.directory / layer

    def create(self, layer: str, size: int) -> None:
        create_cow_layer(self._stem(layer), size, self.chunk_size)

    def open(self, chain: builtins.list[str], read_only: bool) -> CowStorage:
        return CowStorage([self._stem(layer) for layer in chain], read_only=read_only)

    def snapshot(self, storage: CowStorage, top: str, commit: Commit) -> None:
        new_top = uuid.uuid4().hex
        storage.snapshot(self._stem(new_top), commit=lambda frozen: commit(frozen.name, new_top))

    def flatten(
        self, storage: CowStorage | None, chain: builtins.list[str], progress: Progress | None
    ) -> None:
        if storage is not None:
            storage.flatten(progress)
        else:
            flatten_into([self._stem(layer) for layer in chain], progress)

    def used(self, layer: str) -> int:
        try:
            return allocated_bytes(self._stem(layer))
        except StorageError:
            return 0

    def remove(self, layer: str) -> None:
        for path in layer_files(self._stem(layer)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def orphans(self, live: set[str]) -> builtins.list[str]:
        removed = []
        for path in sorted(self.directory.iterdir()):
            if path.name.split(".", 1)[0] not in live:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                removed.append(path.name)
        return removed


class ChunkedBackend(Backend[ChunkedStorage]):
    """Layers as key prefixes ``LAYER/`` in one object store (shared by its volumes)."""

    def __init__(self, store: ObjectStore, chunk_size: int, workers: int = 8) -> None:
        self.store = store
        self.chunk_size = chunk_size
        self.workers = workers

    def create(self, layer: str, size: int) -> None:
        create_chunked_layer(self.store, f"{layer}/", size, self.chunk_size)

    def open(self, chain: builtins.list[str], read_only: bool) -> ChunkedStorage:
        return open_chain(
            self.store, [f"{layer}/" for layer in chain], read_only=read_only, workers=self.workers
        )

    def snapshot(self, storage: ChunkedStorage, top: str, commit: Commit) -> None:
        new_top = uuid.uuid4().hex
        storage.snapshot(f"{new_top}/", commit=lambda: commit(top, new_top))

    def flatten(
        self, storage: ChunkedStorage | None, chain: builtins.list[str], progress: Progress | None
    ) -> None:
        if storage is not None:
            storage.flatten(progress)
            return
        opened = self.open(chain, read_only=False)
        try:
            opened.flatten(progress)
        finally:
            opened.close()

    def used(self, layer: str) -> int:
        """Chunks held times the chunk size (an upper bound: the last chunk may be short)."""
        try:
            _, chunk_size, _ = read_layer(self.store, f"{layer}/")
            return (len(layer_keys(self.store, f"{layer}/")) - 1) * chunk_size
        except StorageError:
            return 0

    def remove(self, layer: str) -> None:
        try:
            remove_layer(self.store, f"{layer}/")
        except StorageError as err:
            # ENOENT: the container itself (an S3 bucket) does not exist, so neither does
            # the layer: a create that failed on a missing bucket leaves nothing to remove.
            if err.errno != errno.ENOENT:
                raise

    def close(self) -> None:
        self.store.close()


class RbdBackend(Backend["RbdStorage"]):
    """Volumes as RBD images in ``pool``: top layer ``IMAGE``, snapshot layer ``IMAGE@SNAP``.

    With ``image`` set, the one volume on this backend is that existing image (adopted: its
    size is the image's, and deleting the volume never removes the image).
    """

    def __init__(self, cluster: Any, pool: str, namespace: str = "", image: str = "") -> None:
        from backend.storage import rbd  # noqa: PLC0415 - needs python3-rbd: only when used

        self._rbd = rbd
        self.cluster = cluster
        self.pool = pool
        self.namespace = namespace
        self.image = image

    def _where(self) -> dict[str, Any]:
        return {"namespace": self.namespace}

    def new_layer(self) -> str:
        return self.image or self.new_clone_layer()

    def new_clone_layer(self) -> str:
        return f"nbs-{uuid.uuid4().hex}"

    def existing_size(self, layer: str) -> int | None:
        if layer != self.image:
            return None
        images = self._rbd.list_images(self.cluster, self.pool, **self._where())
        if layer not in images:
            return None
        view = self._rbd.RbdStorage(self.cluster, self.pool, layer, read_only=True, **self._where())
        try:
            return int(view.size)
        finally:
            view.close()

    def create(self, layer: str, size: int) -> None:
        if layer == self.image and self.existing_size(layer) is not None:
            return
        self._rbd.create_image(self.cluster, self.pool, layer, size, **self._where())

    def clone(self, layer: str, parent: builtins.list[str], size: int) -> None:
        image, _, snap = parent[-1].partition("@")
        self._rbd.clone(self.cluster, self.pool, image, snap, layer, **self._where())

    def open(self, chain: builtins.list[str], read_only: bool) -> RbdStorage:
        image, _, snap = chain[-1].partition("@")
        storage: RbdStorage = self._rbd.RbdStorage(
            self.cluster,
            self.pool,
            image,
            read_only=read_only or bool(snap),
            snapshot=snap or None,
            **self._where(),
        )
        return storage

    def snapshot(self, storage: RbdStorage, top: str, commit: Commit) -> None:
        snap = uuid.uuid4().hex
        storage.snapshot(snap)
        try:
            commit(f"{top}@{snap}", top)
        except BaseException:
            with contextlib.suppress(Exception):
                self._rbd.remove_snapshot(self.cluster, self.pool, top, snap, **self._where())
            raise

    def flatten(
        self, storage: RbdStorage | None, chain: builtins.list[str], progress: Progress | None
    ) -> None:
        self._rbd.flatten(self.cluster, self.pool, chain[-1], progress, **self._where())

    def used(self, layer: str) -> int:
        image, _, snap = layer.partition("@")
        try:
            return int(
                self._rbd.used_bytes(
                    self.cluster, self.pool, image, snapshot=snap or None, **self._where()
                )
            )
        except StorageError:
            return 0

    def remove(self, layer: str) -> None:
        image, _, snap = layer.partition("@")
        if snap:
            self._rbd.remove_snapshot(self.cluster, self.pool, image, snap, **self._where())
        elif image != self.image:
            self._rbd.remove_image(self.cluster, self.pool, image, **self._where())


class NbdBackend(Backend[NbdStorage]):
    """The one volume on this backend is the remote export at ``url``, adopted: its size is
    the export's, nbs never removes it, and what only the export's own server could do
    (snapshots, clones, resizing: NbdStorage declares no resize) is refused."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self.url = url
        self.target = NbdTarget.from_uri(url)
        self.options = options

    def new_layer(self) -> str:
        return f"nbd:{self.target}"

    def existing_size(self, layer: str) -> int | None:
        try:
            probe = NbdStorage(self.target, reconnect_deadline=0)
        except StorageError as err:
            # The operator named an export that does not answer: theirs to fix (a 4xx).
            raise InvalidRequestError(f"{err}") from None
        try:
            return probe.size
        finally:
            probe.close()

    def create(self, layer: str, size: int) -> None:
        """Nothing to make: the export exists (existing_size opened it)."""

    def open(self, chain: builtins.list[str], read_only: bool) -> NbdStorage:
        return NbdStorage(self.target, **self.options)

    def snapshot(self, storage: NbdStorage, top: str, commit: Commit) -> None:
        raise InvalidRequestError(
            f"a snapshot is not possible on a volume of kind nbd ({self.target}): do it on the"
            " server that owns the export"
        )

    def flatten(
        self, storage: NbdStorage | None, chain: builtins.list[str], progress: Progress | None
    ) -> None:
        """Nothing under the export to copy up."""

    def used(self, layer: str) -> int:
        return 0  # unknown here; the export's server knows

    def remove(self, layer: str) -> None:
        """Never: the export belongs to its server."""
