"""The backends of one volume service: one per storage location, made on first use through
the registry (backend.volumes.kinds) and shared by every volume there, so one S3 client or one
Ceph connection serves them all."""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from backend.storage import StorageError
from backend.volumes.backends import Backend
from backend.volumes.catalogue import Catalogue
from backend.volumes.kinds import KINDS
from backend.volumes.replicated import NoNodes, StorageNodes
from backend.volumes.storages import StorageSpec


class Backends:
    """Backends by location (a spec without its layers).  Thread safe.  Also the registry
    factories' :class:`~backend.volumes.kinds.Site`."""

    def __init__(
        self,
        data_dir: Path,
        chunk_size: int,
        *,
        nodes: StorageNodes | None = None,
        catalogue: Callable[[], Catalogue] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.chunk_size = chunk_size
        self._nodes = nodes or NoNodes()
        self._catalogue = catalogue
        self._lock = threading.Lock()
        self._backends: dict[StorageSpec, Backend[Any]] = {}
        self._clusters: dict[tuple[str, float], Any] = {}

    def get(self, spec: StorageSpec) -> Backend[Any]:
        location = spec.location  # an adopted RBD image gets a backend of its own
        with self._lock:
            backend = self._backends.get(location)
            if backend is None:
                kind = KINDS.get(location.kind)
                if kind is None:
                    raise StorageError(errno.EINVAL, f"unknown storage kind {location.kind!r}")
                try:
                    backend = kind.backend(kind.resolved(dict(location.params)), self)
                except (ImportError, OSError) as err:
                    raise StorageError(errno.EIO, f"cannot open storage {location}: {err}") from err
                self._backends[location] = backend
            return backend

    def cluster(self, conf: str, timeout: float) -> Any:
        """The Ceph cluster connection for ``conf`` (lock held: called from ``get``)."""
        from backend.storage.ceph import RadosCluster  # noqa: PLC0415 - needs python3-rados

        key = (conf, timeout)
        cluster = self._clusters.get(key)
        if cluster is None:
            cluster = RadosCluster(conf, timeout=timeout)
            self._clusters[key] = cluster
        return cluster

    @property
    def nodes(self) -> StorageNodes:
        return self._nodes

    def catalogue(self) -> Catalogue:
        """The volume service's catalogue (the one open now: it changes on first write)."""
        if self._catalogue is None:
            raise StorageError(errno.EINVAL, "no catalogue for replicated volumes here")
        return self._catalogue()

    def __iter__(self) -> Iterator[Backend[Any]]:
        with self._lock:
            return iter(list(self._backends.values()))

    def close(self) -> None:
        with self._lock:
            for backend in self._backends.values():
                with contextlib.suppress(Exception):
                    backend.close()
            self._backends.clear()
            for cluster in self._clusters.values():
                with contextlib.suppress(Exception):
                    cluster.close()
            self._clusters.clear()
