"""Objects as files in a directory tree: one file per key, ``a/b`` being ``root/a/b``.

``put`` writes a temporary file next to the object, fsyncs it, renames it over the object and
fsyncs the directory, so an object is always whole (the rename is atomic) and durable once
``put`` returns.  ``delete`` fsyncs the directory too.

``put_range`` (offset writes, on by default) writes in place with ``pwrite``, creating the
file if needed: a chunked volume's partial writes cost their size, not a read-modify-write of
the chunk.  Not atomic (the contract allows it) and durable only after ``sync()``, which
fsyncs every file ``put_range`` wrote since the last sync, and the directories of the files it
created.

Temporary files are named ``.<name>~<random>.tmp``: ``~`` cannot appear in a key, so a
temporary file left behind by a crash is never mistaken for an object, and ``list`` skips it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from backend.storage.base import StorageError
from backend.storage.fileio import pread_all, sync_directory
from backend.storage.objects.base import ObjectStore

_KEY = re.compile(r"[A-Za-z0-9._/-]+")


def check_key(key: str) -> None:
    """Raise ``StorageError(EINVAL)`` unless ``key`` is a valid key (see ObjectStore)."""
    if not _KEY.fullmatch(key) or any(part in {"", ".", ".."} for part in key.split("/")):
        raise StorageError(errno.EINVAL, f"invalid object key {key!r}")


class DirectoryObjectStore(ObjectStore):
    """Objects under the directory ``root`` (created if missing, unless ``create=False``:
    then a missing root is ``ENOENT``, so that a store whose disk is not mounted is not
    silently replaced by an empty directory).

    ``offset_writes=False`` turns ``put_range`` off (a partial update is then a whole new
    object, as on S3).  Empty directories left by ``delete`` stay (removing them would race
    with a concurrent ``put`` into them).  A key that names a directory of other keys reads as
    missing.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, offset_writes: bool = True, create: bool = True
    ) -> None:
        self.supports_offset_writes = offset_writes
        self._dirty: set[Path] = set()
        self._dirty_directories: set[Path] = set()
        self.root = Path(root)
        if not create and not self.root.is_dir():
            raise StorageError(errno.ENOENT, f"directory {self.root} does not exist")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError.from_os_error(err, f"cannot create {self.root}") from err
        self._closed = False
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as err:
            raise StorageError.from_os_error(err, f"get {key}") from err

    def get_range(self, key: str, offset: int, length: int) -> bytes | None:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as err:
            raise StorageError.from_os_error(err, f"get {key}") from err
        try:
            return pread_all(fd, length, offset)
        except IsADirectoryError:
            return None
        except OSError as err:
            raise StorageError.from_os_error(err, f"get {key}") from err
        finally:
            os.close(fd)

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        path = self._path(key)
        temporary = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(
                prefix=f".{path.name}~", suffix=".tmp", dir=path.parent
            )
            try:
                view = memoryview(data).cast("B")
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, path)
            temporary = None
            sync_directory(path.parent)
        except OSError as err:
            raise StorageError.from_os_error(err, f"put {key}") from err
        finally:
            if temporary is not None:
                # A stray temporary file is harmless: list() skips it.
                with contextlib.suppress(OSError):
                    os.unlink(temporary)

    def put_range(self, key: str, offset: int, data: bytes | bytearray | memoryview) -> None:
        if not self.supports_offset_writes:
            raise NotImplementedError(f"{self!r} has no offset writes")
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            created = False
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                created = True
            except FileExistsError:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                view = memoryview(data).cast("B")
                at = offset
                while view:
                    done = os.pwrite(fd, view, at)
                    view, at = view[done:], at + done
            finally:
                os.close(fd)
        except OSError as err:
            raise StorageError.from_os_error(err, f"put {key} at {offset}") from err
        with self._lock:
            self._dirty.add(path)
            if created:
                self._dirty_directories.add(path.parent)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as err:
            raise StorageError.from_os_error(err, f"delete {key}") from err
        try:
            sync_directory(path.parent)
        except OSError as err:
            raise StorageError.from_os_error(err, f"delete {key}") from err

    def list(self, prefix: str = "") -> Iterator[str]:
        self._check_open()
        # Walk only the directory the prefix lies in.
        head = prefix.rpartition("/")[0]
        start = self.root / head if head else self.root
        keys: list[str] = []
        try:
            for directory, dirnames, filenames in os.walk(start):
                dirnames.sort()
                relative = Path(directory).relative_to(self.root).as_posix()
                base = "" if relative == "." else relative + "/"
                for name in filenames:
                    key = base + name
                    if key.startswith(prefix) and "~" not in name and _KEY.fullmatch(key):
                        keys.append(key)
        except OSError as err:
            raise StorageError.from_os_error(err, f"list {prefix}") from err
        return iter(sorted(keys))

    def sync(self) -> None:
        """fsync what ``put_range`` wrote (``put`` and ``delete`` synced themselves)."""
        self._check_open()
        with self._lock:
            files, self._dirty = self._dirty, set()
            directories, self._dirty_directories = self._dirty_directories, set()
        try:
            for path in sorted(files):
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:  # deleted since, or replaced by a synced put
                    continue
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            for directory in sorted(directories):
                with contextlib.suppress(FileNotFoundError):
                    sync_directory(directory)
        except OSError as err:
            with self._lock:  # still not durable: the next sync tries again
                self._dirty |= files
                self._dirty_directories |= directories
            raise StorageError.from_os_error(err, "sync") from err

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def _path(self, key: str) -> Path:
        self._check_open()
        check_key(key)
        return self.root / key

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(errno.EBADF, f"object store {self.root} is closed")

    def __repr__(self) -> str:
        return f"DirectoryObjectStore({str(self.root)!r})"
