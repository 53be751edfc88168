"""The shared system-call loops of the storages on local files (backend/storage/fileio.py)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from backend.storage.fileio import pread_all, pwrite_all, sync_directory


def test_whole_reads_and_writes(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        pwrite_all(fd, b"abcdef", 3)
        assert pread_all(fd, 4, 0) == b"\0\0\0a"
        assert pread_all(fd, 100, 5) == b"cdef"  # fewer only at the end of the file
        assert pread_all(fd, 10, 50) == b""
        assert pread_all(fd, 0, 0) == b""
    finally:
        os.close(fd)


def test_errors_are_the_systems(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="Bad file descriptor") as excinfo:
            pwrite_all(fd, b"x", 0)
        assert excinfo.value.errno == errno.EBADF
    finally:
        os.close(fd)
    sync_directory(tmp_path)
    with pytest.raises(NotADirectoryError):
        sync_directory(tmp_path / "f")
