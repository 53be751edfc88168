"""Where a volume's data lives: storage specs, written inline or as named profiles.

A volume is created on one storage and keeps it; clones share their origin's.  The spec is
written into the catalogue with the volume (canonical JSON, never secrets), so any process
opening the catalogue opens the volume the same way.

Inline (``nbs volume create --storage``)::

    KIND[:KEY=VALUE,...][+LAYER[:KEY=VALUE,...]]...

    file                                     local copy-on-write files in the data directory
    dir:path=/srv/nbs/objects,chunk_size=4MiB  chunks as files in a directory (it must exist,
                                             or add create=true; stored as an absolute path)
    s3:bucket=nbs,endpoint=http://127.0.0.1:8333,prefix=vols/
    rados:pool=nbs,namespace=prod,conf=/etc/ceph/ceph.conf
    rbd:pool=rbd                             one RBD image per volume (native snapshots, clones)
    rbd:pool=rbd,image=vm1                   an existing RBD image (never removed by nbs)
    s3:bucket=nbs+cache:size=256MiB+retry:attempts=5,deadline=30

Layers wrap the storage in the order written: the first is the outermost (nearest the client).
In YAML (``storages:`` in the configuration) the same keys, with ``type`` and ``layers``::

    storages:
      cold:
        type: s3
        bucket: nbs
        endpoint: http://127.0.0.1:8333
        layers:
          - cache: {size: 256MiB}
          - retry: {attempts: 5, deadline: 30}

``--storage cold`` then names the profile.  Every option is defined once, in :data:`KINDS`
and :data:`LAYERS`, with its type and limits (the storages' own), and checked at parse time.
S3 credentials never go into a spec: they come from the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``...).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from backend.storage import chunked, cow
from backend.volumes.model import InvalidRequestError, parse_size, shown

Parser = Callable[[str], Any]


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a storage kind or layer: how its text is parsed and checked (a
    ``ValueError`` names what is allowed), and whether it must be given."""

    parse: Parser
    required: bool = False


@dataclasses.dataclass(frozen=True)
class Kind:
    """The options of one storage kind or layer: the one place their types and limits live."""

    options: Mapping[str, Option]

    @property
    def required(self) -> frozenset[str]:
        return frozenset(k for k, o in self.options.items() if o.required)


def _power_of_two(low: int, high: int) -> Parser:
    def parse(value: str) -> int:
        size = _parse_size(value)
        if size < low or size > high or size & (size - 1):
            raise ValueError(f"must be a power of two from {_human(low)} to {_human(high)}")
        return size

    return parse


def _size_up_to(high: int) -> Parser:
    def parse(value: str) -> int:
        size = _parse_size(value)
        if size > high:
            raise ValueError(f"must be at most {_human(high)}")
        return size

    return parse


def _parse_size(value: str) -> int:
    try:
        return parse_size(value)
    except InvalidRequestError as err:
        raise ValueError(err.message) from None


def _seconds(low: float, high: float, *, zero: bool = True) -> Parser:
    """Seconds (``30``, ``1.5``, ``30s``): finite, from ``low`` (or more than 0 when
    ``zero`` is false) to ``high``."""

    def parse(value: str) -> float:
        text = value.strip().removesuffix("s")
        try:
            number = float(text) if len(text) <= 32 else math.nan
        except ValueError:
            number = math.nan  # refused below, as NaN and infinities are
        if not (low <= number <= high) or (not zero and number == 0):
            lowest = f"from {low:g}" if zero else f"more than {low:g} and"
            raise ValueError(f"must be seconds {lowest} up to {high:g} (e.g. 30, 1.5s)")
        return number

    return parse


def _count(low: int, high: int) -> Parser:
    def parse(value: str) -> int:
        text = value.strip()
        if not (text.isascii() and text.isdigit() and len(text) <= 12) or not (
            low <= int(text) <= high
        ):
            raise ValueError(f"must be a whole number from {low} to {high}")
        return int(text)

    return parse


def _text(value: str) -> str:
    if not value or "\0" in value or len(value) > 4096:
        raise ValueError("must be a non-empty string of at most 4096 characters")
    return value


def _mode(value: str) -> str:
    if value not in ("write-through", "write-back"):
        raise ValueError("must be write-through or write-back")
    return value


def _boolean(value: str) -> bool:
    if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
        raise ValueError("must be true or false")
    return value.lower() in ("true", "yes", "1")


def _human(size: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return f"{size}B"


# What the storages can do (their own limits, not a second copy of them).
_FILE_CHUNK = _power_of_two(cow.MIN_CHUNK_SIZE, cow.MAX_CHUNK_SIZE)
_OBJECT_CHUNK = _power_of_two(chunked.MIN_CHUNK_SIZE, chunked.MAX_CHUNK_SIZE)
# Sane ranges: past them a value is a typo (a retry loop of 10^23 attempts, a deadline of
# NaN seconds), not a configuration.
MAX_ATTEMPTS = 1000
MAX_WAIT = 24 * 3600.0  # retry deadlines
MAX_TIMEOUT = 3600.0  # one request to a store
MAX_BACKOFF = 60.0
MAX_CACHE = 1 << 40  # 1 TiB: held in memory
_ATTEMPTS = Option(_count(1, MAX_ATTEMPTS))
_TIMEOUT = Option(_seconds(0, MAX_TIMEOUT, zero=False))

KINDS: dict[str, Kind] = {
    "file": Kind({"chunk_size": Option(_FILE_CHUNK)}),
    "dir": Kind(
        {
            # Resolved to an absolute path by _make (it must not depend on who opens it).
            "path": Option(_text),
            "create": Option(_boolean),
            "chunk_size": Option(_OBJECT_CHUNK),
        }
    ),
    "s3": Kind(
        {
            "bucket": Option(_text, required=True),
            "endpoint": Option(_text),
            "region": Option(_text),
            "prefix": Option(_text),
            "chunk_size": Option(_OBJECT_CHUNK),
            "attempts": _ATTEMPTS,
            "timeout": _TIMEOUT,
        }
    ),
    "rados": Kind(
        {
            "pool": Option(_text, required=True),
            "namespace": Option(_text),
            "conf": Option(_text),
            "chunk_size": Option(_OBJECT_CHUNK),
            "timeout": _TIMEOUT,
        }
    ),
    "rbd": Kind(
        {
            "pool": Option(_text, required=True),
            "namespace": Option(_text),
            "conf": Option(_text),
            "image": Option(_text),
            "timeout": _TIMEOUT,
        }
    ),
}
LAYERS: dict[str, Kind] = {
    "cache": Kind(
        {
            "size": Option(_size_up_to(MAX_CACHE)),
            "mode": Option(_mode),
            "block": Option(_power_of_two(512, chunked.MAX_CHUNK_SIZE)),
        }
    ),
    "retry": Kind(
        {
            "attempts": _ATTEMPTS,
            "deadline": Option(_seconds(0, MAX_WAIT)),
            "backoff": Option(_seconds(0, MAX_BACKOFF)),
        }
    ),
}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    kind: str
    params: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)


@dataclasses.dataclass(frozen=True)
class StorageSpec:
    """A parsed, validated storage: its kind, parameters and layers (outermost first)."""

    kind: str = "file"
    params: tuple[tuple[str, Any], ...] = ()
    layers: tuple[LayerSpec, ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    @property
    def location(self) -> StorageSpec:
        """The spec without its layers (layers do not change where data is)."""
        return dataclasses.replace(self, layers=())

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": self.kind,
                "params": dict(self.params),
                "layers": [{"kind": la.kind, "params": dict(la.params)} for la in self.layers],
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> StorageSpec:
        data = json.loads(text)
        return cls(
            kind=data["kind"],
            params=tuple(sorted(data["params"].items())),
            layers=tuple(
                LayerSpec(la["kind"], tuple(sorted(la["params"].items()))) for la in data["layers"]
            ),
        )

    def __str__(self) -> str:
        def part(kind: str, params: tuple[tuple[str, Any], ...]) -> str:
            if not params:
                return kind
            return kind + ":" + ",".join(f"{k}={v}" for k, v in params)

        return "+".join(
            [part(self.kind, self.params)] + [part(la.kind, la.params) for la in self.layers]
        )


FILE = StorageSpec()


def _params(
    kind: str, raw: Mapping[str, Any], definition: Kind, where: str
) -> tuple[tuple[str, Any], ...]:
    out = {}
    for key, value in raw.items():
        option = definition.options.get(key)
        if option is None:
            raise InvalidRequestError(
                f"{where}: {kind} has no option {shown(key)}"
                f" (options: {', '.join(sorted(definition.options))})"
            )
        if isinstance(value, int) and value.bit_length() > 128:  # str() of 5,000 digits raises
            raise InvalidRequestError(f"{where}: {kind} {key}: number out of range")
        try:
            out[key] = option.parse(str(value))
        except ValueError as err:
            raise InvalidRequestError(f"{where}: {kind} {key}={shown(value)}: {err}") from None
    return tuple(sorted(out.items()))


def _absolute(
    params: tuple[tuple[str, Any], ...], base: Path | None, where: str
) -> tuple[tuple[str, Any], ...]:
    """``path`` made absolute: against ``base`` (the caller's working directory, or the
    configuration file's), refused without one (over the API a client's directory means
    nothing on the server).  Stored relative, it would name a different directory for every
    process that opens the catalogue."""
    values = dict(params)
    path = values.get("path")
    if path is None or Path(path).is_absolute():
        return params
    if base is None:
        raise InvalidRequestError(f"{where}: dir path={shown(path)} must be an absolute path")
    values["path"] = str(Path(base, path).resolve())
    return tuple(sorted(values.items()))


def _make(
    kind: str,
    raw: Mapping[str, Any],
    layers: Sequence[tuple[str, Mapping[str, Any]]],
    where: str,
    base: Path | None,
) -> StorageSpec:
    if kind not in KINDS:
        raise InvalidRequestError(
            f"{where}: unknown storage {shown(kind)} (one of {', '.join(KINDS)}, or a profile name)"
        )
    missing = KINDS[kind].required - set(raw)
    if missing:
        raise InvalidRequestError(f"{where}: {kind} needs {', '.join(sorted(missing))}")
    layer_specs = []
    for layer_kind, layer_raw in layers:
        if layer_kind not in LAYERS:
            raise InvalidRequestError(
                f"{where}: unknown layer {shown(layer_kind)} (one of {', '.join(LAYERS)})"
            )
        layer_specs.append(
            LayerSpec(layer_kind, _params(layer_kind, layer_raw, LAYERS[layer_kind], where))
        )
    params = _params(kind, raw, KINDS[kind], where)
    if kind == "dir":
        params = _absolute(params, base, where)
    return StorageSpec(kind, params, tuple(layer_specs))


def prepare_location(spec: StorageSpec) -> StorageSpec:
    """Check that a new volume's storage location is there before anything is recorded:
    a ``dir`` path must exist (or is made, with ``create=true``).  Returns the spec to record,
    without ``create`` (a later open must never make an empty directory where a missing disk
    should have been)."""
    if spec.kind != "dir" or spec.get("path") is None:
        return spec
    path = Path(spec.get("path"))
    if spec.get("create"):
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise InvalidRequestError(f"cannot create {path}: {err.strerror}") from None
    elif not path.is_dir():
        raise InvalidRequestError(
            f"storage directory {path} does not exist (add create=true to make it)"
        )
    params = tuple((k, v) for k, v in spec.params if k != "create")
    return dataclasses.replace(spec, params=params)


def _split(part: str, where: str) -> tuple[str, dict[str, str]]:
    kind, _, rest = part.partition(":")
    raw: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidRequestError(f"{where}: expected KEY=VALUE, got {shown(item)}")
        raw[key.strip()] = value.strip()
    return kind.strip(), raw


def parse_storage(
    text: str, profiles: Mapping[str, StorageSpec] | None = None, base: Path | None = None
) -> StorageSpec:
    """A spec from ``--storage`` text: a profile name or an inline spec (module docstring).
    A relative ``dir`` path is resolved against ``base``, and refused without one."""
    profiles = profiles or {}
    text = text.strip()
    if text in profiles:
        return profiles[text]
    where = f"storage {shown(text)}"
    parts = text.split("+")
    kind, raw = _split(parts[0], where)
    if kind in profiles and not raw:
        profile = profiles[kind]
        extra = [_split(p, where) for p in parts[1:]]
        more = _make(profile.kind, dict(profile.params), extra, where, None).layers
        return dataclasses.replace(profile, layers=profile.layers + more)
    return _make(kind, raw, [_split(p, where) for p in parts[1:]], where, base)


def parse_storage_mapping(data: Any, where: str, base: Path | None = None) -> StorageSpec:
    """A spec from a YAML mapping: ``type``, its options, and ``layers`` (a list of
    one-key mappings ``{cache: {...}}`` / ``{retry: {...}}``).  A relative ``dir`` path is
    resolved against ``base`` (the configuration file's directory), refused without one."""
    if not isinstance(data, Mapping):
        raise InvalidRequestError(f"{where}: expected a mapping with 'type'")
    raw = dict(data)
    kind = raw.pop("type", None)
    if not isinstance(kind, str):
        raise InvalidRequestError(f"{where}: expected 'type' (one of {', '.join(KINDS)})")
    layers_raw = raw.pop("layers", None) or []
    if not isinstance(layers_raw, list):
        raise InvalidRequestError(f"{where}.layers: expected a list")
    layers: list[tuple[str, Mapping[str, Any]]] = []
    for i, item in enumerate(layers_raw):
        if isinstance(item, str):
            layers.append((item, {}))
            continue
        if not isinstance(item, Mapping) or len(item) != 1:
            raise InvalidRequestError(
                f"{where}.layers[{i}]: expected one of {', '.join(LAYERS)} with its options"
            )
        ((layer_kind, options),) = item.items()
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise InvalidRequestError(f"{where}.layers[{i}].{layer_kind}: expected a mapping")
        layers.append((str(layer_kind), options))
    return _make(kind, raw, layers, where, base)
