"""Where a volume's data lives: storage specs, written inline or as named profiles.

A volume is created on one storage and keeps it; clones share their origin's.  The spec is
written into the catalogue with the volume (canonical JSON, never secrets), so any process
opening the catalogue opens the volume the same way.

Inline (``nbs volume create --storage``)::

    KIND[:KEY=VALUE,...][+LAYER[:KEY=VALUE,...]]...

    file                                     local copy-on-write files in the data directory
    dir:path=/srv/nbs/objects,chunk_size=4MiB  chunks as files in a directory
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

``--storage cold`` then names the profile.  S3 credentials never go into a spec: they come
from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``...).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from backend.volumes.model import InvalidRequestError, parse_size

KIB = 1024
MIB = 1024 * KIB


def _size(value: str) -> int:
    return parse_size(value)


def _seconds(value: str) -> float:
    text = value.strip().removesuffix("s")
    number = float(text)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


def _count(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be >= 1")
    return number


def _text(value: str) -> str:
    if not value or "\0" in value:
        raise ValueError("must be a non-empty string")
    return value


def _mode(value: str) -> str:
    if value not in ("write-through", "write-back"):
        raise ValueError("must be write-through or write-back")
    return value


def _chunk(value: str) -> int:
    size = parse_size(value)
    if size < 64 * KIB or size > 32 * MIB or size & (size - 1):
        raise ValueError("must be a power of two from 64KiB to 32MiB")
    return size


def _cow_chunk(value: str) -> int:
    size = parse_size(value)
    if size < 4 * KIB or size > 32 * MIB or size & (size - 1):
        raise ValueError("must be a power of two from 4KiB to 32MiB")
    return size


Parser = Callable[[str], Any]

# kind -> (required keys, {key: parser})
KINDS: dict[str, tuple[frozenset[str], dict[str, Parser]]] = {
    "file": (frozenset(), {"chunk_size": _cow_chunk}),
    "dir": (frozenset(), {"path": _text, "chunk_size": _chunk}),
    "s3": (
        frozenset({"bucket"}),
        {
            "bucket": _text,
            "endpoint": _text,
            "region": _text,
            "prefix": _text,
            "chunk_size": _chunk,
            "attempts": _count,
            "timeout": _seconds,
        },
    ),
    "rados": (
        frozenset({"pool"}),
        {
            "pool": _text,
            "namespace": _text,
            "conf": _text,
            "chunk_size": _chunk,
            "timeout": _seconds,
        },
    ),
    "rbd": (
        frozenset({"pool"}),
        {"pool": _text, "namespace": _text, "conf": _text, "image": _text, "timeout": _seconds},
    ),
}
LAYERS: dict[str, dict[str, Parser]] = {
    "cache": {"size": _size, "mode": _mode, "block": _size},
    "retry": {"attempts": _count, "deadline": _seconds, "backoff": _seconds},
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
    kind: str, raw: Mapping[str, Any], parsers: Mapping[str, Parser], where: str
) -> tuple[tuple[str, Any], ...]:
    out = {}
    for key, value in raw.items():
        if key not in parsers:
            raise InvalidRequestError(
                f"{where}: {kind} has no option {key!r} (options: {', '.join(sorted(parsers))})"
            )
        try:
            out[key] = parsers[key](str(value))
        except ValueError as err:
            raise InvalidRequestError(f"{where}: {kind} {key}={value!r}: {err}") from None
    return tuple(sorted(out.items()))


def _make(
    kind: str,
    raw: Mapping[str, Any],
    layers: Sequence[tuple[str, Mapping[str, Any]]],
    where: str,
) -> StorageSpec:
    if kind not in KINDS:
        raise InvalidRequestError(
            f"{where}: unknown storage {kind!r} (one of {', '.join(KINDS)}, or a profile name)"
        )
    required, parsers = KINDS[kind]
    missing = required - set(raw)
    if missing:
        raise InvalidRequestError(f"{where}: {kind} needs {', '.join(sorted(missing))}")
    layer_specs = []
    for layer_kind, layer_raw in layers:
        if layer_kind not in LAYERS:
            raise InvalidRequestError(
                f"{where}: unknown layer {layer_kind!r} (one of {', '.join(LAYERS)})"
            )
        layer_specs.append(
            LayerSpec(layer_kind, _params(layer_kind, layer_raw, LAYERS[layer_kind], where))
        )
    return StorageSpec(kind, _params(kind, raw, parsers, where), tuple(layer_specs))


def _split(part: str, where: str) -> tuple[str, dict[str, str]]:
    kind, _, rest = part.partition(":")
    raw: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidRequestError(f"{where}: expected KEY=VALUE, got {item!r}")
        raw[key.strip()] = value.strip()
    return kind.strip(), raw


def parse_storage(text: str, profiles: Mapping[str, StorageSpec] | None = None) -> StorageSpec:
    """A spec from ``--storage`` text: a profile name or an inline spec (module docstring)."""
    profiles = profiles or {}
    text = text.strip()
    if text in profiles:
        return profiles[text]
    where = f"storage {text!r}"
    parts = text.split("+")
    kind, raw = _split(parts[0], where)
    if kind in profiles and not raw:
        base = profiles[kind]
        extra = [_split(p, where) for p in parts[1:]]
        more = _make(base.kind, dict(base.params), extra, where).layers
        return dataclasses.replace(base, layers=base.layers + more)
    return _make(kind, raw, [_split(p, where) for p in parts[1:]], where)


def parse_storage_mapping(data: Any, where: str) -> StorageSpec:
    """A spec from a YAML mapping: ``type``, its options, and ``layers`` (a list of
    one-key mappings ``{cache: {...}}`` / ``{retry: {...}}``)."""
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
    return _make(kind, raw, layers, where)
