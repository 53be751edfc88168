"""The registry of storage kinds and layers: everything about each, in one entry.

For every kind (where a volume's data lives) and every layer (what wraps its storage), one
entry holds its options with their types, limits and defaults, the factory that builds it,
and its docs text.  The spec parser (backend.volumes.storages) checks options against these,
the volume service builds backends and layers through them, and docs/storage.md's tables are
generated from them (tests/unit/volumes/test_kinds.py checks the docs say the same).  Adding
a kind is adding an entry to :data:`KINDS`; a layer, to :data:`LAYERS`.

Limits are the storages' own (``backend.storage.cow``/``chunked`` chunk sizes), not a copy.
Factories get the options given in the spec with the defaults filled in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from backend.replication.policy import ReplicationPolicy
from backend.replication.tracking import DEFAULT_GRANULARITY, MAX_GRANULARITY, MIN_GRANULARITY
from backend.storage import Storage, chunked, cow
from backend.storage.layers import CachingStorage, RetryingStorage
from backend.storage.layers.caching import DEFAULT_BLOCK
from backend.storage.nbd import NbdTarget
from backend.storage.objects.base import ObjectStore
from backend.volumes.backends import (
    Backend,
    ChunkedBackend,
    FileBackend,
    NbdBackend,
    RbdBackend,
)
from backend.volumes.model import InvalidRequestError
from backend.volumes.options import (
    BOOLEAN,
    TEXT,
    Option,
    Values,
    choice,
    count,
    human,
    power_of_two,
    seconds,
    size_up_to,
)
from backend.volumes.replicated import ReplicatedBackend, StorageNodes, min_insync_of

if TYPE_CHECKING:  # the catalogue imports this registry (through storages)
    from backend.volumes.catalogue import Catalogue

Params = Mapping[str, Any]


class Site(Protocol):
    """What a factory may use besides its options: the volume service's data directory and
    default chunk size, one shared Ceph connection per (conf, timeout), the configured
    storage nodes and the catalogue (replicated volumes record their replicas there)."""

    @property
    def data_dir(self) -> Path: ...

    @property
    def chunk_size(self) -> int: ...

    def cluster(self, conf: str, timeout: float) -> Any: ...

    @property
    def nodes(self) -> StorageNodes: ...

    def catalogue(self) -> Catalogue: ...


@dataclasses.dataclass(frozen=True)
class Kind:
    """Options shared by storage kinds and layers."""

    doc: str
    options: Mapping[str, Option]

    @property
    def required(self) -> frozenset[str]:
        return frozenset(k for k, o in self.options.items() if o.required)

    def resolved(self, params: Params) -> dict[str, Any]:
        """``params`` with every option not given set to its default."""
        return {name: option.default for name, option in self.options.items()} | dict(params)


@dataclasses.dataclass(frozen=True)
class StorageKind(Kind):
    """A kind of storage location.

    ``backend``: builds the Backend of one location from its resolved options.
    ``paths``: options naming a path, made absolute when the spec is parsed.
    ``prepare``: checks (and may make) a new volume's location before it is recorded; returns
    the options to record.  ``missing_container_is_empty``: a store that says its container (an
    S3 bucket, a RADOS pool) does not exist holds no layer data, so there is nothing to remove.
    """

    backend: Callable[[Params, Site], Backend[Any]] = dataclasses.field(kw_only=True)
    paths: tuple[str, ...] = dataclasses.field(default=(), kw_only=True)
    prepare: Callable[[Params], Params] | None = dataclasses.field(default=None, kw_only=True)
    missing_container_is_empty: bool = dataclasses.field(default=False, kw_only=True)


@dataclasses.dataclass(frozen=True)
class LayerKind(Kind):
    """A layer: ``wrap`` puts it over a storage, from its resolved options."""

    wrap: Callable[[Storage, Params], Storage] = dataclasses.field(kw_only=True)


# Sane ranges: past them a value is a typo (a retry loop of 10^23 attempts, a deadline of
# NaN seconds), not a configuration.
MAX_ATTEMPTS = 1000
MAX_WAIT = 24 * 3600.0  # retry deadlines
MAX_TIMEOUT = 3600.0  # one request to a store
MAX_BACKOFF = 60.0
MAX_CACHE = 1 << 40  # 1 TiB: held in memory

_OBJECT_CHUNK = Option(
    power_of_two(chunked.MIN_CHUNK_SIZE, chunked.MAX_CHUNK_SIZE),
    default=chunked.DEFAULT_CHUNK_SIZE,
)
_ATTEMPTS = Option(count(1, MAX_ATTEMPTS))
_TIMEOUT = Option(seconds(0, MAX_TIMEOUT, zero=False))
_CEPH_CONF = Option(TEXT, default="/etc/ceph/ceph.conf")
_CEPH_TIMEOUT = Option(seconds(0, MAX_TIMEOUT, zero=False), default=30.0)


# -- Factories ---------------------------------------------------------------------------------


def _chunked(
    store: Callable[[Params, Site], ObjectStore],
) -> Callable[[Params, Site], Backend[Any]]:
    """The backend of an object-store kind: copy-on-write chunks in the store it makes."""

    def backend(params: Params, site: Site) -> Backend[Any]:
        return ChunkedBackend(store(params, site), int(params["chunk_size"]))

    return backend


def _file_backend(params: Params, site: Site) -> Backend[Any]:
    return FileBackend(site.data_dir / "layers", int(params["chunk_size"] or site.chunk_size))


def _directory_store(params: Params, site: Site) -> ObjectStore:
    from backend.storage.objects.directory import DirectoryObjectStore  # noqa: PLC0415

    # The data directory's own objects/ is made on first use; a path the user gave must exist
    # (_prepare_directory made it, if asked, when the volume was created).
    if params["path"] is None:
        return DirectoryObjectStore(site.data_dir / "objects")
    return DirectoryObjectStore(params["path"], create=False)


def _prepare_directory(params: Params) -> Params:
    """A given ``path`` must exist, or is made with ``create=true``; ``create`` is not
    recorded (a later open must never make an empty directory where a missing disk should
    have been)."""
    if params.get("path") is None:
        return params
    path = Path(params["path"])
    if params.get("create"):
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise InvalidRequestError(f"cannot create {path}: {err.strerror}") from None
    elif not path.is_dir():
        raise InvalidRequestError(
            f"storage directory {path} does not exist (add create=true to make it)"
        )
    return {k: v for k, v in params.items() if k != "create"}


def _s3_store(params: Params, site: Site) -> ObjectStore:
    from backend.storage.objects.s3 import S3ObjectStore  # noqa: PLC0415

    options: dict[str, Any] = {
        "bucket": params["bucket"],
        "prefix": params["prefix"],
        "endpoint": params["endpoint"],
        "region": params["region"],
    }
    # Not given: the store's own defaults.
    if params["attempts"] is not None:
        options["attempts"] = params["attempts"]
    if params["timeout"] is not None:
        options["read_timeout"] = params["timeout"]
    return S3ObjectStore(**options)


def _rados_store(params: Params, site: Site) -> ObjectStore:
    from backend.storage.objects.rados import RadosObjectStore  # noqa: PLC0415

    cluster = site.cluster(params["conf"], float(params["timeout"]))
    return RadosObjectStore(cluster, params["pool"], params["namespace"])


def _rbd_backend(params: Params, site: Site) -> Backend[Any]:
    cluster = site.cluster(params["conf"], float(params["timeout"]))
    return RbdBackend(cluster, params["pool"], params["namespace"], params["image"])


def _nbd_backend(params: Params, site: Site) -> Backend[Any]:
    options: dict[str, Any] = {"connections": int(params["connections"])}
    # Not given: NbdStorage's own defaults.
    if params["timeout"] is not None:
        options["request_timeout"] = float(params["timeout"])
    if params["reconnect"] is not None:
        options["reconnect_deadline"] = float(params["reconnect"])
    return NbdBackend(params["url"], options)


def _nbd_url(value: str) -> str:
    NbdTarget.from_uri(value)  # its ValueError names what is wrong
    return value


def _node_list(value: str) -> str:
    names = value.split("/")
    if any(not name for name in names) or len(set(names)) != len(names) or len(names) > 16:
        raise ValueError("must be 1-16 distinct node names joined by '/', e.g. a/b/c")
    return value


def _replicated_backend(params: Params, site: Site) -> Backend[Any]:
    nodes = str(params["nodes"]).split("/")  # checked against the config by create
    # Without min_insync a write needs a majority of the members as they are at that moment:
    # `nodes=` names where create made the replicas, not the members after replica changes.
    min_insync = min_insync_of(len(nodes), params["min_insync"])
    if min_insync > len(nodes):
        raise InvalidRequestError(f"min_insync={min_insync} is more than the {len(nodes)} nodes")
    policy = ReplicationPolicy(
        min_insync=min_insync,
        majority=params["min_insync"] is None,
        below_min=params["below_min"],
        below_min_wait=float(params["wait"]),
        child_timeout=float(params["timeout"]),
        resync_rate=int(params["resync_rate"] or 0),
    )
    return ReplicatedBackend(
        nodes,
        policy,
        int(params["granularity"]),
        min(float(params["reconnect"]), policy.child_timeout),
        directory=site.nodes,
        data_dir=site.data_dir,
        catalogue=site.catalogue,
    )


def _cache(storage: Storage, params: Params) -> Storage:
    return CachingStorage(
        storage,
        int(params["size"]),
        block=int(params["block"]),
        write_back=params["mode"] == "write-back",
    )


def _retry(storage: Storage, params: Params) -> Storage:
    return RetryingStorage(
        storage,
        attempts=int(params["attempts"]),
        deadline=float(params["deadline"]),
        backoff=float(params["backoff"]),
    )


# -- The registry ------------------------------------------------------------------------------

KINDS: dict[str, StorageKind] = {
    "file": StorageKind(
        "a chain of copy-on-write layer files in `DATA_DIR/layers`",
        {
            # Default: the volume service's chunk size (its default is cow's own).
            "chunk_size": Option(
                power_of_two(cow.MIN_CHUNK_SIZE, cow.MAX_CHUNK_SIZE),
                shown_default=human(cow.DEFAULT_CHUNK_SIZE),
            )
        },
        backend=_file_backend,
    ),
    "dir": StorageKind(
        "chunks as files in a directory (one per chunk)",
        {
            "path": Option(TEXT, shown_default="`DATA_DIR/objects`"),
            "create": Option(BOOLEAN, default=False),
            "chunk_size": _OBJECT_CHUNK,
        },
        backend=_chunked(_directory_store),
        paths=("path",),
        prepare=_prepare_directory,
    ),
    "s3": StorageKind(
        "chunks as S3 objects; credentials from the environment (`AWS_ACCESS_KEY_ID`,"
        " `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, ...), never from the spec",
        {
            "bucket": Option(TEXT, required=True),
            "endpoint": Option(TEXT),
            "region": Option(TEXT),
            "prefix": Option(TEXT, default=""),
            "chunk_size": _OBJECT_CHUNK,
            "attempts": _ATTEMPTS,
            "timeout": _TIMEOUT,
        },
        backend=_chunked(_s3_store),
        missing_container_is_empty=True,
    ),
    "rados": StorageKind(
        "chunks as RADOS objects (offset writes, no read-modify-write)",
        {
            "pool": Option(TEXT, required=True),
            "namespace": Option(TEXT, default=""),
            "conf": _CEPH_CONF,
            "chunk_size": _OBJECT_CHUNK,
            "timeout": _CEPH_TIMEOUT,
        },
        backend=_chunked(_rados_store),
        missing_container_is_empty=True,
    ),
    "rbd": StorageKind(
        "an RBD image `nbs-<uuid>`; with `image=NAME`, that existing image, adopted: its size"
        " is the image's and deleting the volume never removes it",
        {
            "pool": Option(TEXT, required=True),
            "namespace": Option(TEXT, default=""),
            "conf": _CEPH_CONF,
            "image": Option(TEXT, default=""),
            "timeout": _CEPH_TIMEOUT,
        },
        backend=_rbd_backend,
    ),
    "nbd": StorageKind(
        "an existing remote NBD export (another `nbs serve`, nbdkit, qemu-nbd), adopted: its"
        " size is the export's, deleting the volume never touches it, and snapshots, clones"
        " and resizing are refused; `NbdStorage` (see [Remote NBD exports](#remote-nbd-exports))",
        {
            "url": Option(
                Values(
                    _nbd_url,
                    "an NBD URI: `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`,"
                    " `nbds…` with `tls-certificates=DIR`, `tls-hostname`",
                ),
                required=True,
            ),
            "connections": Option(count(1, 16), default=1),
            "timeout": Option(
                seconds(0, MAX_TIMEOUT, zero=False),
                shown_default="30 s: a reply missing this long drops the connection",
            ),
            "reconnect": Option(
                seconds(0, MAX_WAIT),
                shown_default="60 s: how long requests wait for a reconnection",
            ),
        },
        backend=_nbd_backend,
    ),
    "replicated": StorageKind(
        "N replica volumes on the storage nodes of the config (`nodes:`), one per node, kept"
        " identical by this server's engine; snapshots are taken on every replica at one point;"
        " a resize grows every replica, also while attached, and shrinking is refused"
        " (see [replication.md](replication.md#growing-a-replicated-volume))",
        {
            "nodes": Option(
                Values(_node_list, "node names from `nodes:` joined by `/`, e.g. `a/b/c`"),
                required=True,
            ),
            "min_insync": Option(count(1, 16), shown_default="a majority of the replicas"),
            "below_min": Option(choice("wait", "fail"), default="wait"),
            "wait": Option(seconds(0, MAX_WAIT), default=30.0),
            "timeout": Option(seconds(0, MAX_TIMEOUT, zero=False), default=10.0),
            "reconnect": Option(seconds(0, MAX_TIMEOUT), default=2.0),
            "resync_rate": Option(size_up_to(MAX_CACHE), shown_default="unlimited"),
            "granularity": Option(
                power_of_two(MIN_GRANULARITY, MAX_GRANULARITY), default=DEFAULT_GRANULARITY
            ),
        },
        backend=_replicated_backend,
    ),
}

LAYERS: dict[str, LayerKind] = {
    "cache": LayerKind(
        "`CachingStorage`, one per volume, shared by its connections",
        {
            "size": Option(size_up_to(MAX_CACHE), default=256 * 1024 * 1024),
            "mode": Option(choice("write-through", "write-back"), default="write-through"),
            # Up to the largest object chunk: a block never spans more than one chunk's worth.
            "block": Option(power_of_two(512, chunked.MAX_CHUNK_SIZE), default=DEFAULT_BLOCK),
        },
        wrap=_cache,
    ),
    "retry": LayerKind(
        "`RetryingStorage`",
        {
            "attempts": Option(count(1, MAX_ATTEMPTS), default=5),
            "deadline": Option(seconds(0, MAX_WAIT), default=30.0),
            "backoff": Option(seconds(0, MAX_BACKOFF), default=0.05),
        },
        wrap=_retry,
    ),
}


def docs_tables() -> str:
    """docs/storage.md's tables of kinds and layers, as the registry defines them."""
    lines = ["| kind | options (required in bold) | what a volume is |", "|---|---|---|"]
    for name, kind in KINDS.items():
        shown = f"`{name}` (default)" if name == "file" else f"`{name}`"
        lines.append(f"| {shown} | {_options(kind)} | {kind.doc} |")
    lines += ["", "| layer | options | |", "|---|---|---|"]
    lines += [f"| `{name}` | {_options(layer)} | {layer.doc} |" for name, layer in LAYERS.items()]
    return "\n".join(lines) + "\n"


def _options(kind: Kind) -> str:
    return ", ".join(option.describe(name) for name, option in kind.options.items())
