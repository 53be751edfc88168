"""The storage nodes of the config (``nodes:``) as the volume service's StorageNodes: each
node's management API through RemoteVolumes, its NBD listener from its URI.

A node that refuses the token is an InvalidRequestError (the config is wrong), every other
failure the API client's own error.  Tokens in files are read at each use, so a rotated
token file is picked up without a restart, and a missing one is a one-line error of the
operation that needed it.

SIGHUP swaps the whole set (:meth:`ConfiguredNodes.replace`, docs/decisions/0125): each
operation looks its node up once, so it uses the old or the new definition, never a mix; a
node no longer configured is not contacted again (its members cannot be reopened)."""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import MappingProxyType
from typing import TYPE_CHECKING

from backend.config import NodeConfig
from backend.storage.base import StorageError
from backend.storage.nbd import NbdTarget
from backend.volumes.catalogue import Catalogue
from backend.volumes.model import InvalidRequestError, NodeInfo, VolumeError
from backend.volumes.replicated import NodeProbe, NodeVolumes

if TYPE_CHECKING:
    from backend.api.client import RemoteVolumes

# Seconds a node's API has to answer `nbs node list`'s status request.
PROBE_TIMEOUT = 3.0


@dataclasses.dataclass(frozen=True)
class NodesChange:
    """What a :meth:`ConfiguredNodes.replace` changed, by node name (sorted)."""

    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


class ConfiguredNodes:
    """Thread safe: the nodes are one read-only mapping that :meth:`replace` swaps whole
    (one reference assignment), so readers (API threads, the engines' reopen and resync
    paths) need no lock."""

    def __init__(self, nodes: Mapping[str, NodeConfig]) -> None:
        self._nodes: Mapping[str, NodeConfig] = MappingProxyType(dict(nodes))

    def replace(self, nodes: Mapping[str, NodeConfig]) -> NodesChange:
        """Use ``nodes`` from now on (SIGHUP).  Connections open now keep their address;
        every lookup after this returns sees the new set.  Called by one thread at a time
        (the signal loop)."""
        old, new = self._nodes, MappingProxyType(dict(nodes))
        self._nodes = new
        return NodesChange(
            added=tuple(sorted(new.keys() - old.keys())),
            changed=tuple(sorted(n for n in new.keys() & old.keys() if new[n] != old[n])),
            removed=tuple(sorted(old.keys() - new.keys())),
        )

    def names(self) -> Sequence[str]:
        return tuple(self._nodes)

    def _node(self, name: str) -> NodeConfig:
        try:
            return self._nodes[name]
        except KeyError:
            raise InvalidRequestError(f"no storage node {name!r} is configured") from None

    @contextmanager
    def volumes(self, node: str) -> Iterator[NodeVolumes]:
        with self._client(node) as client:
            yield client

    def probe(self, node: str) -> NodeProbe:
        config = self._node(node)
        try:
            with self._client(node) as client:
                status = client.status(timeout=PROBE_TIMEOUT)
        except VolumeError as err:  # no answer, a refused token, a bad answer
            return NodeProbe(config.api, config.nbd, reachable=False, error=str(err))
        version = status.get("version")
        return NodeProbe(
            config.api, config.nbd, reachable=True, version=str(version) if version else None
        )

    @contextmanager
    def _client(self, node: str) -> Iterator[RemoteVolumes]:
        from backend.api.client import RemoteVolumes, read_token  # noqa: PLC0415 - httpx
        from backend.api.errors import UnauthorizedError  # noqa: PLC0415

        config = self._node(node)
        verify: str | bool = str(config.ca) if config.ca is not None else True
        try:
            token = config.token
            if token is None:
                assert config.token_file is not None  # the config parser checked one is set
                token = read_token(config.token_file)
            with RemoteVolumes(config.api, token, verify=verify) as client:
                yield client
        except UnauthorizedError as err:
            # The config's token (or its file) is wrong: the operator's to fix, not a failure
            # of the node.
            raise InvalidRequestError(f"{err} (nodes.{node} in the config)") from None

    def target(self, node: str, export: str) -> NbdTarget:
        config = self._nodes.get(node)
        if config is None:
            # A StorageError: the engine opening a member on a node removed from the config
            # fails that member (out, like a dead node's) and serves on with the others.
            raise StorageError(errno.ENXIO, f"no storage node {node!r} is configured")
        return config.target(export)


class ListedNodes(ConfiguredNodes):
    """The storage nodes as a running server listed them (``GET /v1/nodes``): their NBD
    addresses, for reading replicas in this process (``nbs volume export`` beside a server,
    without --config), and their status as listed.  No tokens come with the list, so their
    APIs are not for this process: asking for one is an InvalidRequestError."""

    def __init__(self, nodes: Sequence[NodeInfo]) -> None:
        self._listed = {n.name: n for n in nodes if n.configured}
        super().__init__({n.name: NodeConfig(api=n.api, nbd=n.nbd) for n in self._listed.values()})

    def probe(self, node: str) -> NodeProbe:
        self._node(node)  # InvalidRequestError if not listed
        n = self._listed[node]
        return NodeProbe(n.api, n.nbd, n.reachable, n.version, n.error)

    @contextmanager
    def volumes(self, node: str) -> Iterator[NodeVolumes]:
        raise InvalidRequestError(
            f"storage node {node!r}: its API is the server's to use (this command has no"
            " token for it; pass --config)"
        )
        yield  # a generator, as the method it replaces


def volumes_on_nodes(catalogue: Catalogue, nodes: Sequence[str]) -> dict[str, list[str]]:
    """The volumes of ``catalogue`` that have a replica (a member, not a leftover) on each
    of ``nodes``, by node; nodes holding none are left out."""
    found: dict[str, list[str]] = {}
    for row in catalogue.volumes(state=None):
        if row.storage.kind != "replicated":
            continue
        membership = catalogue.membership(row.top)
        if membership is None:  # being created
            continue
        for node in nodes:
            if node in membership.members:
                found.setdefault(node, []).append(row.name)
    return found
