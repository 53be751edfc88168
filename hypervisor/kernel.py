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

Errors::

    KernelError                  anything this module refuses or fails at
    ├── DriverMissingError       no nbd driver loaded: ``modprobe nbd``
    ├── NotPermittedError        needs root (CAP_SYS_ADMIN)
    ├── TlsUnsupportedError      nbds:// targets: the kernel client speaks plaintext only
    ├── ExportError              the export cannot be used (the handshake's message)
    │   ├── ServerDownError      nothing answers at the server's address
    │   └── NoSuchExportError    the server has no such export
    ├── DeviceError              the kernel refused a command (``errno`` set), or a device
    │                            did not come up or go away as asked
    └── SupervisorError          the supervisor could not be started
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import enum
import errno
import fcntl
import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from hypervisor import nbdclient
from hypervisor.netlink import (
    Attr,
    FamilyNotFoundError,
    GenlMessage,
    GenlSocket,
    NetlinkError,
    NotificationsLostError,
    find,
    iter_nested,
    nested,
    string,
    u32,
    u64,
)
from hypervisor.target import NbdTarget

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())

FAMILY = "nbd"
MCAST_GROUP = "nbd_mc_group"
GENL_VERSION = 1
BACKEND_PREFIX = "nbs:"

DEFAULT_TIMEOUT = 30  # s before a request with no reply counts its connection as dead
DEFAULT_DEAD_CONN_TIMEOUT = 120  # s the kernel holds I/O while every connection is down
MAX_AUTO_CONNECTIONS = 4
MIN_BLOCK, MAX_BLOCK = 512, 4096  # what the kernel accepts (blk_validate_block_size)

SYS_BLOCK = Path("/sys/block")
SYS_MODULE = Path("/sys/module/nbd")
DEV = Path("/dev")
PROC = Path("/proc")
DEFAULT_STATE_DIR = Path("/run/nbs/kernel")

SUPERVISOR_START_TIMEOUT = 20.0
SUPERVISOR_STOP_TIMEOUT = 10.0
DISCONNECT_TIMEOUT = 10.0
CHECK_INTERVAL = 5.0  # s between the supervisor's checks that its device is still there
LINK_DEAD_GATHER = 0.2  # s to wait for the other connections' LINK_DEAD after the first
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0

Interface = Literal["netlink", "ioctl"]


class Cmd(enum.IntEnum):
    """NBD_CMD_* of the generic netlink family (not the NBD wire commands)."""

    CONNECT = 1
    DISCONNECT = 2
    RECONFIGURE = 3
    LINK_DEAD = 4
    STATUS = 5


class NbdAttr(enum.IntEnum):
    """NBD_ATTR_*: INDEX is a u32, the numbers u64, BACKEND_IDENTIFIER a string."""

    INDEX = 1
    SIZE_BYTES = 2
    BLOCK_SIZE_BYTES = 3
    TIMEOUT = 4
    SERVER_FLAGS = 5
    CLIENT_FLAGS = 6
    SOCKETS = 7
    DEAD_CONN_TIMEOUT = 8
    DEVICE_LIST = 9
    BACKEND_IDENTIFIER = 10


SOCK_ITEM = 1  # NBD_SOCK_ITEM in SOCKETS, holding
SOCK_FD = 1  # NBD_SOCK_FD (u32)
DEVICE_ITEM = 1  # NBD_DEVICE_ITEM in DEVICE_LIST, holding
DEVICE_INDEX = 1  # NBD_DEVICE_INDEX (u32) and
DEVICE_CONNECTED = 2  # NBD_DEVICE_CONNECTED (u8)


class Ioctl(enum.IntEnum):
    """include/uapi/linux/nbd.h: _IO(0xab, n)."""

    SET_SOCK = 0xAB00
    SET_BLKSIZE = 0xAB01
    SET_SIZE = 0xAB02
    DO_IT = 0xAB03
    CLEAR_SOCK = 0xAB04
    CLEAR_QUE = 0xAB05
    DISCONNECT = 0xAB08
    SET_TIMEOUT = 0xAB09
    SET_FLAGS = 0xAB0A


# -- errors -------------------------------------------------------------------------------


class KernelError(Exception):
    """The kernel nbd fallback refused or failed; the message says why in operator terms."""


class DriverMissingError(KernelError):
    """No nbd driver in the running kernel."""


class NotPermittedError(KernelError):
    """The nbd driver wants CAP_SYS_ADMIN."""


class TlsUnsupportedError(KernelError):
    """The kernel's NBD client has no TLS."""


class ExportError(KernelError):
    """The export cannot be used (server down, no such export, refused handshake)."""


class ServerDownError(ExportError):
    """Nothing answers at the server's address."""


class NoSuchExportError(ExportError):
    """The server answered but has no such export."""


class DeviceError(KernelError):
    """The kernel refused a command, or a device did not change state as asked."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class SupervisorError(KernelError):
    """The supervisor process did not start."""


ERRORS: dict[str, type[KernelError]] = {
    cls.__name__: cls
    for cls in (
        KernelError,
        DriverMissingError,
        NotPermittedError,
        TlsUnsupportedError,
        ExportError,
        ServerDownError,
        NoSuchExportError,
        DeviceError,
        SupervisorError,
    )
}


# -- results ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelDevice:
    """A connected /dev/nbdN and what we know of it."""

    index: int
    path: str
    size: int
    backend_id: str | None  # /sys/block/nbdN/backend (None: not set, or ioctl-attached)
    target: str | None = None  # the NBD URI, if we attached it
    supervisor_pid: int | None = None  # None: no live supervisor
    connections: int | None = None
    interface: Interface | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KernelDevice:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class DetachResult:
    detached: bool  # False: there was nothing to detach
    message: str
    index: int | None = None
    backend_id: str | None = None


@dataclasses.dataclass(frozen=True)
class DeviceStatus:
    index: int
    connected: bool


@dataclasses.dataclass(frozen=True)
class Record:
    """What we keep about one attached device: ``<state dir>/<index>.json``.

    It is also the supervisor's brief (passed on its command line, without ``pid``).
    """

    index: int
    target: str
    backend_id: str
    interface: Interface
    connections: int
    size: int
    block_size: int
    flags: int
    timeout: int
    dead_conn_timeout: int
    pid: int | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Record:
        data = json.loads(text)
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def device_path(index: int) -> str:
    return f"/dev/nbd{index}"


def backend_id_for(target: NbdTarget) -> str:
    """The stable identifier of a volume: what /sys/block/nbdN/backend shows."""
    return BACKEND_PREFIX + target.uri()


def block_size_for(info: nbdclient.ExportInfo) -> int:
    """The export's preferred block size, within what the kernel accepts, never below its min."""
    size = max(min(info.preferred_block, MAX_BLOCK), MIN_BLOCK, info.min_block)
    if size > MAX_BLOCK or size & (size - 1):
        raise ExportError(
            f"the export needs {info.min_block}-byte blocks; the kernel nbd driver takes "
            f"power-of-two sizes from {MIN_BLOCK} to {MAX_BLOCK}"
        )
    return size


def connection_count(info: nbdclient.ExportInfo, requested: int | None) -> int:
    """How many sockets to give the kernel: several only if the export allows multi-conn."""
    if requested is not None:
        if requested < 1:
            raise KernelError(f"connections must be at least 1, not {requested}")
        if requested > 1 and not info.multi_conn:
            raise ExportError(
                f"the export does not advertise CAN_MULTI_CONN: {requested} connections "
                "could see each other's writes out of order; use one"
            )
        return requested
    if not info.multi_conn:
        return 1
    return max(1, min(MAX_AUTO_CONNECTIONS, os.cpu_count() or 1))


# -- netlink messages (pure: unit-tested byte by byte) --------------------------------------


def sockets_attr(fds: Sequence[int]) -> Attr:
    return nested(NbdAttr.SOCKETS, [nested(SOCK_ITEM, [u32(SOCK_FD, fd)]) for fd in fds])


def connect_attrs(
    *,
    fds: Sequence[int],
    size: int,
    block_size: int,
    server_flags: int,
    timeout: int,
    dead_conn_timeout: int,
    backend_id: str,
    index: int | None = None,
) -> list[Attr]:
    """NBD_CMD_CONNECT: without ``index`` the kernel picks (or creates) a free device."""
    attrs = [] if index is None else [u32(NbdAttr.INDEX, index)]
    return [
        *attrs,
        u64(NbdAttr.SIZE_BYTES, size),
        u64(NbdAttr.BLOCK_SIZE_BYTES, block_size),
        u64(NbdAttr.SERVER_FLAGS, server_flags),
        u64(NbdAttr.TIMEOUT, timeout),
        u64(NbdAttr.DEAD_CONN_TIMEOUT, dead_conn_timeout),
        string(NbdAttr.BACKEND_IDENTIFIER, backend_id),
        sockets_attr(fds),
    ]


def reconfigure_attrs(*, index: int, fds: Sequence[int], backend_id: str) -> list[Attr]:
    """NBD_CMD_RECONFIGURE: the kernel swaps each new socket in for a dead one.

    It insists on the same BACKEND_IDENTIFIER as at CONNECT. A socket with no dead one left
    to replace is dropped without error (nbd_reconnect_socket's -ENOSPC is swallowed).
    """
    return [
        u32(NbdAttr.INDEX, index),
        string(NbdAttr.BACKEND_IDENTIFIER, backend_id),
        sockets_attr(fds),
    ]


def disconnect_attrs(index: int) -> list[Attr]:
    return [u32(NbdAttr.INDEX, index)]


def status_attrs(index: int | None = None) -> list[Attr]:
    return [] if index is None else [u32(NbdAttr.INDEX, index)]


def parse_status(replies: Sequence[GenlMessage]) -> list[DeviceStatus]:
    found = []
    for reply in replies:
        for fields in iter_nested(reply.attr(NbdAttr.DEVICE_LIST), DEVICE_ITEM):
            index = find(fields, DEVICE_INDEX)
            connected = find(fields, DEVICE_CONNECTED)
            if index is not None:
                found.append(
                    DeviceStatus(index.as_u32(), connected is not None and connected.as_u8() != 0)
                )
    return sorted(found, key=lambda s: s.index)


def link_dead_indexes(messages: Sequence[GenlMessage], family: int) -> list[int]:
    """The devices named by NBD_CMD_LINK_DEAD notifications (one per dead connection)."""
    found = []
    for message in messages:
        if message.family == family and message.cmd == Cmd.LINK_DEAD:
            index = message.attr(NbdAttr.INDEX)
            if index is not None:
                found.append(index.as_u32())
    return found


class NbdNetlink:
    """The "nbd" generic netlink family on one socket (owned: ``close`` closes it)."""

    def __init__(self, sock: GenlSocket) -> None:
        self.sock = sock
        try:
            self.family = sock.family(FAMILY)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def open(cls, fd: int | None = None) -> NbdNetlink:
        """Resolve the family; ``FamilyNotFoundError`` if the kernel has none."""
        return cls(GenlSocket() if fd is None else GenlSocket.from_fd(fd))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NbdNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def subscribe(self) -> None:
        group = self.family.groups.get(MCAST_GROUP)
        if group is None:
            raise DeviceError(f"the nbd driver has no {MCAST_GROUP!r} multicast group")
        self.sock.subscribe(group)

    def request(self, cmd: Cmd, attrs: Sequence[Attr]) -> list[GenlMessage]:
        try:
            return self.sock.request(self.family.id, cmd, attrs, version=GENL_VERSION)
        except NetlinkError as err:
            if err.errno == errno.EPERM:
                raise NotPermittedError(f"NBD_CMD_{cmd.name} needs root (CAP_SYS_ADMIN)") from err
            raise DeviceError(
                f"the kernel refused NBD_CMD_{cmd.name}: {os.strerror(err.errno or 0)} (see dmesg)",
                err.errno,
            ) from err

    def connect(self, **kwargs: Any) -> int:
        """NBD_CMD_CONNECT (``connect_attrs`` arguments); returns the device index."""
        replies = self.request(Cmd.CONNECT, connect_attrs(**kwargs))
        for reply in replies:
            index = reply.attr(NbdAttr.INDEX)
            if index is not None:
                return index.as_u32()
        raise DeviceError("NBD_CMD_CONNECT succeeded but the kernel named no device")

    def reconfigure(self, index: int, fds: Sequence[int], backend_id: str) -> None:
        self.request(
            Cmd.RECONFIGURE, reconfigure_attrs(index=index, fds=fds, backend_id=backend_id)
        )

    def disconnect(self, index: int) -> None:
        self.request(Cmd.DISCONNECT, disconnect_attrs(index))

    def status(self, index: int | None = None) -> list[DeviceStatus]:
        return parse_status(self.request(Cmd.STATUS, status_attrs(index)))

    def link_dead(self, timeout: float | None) -> list[int]:
        """Indexes from LINK_DEAD notifications ([] on timeout); ``NotificationsLostError``."""
        return link_dead_indexes(self.sock.receive(timeout), self.family.id)


# -- sysfs and the process table ----------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def nbd_indexes() -> list[int]:
    """Every nbd device the kernel has (connected or not), from /sys/block."""
    found = []
    with contextlib.suppress(OSError):
        for entry in SYS_BLOCK.iterdir():
            match = re.fullmatch(r"nbd(\d+)", entry.name)
            if match:
                found.append(int(match.group(1)))
    return sorted(found)


def is_connected(index: int) -> bool:
    """The kernel creates /sys/block/nbdN/pid when the device starts, removes it when it ends."""
    return (SYS_BLOCK / f"nbd{index}" / "pid").exists()


def read_backend(index: int) -> str | None:
    value = _read(SYS_BLOCK / f"nbd{index}" / "backend")
    return value or None


def device_size(index: int) -> int:
    sectors = _read(SYS_BLOCK / f"nbd{index}" / "size")
    return int(sectors) * 512 if sectors and sectors.isdigit() else 0


def find_by_backend(backend_id: str) -> int | None:
    """The connected device showing that backend identifier, if any."""
    for index in nbd_indexes():
        if read_backend(index) == backend_id and is_connected(index):
            return index
    return None


def driver_loaded() -> bool:
    return SYS_MODULE.exists() or bool(nbd_indexes())


def has_cap_sys_admin() -> bool:
    status = _read(PROC / "self" / "status") or ""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << 21))
    return os.geteuid() == 0


def supervisor_alive(pid: int | None, index: int) -> bool:
    """Whether ``pid`` is running and is the supervisor of device ``index`` (not a reused PID)."""
    if pid is None:
        return False
    stat = _read(PROC / str(pid) / "stat")
    if stat is None or stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]:
        return False
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
        brief = argv[argv.index(b"supervise") + 1]
        return b"hypervisor.kernel" in argv and Record.from_json(brief.decode()).index == index
    except (OSError, ValueError, IndexError, TypeError, KeyError):
        return False


# -- state ----------------------------------------------------------------------------------


def state_dir() -> Path:
    return Path(os.environ.get("NBS_KERNEL_STATE_DIR") or DEFAULT_STATE_DIR)


def record_path(directory: Path, index: int) -> Path:
    return directory / f"{index}.json"


def save_record(directory: Path, record: Record) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = record_path(directory, record.index)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(record.to_json() + "\n")
    os.replace(tmp, path)


def load_records(directory: Path) -> dict[int, Record]:
    """Every readable record, by device index (unreadable ones are logged and skipped)."""
    records: dict[int, Record] = {}
    with contextlib.suppress(OSError):
        for path in sorted(directory.glob("*.json")):
            try:
                record = Record.from_json(path.read_text())
            except (OSError, ValueError, TypeError) as err:
                log.warning("ignoring unreadable state file %s: %s", path, err)
                continue
            records[record.index] = record
    return records


def remove_record(directory: Path, index: int, *, pid: int | None = None) -> None:
    """Forget device ``index`` (only if the record still names ``pid``, when one is given)."""
    path = record_path(directory, index)
    if pid is not None:
        current = load_records(directory).get(index)
        if current is None or current.pid != pid:
            return
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """One attach or detach at a time on this host."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(directory / ".lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise KernelError(f"cannot use the state directory {directory}: {err.strerror}") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- attach ---------------------------------------------------------------------------------


def as_target(what: NbdTarget | str) -> NbdTarget:
    return what if isinstance(what, NbdTarget) else NbdTarget.parse(what)


def refuse_tls(target: NbdTarget) -> None:
    if target.tls:
        raise TlsUnsupportedError(
            f"{target.uri()}: the kernel nbd driver cannot speak TLS; "
            "serve the volume in plaintext on a trusted network, or attach it through QEMU"
        )


@contextlib.contextmanager
def _export_errors() -> Iterator[None]:
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
    with _export_errors():
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


def netlink_family() -> NbdNetlink:
    """The "nbd" netlink family; ``DriverMissingError`` if the kernel has none."""
    try:
        return NbdNetlink.open()
    except FamilyNotFoundError:
        raise DriverMissingError(
            "the nbd kernel module is not loaded: run `modprobe nbd` (as root)"
        ) from None


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
    target = as_target(target)
    refuse_tls(target)
    directory = state or state_dir()
    backend_id = backend_id_for(target)
    if not has_cap_sys_admin():
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
            return _device(record)
    else:
        # Attached with our identifier but no record (state lost): adopt it.
        info = _probe(target)
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
    return _device(record)


def _probe(target: NbdTarget) -> nbdclient.ExportInfo:
    with _export_errors():
        return nbdclient.probe(target)


def _device(record: Record) -> KernelDevice:
    pid = record.pid if supervisor_alive(record.pid, record.index) else None
    return KernelDevice(
        index=record.index,
        path=device_path(record.index),
        size=device_size(record.index) or record.size,
        backend_id=read_backend(record.index) or record.backend_id,
        target=record.target,
        supervisor_pid=pid,
        connections=record.connections,
        interface=record.interface,
    )


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
    socks, info = dial_many(target, connections)
    try:
        with _export_errors():
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
    return _device(record)


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
    sock, info = dial(target)
    try:
        with _export_errors():
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
            _stop_supervisor(pid, index)
            remove_record(directory, index)
            raise DeviceError(f"{device_path(index)} did not start: {_log_tail(directory, index)}")
        time.sleep(0.05)
    log.info("attached %s as %s (ioctl)", target.uri(), device_path(index))
    return _device(record)


# -- the supervisor process -----------------------------------------------------------------


def _log_tail(directory: Path, index: int, lines: int = 5) -> str:
    text = _read(directory / f"{index}.log") or "(no log)"
    return " | ".join(text.splitlines()[-lines:])


def _child_env() -> dict[str, str]:
    """Our environment, with this checkout importable whatever the supervisor's cwd."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def start_supervisor(
    record: Record,
    directory: Path,
    *,
    netlink_fd: int | None = None,
    sock_fd: int | None = None,
    revive: bool = False,
) -> int:
    """Start the device's supervisor, detached from us; returns its PID once it is ready."""
    brief = dataclasses.replace(record, pid=None).to_json()
    argv = [sys.executable, "-m", "hypervisor.kernel", "--state-dir", str(directory)]
    argv += ["supervise", brief]
    fds: list[int] = []
    if netlink_fd is not None:
        argv += ["--netlink-fd", str(netlink_fd)]
        fds.append(netlink_fd)
    if sock_fd is not None:
        argv += ["--sock-fd", str(sock_fd)]
        fds.append(sock_fd)
    if revive:
        argv.append("--revive")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with (directory / f"{record.index}.log").open("ab") as logfile:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=logfile,
            pass_fds=fds,
            start_new_session=True,
            cwd="/",
            env=_child_env(),
        )
    assert process.stdout is not None
    # The process forks: the supervisor proper says "ready PID", the parent exits at once.
    line = b""
    deadline = time.monotonic() + SUPERVISOR_START_TIMEOUT
    with process.stdout:
        fd = process.stdout.fileno()
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                chunk = os.read(fd, 256)
                if not chunk:
                    break
                line += chunk
    try:
        process.wait(SUPERVISOR_START_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    match = re.fullmatch(rb"ready (\d+)\n", line)
    if match is None:
        raise SupervisorError(
            f"the supervisor of {device_path(record.index)} did not start: "
            f"{_log_tail(directory, record.index)}"
        )
    return int(match.group(1))


def _stop_supervisor(pid: int | None, index: int) -> bool:
    """SIGTERM the recorded supervisor of device ``index`` (never another process)."""
    if not supervisor_alive(pid, index):
        return False
    assert pid is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + SUPERVISOR_STOP_TIMEOUT
    while supervisor_alive(pid, index):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return True


def _on_sigterm(signum: int, frame: object) -> None:
    log.info("stopped by signal %d", signum)
    raise SystemExit(0)


class Supervisor:
    """Keeps one netlink-attached device connected: re-dials on LINK_DEAD, RECONFIGUREs."""

    def __init__(self, record: Record, nl: NbdNetlink, directory: Path) -> None:
        self.record = record
        self.nl = nl
        self.directory = directory
        self.target = NbdTarget.parse(record.target)
        self.give_up_after = float(max(record.dead_conn_timeout, 10))

    def run(self) -> int:
        index = self.record.index
        while True:
            try:
                dead = self.nl.link_dead(CHECK_INTERVAL).count(index)
            except NotificationsLostError:
                log.warning("notifications were lost: reconnecting to be safe")
                dead = self.record.connections
            if dead:
                dead += self._gather(LINK_DEAD_GATHER)
                log.info("%d connection(s) of %s died", dead, device_path(index))
                if not self.reconnect(min(dead, self.record.connections)):
                    return 1
            elif read_backend(index) != self.record.backend_id or not is_connected(index):
                log.info("%s was disconnected: exiting", device_path(index))
                remove_record(self.directory, index, pid=os.getpid())
                return 0

    def _gather(self, window: float) -> int:
        """More LINK_DEAD for our device arriving within ``window`` seconds (multi-conn)."""
        count = 0
        deadline = time.monotonic() + window
        while (left := deadline - time.monotonic()) > 0:
            try:
                count += self.nl.link_dead(left).count(self.record.index)
            except NotificationsLostError:
                return self.record.connections
        return count

    def reconnect(self, count: int) -> bool:
        """Dial ``count`` new sockets and RECONFIGURE; False once the deadline has passed."""
        index = self.record.index
        deadline = time.monotonic() + self.give_up_after
        delay = BACKOFF_FIRST
        while True:
            try:
                self._reconfigure(count)
                log.info("%s reconnected to %s", device_path(index), self.target.uri())
                return True
            except (KernelError, OSError) as err:
                if read_backend(index) != self.record.backend_id:
                    log.info("%s is gone: stop reconnecting", device_path(index))
                    return True
                if time.monotonic() + delay > deadline:
                    log.error(
                        "giving up on %s after %.0f s: %s",
                        device_path(index),
                        self.give_up_after,
                        err,
                    )
                    return False
                log.info("reconnect failed (%s); retrying in %.1f s", err, delay)
            time.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def _reconfigure(self, count: int) -> None:
        socks = []
        try:
            for _ in range(count):
                sock, info = dial(self.target)
                socks.append(sock)
                if info.size != self.record.size:
                    log.warning(
                        "the export is now %d bytes, the device %d: keeping the device's size",
                        info.size,
                        self.record.size,
                    )
            self.nl.reconfigure(
                self.record.index, [s.fileno() for s in socks], self.record.backend_id
            )
        finally:
            for s in socks:
                s.close()


def _serve_ioctl(record: Record, sock_fd: int, ready: Callable[[], None]) -> int:
    """The ioctl interface: configure /dev/nbdN and sit in NBD_DO_IT until it disconnects."""
    fd = os.open(DEV / f"nbd{record.index}", os.O_RDWR | os.O_CLOEXEC)
    try:
        ioctl(fd, Ioctl.SET_BLKSIZE, record.block_size)
        ioctl(fd, Ioctl.SET_SIZE, record.size)
        ioctl(fd, Ioctl.SET_FLAGS, record.flags)
        ioctl(fd, Ioctl.SET_TIMEOUT, record.timeout)
        ioctl(fd, Ioctl.SET_SOCK, sock_fd)
        os.close(sock_fd)
        ready()
        try:
            ioctl(fd, Ioctl.DO_IT)
            log.info("%s disconnected", device_path(record.index))
        except OSError as err:
            log.error("%s ended: %s", device_path(record.index), err.strerror)
        with contextlib.suppress(OSError):
            ioctl(fd, Ioctl.CLEAR_QUE)
        with contextlib.suppress(OSError):
            ioctl(fd, Ioctl.CLEAR_SOCK)
    finally:
        os.close(fd)
    return 0


_libc = ctypes.CDLL(None, use_errno=True)


def ioctl(fd: int, request: int, arg: int = 0) -> None:
    """ioctl(2) with an unsigned long argument (fcntl.ioctl's int is too small for sizes)."""
    if _libc.ioctl(fd, ctypes.c_ulong(request), ctypes.c_ulong(arg)) < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def supervise(
    record: Record,
    directory: Path,
    *,
    netlink_fd: int | None = None,
    sock_fd: int | None = None,
    revive: bool = False,
    daemon: bool = True,
) -> int:
    """The supervisor's main: detach, say "ready PID" on stdout, then keep the device alive."""
    if daemon and os.fork():
        os._exit(0)  # the caller waits for this parent; the child carries on, orphaned

    def ready() -> None:
        sys.stdout.write(f"ready {os.getpid()}\n")
        sys.stdout.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if record.interface == "ioctl":
            if sock_fd is None:
                raise KernelError("the ioctl supervisor needs --sock-fd")
            return _serve_ioctl(record, sock_fd, ready)
        nl = NbdNetlink.open(netlink_fd)
        with nl:
            if netlink_fd is None:
                nl.subscribe()
            supervisor = Supervisor(record, nl, directory)
            ready()
            log.info("supervising %s for %s", device_path(record.index), record.target)
            if revive and not supervisor.reconnect(record.connections):
                return 1
            return supervisor.run()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# -- detach, attached, status ---------------------------------------------------------------


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
            _stop_supervisor(record.pid, index)
            remove_record(directory, index)
            message = f"{device_path(index)} was already disconnected; forgot its state"
            return DetachResult(False, message, index, backend_id)
        if not has_cap_sys_admin():
            raise NotPermittedError("detaching an nbd device needs root (CAP_SYS_ADMIN)")
        if record is not None and record.interface == "ioctl":
            _disconnect_ioctl(index)  # its supervisor leaves NBD_DO_IT and exits
            _wait_disconnected(index, record.pid)
        else:
            if record is not None:
                _stop_supervisor(record.pid, index)  # first, or it would reconnect
            with netlink_family() as nl:
                nl.disconnect(index)
            _wait_disconnected(index, None)
        remove_record(directory, index)
    log.info("detached %s", device_path(index))
    return DetachResult(True, f"detached {device_path(index)}", index, backend_id)


def _disconnect_ioctl(index: int) -> None:
    fd = os.open(DEV / f"nbd{index}", os.O_RDWR | os.O_CLOEXEC)
    try:
        ioctl(fd, Ioctl.DISCONNECT)
        ioctl(fd, Ioctl.CLEAR_SOCK)
    except OSError as err:
        raise DeviceError(
            f"{device_path(index)}: disconnect failed: {err.strerror}", err.errno
        ) from err
    finally:
        os.close(fd)


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
            devices.append(_device(record))
        else:
            devices.append(KernelDevice(index, device_path(index), device_size(index), backend))
    return devices


def status(index: int | None = None) -> list[DeviceStatus]:
    """NBD_CMD_STATUS: every nbd device the kernel has (or just ``index``)."""
    with netlink_family() as nl:
        return nl.status(index)


# -- command line ---------------------------------------------------------------------------


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


if __name__ == "__main__":
    sys.exit(main())
