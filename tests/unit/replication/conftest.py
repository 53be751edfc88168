"""Fixtures shared by the engine's tests: a volume of three members (in memory, or over NBD
to in-process servers) and its engines, closed at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backend.replication.policy import ReplicationPolicy
from tests.unit.replication.replicas import QUICK, SIZE, Engine, G, Volume, members
from tests.unit.server.clients import in_process_servers


@pytest.fixture(params=["memory", "nbd"])
def volume(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Volume]:
    """Members in memory (the engine's pool path) or over NBD to in-process servers (its
    submit path: docs/decisions/0106)."""
    if request.param == "memory":
        yield Volume.create(tmp_path, list(members(3)), SIZE, granularity=G)
        return
    with in_process_servers() as serve:
        volume = Volume.create(tmp_path, list(members(3)), SIZE, granularity=G, serve=serve)
        yield volume
        volume.replicas.heal()  # nothing stays hung on a server being shut down


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    opened: list[Engine] = []
    yield opened
    for engine in opened:
        engine.close()


@pytest.fixture
def open_engine(volume: Volume, engines: list[Engine]) -> Callable[..., Engine]:
    def make(policy: ReplicationPolicy = QUICK) -> Engine:
        engine = volume.open(policy)
        engines.append(engine)
        return engine

    return make
