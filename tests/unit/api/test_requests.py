"""The create and import parameters travel as one dataclass: what the API client sends
(CreateRequest.to_json, ImportRequest.to_json) is what the API's request schema reads back
into the same request."""

from __future__ import annotations

import dataclasses

import pytest

from backend.api.app import VolumeCreate, VolumeImport
from backend.volumes.model import CreateRequest, ImportRequest
from tests.unit.api.conftest import MiB

CREATES = [
    CreateRequest("v", MiB),
    CreateRequest("v", None, storage="rbd:pool=rbd,image=old"),
    CreateRequest(
        "v",
        "8MiB",
        description="first",
        labels={"env": "test"},
        read_only=True,
        storage="dir:chunk_size=128KiB",
        shared=True,
    ),
]


def test_the_create_body_is_the_schema_s() -> None:
    fields = [f.name for f in dataclasses.fields(CreateRequest)]
    assert list(VolumeCreate.model_fields) == fields
    assert list(CreateRequest("v", MiB).to_json()) == fields


def test_the_import_body_is_the_schema_s_without_the_name() -> None:
    body = ImportRequest(CreateRequest("v", None), "/img.raw").to_json()
    assert list(VolumeImport.model_fields) == list(body)
    assert body == {
        "source": "/img.raw",
        "size": None,
        "description": "",
        "labels": {},
        "read_only": False,
        "storage": None,
        "shared": False,
    }


@pytest.mark.parametrize("request_", CREATES)
def test_a_create_request_survives_the_api(request_: CreateRequest) -> None:
    assert VolumeCreate.model_validate(request_.to_json()).request() == request_


@pytest.mark.parametrize("volume", CREATES)
def test_an_import_request_survives_the_api(volume: CreateRequest) -> None:
    sent = ImportRequest(volume, "nbd+unix:///x?socket=/run/x.sock")
    assert VolumeImport.model_validate(sent.to_json()).request(volume.name) == sent


def test_labels_are_sent_as_a_copy() -> None:
    labels = {"env": "test"}
    body = CreateRequest("v", MiB, labels=labels).to_json()
    body["labels"]["env"] = "changed"
    assert labels == {"env": "test"}
