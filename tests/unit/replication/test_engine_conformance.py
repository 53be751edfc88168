"""ReplicatedStorage over three members, in memory and over NBD (each member an NbdStorage to
an in-process server: the engine's submit path, docs/decisions/0106): the storage
conformance suite and the model test, plus the members being byte-identical afterwards."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backend.replication.tracking import RegionMap
from backend.server.server import Server
from backend.storage import Storage
from tests.unit.replication.replicas import Engine, Volume, members
from tests.unit.server.clients import in_process_servers
from tests.unit.storage.conformance import *  # noqa: F403
from tests.unit.storage.conformance import StorageFactory
from tests.unit.storage.model import make_model_test


class _CheckedEngine(Engine):
    """Closes its own volume's directory, and checks the members agree on close."""

    volume: Volume
    directory: tempfile.TemporaryDirectory[str]

    def close(self) -> None:
        if not self._closed:
            assert self.volume.replicas.identical(), "members differ"
        super().close()
        self.directory.cleanup()


def _engine(size: int, serve: Callable[..., Server] | None = None) -> Storage:
    directory = tempfile.TemporaryDirectory()
    volume = Volume.create(Path(directory.name), list(members(3)), size, serve=serve)
    regions = RegionMap.open(volume.map_path, syncer=lambda fd: None)
    engine = _CheckedEngine(
        volume.volume_id, size, volume.store, regions, volume.replicas.open_child
    )
    engine.volume = volume
    engine.directory = directory
    return engine


@pytest.fixture(params=["memory", "nbd"])
def storage_factory(request: pytest.FixtureRequest) -> Iterator[StorageFactory]:
    if request.param == "memory":
        yield _engine
        return
    with in_process_servers() as serve:
        yield lambda size: _engine(size, serve)


TestReplicatedModel = make_model_test(_engine)

# The model test is a unittest class, built before any fixture runs: its factory finds the
# server starter through this holder, filled by the fixture the class uses.
_model_serve: list[Callable[..., Server]] = []


@pytest.fixture
def model_serve() -> Iterator[None]:
    with in_process_servers() as serve:
        _model_serve.append(serve)
        yield
        _model_serve.clear()


TestReplicatedOverNbdModel = pytest.mark.usefixtures("model_serve")(
    make_model_test(lambda size: _engine(size, _model_serve[0]), max_examples=20)
)
