"""The ``nbs`` command."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import queue
import signal
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn, TypeVar

from backend import logs
from backend.nbd import TLSPolicy
from backend.server import systemd
from backend.server.exports import Export, Exports, ExportTable
from backend.server.limits import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
    connection_count,
    handshake_seconds,
)
from backend.server.server import ServeError, Server, TCPAddress, UnixAddress, inherited_sockets
from backend.server.tls import TLSConfigError, TLSFiles, server_context
from backend.server.volume_exports import DEFAULT_VOLUME, VolumeExports
from backend.storage import FileStorage, Storage, StorageError
from backend.volumes import cli as volumes_cli
from backend.volumes.config import (
    DEFAULT_LISTEN,
    DEFAULT_VOLUME_SIZE,
    LOG_FORMATS,
    LOG_LEVELS,
    ConfigError,
    ExportConfig,
    MetricsConfig,
    ServeConfig,
    TLSConfig,
    default_data_dir,
    load_config,
    parse_export_spec,
    parse_host_port,
    parse_max_request,
)
from backend.volumes.model import Holder, VolumeError
from backend.volumes.service import VolumeService
from hypervisor import cli as hypervisor_cli

if TYPE_CHECKING:
    from backend.api.server import ApiServer
    from backend.server.metrics_endpoint import MetricsEndpoint

log = logging.getLogger("nbs")
EXIT_USAGE = 2
_T = TypeVar("_T")


class UsageError(Exception):
    """Bad arguments or configuration: one line on stderr, exit code 2."""


def _export_arg(text: str) -> ExportConfig:
    try:
        return parse_export_spec(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _max_request_arg(text: str) -> int:
    try:
        return parse_max_request(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _listen_arg(text: str) -> str:
    try:
        parse_host_port(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _limit_arg(parse: Callable[[object], _T]) -> Callable[[str], _T]:
    def convert(text: str) -> _T:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


class _Parser(argparse.ArgumentParser):
    """Argument errors are one line and exit code 2, like every other usage error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"nbs: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nbs", description="NBS network block store")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="serve exports over NBD",
        description=(
            "Serve block exports over NBD.  Without --export or a config listing exports,"
            " serves a 1 GiB sparse volume 'default' kept in the data directory."
        ),
    )
    serve.add_argument(
        "--listen",
        action="append",
        type=_listen_arg,
        metavar="HOST:PORT",
        help=f"TCP address to listen on (repeatable; default {DEFAULT_LISTEN}; port 0 picks one)",
    )
    serve.add_argument(
        "--socket",
        action="append",
        type=Path,
        metavar="PATH",
        help="Unix socket to listen on (repeatable)",
    )
    serve.add_argument(
        "--export",
        action="append",
        type=_export_arg,
        metavar="NAME=PATH[,ro][,tls=MODE]",
        help=(
            "serve the raw file or block device PATH as NAME (repeatable); options: ro,"
            " tls=off|allowed|required, description=TEXT, min-block=N"
        ),
    )
    serve.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate")
    serve.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key")
    serve.add_argument(
        "--tls-ca", type=Path, metavar="PEM", help="CA that client certificates must chain to"
    )
    serve.add_argument(
        "--tls-required",
        action="store_true",
        help="serve no client that does not negotiate TLS (default: TLS allowed, not required)",
    )
    serve.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration file")
    serve.add_argument(
        "--data-dir", type=Path, metavar="DIR", help="where the default volume lives"
    )
    serve.add_argument(
        "--max-request",
        type=_max_request_arg,
        metavar="SIZE",
        help="longest NBD read or write accepted (default 64MiB; a power of two, 1MiB-1GiB)",
    )
    serve.add_argument("--log-level", choices=LOG_LEVELS, help="default: info")
    serve.add_argument("--log-format", choices=LOG_FORMATS, help="default: text")
    serve.add_argument(
        "--metrics-listen",
        type=_listen_arg,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)",
    )
    serve.add_argument(
        "--max-connections",
        type=_limit_arg(connection_count),
        metavar="N",
        help=f"connections open at once (default {DEFAULT_MAX_CONNECTIONS})",
    )
    serve.add_argument(
        "--max-connections-per-client",
        type=_limit_arg(connection_count),
        metavar="N",
        help=(
            "connections open at once from one client IP address"
            f" (default {DEFAULT_MAX_CONNECTIONS_PER_CLIENT})"
        ),
    )
    serve.add_argument(
        "--handshake-timeout",
        type=_limit_arg(handshake_seconds),
        metavar="SECONDS",
        help=f"time a client has to pick an export (default {DEFAULT_HANDSHAKE_TIMEOUT:g})",
    )
    serve.set_defaults(func=cmd_serve)
    config = sub.add_parser("config", help="check a configuration file")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    check = config_sub.add_parser(
        "check",
        help="validate a YAML configuration file",
        description="Print 'FILE: ok', or the first error and exit with code 2.",
    )
    check.add_argument("file", type=Path, metavar="FILE")
    check.set_defaults(func=cmd_config_check)
    # The command line is the one seam where backend and hypervisor meet.
    volumes_cli.add_commands(sub)
    hypervisor_cli.add_commands(sub)
    return parser


def _merge(args: argparse.Namespace) -> ServeConfig:
    config = load_config(args.config) if args.config else ServeConfig()
    changes: dict[str, object] = {}
    if args.listen:
        changes["listen"] = tuple(args.listen)
    if args.socket:
        changes["sockets"] = tuple(args.socket)
    if args.export:
        changes["exports"] = config.exports + tuple(args.export)
    if args.tls_cert or args.tls_key or args.tls_ca:
        if not (args.tls_cert and args.tls_key):
            raise UsageError("--tls-cert and --tls-key go together")
        changes["tls"] = TLSConfig(args.tls_cert, args.tls_key, args.tls_ca, args.tls_required)
    elif args.tls_required:
        if config.tls is None:
            raise UsageError(
                "--tls-required needs --tls-cert and --tls-key (or tls: in the config)"
            )
        changes["tls"] = dataclasses.replace(config.tls, required=True)
    if args.data_dir:
        changes["data_dir"] = args.data_dir
    if args.max_request:
        changes["max_request"] = args.max_request
    if args.log_level:
        changes["log_level"] = args.log_level
    if args.log_format:
        changes["log_format"] = args.log_format
    if args.metrics_listen:
        changes["metrics"] = MetricsConfig(args.metrics_listen)
    limits = {
        key: getattr(args, key)
        for key in ("max_connections", "max_connections_per_client", "handshake_timeout")
        if getattr(args, key) is not None
    }
    if limits:
        changes["limits"] = dataclasses.replace(config.limits, **limits)
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


def cmd_config_check(args: argparse.Namespace) -> int:
    load_config(args.file)  # a ConfigError is printed by main(), exit code 2
    print(f"{args.file}: ok")
    return 0


def _open_exports(
    config: ServeConfig, keep: Mapping[ExportConfig, Export] | None = None
) -> list[Export]:
    """Open the configured exports; those in ``keep`` (a reload) keep their open storage."""
    keep = keep or {}
    specs = list(config.exports)
    exports: list[Export] = []
    seen: set[str] = set()
    opened: list[Storage] = []
    try:
        for spec in specs:
            if spec.name in seen:
                raise UsageError(f"export {spec.name!r} is given twice")
            seen.add(spec.name)
            if spec.tls is TLSPolicy.REQUIRED and config.tls is None:
                raise UsageError(f"export {spec.name!r} requires TLS but no certificate is set")
            policy = spec.tls or config.tls_policy
            kept = keep.get(spec)
            if kept is not None and kept.tls is policy:
                exports.append(kept)
                continue
            try:
                storage = FileStorage(spec.path, read_only=spec.read_only)
            except StorageError as err:
                raise UsageError(f"export {spec.name!r}: {err}") from err
            opened.append(storage)
            exports.append(
                Export(
                    name=spec.name,
                    storage=storage,
                    description=spec.description,
                    tls=policy,
                    read_only=spec.read_only,
                    min_block=spec.min_block,
                )
            )
    except UsageError:
        for each in opened:
            each.close()
        raise
    return exports


def _catalogue_exports(config: ServeConfig, server_ref: list[Server]) -> VolumeExports:
    """Serve every catalogued volume; an empty catalogue gets the embedded default volume."""
    data_dir = config.data_dir or default_data_dir()

    def holders(name: str) -> list[Holder]:
        if not server_ref:
            return []
        return [Holder(h.peer, h.writable, h.since) for h in server_ref[0].holders.of(name)]

    try:
        service = VolumeService(
            data_dir,
            serving=True,
            holders=holders,
            profiles=config.storages,
            default_storage=config.default_storage,
        )
        if not service.catalogue.volumes():
            # On the default storage: a `dir` there must exist (or say create=true).
            service.create(DEFAULT_VOLUME, DEFAULT_VOLUME_SIZE, description="NBS default volume")
            log.info(
                "created volume %r (%d bytes, sparse) in %s",
                DEFAULT_VOLUME,
                DEFAULT_VOLUME_SIZE,
                data_dir,
            )
    except VolumeError as err:
        raise UsageError(err.message) from err
    except OSError as err:
        raise UsageError(f"cannot use data directory {data_dir}: {err.strerror}") from err
    return VolumeExports(service, tls=config.tls_policy)


def _tls_context(config: ServeConfig) -> ssl.SSLContext | None:
    if config.tls is None:
        return None
    return server_context(TLSFiles(config.tls.cert, config.tls.key, config.tls.ca))


def _listeners(config: ServeConfig, inherited: bool) -> tuple[list[TCPAddress], list[UnixAddress]]:
    listen = config.listen or (() if inherited or config.sockets else (DEFAULT_LISTEN,))
    tcp = [TCPAddress(*parse_host_port(item)) for item in listen]
    return tcp, [UnixAddress(path) for path in config.sockets]


def _metrics(config: ServeConfig, server: Server) -> MetricsEndpoint | None:
    if config.metrics is None:
        return None
    # prometheus_client costs 4 MiB of RSS and 30 ms at start: only with metrics turned on.
    from backend.server.metrics_endpoint import MetricsEndpoint, MetricsError  # noqa: PLC0415

    try:
        return MetricsEndpoint(*parse_host_port(config.metrics.listen), server.metrics_snapshot)
    except MetricsError as err:
        raise ServeError(str(err)) from err


def _api(config: ServeConfig, table: Exports, server: Server) -> ApiServer | None:
    """The management API over the served catalogue (none with fixed --export files): on
    DATA/api.sock always, and on the ``api.listen`` addresses.  Raises ServeError."""
    if not isinstance(table, VolumeExports):
        return None
    # Imported here: FastAPI and uvicorn cost every other nbs command startup time.
    from backend.api.app import create_app  # noqa: PLC0415
    from backend.api.local import load_or_create_token, socket_path, token_path  # noqa: PLC0415
    from backend.api.server import ApiServer  # noqa: PLC0415

    service = table.service
    token = load_or_create_token(config.api.token_file or token_path(service.data_dir))
    urls: list[str] = []
    app = create_app(
        service,
        token=token,
        status=lambda: {
            "connections": server.session_count,
            "listeners": list(server.uris),
            "api": urls,
        },
    )
    tls = config.api.tls
    api = ApiServer(
        app,
        listen=[parse_host_port(address) for address in config.api.listen],
        unix=socket_path(service.data_dir),
        tls=TLSFiles(tls.cert, tls.key) if tls is not None else None,
    )
    urls.extend(api.start())
    return api


def cmd_serve(args: argparse.Namespace) -> int:
    config = _merge(args)
    logs.configure(config.log_level, config.log_format)
    tls = _tls_context(config)
    server_ref: list[Server] = []
    table: Exports
    fixed: list[Export] = []
    if config.exports:
        fixed = _open_exports(config)
        table = ExportTable(fixed)
        names = ", ".join(e.name for e in fixed)
    else:
        table = _catalogue_exports(config, server_ref)
        names = f"the volumes in {table.service.data_dir}"
    inherited = inherited_sockets()
    tcp, unix = _listeners(config, bool(inherited))
    server = Server(
        table,
        tcp=tcp,
        unix=unix,
        inherited=inherited,
        tls=tls,
        io_threads=config.io_threads,
        limits=config.limits,
        max_request=config.max_request,
    )
    server_ref.append(server)
    metrics = None
    try:
        uris = server.bind()
        metrics = _metrics(config, server)
        api = _api(config, table, server)
    except ServeError:
        if metrics is not None:
            metrics.close()
        server.close_listeners()
        table.close()
        raise
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signals.put(signum)  # acted on below: a handler must not log or take locks

    for handled in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(handled, on_signal)
    server.start()
    for uri in uris:
        print(f"nbs: listening on {uri} (exports: {names})", flush=True)
    for url in api.urls if api is not None else ():
        # Not "listening on": scripts and tests read those lines as NBD URIs.
        print(f"nbs: management API at {url}", flush=True)
    serving = _Serving(args, config, server, metrics, dict(zip(config.exports, fixed, strict=True)))
    serving.announce_metrics()
    systemd.notify(f"READY=1\nSTATUS={serving.status()}")
    while (signum := _next_signal(signals)) == signal.SIGHUP:
        serving.reload(inherited=bool(inherited))
    log.info("received %s, shutting down", signal.Signals(signum).name)
    systemd.notify("STOPPING=1\nSTATUS=stopping")
    if serving.metrics is not None:
        serving.metrics.close()
    # The API first: nothing may change the catalogue while the NBD side closes it.
    api_clean = api.stop(serving.config.shutdown_grace) if api is not None else True
    clean = server.shutdown(serving.config.shutdown_grace) and api_clean
    log.info("stopped%s", "" if clean else " with errors")
    return 0 if clean else 1


def _next_signal(signals: queue.SimpleQueue[int]) -> int:
    while True:
        try:  # a timeout, so that the signal handler gets to run promptly
            return signals.get(timeout=3600)
        except queue.Empty:
            continue


class _Serving:
    """What SIGHUP may change in a running ``nbs serve``: it re-reads the config file and
    applies log settings, TLS, static exports, listeners and the metrics endpoint, or, if
    any of them fails, logs why and changes nothing."""

    def __init__(
        self,
        args: argparse.Namespace,
        config: ServeConfig,
        server: Server,
        metrics: MetricsEndpoint | None,
        exports: dict[ExportConfig, Export],
    ) -> None:
        self.args = args
        self.config = config
        self.server = server
        self.metrics = metrics
        self.exports = exports  # static exports by the spec they were opened from

    def status(self) -> str:
        what = ", ".join(e.name for e in self.exports.values()) or "the volume catalogue"
        return f"serving {what} on {', '.join(self.server.uris)}"

    def announce_metrics(self) -> None:
        if self.metrics is not None:
            print(f"nbs: serving metrics on {self.metrics.url}", flush=True)

    def reload(self, *, inherited: bool) -> None:
        source = self.args.config or "the command line"
        log.info("received SIGHUP, reloading %s", source)
        systemd.notify(systemd.reloading())
        try:
            self._reload(inherited)
        except (UsageError, ConfigError, ServeError, TLSConfigError) as err:
            log.error("reload failed, the running configuration stays: %s", err)
            reason = " ".join(str(err).split())  # one line: a YAML error spans several
            systemd.notify(f"READY=1\nSTATUS=reload failed: {reason}; {self.status()}")
            return
        log.info("reloaded %s", source)
        systemd.notify(f"READY=1\nSTATUS={self.status()}")

    def _reload(self, inherited: bool) -> None:
        old = self.config
        config = _merge(self.args)
        if bool(config.exports) != bool(old.exports):
            raise UsageError("switching between exports and the volume catalogue needs a restart")
        for key in ("data_dir", "io_threads", "max_request", "api"):
            if getattr(config, key) != getattr(old, key):
                log.warning("reload: a change of %s takes effect on restart", key)
        tls = _tls_context(config)
        exports = _open_exports(config, keep=self.exports) if config.exports else []
        running = {id(e) for e in self.exports.values()}
        opened = [e for e in exports if id(e) not in running]
        metrics = self.metrics
        try:
            if config.metrics != old.metrics:
                metrics = _metrics(config, self.server)
            added = self.server.set_listeners(*_listeners(config, inherited))
        except ServeError:
            for export in opened:
                export.storage.close()
            if metrics is not None and metrics is not self.metrics:
                metrics.close()
            raise
        # Nothing fails from here on.
        logs.configure(config.log_level, config.log_format)
        self.server.set_limits(config.limits)
        self.server.set_tls(tls)
        if isinstance(self.server.table, VolumeExports):
            self.server.table.tls = config.tls_policy
        else:
            kept = {id(e) for e in exports}
            retired = [e for e in self.exports.values() if id(e) not in kept]
            self.server.replace_exports(ExportTable(exports), retired)
            self.exports = dict(zip(config.exports, exports, strict=True))
            for export in opened:
                log.info("serving export %r", export.name)
            for export in retired:
                log.info("export %r removed (open connections keep it)", export.name)
        for uri in added:
            print(f"nbs: listening on {uri}", flush=True)
        if metrics is not self.metrics:
            if self.metrics is not None:
                self.metrics.close()
            self.metrics = metrics
            self.announce_metrics()
        self.config = config


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="nbs: %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # qemu.qmp logs connection failures as errors; the CLI reports them itself, once.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":  # one-shot commands: say what failed, not every step
        logging.getLogger().setLevel(logging.WARNING)
    if args.func.__module__ == hypervisor_cli.__name__:
        return hypervisor_cli.run(args)
    if args.func.__module__ == volumes_cli.__name__:
        return volumes_cli.run(args)
    try:
        result: int = args.func(args)
    except (UsageError, ConfigError, ServeError, TLSConfigError) as err:
        print(f"nbs: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return result


if __name__ == "__main__":
    sys.exit(main())
