"""The userspace side of attaching: NBD handshakes that leave sockets ready for the kernel.

The kernel client does no negotiation, so we do it (``nbdclient.connect_transmission``) and
raise nbdclient's errors again as the kernel path's own.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from hypervisor import nbdclient
from hypervisor.kernel.errors import (
    ExportError,
    NoSuchExportError,
    ServerDownError,
    TlsUnsupportedError,
)
from hypervisor.kernel.records import connection_count
from hypervisor.target import NbdTarget


def as_target(what: NbdTarget | str) -> NbdTarget:
    return what if isinstance(what, NbdTarget) else NbdTarget.parse(what)


def refuse_tls(target: NbdTarget) -> None:
    if target.tls:
        raise TlsUnsupportedError(
            f"{target.uri()}: the kernel nbd driver cannot speak TLS; "
            "serve the volume in plaintext on a trusted network, or attach it through QEMU"
        )


@contextlib.contextmanager
def export_errors() -> Iterator[None]:
    """nbdclient's errors, raised again as ours."""
    try:
        yield
    except nbdclient.ServerUnreachableError as err:
        raise ServerDownError(str(err)) from err
    except nbdclient.ExportMissingError as err:
        raise NoSuchExportError(str(err)) from err
    except nbdclient.NbdClientError as err:
        raise ExportError(str(err)) from err


def dial(target: NbdTarget) -> tuple[socket.socket, nbdclient.ExportInfo]:
    """One socket in the transmission phase."""
    refuse_tls(target)
    with export_errors():
        return nbdclient.connect_transmission(target)


def dial_many(
    target: NbdTarget, count: int | None
) -> tuple[list[socket.socket], nbdclient.ExportInfo]:
    """``count`` sockets (None: as many as the export allows) to the same export."""
    sock, info = dial(target)
    socks = [sock]
    try:
        for _ in range(connection_count(info, count) - 1):
            more, again = dial(target)
            socks.append(more)
            if again.size != info.size:
                raise ExportError(f"{target.uri()}: the export changed size while connecting")
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks, info


def probe(target: NbdTarget) -> nbdclient.ExportInfo:
    with export_errors():
        return nbdclient.probe(target)
