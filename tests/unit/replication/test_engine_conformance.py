"""ReplicatedStorage over three in-memory members: the storage conformance suite and the
model test, plus the members being byte-identical afterwards."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from backend.replication.tracking import RegionMap
from backend.storage import Storage
from tests.unit.replication.replicas import Engine, Volume, members
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


def _engine(size: int) -> Storage:
    directory = tempfile.TemporaryDirectory()
    volume = Volume.create(Path(directory.name), list(members(3)), size)
    regions = RegionMap.open(volume.map_path, syncer=lambda fd: None)
    engine = _CheckedEngine(
        volume.volume_id, size, volume.store, regions, volume.replicas.open_child
    )
    engine.volume = volume
    engine.directory = directory
    return engine


@pytest.fixture
def storage_factory() -> StorageFactory:
    return _engine


TestReplicatedModel = make_model_test(_engine)
