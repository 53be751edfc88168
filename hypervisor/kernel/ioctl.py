"""The old ioctl interface (include/uapi/linux/nbd.h), for kernels without the netlink family.

There the supervisor configures /dev/nbdN and sits in NBD_DO_IT for the device's lifetime;
detach sends NBD_DISCONNECT.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import logging
import os
from collections.abc import Callable
from pathlib import Path

from hypervisor.kernel.errors import DeviceError
from hypervisor.kernel.records import Record, device_path

log = logging.getLogger(__name__)

DEV = Path("/dev")


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


def serve_ioctl(record: Record, sock_fd: int, ready: Callable[[], None]) -> int:
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


def disconnect_ioctl(index: int) -> None:
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
