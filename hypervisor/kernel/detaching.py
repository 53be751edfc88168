"""Detach, and the read-only views: ``attached`` (sysfs plus our records), ``status``.

Detach stops the device's supervisor (by its recorded PID) first, so it does not reconnect,
then disconnects the device and forgets its record. Detaching what is not attached is a
no-op that says so.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from hypervisor.kernel import sysfs
from hypervisor.kernel.errors import DeviceError, NotPermittedError
from hypervisor.kernel.family import netlink_family
from hypervisor.kernel.handshake import as_target
from hypervisor.kernel.ioctl import disconnect_ioctl
from hypervisor.kernel.records import (
    DetachResult,
    DeviceStatus,
    KernelDevice,
    backend_id_for,
    device_path,
)
from hypervisor.kernel.state import load_records, locked, remove_record, state_dir
from hypervisor.kernel.supervisor import stop_supervisor
from hypervisor.kernel.sysfs import (
    describe,
    device_size,
    find_by_backend,
    is_connected,
    nbd_indexes,
    read_backend,
    supervisor_alive,
)
from hypervisor.target import NbdTarget

log = logging.getLogger(__name__)

DISCONNECT_TIMEOUT = 10.0


def resolve_index(what: KernelDevice | NbdTarget | int | str, directory: Path) -> int | None:
    """The device ``what`` names: a device, an index, /dev/nbdN, nbdN, a URI or a volume."""
    if isinstance(what, KernelDevice):
        return what.index
    if isinstance(what, int):
        return what
    if isinstance(what, str):
        match = re.fullmatch(r"(?:/dev/)?nbd(\d+)", what)
        if match:
            return int(match.group(1))
    backend_id = backend_id_for(as_target(what))
    index = find_by_backend(backend_id)
    if index is not None:
        return index
    return next(
        (r.index for r in load_records(directory).values() if r.backend_id == backend_id), None
    )


def detach(
    what: KernelDevice | NbdTarget | int | str, *, state: Path | None = None
) -> DetachResult:
    """Stop the device's supervisor, disconnect it, forget it; a no-op if it is not attached."""
    directory = state or state_dir()
    index = resolve_index(what, directory)
    name = what.path if isinstance(what, KernelDevice) else str(what)
    if isinstance(what, NbdTarget):
        name = what.uri()
    if index is None:
        return DetachResult(False, f"{name} is not attached")
    with locked(directory):
        record = load_records(directory).get(index)
        backend_id = read_backend(index) or (record.backend_id if record else None)
        if not is_connected(index):
            if record is None:
                return DetachResult(False, f"{device_path(index)} is not connected", index)
            stop_supervisor(record.pid, index)
            remove_record(directory, index)
            message = f"{device_path(index)} was already disconnected; forgot its state"
            return DetachResult(False, message, index, backend_id)
        if not sysfs.has_cap_sys_admin():
            raise NotPermittedError("detaching an nbd device needs root (CAP_SYS_ADMIN)")
        if record is not None and record.interface == "ioctl":
            disconnect_ioctl(index)  # its supervisor leaves NBD_DO_IT and exits
            _wait_disconnected(index, record.pid)
        else:
            if record is not None:
                stop_supervisor(record.pid, index)  # first, or it would reconnect
            with netlink_family() as nl:
                nl.disconnect(index)
            _wait_disconnected(index, None)
        remove_record(directory, index)
    log.info("detached %s", device_path(index))
    return DetachResult(True, f"detached {device_path(index)}", index, backend_id)


def _wait_disconnected(index: int, pid: int | None) -> None:
    deadline = time.monotonic() + DISCONNECT_TIMEOUT
    while is_connected(index) or (pid is not None and supervisor_alive(pid, index)):
        if time.monotonic() > deadline:
            raise DeviceError(
                f"{device_path(index)} is still connected: is it mounted or held open?"
            )
        time.sleep(0.05)


def attached(*, state: Path | None = None) -> list[KernelDevice]:
    """Connected nbd devices (from sysfs) with what we recorded about them.

    Needs neither root nor the nbd module: without it the answer is [].
    """
    records = load_records(state or state_dir())
    devices = []
    for index in nbd_indexes():
        if not is_connected(index):
            continue
        backend = read_backend(index)
        record = records.get(index)
        if record is not None and (record.interface == "ioctl" or backend == record.backend_id):
            devices.append(describe(record))
        else:
            devices.append(KernelDevice(index, device_path(index), device_size(index), backend))
    return devices


def status(index: int | None = None) -> list[DeviceStatus]:
    """NBD_CMD_STATUS: every nbd device the kernel has (or just ``index``)."""
    with netlink_family() as nl:
        return nl.status(index)
