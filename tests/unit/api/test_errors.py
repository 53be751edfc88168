"""Error answers and the VolumeErrors they turn back into."""

from __future__ import annotations

from typing import Any

import pytest

from backend.api import errors
from backend.api.errors import ERROR_CLASSES, code_for_status, error_body, from_answer
from backend.volumes.model import (
    DependencyError,
    InvalidRequestError,
    NotFoundError,
    VolumeError,
)


def subclasses(cls: type[VolumeError]) -> set[type[VolumeError]]:
    found = set(cls.__subclasses__())
    return found.union(*(subclasses(sub) for sub in found)) if found else found


def test_every_volume_error_has_a_unique_code_and_is_known() -> None:
    known = {c for c in subclasses(VolumeError) if c.__module__.startswith("backend.")}
    assert set(ERROR_CLASSES.values()) == known
    assert len({c.code for c in known}) == len(known)


@pytest.mark.parametrize(("code", "cls"), sorted(ERROR_CLASSES.items()))
def test_an_error_survives_the_round_trip(code: str, cls: type[VolumeError]) -> None:
    error = from_answer(cls.status, error_body(cls.code, "what happened"))
    assert type(error) is cls
    assert (error.message, error.status, error.code) == ("what happened", cls.status, code)


def test_has_dependents_is_a_dependency_error() -> None:
    error = from_answer(409, error_body("has-dependents", "clones"))
    assert isinstance(error, DependencyError)


@pytest.mark.parametrize(
    ("status", "cls"),
    [(400, InvalidRequestError), (404, NotFoundError), (401, errors.UnauthorizedError)],
)
def test_an_unknown_code_falls_back_to_the_status(status: int, cls: type[VolumeError]) -> None:
    assert type(from_answer(status, error_body("from-the-future", "m"))) is cls


@pytest.mark.parametrize("body", [None, "<html>bad gateway</html>", [], {"error": "x"}, {}])
def test_a_body_not_in_the_error_shape_keeps_the_status(body: Any) -> None:
    error = from_answer(502, body)
    assert type(error) is VolumeError
    assert error.message == "the API answered 502 Bad Gateway"


def test_unknown_status() -> None:
    assert from_answer(599, None).message == "the API answered 599 unknown status"


@pytest.mark.parametrize(
    ("status", "code"),
    [(404, "not-found"), (405, "method-not-allowed"), (400, "invalid"), (418, "i'm-a-teapot")],
)
def test_codes_of_framework_errors(status: int, code: str) -> None:
    assert code_for_status(status) == code
