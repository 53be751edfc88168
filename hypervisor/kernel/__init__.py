"""Bind NBS volumes to /dev/nbdX through the kernel nbd driver (bare-metal hosts).

The kernel client does no negotiation: we do the NBD handshake in userspace
(``nbdclient.connect_transmission``) and hand the kernel sockets already in the transmission
phase, over the generic netlink family "nbd" (include/uapi/linux/nbd-netlink.h). Kernels
without that family get the old ioctl interface (NBD_SET_SOCK … NBD_DO_IT), and only they.

    attach(target)   handshake (one socket per connection; several only for CAN_MULTI_CONN
                     exports), NBD_CMD_CONNECT with BACKEND_IDENTIFIER "nbs:" + URI, then start
                     the device's supervisor. Idempotent: a device already showing that
                     identifier in /sys/block/nbdN/backend is returned as it is.
    detach(what)     stop the supervisor (by its recorded PID), NBD_CMD_DISCONNECT, forget the
                     state. Detaching what is not attached is a no-op that says so.
    attached()       connected nbd devices from sysfs, with what we recorded about them.
    status()         NBD_CMD_STATUS: every nbd device the kernel has, connected or not.

The supervisor (``python -m hypervisor.kernel supervise``, one per device, detached from the
caller's session) keeps the device alive across server restarts: it listens on the
"nbd_mc_group" multicast group and, on NBD_CMD_LINK_DEAD for its device, dials the server
again (with backoff, until a deadline), redoes the handshake and sends NBD_CMD_RECONFIGURE with
the new sockets and the same BACKEND_IDENTIFIER. The kernel holds I/O for up to
``dead_conn_timeout`` seconds meanwhile, so requests blocked in the outage complete without
error. What was attached is recorded in ``$NBS_KERNEL_STATE_DIR`` (default /run/nbs/kernel),
one ``<index>.json`` per device (target URI, backend id, supervisor PID), plus
``<index>.log``, the supervisor's log.

Modules, one per part (this package re-exports what callers use)::

    errors      KernelError and its subtree (the whole package's tree: hypervisor/errors.py)
    records     KernelDevice, DetachResult, DeviceStatus, Record; backend id, block size,
                connection count
    family      the "nbd" generic netlink family: messages (pure) and NbdNetlink
    sysfs       /sys/block/nbdN and /proc: devices, backends, live supervisors
    state       the per-device records in the state directory, and the host lock
    handshake   userspace NBD handshakes leaving sockets ready for the kernel
    ioctl       the old ioctl interface
    supervisor  the per-device supervisor process
    attaching   attach()
    detaching   detach(), attached(), status()
    cli         ``python -m hypervisor.kernel`` (__main__.py runs cli.main)
"""

from __future__ import annotations

import logging

from hypervisor.kernel.attaching import attach
from hypervisor.kernel.cli import main
from hypervisor.kernel.detaching import attached, detach, resolve_index, status
from hypervisor.kernel.errors import (
    ERRORS,
    DeviceError,
    DriverMissingError,
    ExportError,
    KernelError,
    NoSuchExportError,
    NotPermittedError,
    ServerDownError,
    SupervisorError,
    TlsUnsupportedError,
)
from hypervisor.kernel.family import Cmd, NbdAttr, NbdNetlink
from hypervisor.kernel.handshake import as_target
from hypervisor.kernel.records import (
    DEFAULT_DEAD_CONN_TIMEOUT,
    DEFAULT_TIMEOUT,
    DetachResult,
    DeviceStatus,
    Interface,
    KernelDevice,
    Record,
    backend_id_for,
    device_path,
)
from hypervisor.kernel.state import state_dir

# A library stays quiet unless its caller configures logging; the modules log as children.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "DEFAULT_DEAD_CONN_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "ERRORS",
    "Cmd",
    "DetachResult",
    "DeviceError",
    "DeviceStatus",
    "DriverMissingError",
    "ExportError",
    "Interface",
    "KernelDevice",
    "KernelError",
    "NbdAttr",
    "NbdNetlink",
    "NoSuchExportError",
    "NotPermittedError",
    "Record",
    "ServerDownError",
    "SupervisorError",
    "TlsUnsupportedError",
    "as_target",
    "attach",
    "attached",
    "backend_id_for",
    "detach",
    "device_path",
    "main",
    "resolve_index",
    "state_dir",
    "status",
]
