"""What the volume service talks about: volumes, snapshots, their validation, and its errors.

VolumeError                 every failure of a volume operation; ``status`` is the HTTP
 ├── InvalidRequestError    status the API answers with, ``code`` a stable identifier
 ├── NotFoundError
 ├── AlreadyExistsError
 ├── InUseError             a client has the volume open (409)
 ├── DependencyError        clones depend on it (409)
 └── StorageFailureError    the storage underneath failed (500)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

NAME_RULE = "1-255 characters of letters, digits, '.', '_', '-', starting with a letter or digit"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
# At most 20 digits: more is never a size, and int() of thousands of digits raises.
_SIZE = re.compile(r"^\s*(\d{1,20})\s*([KMGTPE]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
SECTOR = 512
MAX_SIZE = 1 << 50  # 1 PiB: larger is a typo, not a volume
LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")


class VolumeError(Exception):
    status = 500
    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequestError(VolumeError):
    status = 400
    code = "invalid"


class NotFoundError(VolumeError):
    status = 404
    code = "not-found"


class AlreadyExistsError(VolumeError):
    status = 409
    code = "exists"


class InUseError(VolumeError):
    status = 409
    code = "in-use"


class DependencyError(VolumeError):
    status = 409
    code = "has-dependents"


class StorageFailureError(VolumeError):
    status = 500
    code = "storage"


def shown(value: object, limit: int = 64) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages: one line, whatever
    was sent (a 5,000-digit size must not come back as a 5,000-character error)."""
    try:
        text = repr(value)
    except ValueError:  # repr() of an int of more than 4300 digits
        return "a number too long to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_name(name: str, what: str = "volume") -> str:
    """``name`` if it is a valid volume or snapshot name, else InvalidRequestError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise InvalidRequestError(f"invalid {what} name {shown(name)}: {NAME_RULE}")
    return name


def parse_size(text: str | int) -> int:
    """``10GiB``, ``512M``, ``1T``, ``4096`` (bytes); binary units; a multiple of 512 bytes."""
    if isinstance(text, bool):
        raise InvalidRequestError(f"invalid size {shown(text)}")
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(text)
        if not match:
            raise InvalidRequestError(
                f"invalid size {shown(text)}: use e.g. 10GiB, 512MiB, 4096 (at most 1PiB)"
            )
        size = int(match.group(1)) << (10 * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise InvalidRequestError(f"size must be positive, got {shown(text)}")
    if size > MAX_SIZE:
        raise InvalidRequestError(
            f"size {shown(text)} is larger than the limit of {MAX_SIZE} bytes (1PiB)"
        )
    if size % SECTOR:
        raise InvalidRequestError(f"size must be a multiple of {SECTOR} bytes, got {size}")
    return size


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key):
            raise InvalidRequestError(f"invalid label key {key!r}")
        if not isinstance(value, str) or len(value) > 255 or "\0" in value:
            raise InvalidRequestError(f"invalid value for label {key!r}")
    return labels


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    volume: str
    name: str
    size: int
    created: float
    used_bytes: int  # space held by this snapshot's own layer
    clones: tuple[str, ...]  # volumes cloned from it

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Holder:
    """A client that has a volume open on the serving ``nbs serve``."""

    peer: str  # "HOST:PORT" (TCP) or "unix pid N"
    writable: bool  # False: served read-only (the volume is held writable by another client)
    since: float  # when it opened the volume (time.time())
    epoch: int | None = None  # the replication epoch it named (None: a plain connection)


@dataclasses.dataclass(frozen=True)
class ReplicaInfo:
    """One replica of a replicated volume, as ``nbs volume info`` shows it."""

    node: str
    volume: str  # the replica volume's name on the node
    state: str  # in_sync, resyncing or out
    in_flight: int = 0  # requests the engine has outstanding on it (live only)
    resync_done: int | None = None  # bytes handled of resync_total, while resyncing
    resync_total: int | None = None
    last_error: str | None = None  # why it is out, if the live engine knows


@dataclasses.dataclass(frozen=True)
class ReplicationInfo:
    """A replicated volume's membership: from the serving engine when it has the volume open
    (``live``), else as last committed to the catalogue."""

    epoch: int
    generation: int
    min_insync: int
    live: bool
    replicas: tuple[ReplicaInfo, ...]
    last_scrub: ScrubInfo | None = None  # the serving engine's last finished scrub (live only)


@dataclasses.dataclass(frozen=True)
class VolumeInfo:
    name: str
    size: int
    description: str
    labels: dict[str, str]
    read_only: bool
    created: float
    used_bytes: int  # space held by the volume's own (writable) layer
    origin: str | None  # "VOLUME@SNAPSHOT" for clones
    snapshots: tuple[str, ...]
    connections: int = 0  # clients that have it open (when asked of a running server)
    storage: str = "file"  # where its data lives (backend.volumes.storages, inline form)
    shared: bool = False  # several clients may hold it writable at once
    holders: tuple[Holder, ...] = ()  # who has it open (when asked of a running server)
    uid: str = ""  # tells it from an earlier volume of the same name
    epoch: int = 0  # the highest replication epoch it promised (docs/replication.md)
    replication: ReplicationInfo | None = None  # a replicated volume's replicas

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class NodeReplica:
    """A replica a storage node holds for this catalogue, as ``nbs node info`` shows it."""

    volume: str  # the replicated volume, by its name here
    replica: str  # the replica volume's name on the node
    state: str  # in_sync, resyncing, out or leftover (as in ReplicaInfo)


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """A storage node (``nodes:`` of the config), as ``nbs node list`` shows it.

    ``configured`` is false for a node the config no longer names (a reload removed it)
    whose replicas the catalogue still records: it is never contacted again, and the
    replicas there are to be replaced."""

    name: str
    configured: bool
    api: str  # its management API URL ("" if not configured)
    nbd: str  # its NBD listener URI ("" if not configured)
    reachable: bool  # its API answered just now
    version: str | None  # the nbs version it reported, if it answered
    error: str | None  # why it did not answer
    replicas: tuple[NodeReplica, ...]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ScrubMismatch:
    """Bytes of a replicated volume whose replicas differ: those on ``replicas`` (node names)
    hold other bytes than the majority, or, with no majority, every replica compared differs.
    ``repaired``: the majority's bytes were written over them."""

    offset: int
    length: int
    replicas: tuple[str, ...]
    majority: bool
    repaired: bool


@dataclasses.dataclass(frozen=True)
class ScrubInfo:
    """What ``nbs volume scrub`` found (docs/replication.md, "Scrub")."""

    volume: str
    repair: bool  # asked to repair what has a majority
    size: int
    compared: int  # bytes compared on at least two replicas
    replicas: tuple[str, ...]  # the nodes whose replicas were in sync when it began
    mismatches: tuple[ScrubMismatch, ...]
    failed: tuple[str, ...]  # replicas whose read or repair failed: now out, to be resynced
    unresolved: int  # mismatches not repaired
    seconds: float
    finished: float  # Unix time

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CreateRequest:
    """A new volume as asked for: the parameters of ``create`` (and, inside
    :class:`ImportRequest`, of ``import_image``).

    Built once, where the request comes in (`nbs volume create`, or the API server from the
    body of ``POST /v1/volumes``); the volume clients pass it through unchanged (the API
    client sends :meth:`to_json` as that body), and VolumeService.create checks it.
    ``size``: bytes or text such as ``10GiB``; None only for an adopted RBD image or NBD
    export (its size is theirs).  ``storage``: ``--storage`` text, a profile name or an inline spec
    (backend.volumes.storages); None is the default storage.
    """

    name: str
    size: int | str | None
    _: dataclasses.KW_ONLY
    description: str = ""
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    read_only: bool = False
    storage: str | None = None
    shared: bool = False  # several clients may hold it writable at once

    def to_json(self) -> dict[str, Any]:
        """The body of ``POST /v1/volumes``: every field, under its own name."""
        return {**dataclasses.asdict(self), "labels": dict(self.labels)}


@dataclasses.dataclass(frozen=True)
class ImportRequest:
    """A new volume filled from the image at ``source`` (a file or an NBD URI, read on the
    machine that does the copy); ``volume.size`` None means the image's virtual size."""

    volume: CreateRequest
    source: str

    def to_json(self) -> dict[str, Any]:
        """The body of ``POST /v1/volumes/NAME/import``: the name is in the path."""
        options = self.volume.to_json()
        del options["name"]
        return {"source": self.source, **options}
