"""The ``nbs`` command: its arguments, merged into the config for ``nbs serve``.

What runs is elsewhere: backend.serving (``nbs serve``), backend.volume_commands (``nbs
volume``/``nbs snapshot``), hypervisor.cli (attaching); this is the one seam where backend
and hypervisor meet.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

from backend import volume_commands
from backend.config import (
    DEFAULT_LISTEN,
    LOG_FORMATS,
    LOG_LEVELS,
    ConfigError,
    ExportConfig,
    MetricsConfig,
    ServeConfig,
    TLSConfig,
    load_config,
    parse_export_spec,
    parse_host_port,
    parse_max_request,
)
from backend.server.limits import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
    connection_count,
    handshake_seconds,
)
from backend.server.server import ServeError
from backend.server.tls import TLSConfigError
from backend.serving import UsageError, serve
from hypervisor import cli as hypervisor_cli

EXIT_USAGE = 2
_T = TypeVar("_T")


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
    volume_commands.add_commands(sub)
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


def cmd_serve(args: argparse.Namespace) -> int:
    # SIGHUP merges the command line into the re-read config file again.
    return serve(_merge(args), lambda: _merge(args), str(args.config or "the command line"))


def cmd_config_check(args: argparse.Namespace) -> int:
    load_config(args.file)  # a ConfigError is printed by main(), exit code 2
    print(f"{args.file}: ok")
    return 0


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
    if args.func.__module__ == volume_commands.__name__:
        return volume_commands.run(args)
    try:
        result: int = args.func(args)
    except (UsageError, ConfigError, ServeError, TLSConfigError) as err:
        print(f"nbs: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return result


if __name__ == "__main__":
    sys.exit(main())
