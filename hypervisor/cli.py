"""``nbs attach | detach | attached | xml``: the hypervisor side of the command line.

Where a volume goes is chosen by one of ``--qmp SOCKET`` (a QEMU started by hand or by an
orchestrator), ``--domain NAME [--connect URI]`` (libvirt) or ``--kernel [--host SSH]``
(/dev/nbdX on this or a remote bare-metal host).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from hypervisor import defaults
from hypervisor.errors import HypervisorError
from hypervisor.target import NbdTarget, TargetError

USAGE_ERROR = 2
FAILURE = 1


class CommandError(HypervisorError):
    """A hypervisor operation failed; exit code 1 with the message."""


class UsageError(CommandError):
    """The command cannot run as asked (e.g. a missing optional binding); exit code 2."""


LIBVIRT_MISSING = (
    "--domain needs the libvirt Python binding, which is not installed:"
    " pip install 'nbs[libvirt]' (or Debian's python3-libvirt)"
)


def _libvirt() -> ModuleType:
    """hypervisor.domain, which needs libvirt-python: only the --domain paths import it."""
    try:
        from hypervisor import domain  # noqa: PLC0415 - optional dependency
    except ModuleNotFoundError as err:
        if err.name not in ("libvirt", "libvirt_qemu"):
            raise
        raise UsageError(LIBVIRT_MISSING) from None
    return domain


def _where(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--qmp", type=Path, metavar="SOCKET", help="QEMU's QMP Unix socket")
    group.add_argument("--domain", metavar="NAME", help="libvirt domain")
    group.add_argument("--kernel", action="store_true", help="kernel nbd driver (/dev/nbdX)")
    parser.add_argument(
        "--connect",
        default=defaults.LIBVIRT_CONNECT,
        metavar="URI",
        help=f"libvirt connection URI (default {defaults.LIBVIRT_CONNECT})",
    )
    parser.add_argument("--host", metavar="[USER@]HOST[:PORT]", help="with --kernel: over SSH")
    parser.add_argument("--ssh-key", type=Path, metavar="FILE", help="--host: private key file")
    parser.add_argument(
        "--accept-new-host-key",
        action="store_true",
        help="--host: trust a host key not yet in known_hosts (and remember it)",
    )
    parser.add_argument(
        "--remote-python",
        default="python3",
        metavar="PATH",
        help="--host: the interpreter with NBS installed on the host (python3)",
    )
    parser.add_argument("--sudo", action="store_true", help="--host: run as sudo -n there")
    parser.add_argument(
        "--server",
        metavar="URI",
        help="NBS server for bare volume names (default $NBS_SERVER or nbd://127.0.0.1:10809)",
    )


def add_commands(sub: Any) -> None:
    """Register the hypervisor subcommands on the ``nbs`` parser's subparsers."""
    attach = sub.add_parser(
        "attach",
        help="attach a volume to a VM or this host",
        description="Attach WHAT (a volume name or an nbd:// / nbd+unix:// URI) to a VM.",
    )
    attach.add_argument("what", metavar="WHAT")
    _where(attach)
    attach.add_argument(
        "--reconnect-delay",
        type=int,
        default=defaults.RECONNECT_DELAY,
        metavar="SECONDS",
        help="how long QEMU holds guest I/O while the server is unreachable "
        f"(default {defaults.RECONNECT_DELAY}; libvirt: applied through the monitor, 0 = off)",
    )
    attach.add_argument("--persistent", action="store_true", help="libvirt: also in the config")
    attach.add_argument(
        "--read-only",
        action="store_true",
        help="attach it read-only (needed for read-only volumes, and to share a volume that"
        " another client holds writable)",
    )
    attach.add_argument(
        "--connections", type=int, metavar="N", help="kernel: sockets (multi-conn exports only)"
    )
    attach.add_argument("--json", action="store_true", help="--qmp/--domain: print the attachment")
    attach.set_defaults(func=cmd_attach)

    detach = sub.add_parser("detach", help="detach a volume")
    detach.add_argument("what", metavar="WHAT")
    _where(detach)
    detach.add_argument("--persistent", action="store_true", help="libvirt: also from the config")
    detach.add_argument(
        "--timeout",
        type=float,
        default=defaults.DETACH_TIMEOUT,
        metavar="SECONDS",
        help="how long to wait for the guest to release the disk",
    )
    detach.set_defaults(func=cmd_detach)

    listing = sub.add_parser("attached", help="list attached volumes")
    _where(listing)
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=cmd_attached)

    xml = sub.add_parser("xml", help="print libvirt <disk> XML for virsh attach-device")
    xml.add_argument("what", metavar="WHAT")
    xml.add_argument("--dev", default="vdb", help="target device name in the guest (vdb)")
    xml.add_argument("--read-only", action="store_true")
    xml.add_argument("--server", metavar="URI", help="NBS server for bare volume names")
    xml.set_defaults(func=cmd_xml)


def _target(args: argparse.Namespace) -> NbdTarget:
    return NbdTarget.parse(args.what, args.server)


def _volume(args: argparse.Namespace) -> str:
    """detach takes a volume name or the URI it was attached with."""
    return _target(args).volume


def _report_attached(args: argparse.Namespace, done: Any, text: str) -> None:
    """The attachment, including the serial (and so the by-id path) the guest sees."""
    if args.json:
        json.dump(dataclasses.asdict(done), sys.stdout, indent=2)
        print()
    else:
        print(f"{text} (serial {done.serial}, in the guest {done.by_id})")


def cmd_attach(args: argparse.Namespace) -> int:
    target = _target(args)
    if args.qmp:
        from hypervisor import qmp  # noqa: PLC0415 - asyncio, qemu.qmp

        done = qmp.attach(
            args.qmp, target, reconnect_delay=args.reconnect_delay, read_only=args.read_only
        )
        _report_attached(args, done, f"attached {target.uri()} as {done.device}")
    elif args.domain:
        disk = _libvirt().attach(
            args.domain,
            target,
            connect=args.connect,
            persistent=args.persistent,
            reconnect_delay=args.reconnect_delay or None,
            read_only=args.read_only,
        )
        where = f"{disk.target_dev} ({disk.alias})"
        _report_attached(args, disk, f"attached {target.uri()} to {args.domain} as {where}")
    else:
        from hypervisor import kernel_cli  # noqa: PLC0415 - kernel support is Linux-root only

        result: int = kernel_cli.attach(args, target)
        return result
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    if args.kernel:
        from hypervisor import kernel_cli  # noqa: PLC0415

        device = re.fullmatch(r"(/dev/)?nbd\d+", args.what)
        status: int = kernel_cli.detach(args, None if device else _target(args))
        return status
    volume = _volume(args)
    if args.qmp:
        from hypervisor import qmp  # noqa: PLC0415 - asyncio, qemu.qmp

        gone: object = qmp.detach(args.qmp, volume, args.timeout)
    elif args.domain:
        gone = _libvirt().detach(
            args.domain,
            volume,
            connect=args.connect,
            persistent=args.persistent,
            timeout=args.timeout,
        )
    print(f"detached {volume}" if gone is not None else f"{volume} was not attached")
    return 0


def cmd_attached(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]]
    if args.qmp:
        from hypervisor import qmp  # noqa: PLC0415 - asyncio, qemu.qmp

        rows = [dataclasses.asdict(a) for a in qmp.attached(args.qmp)]
    elif args.domain:
        disks = _libvirt().attached(args.domain, connect=args.connect)
        rows = [dataclasses.asdict(d) for d in disks]
    else:
        from hypervisor import kernel_cli  # noqa: PLC0415

        rows = kernel_cli.attached_rows(args)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    else:
        print_table(rows)
    return 0


def cmd_xml(args: argparse.Namespace) -> int:
    from hypervisor.disk_xml import disk_xml  # noqa: PLC0415 - needs no libvirt binding

    sys.stdout.write(disk_xml(_target(args), dev=args.dev, read_only=args.read_only))
    return 0


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        print("nothing attached")
        return
    columns = list(rows[0])
    cells = [[("" if r[c] is None else str(r[c])) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def run(args: argparse.Namespace) -> int:
    """Run a hypervisor subcommand, turning its errors into one line and an exit code."""
    from hypervisor.qmp import NeedsOptionError  # noqa: PLC0415

    try:
        result: int = args.func(args)
    except (TargetError, UsageError, NeedsOptionError) as err:
        print(f"nbs: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except HypervisorError as err:  # every other error of the package: see hypervisor/errors.py
        print(f"nbs: error: {err}", file=sys.stderr)
        return FAILURE
    return result
