"""The storage nodes of the config (``nodes:``) as the volume service's StorageNodes: each
node's management API through RemoteVolumes, its NBD listener from its URI.

A node that refuses the token is an InvalidRequestError (the config is wrong), every other
failure the API client's own error.  Tokens in files are read at each use, so a rotated
token file is picked up without a restart, and a missing one is a one-line error of the
operation that needed it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from backend.config import NodeConfig
from backend.storage.nbd import NbdTarget
from backend.volumes.model import InvalidRequestError
from backend.volumes.replicated import NodeVolumes


class ConfiguredNodes:
    def __init__(self, nodes: Mapping[str, NodeConfig]) -> None:
        self._nodes = dict(nodes)

    def names(self) -> Sequence[str]:
        return tuple(self._nodes)

    def _node(self, name: str) -> NodeConfig:
        try:
            return self._nodes[name]
        except KeyError:
            raise InvalidRequestError(f"no storage node {name!r} is configured") from None

    @contextmanager
    def volumes(self, node: str) -> Iterator[NodeVolumes]:
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
        return self._node(node).target(export)
