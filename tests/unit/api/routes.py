"""Every route of the volume API as (method, path): test_openapi.py checks the app and its
OpenAPI document against it, tests/integration/test_api.py the running server."""

from __future__ import annotations

EXPECTED = {
    ("GET", "/healthz"),
    ("GET", "/v1/volumes"),
    ("POST", "/v1/volumes"),
    ("GET", "/v1/volumes/{name}"),
    ("PATCH", "/v1/volumes/{name}"),
    ("DELETE", "/v1/volumes/{name}"),
    ("POST", "/v1/volumes/{name}/import"),
    ("POST", "/v1/volumes/{name}/scrub"),
    ("GET", "/v1/snapshots"),
    ("GET", "/v1/volumes/{name}/snapshots"),
    ("POST", "/v1/volumes/{name}/snapshots"),
    ("DELETE", "/v1/volumes/{name}/snapshots/{snapshot}"),
    ("POST", "/v1/volumes/{name}/snapshots/{snapshot}/clone"),
    ("POST", "/v1/volumes/{name}/replicas"),
    ("DELETE", "/v1/volumes/{name}/replicas/{node}"),
    ("POST", "/v1/volumes/{name}/replicas/{node}/replace"),
    ("GET", "/v1/nodes"),
    ("GET", "/v1/nodes/{name}"),
    ("POST", "/v1/gc"),
    ("GET", "/v1/exports"),
    ("GET", "/v1/status"),
}
