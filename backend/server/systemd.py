"""The service manager's notification protocol (sd_notify(3)), with the standard library only.

``nbs serve`` tells systemd (Type=notify) when it is ready, reloading and stopping, and what it
is doing (STATUS=).  Without $NOTIFY_SOCKET every call is a no-op that returns False, so the
server runs the same way by hand, under a test, or under another supervisor.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``state`` (``"READY=1"``, ``"STATUS=..."``, lines joined by ``\\n``) to systemd.

    Returns True if the datagram was sent, False if there is no $NOTIFY_SOCKET (not started by
    systemd, or NotifyAccess=none) or it cannot be reached.  Never raises: a supervisor that
    went away must not take the server down with it.
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    elif not address.startswith("/"):
        return False  # unset, or a transport this implementation does not speak (vsock:)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as err:
        log.debug("cannot notify the service manager at %r: %s", address, err)
        return False
    return True


def reloading() -> str:
    """The RELOADING=1 message; MONOTONIC_USEC lets systemd (>= 253) match it to the reload."""
    return f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
