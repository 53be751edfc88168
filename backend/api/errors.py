"""The API's errors, and rebuilding a VolumeError from an error answer.

Every error answer has the body ``{"error": {"code": CODE, "message": TEXT}}`` and the HTTP
status of the error class with that code.  The API adds three classes to the volume error tree
(backend.volumes.model), all VolumeErrors so that the CLI reports them like any other::

    VolumeError
     ├── … the volume service's errors (model.py, ServedElsewhereError)
     ├── UnauthorizedError       401: no token, or the wrong one
     ├── UnsupportedError        501: an operation the API does not offer
     └── UnreachableError        503: the client cannot reach the API at all
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from backend.volumes.model import (
    AlreadyExistsError,
    DependencyError,
    InUseError,
    InvalidRequestError,
    NotFoundError,
    StorageFailureError,
    VolumeError,
)
from backend.volumes.service import ServedElsewhereError


class UnauthorizedError(VolumeError):
    status = 401
    code = "unauthorized"


class UnsupportedError(VolumeError):
    status = 501
    code = "not-supported"


class UnreachableError(VolumeError):
    status = 503
    code = "unreachable"


ERROR_CLASSES: dict[str, type[VolumeError]] = {
    cls.code: cls
    for cls in (
        InvalidRequestError,
        NotFoundError,
        AlreadyExistsError,
        InUseError,
        DependencyError,
        StorageFailureError,
        ServedElsewhereError,
        UnauthorizedError,
        UnsupportedError,
        UnreachableError,
    )
}

# For codes this client does not know (a newer server): the class of the same status.
_BY_STATUS: dict[int, type[VolumeError]] = {
    400: InvalidRequestError,
    401: UnauthorizedError,
    404: NotFoundError,
    501: UnsupportedError,
}


def error_body(code: str, message: str) -> dict[str, Any]:
    """The JSON body of every error answer."""
    return {"error": {"code": code, "message": message}}


def code_for_status(status: int) -> str:
    """The code of an error the framework raised (unknown route: 404 ``not-found``, …)."""
    known = _BY_STATUS.get(status)
    if known is not None:
        return known.code
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "-")
    except ValueError:
        return "error"


def from_answer(status: int, body: Any) -> VolumeError:
    """The VolumeError an error answer stands for; never raises.

    A body in the error shape gives the class by its code (else by ``status``) and the message;
    anything else (a proxy's HTML page, …) becomes a VolumeError carrying the status.
    """
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        code = error.get("code")
        cls = ERROR_CLASSES.get(code) if isinstance(code, str) else None
        return (cls or _BY_STATUS.get(status, VolumeError))(error["message"])
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "unknown status"
    return _BY_STATUS.get(status, VolumeError)(f"the API answered {status} {reason}")
