"""Whole reads and writes at an offset, and directory syncs: the few system-call loops that
the storages on local files (copy-on-write layers, the directory object store) share.
Errors are the ``OSError`` the system raised; callers say what they were doing."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def pread_all(fd: int, length: int, offset: int) -> bytes:
    """Up to ``length`` bytes at ``offset``: fewer only at the end of the file."""
    parts: list[bytes] = []
    done = 0
    while done < length:
        part = os.pread(fd, length - done, offset + done)
        if not part:
            break
        parts.append(part)
        done += len(part)
    return b"".join(parts)


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """All of ``data`` at ``offset`` (``pwrite`` may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:
            raise OSError(errno.EIO, f"no progress writing at {offset}")
        view, offset = view[written:], offset + written


def sync_directory(directory: Path) -> None:
    """Make the entries of ``directory`` (files created, linked, renamed, removed) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
