"""An API app over a real VolumeService in tmp_path, driven in-process by FastAPI's client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from backend.api.app import create_app
from backend.volumes.service import VolumeService

TOKEN = "unit-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MiB = 1 << 20


@pytest.fixture
def service(tmp_path: Path) -> Iterator[VolumeService]:
    svc = VolumeService(tmp_path / "data")
    svc.start_serving()
    yield svc
    svc.close()


@pytest.fixture
def app(service: VolumeService) -> FastAPI:
    return create_app(service, token=TOKEN)


@pytest.fixture
def anonymous(app: FastAPI) -> Iterator[TestClient]:
    """A client that sends no token."""
    with TestClient(app) as client:
        yield client


@pytest.fixture
def api(app: FastAPI) -> Iterator[TestClient]:
    """A client that sends the right token."""
    with TestClient(app, headers=AUTH) as client:
        yield client
