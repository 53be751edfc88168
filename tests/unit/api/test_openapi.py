"""The OpenAPI document: public, complete, and honest about auth and error answers."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from backend.api.app import NDJSON
from tests.unit.api.routes import EXPECTED


@pytest.fixture
def document(anonymous: TestClient) -> dict[str, Any]:
    response = anonymous.get("/openapi.json")
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }


def test_every_route_is_documented(app: FastAPI, document: dict[str, Any]) -> None:
    routes = {
        (method, route.path)
        for route in app.routes
        if isinstance(route, APIRoute)
        for method in route.methods or ()
    }
    assert routes == EXPECTED
    assert set(operations(document)) == EXPECTED


def test_v1_operations_declare_the_bearer_scheme_and_401(document: dict[str, Any]) -> None:
    assert document["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"}
    }
    for (_, path), operation in operations(document).items():
        if path.startswith("/v1/"):
            assert operation["security"] == [{"bearer": []}], path
            assert "401" in operation["responses"], path
        else:
            assert "security" not in operation


def test_validation_errors_are_documented_as_400_not_422(document: dict[str, Any]) -> None:
    for key, operation in operations(document).items():
        assert "422" not in operation["responses"], key
        if operation.get("parameters") or operation.get("requestBody"):
            assert "400" in operation["responses"], key
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for value in node.values() for r in refs(value)]
        if isinstance(node, list):
            return [r for value in node for r in refs(value)]
        return []

    for ref in refs(document):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


def test_import_is_documented_as_ndjson(document: dict[str, Any]) -> None:
    answer = operations(document)[("POST", "/v1/volumes/{name}/import")]["responses"]["200"]
    assert answer["content"] == {NDJSON: {"schema": {"$ref": "#/components/schemas/ImportEvent"}}}


def test_interactive_docs_are_off(api: TestClient) -> None:
    # Swagger UI and ReDoc load scripts from a CDN, which a storage host must not need.
    assert api.get("/docs").status_code == 404
    assert api.get("/redoc").status_code == 404
