"""Object stores and ChunkedStorage factories shared by the chunked-storage tests
(test_chunked.py, test_chunked_layers.py, test_layers.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator

from backend.storage.chunked import ChunkedStorage
from backend.storage.objects import DirectoryObjectStore, ObjectStore

KIB = 1024
CHUNK = 64 * KIB
# tmpfs (where there is one) makes the directory store's fsyncs free.
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else None


class MemoryObjectStore(ObjectStore):
    """A dict of objects with offset writes; counts puts and put_ranges."""

    supports_offset_writes = True

    def __init__(self) -> None:
        self.objects: dict[str, bytearray] = {}
        self.lock = threading.Lock()
        self.puts = 0
        self.put_ranges = 0

    def get(self, key: str) -> bytes | None:
        with self.lock:
            data = self.objects.get(key)
            return None if data is None else bytes(data)

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        with self.lock:
            self.puts += 1
            self.objects[key] = bytearray(data)

    def put_range(self, key: str, offset: int, data: bytes | bytearray | memoryview) -> None:
        with self.lock:
            self.put_ranges += 1
            obj = self.objects.setdefault(key, bytearray())
            if len(obj) < offset:
                obj.extend(bytes(offset - len(obj)))
            obj[offset : offset + len(data)] = data

    def delete(self, key: str) -> None:
        with self.lock:
            self.objects.pop(key, None)

    def list(self, prefix: str = "") -> Iterator[str]:
        with self.lock:
            return iter(sorted(k for k in self.objects if k.startswith(prefix)))

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


class DisposableDirectoryStore(DirectoryObjectStore):
    """Removes its directory on close (the model test has no tmp_path)."""

    def __init__(self, offset_writes: bool = True) -> None:
        super().__init__(
            tempfile.mkdtemp(prefix="nbs-chunked-", dir=SCRATCH), offset_writes=offset_writes
        )

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.root, ignore_errors=True)


def directory_chunked(size: int) -> ChunkedStorage:
    """Without offset writes: the read-modify-write path."""
    store = DisposableDirectoryStore(offset_writes=False)
    return ChunkedStorage(store, size, chunk_size=CHUNK, workers=4)
