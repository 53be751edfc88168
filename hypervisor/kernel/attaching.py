"""Attach: connect a volume to a free /dev/nbdN and start its supervisor.

Idempotent: a device already showing the volume's identifier in /sys/block/nbdN/backend is
returned as it is (given a supervisor again if it lost its own). Netlink where the kernel
has the family, else (or when asked) the ioctl interface.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

from hypervisor import nbdclient
from hypervisor.kernel import handshake, sysfs
from hypervisor.kernel.errors import (
    DeviceError,
    DriverMissingError,
    ExportError,
    KernelError,
    NotPermittedError,
)
from hypervisor.kernel.family import NbdNetlink, netlink_family
from hypervisor.kernel.records import (
    DEFAULT_DEAD_CONN_TIMEOUT,
    DEFAULT_TIMEOUT,
    Interface,
    KernelDevice,
    Record,
    backend_id_for,
    block_size_for,
    connection_count,
    device_path,
)
from hypervisor.kernel.state import load_records, locked, remove_record, save_record, state_dir
from hypervisor.kernel.supervisor import (
    SUPERVISOR_START_TIMEOUT,
    log_tail,
    start_supervisor,
    stop_supervisor,
)
from hypervisor.kernel.sysfs import (
    describe,
    device_size,
    driver_loaded,
    find_by_backend,
    is_connected,
    nbd_indexes,
    read_backend,
    supervisor_alive,
)
from hypervisor.netlink import FamilyNotFoundError
from hypervisor.target import NbdTarget

log = logging.getLogger(__name__)


def _open_netlink(interface: Interface | None) -> NbdNetlink | None:
    """The netlink family, or None where only the ioctl interface exists (or is asked for)."""
    if interface == "netlink" or (interface is None and not driver_loaded()):
        return netlink_family()
    if interface == "ioctl":
        if not driver_loaded():
            raise DriverMissingError("the nbd kernel module is not loaded: run `modprobe nbd`")
        return None
    try:
        return NbdNetlink.open()
    except FamilyNotFoundError:
        log.info("no nbd netlink family: using the ioctl interface")
        return None


def attach(
    target: NbdTarget | str,
    *,
    connections: int | None = None,
    timeout: int = DEFAULT_TIMEOUT,
    dead_conn_timeout: int = DEFAULT_DEAD_CONN_TIMEOUT,
    interface: Interface | None = None,
    state: Path | None = None,
    read_only: bool = False,
) -> KernelDevice:
    """Connect the volume to a free /dev/nbdN (or return the device that already has it).

    ``connections``: sockets to use (default: min(4, CPUs) if the export advertises
    CAN_MULTI_CONN, else 1). ``timeout``: seconds before a request without reply marks its
    connection dead (the supervisor then reconnects). ``dead_conn_timeout``: seconds the
    kernel holds I/O while no connection is alive, and how long the supervisor keeps trying.
    ``interface``: force "netlink" or "ioctl" (default: netlink where the kernel has it).
    ``read_only``: a read-only device; without it, an export the server offers read-only
    (a read-only volume, or one another client holds writable) is refused.
    """
    target = handshake.as_target(target)
    handshake.refuse_tls(target)
    directory = state or state_dir()
    backend_id = backend_id_for(target)
    if not sysfs.has_cap_sys_admin():
        raise NotPermittedError("attaching an nbd device needs root (CAP_SYS_ADMIN)")
    with locked(directory):
        existing = _existing(backend_id, directory)
        if existing is not None:
            return _ensure_supervised(existing, target, directory, connections)
        nl = _open_netlink(interface)
        if nl is None:
            return _attach_ioctl(
                target,
                backend_id,
                connections=connections,
                timeout=timeout,
                directory=directory,
                read_only=read_only,
            )
        with nl:
            return _attach_netlink(
                nl,
                target=target,
                backend_id=backend_id,
                connections=connections,
                timeout=timeout,
                dead_conn_timeout=dead_conn_timeout,
                directory=directory,
                read_only=read_only,
            )


def _existing(backend_id: str, directory: Path) -> Record | KernelDevice | None:
    """What already serves this volume: our record, or a bare device showing its id."""
    for record in load_records(directory).values():
        if record.backend_id != backend_id or not is_connected(record.index):
            continue
        if record.interface == "ioctl" or read_backend(record.index) == backend_id:
            return record
    index = find_by_backend(backend_id)
    if index is None:
        return None
    return KernelDevice(index, device_path(index), device_size(index), backend_id)


def _ensure_supervised(
    existing: Record | KernelDevice,
    target: NbdTarget,
    directory: Path,
    connections: int | None,
) -> KernelDevice:
    """Return the device already attached; give it a supervisor again if it lost its own."""
    if isinstance(existing, Record):
        record = existing
        if record.interface == "ioctl" or supervisor_alive(record.pid, record.index):
            log.info("%s is already attached as %s", target.uri(), device_path(record.index))
            return describe(record)
    else:
        # Attached with our identifier but no record (state lost): adopt it.
        info = handshake.probe(target)
        record = Record(
            index=existing.index,
            target=target.uri(),
            backend_id=backend_id_for(target),
            interface="netlink",
            connections=connection_count(info, connections),
            size=existing.size,
            block_size=block_size_for(info),
            flags=info.flags,
            timeout=DEFAULT_TIMEOUT,
            dead_conn_timeout=DEFAULT_DEAD_CONN_TIMEOUT,
        )
    log.info(
        "%s is attached but unsupervised: restarting its supervisor", device_path(record.index)
    )
    # A supervisor that starts late may have missed LINK_DEAD: it revives the device first.
    pid = start_supervisor(record, directory, revive=True)
    record = dataclasses.replace(record, pid=pid)
    save_record(directory, record)
    return describe(record)


def _attach_netlink(
    nl: NbdNetlink,
    *,
    target: NbdTarget,
    backend_id: str,
    connections: int | None,
    timeout: int,
    dead_conn_timeout: int,
    directory: Path,
    read_only: bool,
) -> KernelDevice:
    socks, info = handshake.dial_many(target, connections)
    try:
        with handshake.export_errors():
            nbdclient.require_access(target, info, read_only=read_only)
    except ExportError:
        for sock in socks:
            sock.close()
        raise
    # Subscribed before CONNECT and handed to the supervisor: no LINK_DEAD goes unheard.
    watch = NbdNetlink.open()
    try:
        watch.subscribe()
        block_size = block_size_for(info)
        index = nl.connect(
            fds=[s.fileno() for s in socks],
            size=info.size,
            block_size=block_size,
            server_flags=info.flags,
            timeout=timeout,
            dead_conn_timeout=dead_conn_timeout,
            backend_id=backend_id,
        )
        for s in socks:  # the kernel holds its own references now
            s.close()
        record = Record(
            index=index,
            target=target.uri(),
            backend_id=backend_id,
            interface="netlink",
            connections=len(socks),
            size=info.size,
            block_size=block_size,
            flags=info.flags,
            timeout=timeout,
            dead_conn_timeout=dead_conn_timeout,
        )
        try:
            pid = start_supervisor(record, directory, netlink_fd=watch.fileno())
            record = dataclasses.replace(record, pid=pid)
            save_record(directory, record)
        except BaseException:
            with contextlib.suppress(KernelError):
                nl.disconnect(index)
            raise
    finally:
        watch.close()
        for s in socks:
            s.close()
    log.info("attached %s as %s (%d connection(s))", target.uri(), device_path(index), len(socks))
    return describe(record)


def _attach_ioctl(
    target: NbdTarget,
    backend_id: str,
    *,
    connections: int | None,
    timeout: int,
    directory: Path,
    read_only: bool,
) -> KernelDevice:
    if connections not in (None, 1):
        raise KernelError("the ioctl interface takes one connection")
    index = next((i for i in nbd_indexes() if not is_connected(i) and not device_size(i)), None)
    if index is None:
        raise DeviceError("no free /dev/nbdN (load the module with more: nbds_max=N)")
    sock, info = handshake.dial(target)
    try:
        with handshake.export_errors():
            nbdclient.require_access(target, info, read_only=read_only)
        record = Record(
            index=index,
            target=target.uri(),
            backend_id=backend_id,
            interface="ioctl",
            connections=1,
            size=info.size,
            block_size=block_size_for(info),
            flags=info.flags,
            timeout=timeout,
            dead_conn_timeout=0,
        )
        pid = start_supervisor(record, directory, sock_fd=sock.fileno())
    finally:
        sock.close()
    record = dataclasses.replace(record, pid=pid)
    save_record(directory, record)
    deadline = time.monotonic() + SUPERVISOR_START_TIMEOUT
    while not is_connected(index):  # NBD_DO_IT starts the device in the supervisor
        if time.monotonic() > deadline or not supervisor_alive(pid, index):
            stop_supervisor(pid, index)
            remove_record(directory, index)
            raise DeviceError(f"{device_path(index)} did not start: {log_tail(directory, index)}")
        time.sleep(0.05)
    log.info("attached %s as %s (ioctl)", target.uri(), device_path(index))
    return describe(record)
