"""``python -m hypervisor.kernel``: attach, detach, attached, status, and the internal supervise.

With ``--json`` the answer (or the error, by class name) is JSON on stdout: what
hypervisor/remote.py reads when it runs this on another host over SSH.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hypervisor import nbdclient
from hypervisor.kernel.attaching import attach
from hypervisor.kernel.detaching import attached, detach, status
from hypervisor.kernel.errors import KernelError
from hypervisor.kernel.records import (
    DEFAULT_DEAD_CONN_TIMEOUT,
    DEFAULT_TIMEOUT,
    Record,
    device_path,
)
from hypervisor.kernel.state import DEFAULT_STATE_DIR, state_dir
from hypervisor.kernel.supervisor import supervise


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hypervisor.kernel",
        description="Bind NBS volumes to /dev/nbdX through the kernel nbd driver.",
    )
    parser.add_argument(
        "--state-dir", type=Path, help=f"default $NBS_KERNEL_STATE_DIR or {DEFAULT_STATE_DIR}"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    attach_p = sub.add_parser("attach", help="connect a volume to a free /dev/nbdN")
    attach_p.add_argument("target", help="volume name or nbd:// / nbd+unix:// URI")
    attach_p.add_argument("--connections", type=int, metavar="N")
    attach_p.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT, metavar="SECONDS")
    attach_p.add_argument(
        "--dead-conn-timeout", type=int, default=DEFAULT_DEAD_CONN_TIMEOUT, metavar="SECONDS"
    )
    attach_p.add_argument("--interface", choices=["netlink", "ioctl"])
    attach_p.add_argument("--read-only", action="store_true")
    attach_p.add_argument("--json", action="store_true")

    detach_p = sub.add_parser("detach", help="disconnect a device or volume")
    detach_p.add_argument("what", help="/dev/nbdN, nbdN, a volume name or an NBD URI")
    detach_p.add_argument("--json", action="store_true")

    attached_p = sub.add_parser("attached", help="list connected nbd devices")
    attached_p.add_argument("--json", action="store_true")

    status_p = sub.add_parser("status", help="NBD_CMD_STATUS")
    status_p.add_argument("--index", type=int)
    status_p.add_argument("--json", action="store_true")

    supervise_p = sub.add_parser("supervise", help="(internal) keep one device connected")
    supervise_p.add_argument("record", help="the device's record, as JSON")
    supervise_p.add_argument("--netlink-fd", type=int)
    supervise_p.add_argument("--sock-fd", type=int)
    supervise_p.add_argument("--revive", action="store_true")
    supervise_p.add_argument("--foreground", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    directory = args.state_dir or state_dir()
    as_json = getattr(args, "json", False)
    if args.command == "supervise":
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s supervisor: %(message)s"
        )
        return supervise(
            Record.from_json(args.record),
            directory,
            netlink_fd=args.netlink_fd,
            sock_fd=args.sock_fd,
            revive=args.revive,
            daemon=not args.foreground,
        )
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    try:
        result: Any
        if args.command == "attach":
            result = attach(
                args.target,
                connections=args.connections,
                timeout=args.timeout,
                dead_conn_timeout=args.dead_conn_timeout,
                interface=args.interface,
                state=directory,
                read_only=args.read_only,
            )
            text = f"{result.path} {result.target}"
        elif args.command == "detach":
            result = detach(args.what, state=directory)
            text = result.message
        elif args.command == "attached":
            result = attached(state=directory)
            text = "\n".join(f"{d.path} {d.size} {d.backend_id or '-'}" for d in result)
        else:
            result = status(args.index)
            text = "\n".join(
                f"{device_path(s.index)} {'connected' if s.connected else 'free'}" for s in result
            )
    except (KernelError, nbdclient.NbdClientError, ValueError) as err:
        if as_json:
            print(json.dumps({"error": {"type": type(err).__name__, "message": str(err)}}))
        else:
            print(f"error: {err}", file=sys.stderr)
        return 1
    if as_json:
        data = (
            [dataclasses.asdict(r) for r in result]
            if isinstance(result, list)
            else dataclasses.asdict(result)
        )
        print(json.dumps(data, indent=2))
    elif text:
        print(text)
    return 0
