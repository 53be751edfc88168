"""One open copy-on-write layer: its data file (through a FileStorage), its map descriptor,
the map's advisory lock and the allocation bitmap; and the order in which a resize changes
the map (backend/storage/cow/format.py describes the files).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Sequence
from pathlib import Path

from backend.storage.base import StorageError
from backend.storage.chunks import chunk_count
from backend.storage.cow.bitmap import AllocationBitmap, read_bitmap
from backend.storage.cow.format import (
    bitmap_bytes,
    layer_files,
    lock_map,
    open_map_fd,
    read_header,
    write_header,
)
from backend.storage.file import FileStorage


class Layer:
    """The layer at ``stem``, opened for writing (the top of a writable chain: its map is
    locked exclusively) or for reading (locked shared).  ``StorageError`` as CowStorage says."""

    def __init__(self, stem: Path, writable: bool) -> None:
        self.stem = stem
        self.data_path, self.map_path = layer_files(stem)
        self.writable = writable
        self.map_fd = open_map_fd(self.map_path, writable)
        try:
            lock_map(self.map_fd, self.map_path, writable)
            self.chunk_size, self.size = read_header(self.map_fd, self.map_path)
            bits = read_bitmap(self.map_fd, self.map_path, self.size, self.chunk_size)
            self.bitmap = AllocationBitmap(self.map_fd, bits)
            self.data = FileStorage(self.data_path, read_only=not writable)
            if self.data.size < self.size:
                message = f"{self.data_path} holds {self.data.size} bytes, its map says {self.size}"
                self.data.close()
                raise StorageError(errno.EINVAL, message)
        except BaseException:
            os.close(self.map_fd)
            raise

    def freeze(self) -> None:
        """Stop being the written top: writers elsewhere may share it from now on."""
        self.writable = False
        with contextlib.suppress(OSError):
            fcntl.flock(self.map_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)

    def grow_map(self, new_size: int, runs: Sequence[tuple[int, int]], first_changed: int) -> None:
        """Record a larger size with the chunks of ``runs`` set: the bitmap first, then the
        header that makes it count (the data file must already be grown and synced).  The
        caller updates ``size`` once the whole resize is done."""
        self.bitmap.grow(bitmap_bytes(new_size, self.chunk_size), runs, first_changed)
        write_header(self.map_fd, self.chunk_size, new_size)

    def shrink_map(self, new_size: int) -> None:
        """Record a smaller size: the header first (until the data file is cut, it is merely
        longer than the layer), then the bitmap is cut."""
        cs = self.chunk_size
        self.bitmap.shrink(bitmap_bytes(new_size, cs), chunk_count(new_size, cs))
        write_header(self.map_fd, cs, new_size)
        self.bitmap.truncate_file()

    def close(self) -> None:
        try:
            self.data.close()
        finally:
            try:
                os.close(self.map_fd)
            except OSError as err:
                raise StorageError.from_os_error(err, f"close {self.map_path}") from err
