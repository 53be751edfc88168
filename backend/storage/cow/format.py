"""The on-disk format of a copy-on-write layer: its two files, the map header, and creating,
removing and inspecting layers.

A layer is two files sharing a path stem (see :func:`layer_files`):

* ``STEM.data``: a sparse raw file of the layer's size.  The chunks the layer holds sit at
  their natural offsets; everything else is a hole and is never read.
* ``STEM.map``: a 4 KiB header, then the allocation bitmap, 1 bit per chunk (bit ``i % 8`` of
  byte ``i // 8``, least significant first), starting at offset 4096.  The header holds
  (little endian) the magic ``NBSCOWL\\0``, the format version (1), the chunk size, the layer
  size, flags (0) and a CRC-32 of those fields.  The bitmap lives in its own blocks so that
  rewriting it never rewrites (and never risks tearing) the header.  Bits past the last chunk
  belong to no chunk (a crash during a resize may leave some) and are ignored.

tests/unit/storage/test_cow_format.py pins these bytes: existing volumes must keep opening.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from backend.storage.base import StorageError
from backend.storage.chunks import check_geometry, chunk_count
from backend.storage.fileio import pread_all, pwrite_all, sync_directory

MAGIC = b"NBSCOWL\0"
VERSION = 1
DEFAULT_CHUNK_SIZE = 64 * 1024
MIN_CHUNK_SIZE = 512
MAX_CHUNK_SIZE = 16 * 1024 * 1024
# The bitmap starts here; the header before it is written only by create_layer and resizes.
HEADER_SIZE = 4096

# magic, version, chunk size, layer size, flags; then the CRC-32 of those packed fields.
_FIELDS = struct.Struct("<8sIIQI")
_CRC = struct.Struct("<I")
_HEADER_LENGTH = _FIELDS.size + _CRC.size


def layer_files(stem: Path) -> tuple[Path, Path]:
    """The ``(data, map)`` paths of the layer at ``stem`` (a suffix is appended, not replaced)."""
    stem = Path(stem)
    return stem.with_name(stem.name + ".data"), stem.with_name(stem.name + ".map")


def check_layer_geometry(size: int, chunk_size: int) -> None:
    """``ValueError`` unless ``size >= 0`` and ``chunk_size`` is a power of two in
    ``[MIN_CHUNK_SIZE, MAX_CHUNK_SIZE]``."""
    check_geometry(size, chunk_size, MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)


def bitmap_bytes(size: int, chunk_size: int) -> int:
    """The length of the bitmap of a layer of ``size`` bytes."""
    return (chunk_count(size, chunk_size) + 7) // 8


def create_layer(stem: Path, size: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
    """Create an empty layer of ``size`` bytes at ``stem``, atomically and durably.

    Both files are written under temporary names, synced, then published with ``link`` (which,
    unlike ``rename``, never replaces an existing file) and the directory is synced.  If either
    file already exists nothing is changed and ``StorageError(EEXIST)`` is raised; other
    failures raise ``StorageError`` with their errno and leave no file behind.  ``ValueError``
    if ``size`` is negative or ``chunk_size`` is not a power of two in
    ``[MIN_CHUNK_SIZE, MAX_CHUNK_SIZE]``.
    """
    check_layer_geometry(size, chunk_size)
    stem = Path(stem)
    data_path, map_path = layer_files(stem)
    temporaries: list[str] = []
    published: list[Path] = []
    try:
        try:
            temp_data = _temporary(data_path, temporaries)
            _write_synced(temp_data, size, b"")
            temp_map = _temporary(map_path, temporaries)
            header = pack_header(chunk_size, size).ljust(HEADER_SIZE, b"\0")
            _write_synced(temp_map, HEADER_SIZE + bitmap_bytes(size, chunk_size), header)
            # The map is published last: a layer whose map exists is complete.
            for temp, final in ((temp_data, data_path), (temp_map, map_path)):
                os.link(temp, final)
                published.append(final)
            sync_directory(stem.parent)
        except FileExistsError as err:
            raise StorageError(errno.EEXIST, f"layer {stem} already exists") from err
        except OSError as err:
            raise StorageError.from_os_error(err, f"cannot create layer {stem}") from err
    except BaseException:
        for path in published:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    finally:
        for temp in temporaries:
            with contextlib.suppress(OSError):
                os.unlink(temp)


def remove_layer(stem: Path) -> None:
    """Remove both files of a layer that nothing uses yet, ignoring those already gone."""
    for path in layer_files(stem):
        with contextlib.suppress(OSError):
            os.unlink(path)


def layer_size(stem: Path) -> int:
    """The size in bytes recorded in the layer's map (as of its last flush)."""
    with open_map(stem) as (fd, path):
        return read_header(fd, path)[1]


def layer_chunk_size(stem: Path) -> int:
    """The chunk size of the layer (the same in every layer of a chain)."""
    with open_map(stem) as (fd, path):
        return read_header(fd, path)[0]


# -- The map header ----------------------------------------------------------------------------


def pack_header(chunk_size: int, size: int) -> bytes:
    fields = _FIELDS.pack(MAGIC, VERSION, chunk_size, size, 0)
    return fields + _CRC.pack(zlib.crc32(fields))


def write_header(fd: int, chunk_size: int, size: int) -> None:
    """Record a new layer size in the map's header, durably."""
    pwrite_all(fd, pack_header(chunk_size, size), 0)
    os.fdatasync(fd)


def read_header(fd: int, path: Path) -> tuple[int, int]:
    """Parse and check a map's header: ``(chunk_size, size)``; ``StorageError(EINVAL)``
    naming ``path`` if it is not a layer map, is corrupt or of another version."""
    raw = read_map_bytes(fd, _HEADER_LENGTH, 0)
    if len(raw) < _HEADER_LENGTH or raw[: len(MAGIC)] != MAGIC:
        raise StorageError(errno.EINVAL, f"{path} is not a layer map (bad magic)")
    fields = raw[: _FIELDS.size]
    (crc,) = _CRC.unpack(raw[_FIELDS.size :])
    if zlib.crc32(fields) != crc:
        raise StorageError(errno.EINVAL, f"{path}: corrupt map header (checksum mismatch)")
    _, version, chunk_size, size, flags = _FIELDS.unpack(fields)
    if version != VERSION or flags:
        raise StorageError(
            errno.EINVAL, f"{path}: unsupported map version {version} (flags {flags:#x})"
        )
    try:
        check_layer_geometry(size, chunk_size)
    except ValueError as err:
        raise StorageError(errno.EINVAL, f"{path}: corrupt map header ({err})") from err
    return chunk_size, size


# -- Map files ---------------------------------------------------------------------------------


@contextlib.contextmanager
def open_map(stem: Path) -> Iterator[tuple[int, Path]]:
    """The layer's map, open read-only for a look at it: ``(fd, path)``."""
    path = layer_files(stem)[1]
    fd = open_map_fd(path, writable=False)
    try:
        yield fd, path
    finally:
        os.close(fd)


def open_map_fd(path: Path, writable: bool) -> int:
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    try:
        return os.open(path, flags)
    except OSError as err:
        raise StorageError.from_os_error(err, f"cannot open {path}") from err


def lock_map(fd: int, path: Path, exclusive: bool) -> None:
    """Take the advisory lock on a map: exclusive for a written top, shared otherwise;
    ``StorageError(EBUSY)`` if another holder conflicts."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError as err:
        what = "open elsewhere" if exclusive else "open for writing elsewhere"
        raise StorageError(errno.EBUSY, f"{path} is {what}") from err
    except OSError as err:
        raise StorageError.from_os_error(err, f"cannot lock {path}") from err


def read_map_bytes(fd: int, length: int, offset: int) -> bytes:
    """Up to ``length`` bytes of a map at ``offset``; ``StorageError`` if reading fails."""
    try:
        return pread_all(fd, length, offset)
    except OSError as err:
        raise StorageError.from_os_error(err, "read map") from err


def _temporary(final: Path, temporaries: list[str]) -> str:
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    temporaries.append(name)
    return name


def _write_synced(path: str, size: int, head: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        if head:
            pwrite_all(fd, head, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
