"""The "nbd" generic netlink family (include/uapi/linux/nbd-netlink.h).

The message builders and parsers are pure (unit-tested byte by byte); ``NbdNetlink`` sends
them on a ``GenlSocket`` and turns the kernel's refusals into ``KernelError`` subclasses.
"""

from __future__ import annotations

import enum
import errno
import os
from collections.abc import Sequence
from typing import Any

from hypervisor.kernel.errors import DeviceError, DriverMissingError, NotPermittedError
from hypervisor.kernel.records import DeviceStatus
from hypervisor.netlink import (
    Attr,
    FamilyNotFoundError,
    GenlMessage,
    GenlSocket,
    NetlinkError,
    find,
    iter_nested,
    nested,
    string,
    u32,
    u64,
)

FAMILY = "nbd"
MCAST_GROUP = "nbd_mc_group"
GENL_VERSION = 1


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


def netlink_family() -> NbdNetlink:
    """The "nbd" netlink family; ``DriverMissingError`` if the kernel has none."""
    try:
        return NbdNetlink.open()
    except FamilyNotFoundError:
        raise DriverMissingError(
            "the nbd kernel module is not loaded: run `modprobe nbd` (as root)"
        ) from None
