"""The server's YAML configuration (``nbs serve --config``) as frozen dataclasses, and its
validation: listeners, TLS, exports, API, metrics, logging, limits, the storage profiles
the catalogue's volumes may name (parsed by backend.volumes.storages), and the storage nodes
that replicated volumes put their replicas on (``nodes:``, docs/configuration.md).

Every error names the file, the key and what was expected, e.g.
``nbs.yaml: exports[0].tls: expected one of off, allowed, required, got 'yes'``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from backend.nbd import TLSPolicy
from backend.nbd.constants import MAX_PAYLOAD
from backend.server.limits import ConnectionLimits, connection_count, handshake_seconds
from backend.storage.nbd import NbdTarget
from backend.volumes.kinds import KINDS
from backend.volumes.model import InvalidRequestError, parse_size, shown
from backend.volumes.storages import (
    FILE,
    StorageSpec,
    parse_storage,
    parse_storage_mapping,
)

DEFAULT_PORT = 10809
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
DEFAULT_VOLUME_SIZE = 1 << 30
MAX_SHUTDOWN_GRACE = 3600.0
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
DEFAULT_METRICS_LISTEN = "127.0.0.1:9810"
# Top-level keys that make up ServeConfig.limits, with their parsers.
_LIMITS = {
    "max_connections": connection_count,
    "max_connections_per_client": connection_count,
    "handshake_timeout": handshake_seconds,
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


class ConfigError(Exception):
    """A configuration value is missing, unknown or of the wrong type or value."""


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    name: str
    path: Path
    read_only: bool = False
    tls: TLSPolicy | None = None  # None: allowed when TLS is configured, else off
    description: str = ""
    min_block: int = 1


@dataclasses.dataclass(frozen=True)
class TLSConfig:
    cert: Path
    key: Path
    ca: Path | None = None
    required: bool = False  # True: plaintext clients are refused (exports without their own tls)


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    listen: str = DEFAULT_METRICS_LISTEN  # HOST:PORT of the Prometheus endpoint


@dataclasses.dataclass(frozen=True)
class ApiTLSConfig:
    cert: Path
    key: Path


@dataclasses.dataclass(frozen=True)
class ApiConfig:
    listen: tuple[str, ...] = ()  # TCP listeners (HOST:PORT); none: the local socket only
    tls: ApiTLSConfig | None = None
    token_file: Path | None = None  # None: DATA_DIR/api-token


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    """A storage node: another ``nbs serve`` whose volumes replicated volumes use as replicas.

    ``api``: its management API (``https://HOST:PORT`` or ``http://`` on loopback), with
    ``token`` or ``token_file`` (exactly one); ``ca``: the CA bundle its certificate is
    checked against (default: the system's).  ``nbd``: the NBD URI of its NBD listener,
    without an export name (``nbd://HOST:PORT``, ``nbds://HOST:PORT?tls-certificates=DIR``).
    """

    api: str
    nbd: str
    token: str | None = None
    token_file: Path | None = None
    ca: Path | None = None

    def target(self, export: str) -> NbdTarget:
        """Where the export ``export`` of this node is (the URI was checked when parsed)."""
        return dataclasses.replace(NbdTarget.from_uri(self.nbd), export=export)


@dataclasses.dataclass(frozen=True)
class ReplicationConfig:
    probe_interval: float = 2.0  # seconds between the resync supervisor's rounds
    scrub_interval: float = 0.0  # seconds between scheduled scrubs of a volume; 0: none
    scrub_repair: bool = False  # scheduled scrubs repair to the majority


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    listen: tuple[str, ...] = ()
    sockets: tuple[Path, ...] = ()
    exports: tuple[ExportConfig, ...] = ()
    tls: TLSConfig | None = None
    log_level: str = "info"
    log_format: str = "text"
    metrics: MetricsConfig | None = None  # None: no metrics endpoint
    api: ApiConfig = ApiConfig()
    data_dir: Path | None = None
    io_threads: int = 16
    max_request: int = MAX_PAYLOAD  # longest NBD READ/WRITE accepted (parse_max_request)
    shutdown_grace: float = 10.0
    # From top-level keys (see _LIMITS).
    limits: ConnectionLimits = dataclasses.field(default_factory=ConnectionLimits)
    storages: Mapping[str, StorageSpec] = dataclasses.field(default_factory=dict)
    default_storage: StorageSpec = FILE
    nodes: Mapping[str, NodeConfig] = dataclasses.field(default_factory=dict)
    replication: ReplicationConfig = ReplicationConfig()

    @property
    def tls_policy(self) -> TLSPolicy:
        """The TLS policy of the catalogue's volumes and of exports that set none."""
        if self.tls is None:
            return TLSPolicy.OFF
        return TLSPolicy.REQUIRED if self.tls.required else TLSPolicy.ALLOWED


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT``; raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"port must be a number, got {shown(port)}")
    if len(port) > 5:  # int() of thousands of digits raises
        raise ValueError(f"port must be 0-65535, got {shown(port)}")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port must be 0-65535, got {number}")
    return host, number


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(
            f"export name {name!r} must be 1-255 characters of letters, digits, '.', '_', '-',"
            " starting with a letter or digit"
        )
    return name


def parse_export_spec(spec: str) -> ExportConfig:
    """``NAME=PATH[,ro][,tls=MODE][,description=TEXT][,min-block=N]`` (the CLI form)."""
    name, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise ValueError(f"expected NAME=PATH[,ro][,tls=MODE], got {spec!r}")
    path, *options = rest.split(",")
    fields: dict[str, Any] = {"name": check_name(name), "path": Path(path)}
    for option in options:
        key, _, value = option.partition("=")
        if key in ("ro", "read-only") and not value:
            fields["read_only"] = True
        elif key == "tls":
            fields["tls"] = _tls_policy(value)
        elif key == "description":
            fields["description"] = value
        elif key == "min-block":
            fields["min_block"] = _block_size(value)
        else:
            raise ValueError(f"unknown export option {option!r} in {spec!r}")
    return ExportConfig(**fields)


def _tls_policy(value: str) -> TLSPolicy:
    try:
        return TLSPolicy(value)
    except ValueError:
        raise ValueError(
            f"expected one of {', '.join(p.value for p in TLSPolicy)}, got {value!r}"
        ) from None


def _block_size(value: object) -> int:
    text = str(value).strip() if isinstance(value, str) else ""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif text.isascii() and text.isdigit() and len(text) <= 5:  # int() of 5,000 digits raises
        size = int(text)
    else:
        raise ValueError(f"expected a power of two from 1 to 65536, got {shown(value)}")
    if size < 1 or size & (size - 1) or size > 65536:
        raise ValueError(f"expected a power of two from 1 to 65536, got {shown(value)}")
    return size


class _Reader:
    """Walks a YAML mapping, turning every problem into a ConfigError that names the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, expected: str, got: object) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: expected {expected}, got {shown(got)}")

    def mapping(self, value: object, key: str, allowed: set[str]) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key or "top level", "a mapping", value)
        for name in value:
            if name not in allowed:
                where = f"{key}.{name}" if key else str(name)
                raise ConfigError(
                    f"{self.source}: {where}: unknown key (known: {', '.join(sorted(allowed))})"
                )
        return value

    def string(self, value: object, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, "a non-empty string", value)
        return value

    def strings(self, value: object, key: str) -> list[str]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise self.fail(key, "a list of strings", value)
        return [self.string(item, f"{key}[{i}]") for i, item in enumerate(value)]

    def addresses(self, value: object, key: str) -> tuple[str, ...]:
        """One HOST:PORT or a list of them."""
        items = self.strings(value, key)
        for i, item in enumerate(items):
            self.convert(item, f"{key}[{i}]", parse_host_port)
        return tuple(items)

    def convert(self, value: object, key: str, parse: Any) -> Any:
        try:
            return parse(value)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{self.source}: {key}: {err}") from None


def parse_max_request(value: object) -> int:
    """The ``max_request`` setting: ``64MiB`` or a number of bytes, a power of two from 1 MiB
    to 1 GiB.  The spec asks for at least 1 MiB and at least the preferred block size (the
    core advertises a storage's preferred size clamped to this); clients that see no maximum
    assume 32 MiB.  Raises ValueError."""
    expected = "a power of two from 1MiB to 1GiB, e.g. 64MiB"
    if not isinstance(value, str | int) or (isinstance(value, str) and len(value) > 20):
        raise ValueError(f"expected {expected}, got {str(value)[:40]!r}")
    try:
        size = parse_size(value)
    except (InvalidRequestError, ValueError):
        raise ValueError(f"expected {expected}, got {value!r}") from None
    if not MAX_REQUEST_MIN <= size <= MAX_REQUEST_MAX or size & (size - 1):
        raise ValueError(f"expected {expected}, got {value!r}")
    return size


MAX_REQUEST_MIN = 1 << 20
MAX_REQUEST_MAX = 1 << 30


def load_config(path: Path) -> ServeConfig:
    """Read and validate a YAML config file; raises ConfigError."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    return parse_config(data if data is not None else {}, str(path), path.absolute().parent)


def parse_config(data: object, source: str, base: Path | None = None) -> ServeConfig:
    """``base``: where relative storage paths start (the file's directory; None: refused)."""
    r = _Reader(source)
    known = {
        "listen",
        "sockets",
        "exports",
        "tls",
        "log_level",
        "log_format",
        "metrics",
        "api",
        "data_dir",
        "io_threads",
        "max_request",
        "shutdown_grace",
        "storages",
        "default_storage",
        "nodes",
        "replication",
        *_LIMITS,
    }
    top = r.mapping(data, "", known)
    fields: dict[str, Any] = {}
    if "listen" in top:
        fields["listen"] = r.addresses(top["listen"], "listen")
    if "sockets" in top:
        fields["sockets"] = tuple(Path(p) for p in r.strings(top["sockets"], "sockets"))
    if "log_level" in top:
        level = top["log_level"]
        if level not in LOG_LEVELS:
            raise r.fail("log_level", f"one of {', '.join(LOG_LEVELS)}", level)
        fields["log_level"] = level
    if "log_format" in top:
        log_format = top["log_format"]
        if log_format not in LOG_FORMATS:
            raise r.fail("log_format", f"one of {', '.join(LOG_FORMATS)}", log_format)
        fields["log_format"] = log_format
    if "metrics" in top:
        # ``metrics:`` with no value turns the endpoint on at its default address.
        metrics = r.mapping(_empty_if_none(top["metrics"]), "metrics", {"listen"})
        listen = metrics.get("listen", DEFAULT_METRICS_LISTEN)
        r.convert(r.string(listen, "metrics.listen"), "metrics.listen", parse_host_port)
        fields["metrics"] = MetricsConfig(listen=listen)
    if "api" in top:
        fields["api"] = _api(r, top["api"])
    if "data_dir" in top:
        fields["data_dir"] = Path(r.string(top["data_dir"], "data_dir"))
    if "io_threads" in top:
        threads = top["io_threads"]
        if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 1024:
            raise r.fail("io_threads", "an integer from 1 to 1024", threads)
        fields["io_threads"] = threads
    if "max_request" in top:
        fields["max_request"] = r.convert(top["max_request"], "max_request", parse_max_request)
    if "shutdown_grace" in top:
        grace = top["shutdown_grace"]
        if (
            not isinstance(grace, int | float)
            or isinstance(grace, bool)
            or not 0 <= grace <= MAX_SHUTDOWN_GRACE  # also refuses NaN
        ):
            raise r.fail(
                "shutdown_grace", f"a number of seconds from 0 to {MAX_SHUTDOWN_GRACE:g}", grace
            )
        fields["shutdown_grace"] = float(grace)
    limits = {key: r.convert(top[key], key, parse) for key, parse in _LIMITS.items() if key in top}
    if limits:
        fields["limits"] = ConnectionLimits(**limits)
    if "tls" in top:
        tls = r.mapping(top["tls"], "tls", {"cert", "key", "ca", "required"})
        if "cert" not in tls or "key" not in tls:
            raise ConfigError(f"{source}: tls: expected both 'cert' and 'key'")
        ca = tls.get("ca")
        required = tls.get("required", False)
        if not isinstance(required, bool):
            raise r.fail("tls.required", "true or false", required)
        fields["tls"] = TLSConfig(
            cert=Path(r.string(tls["cert"], "tls.cert")),
            key=Path(r.string(tls["key"], "tls.key")),
            ca=Path(r.string(ca, "tls.ca")) if ca is not None else None,
            required=required,
        )
    if "storages" in top:
        fields["storages"] = _storages(r, top["storages"], base)
    if "default_storage" in top:
        text = r.string(top["default_storage"], "default_storage")
        try:
            fields["default_storage"] = parse_storage(text, fields.get("storages", {}), base)
        except InvalidRequestError as err:
            raise ConfigError(f"{source}: default_storage: {err}") from None
    if "nodes" in top:
        fields["nodes"] = _nodes(r, top["nodes"])
    if "replication" in top:
        replication = r.mapping(
            _empty_if_none(top["replication"]),
            "replication",
            {"probe_interval", "scrub_interval", "scrub_repair"},
        )
        interval = replication.get("probe_interval", 2.0)
        if (
            not isinstance(interval, int | float)
            or isinstance(interval, bool)
            or not 0.05 <= interval <= 3600  # also refuses NaN
        ):
            raise r.fail("replication.probe_interval", "seconds from 0.05 to 3600", interval)
        scrub = replication.get("scrub_interval", 0)
        if (
            not isinstance(scrub, int | float)
            or isinstance(scrub, bool)
            or not (scrub == 0 or 1 <= scrub <= 366 * 86400)  # also refuses NaN
        ):
            raise r.fail(
                "replication.scrub_interval", "0 (none) or seconds from 1 to 31622400", scrub
            )
        repair = replication.get("scrub_repair", False)
        if not isinstance(repair, bool):
            raise r.fail("replication.scrub_repair", "true or false", repair)
        fields["replication"] = ReplicationConfig(float(interval), float(scrub), repair)
    if "exports" in top:
        items = top["exports"]
        if not isinstance(items, list):
            raise r.fail("exports", "a list of exports", items)
        fields["exports"] = tuple(_export(r, item, f"exports[{i}]") for i, item in enumerate(items))
    return ServeConfig(**fields)


def _export(r: _Reader, item: object, key: str) -> ExportConfig:
    allowed = {"name", "path", "read_only", "tls", "description", "min_block"}
    export = r.mapping(item, key, allowed)
    for required in ("name", "path"):
        if required not in export:
            raise ConfigError(f"{r.source}: {key}.{required}: required")
    fields: dict[str, Any] = {
        "name": r.convert(export["name"], f"{key}.name", check_name),
        "path": Path(r.string(export["path"], f"{key}.path")),
    }
    if "read_only" in export:
        if not isinstance(export["read_only"], bool):
            raise r.fail(f"{key}.read_only", "true or false", export["read_only"])
        fields["read_only"] = export["read_only"]
    if "tls" in export:
        fields["tls"] = r.convert(export["tls"], f"{key}.tls", _tls_policy)
    if "description" in export:
        fields["description"] = r.string(export["description"], f"{key}.description")
    if "min_block" in export:
        fields["min_block"] = r.convert(export["min_block"], f"{key}.min_block", _block_size)
    return ExportConfig(**fields)


def _api(r: _Reader, value: object) -> ApiConfig:
    api = r.mapping(_empty_if_none(value), "api", {"listen", "tls", "token_file"})
    fields: dict[str, Any] = {}
    if "listen" in api:
        fields["listen"] = r.addresses(api["listen"], "api.listen")
    if "tls" in api:
        tls = r.mapping(api["tls"], "api.tls", {"cert", "key"})
        if "cert" not in tls or "key" not in tls:
            raise ConfigError(f"{r.source}: api.tls: expected both 'cert' and 'key'")
        fields["tls"] = ApiTLSConfig(
            cert=Path(r.string(tls["cert"], "api.tls.cert")),
            key=Path(r.string(tls["key"], "api.tls.key")),
        )
    if "token_file" in api:
        fields["token_file"] = Path(r.string(api["token_file"], "api.token_file"))
    return ApiConfig(**fields)


def _nodes(r: _Reader, value: object) -> dict[str, NodeConfig]:
    if not isinstance(value, Mapping):
        raise r.fail("nodes", "a mapping of node names to nodes", value)
    return {
        r.convert(name, "nodes", _node_name): _node(r, node, f"nodes.{name}")
        for name, node in value.items()
    }


def _node_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"a node name is letters, digits, '.', '_', '-', got {shown(name)}")
    return name


def _node(r: _Reader, value: object, key: str) -> NodeConfig:
    node = r.mapping(value, key, {"api", "token", "token_file", "ca", "nbd"})
    for required in ("api", "nbd"):
        if required not in node:
            raise ConfigError(f"{r.source}: {key}.{required}: required")
    if ("token" in node) == ("token_file" in node):
        raise ConfigError(f"{r.source}: {key}: expected one of 'token' and 'token_file'")
    api = r.string(node["api"], f"{key}.api")
    r.convert(api, f"{key}.api", _api_url)
    nbd = r.string(node["nbd"], f"{key}.nbd")
    target = r.convert(nbd, f"{key}.nbd", NbdTarget.from_uri)
    if target.export:
        raise ConfigError(
            f"{r.source}: {key}.nbd: the node's NBD listener, without an export name, got"
            f" {shown(nbd)}"
        )
    return NodeConfig(
        api=api,
        nbd=nbd,
        token=r.string(node["token"], f"{key}.token") if "token" in node else None,
        token_file=(
            Path(r.string(node["token_file"], f"{key}.token_file"))
            if "token_file" in node
            else None
        ),
        ca=Path(r.string(node["ca"], f"{key}.ca")) if "ca" in node else None,
    )


def _api_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if scheme not in ("http", "https") or not sep or not rest.strip("/"):
        raise ValueError(f"expected an http:// or https:// URL, got {shown(url)}")
    return url


def _storages(r: _Reader, value: object, base: Path | None) -> dict[str, StorageSpec]:
    if not isinstance(value, Mapping):
        raise r.fail("storages", "a mapping of profile names to storages", value)
    profiles = {}
    for name, spec in value.items():
        key = f"storages.{name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in KINDS:
            raise r.fail(key, "a profile name (letters, digits, -_.; not a storage kind)", name)
        try:
            profiles[name] = parse_storage_mapping(spec, key, base)
        except InvalidRequestError as err:
            raise ConfigError(f"{r.source}: {err}") from None
    return profiles


def _empty_if_none(value: object) -> object:
    return {} if value is None else value
