"""What the kernel path returns and keeps: devices, results, the per-device ``Record``.

Also the pure rules that turn an export's handshake into device parameters (backend
identifier, block size, connection count) and the defaults they use.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

from hypervisor import nbdclient
from hypervisor.kernel.errors import ExportError, KernelError
from hypervisor.target import NbdTarget

BACKEND_PREFIX = "nbs:"
DEFAULT_TIMEOUT = 30  # s before a request with no reply counts its connection as dead
DEFAULT_DEAD_CONN_TIMEOUT = 120  # s the kernel holds I/O while every connection is down
MAX_AUTO_CONNECTIONS = 4
MIN_BLOCK, MAX_BLOCK = 512, 4096  # what the kernel accepts (blk_validate_block_size)

Interface = Literal["netlink", "ioctl"]


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
