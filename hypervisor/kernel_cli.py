"""``nbs attach|detach|attached --kernel [--host SSH]``: the kernel nbd paths of the CLI."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from hypervisor import kernel, remote
from hypervisor.target import NbdTarget


def _ssh(args: argparse.Namespace) -> remote.SshOptions:
    return remote.SshOptions(
        key_filename=args.ssh_key,
        accept_new_host_key=args.accept_new_host_key,
        python=args.remote_python,
        sudo=args.sudo,
    )


def attach(args: argparse.Namespace, target: NbdTarget) -> int:
    if args.host:
        device = remote.remote_attach(
            args.host,
            target,
            connections=args.connections,
            read_only=args.read_only,
            ssh=_ssh(args),
        )
    else:
        device = kernel.attach(target, connections=args.connections, read_only=args.read_only)
    where = f" on {args.host}" if args.host else ""
    print(f"attached {target.uri()} as {device.path}{where}")
    return 0


def detach(args: argparse.Namespace, target: NbdTarget | None) -> int:
    """Detach by device (/dev/nbdN, nbdN) or by the volume / URI it was attached with."""
    what: NbdTarget | str = target if target is not None else args.what
    result = (
        remote.remote_detach(args.host, what, ssh=_ssh(args)) if args.host else kernel.detach(what)
    )
    print(result.message)
    return 0


def attached_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    devices = remote.remote_attached(args.host, ssh=_ssh(args)) if args.host else kernel.attached()
    return [dataclasses.asdict(d) for d in devices]
