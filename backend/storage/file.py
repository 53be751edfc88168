"""Raw image files and block devices, through one file descriptor and the page cache.

The read and write paths are a single ``os.pread`` / ``os.pwrite`` with no lock and no copy:
this storage is what the server is benchmarked over.  Every connection shares the one
descriptor, so every connection sees every completed write and an ``fdatasync`` covers them
all (multi-conn is safe).

Zeroing and trimming use ``fallocate(2)`` on regular files (``FALLOC_FL_PUNCH_HOLE``,
``FALLOC_FL_ZERO_RANGE``) and the ``BLKDISCARD`` / ``BLKZEROOUT`` ioctls on block devices.
Allocation is reported with ``SEEK_DATA`` / ``SEEK_HOLE`` on regular files; a block device is
reported as all data.  Linux only.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import threading
from collections.abc import Callable

from backend.storage.base import Capabilities, Extent, Storage, StorageError

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F

# Extents returned per call at most; the contract allows covering less than the asked range,
# and a client asking about a badly fragmented image asks again from where we stopped.
MAX_EXTENTS = 1024
# Zeroes are written in chunks of this size when nothing faster works, so zeroing a large
# range never allocates a buffer of its length.
ZERO_CHUNK = 1024 * 1024

_ZERO_CHUNK = memoryview(bytes(ZERO_CHUNK))
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    libc = ctypes.CDLL(None, use_errno=True)
    func = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if func is None:
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func  # type: ignore[no-any-return]


_fallocate_func = _load_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with mode flags (``os.posix_fallocate`` has none); raises OSError."""
    if _fallocate_func is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _fallocate_func(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class FileStorage(Storage):
    """A raw image file or block device at ``path``, opened for the storage's lifetime.

    The size is taken once at open (``st_size`` for a file, ``lseek(SEEK_END)`` for a block
    device) and never changes.  When ``read_only`` the descriptor is opened ``O_RDONLY`` and
    every mutating call raises ``StorageError(EPERM)``.  Opening a missing path raises
    ``StorageError(ENOENT)``; a path that is neither a regular file nor a block device raises
    ``StorageError(EINVAL)``.

    Thread safe: requests go straight to ``pread``/``pwrite`` on the shared descriptor.

    Behaviour by request:

    * ``trim``: punches a hole in a file, which then reads as zeroes.  On a block device it
      discards the logical blocks wholly inside the range; whether they then read as zeroes
      depends on the device.  A filesystem or device without discard support makes trim a
      no-op (trim is advisory) and is advertised without ``can_trim``.
    * ``write_zeroes``: files use ``fallocate`` (punch a hole when ``may_trim``, else zero the
      range in place, else punch and reallocate) and fall back to writing zeroes when the
      filesystem supports none of it, unless ``fast``, which then fails with ``ENOTSUP``.
      Block devices use ``BLKZEROOUT`` and never claim to be fast.
    * ``extents``: data/hole runs from ``SEEK_DATA``/``SEEK_HOLE`` for files, at most
      ``MAX_EXTENTS`` per call; a block device is one data extent.
    """

    def __init__(self, path: str | os.PathLike[str], read_only: bool = False) -> None:
        self.path = os.fspath(path)
        self._read_only = read_only
        self._close_lock = threading.Lock()
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags)
        except OSError as err:
            raise StorageError.from_os_error(err, f"cannot open {self.path}") from err
        try:
            self._setup()
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    def _setup(self) -> None:
        try:
            st = os.fstat(self._fd)
            self._block_device = stat.S_ISBLK(st.st_mode)
            if self._block_device:
                self._size = os.lseek(self._fd, 0, os.SEEK_END)
                raw = fcntl.ioctl(self._fd, BLKSSZGET, b"\0" * 4)
                self._sector = struct.unpack("i", raw)[0]
                device = st.st_rdev
            elif stat.S_ISREG(st.st_mode):
                self._size = st.st_size
                self._sector = 1
                device = st.st_dev
            else:
                raise StorageError(
                    errno.EINVAL, f"{self.path} is neither a regular file nor a block device"
                )
        except OSError as err:
            raise StorageError.from_os_error(err, f"cannot inspect {self.path}") from err

        # What fallocate modes work is learnt once: a mode that fails with EOPNOTSUPP is not
        # tried again.  Punching is probed now, beyond EOF, which changes nothing.
        self._can_punch = not self._block_device and not self._read_only and self._probe_punch()
        self._can_zero_range = not self._block_device
        self._can_allocate = not self._block_device
        self._can_zeroout = self._block_device
        self._can_discard = (
            self._block_device
            and not self._read_only
            and _queue_attribute(device, "discard_max_bytes") != "0"
        )

        rotational = _queue_attribute(device, "rotational") == "1"
        preferred = st.st_blksize
        if preferred < 512 or preferred > 2 * 1024 * 1024 or preferred & (preferred - 1):
            preferred = 4096
        if self._read_only:
            self._capabilities = Capabilities(
                read_only=True,
                can_trim=False,
                can_zero=False,
                rotational=rotational,
                preferred_block=preferred,
            )
        else:
            self._capabilities = Capabilities(
                can_trim=self._can_discard or self._can_punch,
                can_fast_zero=self._can_punch,
                rotational=rotational,
                preferred_block=preferred,
            )

    def _probe_punch(self) -> bool:
        try:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, self._size, 1)
        except OSError:
            # EOPNOTSUPP, but also EPERM on an append-only file or EFBIG at the size limit:
            # whatever the reason, punching is not something to advertise.
            return False
        return True

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def is_block_device(self) -> bool:
        return self._block_device

    def fileno(self) -> int:
        """The descriptor (-1 once closed); for diagnostics and tests, not for I/O."""
        return self._fd

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as err:
            raise StorageError.from_os_error(err, "read") from err
        if len(data) == length:
            return data
        return self._read_rest(offset, length, data)

    def _read_rest(self, offset: int, length: int, data: bytes) -> bytes:
        parts = [data]
        done = len(data)
        while done < length:
            try:
                chunk = os.pread(self._fd, length - done, offset + done)
            except OSError as err:
                raise StorageError.from_os_error(err, "read") from err
            if not chunk:
                # Only possible if the file was truncated behind our back.
                raise StorageError(errno.EIO, f"read: unexpected end of file at {offset + done}")
            parts.append(chunk)
            done += len(chunk)
        return b"".join(parts)

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        if self._read_only:
            raise self._read_only_error()
        try:
            written = os.pwrite(self._fd, data, offset)
            if written != len(data):
                self._write_rest(offset, data, written)
            if fua:
                self._datasync()
        except OSError as err:
            raise StorageError.from_os_error(err, "write") from err

    def _write_rest(self, offset: int, data: bytes | bytearray | memoryview, done: int) -> None:
        # len() counts items, not bytes, for a memoryview of wider items: count bytes here.
        view = memoryview(data).cast("B")
        while done < len(view):
            written = os.pwrite(self._fd, view[done:], offset + done)
            if written == 0:
                raise StorageError(errno.EIO, f"write: no progress at {offset + done}")
            done += written

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> None:
        if self._read_only:
            raise self._read_only_error()
        if length <= 0:
            return
        try:
            self._check_open()
            if self._block_device:
                self._zero_block_device(offset, length, fast)
            else:
                self._zero_file(offset, length, may_trim, fast)
            if fua:
                self._datasync()
        except OSError as err:
            raise StorageError.from_os_error(err, "write zeroes") from err

    def _zero_file(self, offset: int, length: int, may_trim: bool, fast: bool) -> None:
        if may_trim and self._can_punch and self._try_punch(offset, length):
            return
        if self._can_zero_range:
            try:
                fallocate(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as err:
                if err.errno not in _UNSUPPORTED:
                    raise
                self._can_zero_range = False
        # Without ZERO_RANGE (tmpfs) the range can still stay allocated, as NO_HOLE asks:
        # punch, then allocate again.  Both are fast.
        if self._can_punch and self._try_punch(offset, length):
            if self._can_allocate:
                try:
                    fallocate(self._fd, FALLOC_FL_KEEP_SIZE, offset, length)
                except OSError as err:
                    if err.errno not in _UNSUPPORTED:
                        raise
                    # Allocation is a wish; the range already reads as zeroes.
                    self._can_allocate = False
            return
        if fast:
            raise StorageError(errno.ENOTSUP, "write zeroes: no fast way to zero on this file")
        self._write_zero_chunks(offset, length)

    def _try_punch(self, offset: int, length: int) -> bool:
        """Punch a hole; False (and never again) if the filesystem cannot."""
        try:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as err:
            if err.errno not in _UNSUPPORTED:
                raise
            self._can_punch = False
            return False
        return True

    def _zero_block_device(self, offset: int, length: int, fast: bool) -> None:
        if fast:
            # BLKZEROOUT may itself fall back to writing zeroes: never claim it is fast.
            raise StorageError(errno.ENOTSUP, "write zeroes: no fast zeroing on block devices")
        start, stop = self._inner_sectors(offset, length)
        if self._can_zeroout and start < stop:
            try:
                fcntl.ioctl(self._fd, BLKZEROOUT, struct.pack("QQ", start, stop - start))
            except OSError as err:
                if err.errno not in _UNSUPPORTED and err.errno != errno.ENOTTY:
                    raise
                self._can_zeroout = False
            else:
                self._write_zero_chunks(offset, start - offset)
                self._write_zero_chunks(stop, offset + length - stop)
                return
        self._write_zero_chunks(offset, length)

    def _write_zero_chunks(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            chunk = min(ZERO_CHUNK, end - offset)
            written = os.pwrite(self._fd, _ZERO_CHUNK[:chunk], offset)
            if written == 0:
                raise StorageError(errno.EIO, f"write zeroes: no progress at {offset}")
            offset += written

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if self._read_only:
            raise self._read_only_error()
        if length <= 0:
            return
        try:
            self._check_open()
            if self._block_device:
                start, stop = self._inner_sectors(offset, length)
                if self._can_discard and start < stop:
                    try:
                        fcntl.ioctl(self._fd, BLKDISCARD, struct.pack("QQ", start, stop - start))
                    except OSError as err:
                        if err.errno not in _UNSUPPORTED:
                            raise
                        self._can_discard = False
            elif self._can_punch:
                self._try_punch(offset, length)
            if fua:
                self._datasync()
        except OSError as err:
            raise StorageError.from_os_error(err, "trim") from err

    def _inner_sectors(self, offset: int, length: int) -> tuple[int, int]:
        """The largest sector-aligned ``[start, stop)`` inside the range (the ioctls need it)."""
        sector = self._sector
        start = -(-offset // sector) * sector
        stop = (offset + length) // sector * sector
        return start, max(start, stop)

    def flush(self) -> None:
        try:
            self._datasync()
        except OSError as err:
            raise StorageError.from_os_error(err, "flush") from err

    def cache(self, offset: int, length: int) -> None:
        try:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError as err:
            raise StorageError.from_os_error(err, "cache") from err

    def extents(self, offset: int, length: int) -> list[Extent]:
        end = offset + length
        if self._block_device:
            return [Extent(offset, length)]
        result: list[Extent] = []
        pos = offset
        try:
            while pos < end and len(result) < MAX_EXTENTS:
                try:
                    data = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as err:
                    if err.errno != errno.ENXIO:
                        raise
                    data = end  # no data after pos: a hole up to EOF
                if data > pos:
                    stop = min(data, end)
                    result.append(Extent(pos, stop - pos, hole=True, zero=True))
                else:
                    stop = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end)
                    result.append(Extent(pos, stop - pos))
                pos = stop
        except OSError as err:
            raise StorageError.from_os_error(err, "extents") from err
        return result

    def close(self) -> None:
        with self._close_lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError as err:
                raise StorageError.from_os_error(err, "close") from err

    def _datasync(self) -> None:
        self._check_open()
        os.fdatasync(self._fd)

    def _check_open(self) -> None:
        # Most os calls report a closed storage's -1 as EBADF; fdatasync and ioctl raise
        # ValueError instead, so the paths reaching them check first.
        if self._fd < 0:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    def _read_only_error(self) -> StorageError:
        return StorageError(errno.EPERM, f"{self.path} is open read-only")

    def __repr__(self) -> str:
        mode = "ro" if self._read_only else "rw"
        return f"FileStorage({self.path!r}, {mode}, size={self._size})"


def _queue_attribute(device: int, name: str) -> str | None:
    """A block queue attribute from sysfs for ``device`` or the disk holding it, if any."""
    base = f"/sys/dev/block/{os.major(device)}:{os.minor(device)}"
    # A partition has no queue of its own; its parent disk's directory is one level up.
    for directory in (f"{base}/queue", f"{base}/../queue"):
        try:
            with open(f"{directory}/{name}") as f:
                return f.read().strip()
        except OSError:
            continue
    return None
