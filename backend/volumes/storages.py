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
    nbd:url=nbd://10.0.0.5:10809/vol         an existing remote NBD export (never removed by
                                             nbs; nbd+unix:///vol?socket=PATH, nbds://…)
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

``--storage cold`` then names the profile.  Every option is defined once, in the registry
(backend.volumes.kinds: ``KINDS`` and ``LAYERS``), with its type, limits (the storages' own)
and default, and checked at parse time.  A spec records only the options given; it is typed
here and JSON only in the catalogue (:meth:`StorageSpec.to_json`/:meth:`~StorageSpec.from_json`).
S3 credentials never go into a spec: they come from the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``...).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from backend.volumes.kinds import KINDS, LAYERS, Kind
from backend.volumes.model import InvalidRequestError, shown


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
    kind: str, params: tuple[tuple[str, Any], ...], base: Path | None, where: str
) -> tuple[tuple[str, Any], ...]:
    """The kind's path options made absolute: against ``base`` (the caller's working
    directory, or the configuration file's), refused without one (over the API a client's
    directory means nothing on the server).  Stored relative, a path would name a different
    directory for every process that opens the catalogue."""
    values = dict(params)
    for option in KINDS[kind].paths:
        path = values.get(option)
        if path is None or Path(path).is_absolute():
            continue
        if base is None:
            raise InvalidRequestError(
                f"{where}: {kind} {option}={shown(path)} must be an absolute path"
            )
        values[option] = str(Path(base, path).resolve())
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
    params = _absolute(kind, _params(kind, raw, KINDS[kind], where), base, where)
    return StorageSpec(kind, params, tuple(layer_specs))


def prepare_location(spec: StorageSpec) -> StorageSpec:
    """Check that a new volume's storage location is there before anything is recorded
    (the kind's ``prepare``: a ``dir`` path must exist, or is made with ``create=true``).
    Returns the spec to record."""
    prepare = KINDS[spec.kind].prepare
    if prepare is None:
        return spec
    params = tuple(sorted(prepare(dict(spec.params)).items()))
    return dataclasses.replace(spec, params=params)


# "+" starts a layer, except in an NBD URI's scheme (nbd+unix://, nbds+tcp://).
_LAYER_SPLIT = re.compile(r"\+(?!(?:unix|tcp|vsock)://)")


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
    parts = _LAYER_SPLIT.split(text)
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
