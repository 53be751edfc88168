"""The ``nbs`` command."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn

from backend.nbd import TLSPolicy
from backend.server.exports import Export, Exports, ExportTable
from backend.server.server import ServeError, Server, TCPAddress, UnixAddress, inherited_sockets
from backend.server.tls import TLSConfigError, TLSFiles, server_context
from backend.server.volume_exports import VolumeExports
from backend.storage import FileStorage, Storage, StorageError
from backend.volumes import cli as volumes_cli
from backend.volumes.config import (
    DEFAULT_LISTEN,
    DEFAULT_VOLUME_SIZE,
    LOG_LEVELS,
    ConfigError,
    ExportConfig,
    ServeConfig,
    TLSConfig,
    default_data_dir,
    load_config,
    parse_export_spec,
    parse_host_port,
)
from backend.volumes.model import VolumeError
from backend.volumes.service import VolumeService
from hypervisor import cli as hypervisor_cli

log = logging.getLogger("nbs")
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad arguments or configuration: one line on stderr, exit code 2."""


def _export_arg(text: str) -> ExportConfig:
    try:
        return parse_export_spec(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _listen_arg(text: str) -> str:
    try:
        parse_host_port(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


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
    serve.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration file")
    serve.add_argument(
        "--data-dir", type=Path, metavar="DIR", help="where the default volume lives"
    )
    serve.add_argument("--log-level", choices=LOG_LEVELS, help="default: info")
    serve.set_defaults(func=cmd_serve)
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
        changes["tls"] = TLSConfig(args.tls_cert, args.tls_key, args.tls_ca)
    if args.data_dir:
        changes["data_dir"] = args.data_dir
    if args.log_level:
        changes["log_level"] = args.log_level
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


def _open_exports(config: ServeConfig) -> list[Export]:
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
            try:
                storage = FileStorage(spec.path, read_only=spec.read_only)
            except StorageError as err:
                raise UsageError(f"export {spec.name!r}: {err}") from err
            opened.append(storage)
            policy = spec.tls or (TLSPolicy.ALLOWED if config.tls else TLSPolicy.OFF)
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

    def in_use(name: str) -> int:
        return server_ref[0].connections_by_export.get(name, 0) if server_ref else 0

    try:
        service = VolumeService(data_dir, serving=True, in_use=in_use)
    except VolumeError as err:
        raise UsageError(err.message) from err
    except OSError as err:
        raise UsageError(f"cannot use data directory {data_dir}: {err.strerror}") from err
    if not service.catalogue.volumes():
        service.create("default", DEFAULT_VOLUME_SIZE, description="NBS default volume")
        log.info("created volume 'default' (%d bytes, sparse) in %s", DEFAULT_VOLUME_SIZE, data_dir)
    policy = TLSPolicy.ALLOWED if config.tls else TLSPolicy.OFF
    return VolumeExports(service, tls=policy)


def cmd_serve(args: argparse.Namespace) -> int:
    config = _merge(args)
    logging.getLogger().setLevel(config.log_level.upper())
    tls = None
    if config.tls is not None:
        tls = server_context(TLSFiles(config.tls.cert, config.tls.key, config.tls.ca))
    server_ref: list[Server] = []
    table: Exports
    if config.exports:
        fixed = _open_exports(config)
        table = ExportTable(fixed)
        names = ", ".join(e.name for e in fixed)
    else:
        table = _catalogue_exports(config, server_ref)
        names = f"the volumes in {table.service.data_dir}"
    inherited = inherited_sockets()
    listen = config.listen or (() if inherited or config.sockets else (DEFAULT_LISTEN,))
    tcp = [TCPAddress(*parse_host_port(item)) for item in listen]
    server = Server(
        table,
        tcp=tcp,
        unix=[UnixAddress(p) for p in config.sockets],
        inherited=inherited,
        tls=tls,
        io_threads=config.io_threads,
    )
    server_ref.append(server)
    try:
        uris = server.bind()
    except ServeError:
        table.close()
        raise
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    for uri in uris:
        print(f"nbs: listening on {uri} (exports: {names})", flush=True)
    while not stop.wait(3600):
        pass
    clean = server.shutdown(config.shutdown_grace)
    log.info("stopped%s", "" if clean else " with errors")
    return 0 if clean else 1


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
