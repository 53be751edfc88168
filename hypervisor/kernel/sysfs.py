"""What the kernel shows in /sys/block/nbdN and /proc: devices, their backend, our supervisors.

Read-only: nothing here needs root or the nbd module (without it there are no devices).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from hypervisor.kernel.records import KernelDevice, Record, device_path

SYS_BLOCK = Path("/sys/block")
SYS_MODULE = Path("/sys/module/nbd")
PROC = Path("/proc")


def read_stripped(path: Path) -> str | None:
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
    value = read_stripped(SYS_BLOCK / f"nbd{index}" / "backend")
    return value or None


def device_size(index: int) -> int:
    sectors = read_stripped(SYS_BLOCK / f"nbd{index}" / "size")
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
    status = read_stripped(PROC / "self" / "status") or ""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << 21))
    return os.geteuid() == 0


def supervisor_alive(pid: int | None, index: int) -> bool:
    """Whether ``pid`` is running and is the supervisor of device ``index`` (not a reused PID)."""
    if pid is None:
        return False
    stat = read_stripped(PROC / str(pid) / "stat")
    if stat is None or stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]:
        return False
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
        brief = argv[argv.index(b"supervise") + 1]
        return b"hypervisor.kernel" in argv and Record.from_json(brief.decode()).index == index
    except (OSError, ValueError, IndexError, TypeError, KeyError):
        return False


def describe(record: Record) -> KernelDevice:
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
