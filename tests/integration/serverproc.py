"""What a running ``nbs serve`` process holds, read from /proc: resident memory, open sockets."""

from __future__ import annotations

import os
import time


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def open_sockets(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
        except FileNotFoundError:  # closed while we looked
            pass
    return count


def wait_for_sockets(pid: int, count: int, timeout: float = 60) -> None:
    """Wait until ``pid`` holds at most ``count`` sockets (its sessions are gone)."""
    deadline = time.monotonic() + timeout
    while open_sockets(pid) > count:
        if time.monotonic() > deadline:
            raise AssertionError(f"server still holds {open_sockets(pid)} sockets, not {count}")
        time.sleep(0.1)
