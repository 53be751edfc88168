"""In-process storage nodes for the volume service's replicated-volume tests: each node is a
VolumeService on its own data directory served in catalogue mode by this project's Server on
loopback, so members are real NbdStorages with fenced export names."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

from backend.nbd import TLSPolicy
from backend.server.server import Server, TCPAddress
from backend.storage.nbd import NbdTarget
from backend.volumes.exports import VolumeExports
from backend.volumes.replicated import NodeProbe, NodeVolumes
from backend.volumes.service import VolumeService
from tests.unit.server.clients import port_of


class InProcessNodes:
    """StorageNodes over in-process nodes; a node's "API" is its VolumeService itself."""

    def __init__(self, directory: Path, names: Sequence[str]) -> None:
        self.services: dict[str, VolumeService] = {}
        self.servers: dict[str, Server] = {}
        self.ports: dict[str, int] = {}
        self.stopped: set[str] = set()
        for name in names:
            service = VolumeService(directory / name)
            service.start_serving()
            server = Server(
                VolumeExports(service, tls=TLSPolicy.ALLOWED), tcp=[TCPAddress("127.0.0.1", 0)]
            )
            server.bind()
            server.start()
            self.services[name] = service
            self.servers[name] = server
            self.ports[name] = port_of(server)

    def names(self) -> Sequence[str]:
        return tuple(self.services)

    @contextlib.contextmanager
    def volumes(self, node: str) -> Iterator[NodeVolumes]:
        yield self.services[node]

    def probe(self, node: str) -> NodeProbe:
        # The "API" is the VolumeService, always there: a node is up until stop().
        uri = f"nbd://127.0.0.1:{self.ports[node]}"
        if node in self.stopped:
            return NodeProbe("in-process", uri, reachable=False, error="stopped")
        return NodeProbe("in-process", uri, reachable=True, version="in-process")

    def target(self, node: str, export: str) -> NbdTarget:
        # Its port, known also after stop(): a stopped node refuses connections.
        uri = f"nbd://127.0.0.1:{self.ports[node]}/"
        return dataclasses.replace(NbdTarget.from_uri(uri), export=export)

    def stop(self, node: str) -> None:
        """The node's NBD server goes away (its connections are cut)."""
        self.servers[node].shutdown(grace=1)
        self.stopped.add(node)

    def replicas(self, node: str) -> list[str]:
        return [v.name for v in self.services[node].list() if v.name.startswith("r-")]

    def replica_bytes(self, node: str, name: str) -> bytes:
        # The storage the node serves (a second, read-only open would conflict with it).
        storage = self.services[node].storage(name)
        return storage.read(0, storage.size)

    def close(self) -> None:
        for server in self.servers.values():
            server.shutdown(grace=5)
        for service in self.services.values():
            service.close()
