"""ChunkedStorage: the conformance suite and the model test over a DirectoryObjectStore (no
offset writes: the read-modify-write path) and an in-memory store with offset writes (the
put_range path), then sparseness, concurrency, error propagation, and the object stores
themselves (directory atomicity, keys, the fault injector)."""

from __future__ import annotations

import errno
import os
import random
import resource
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from backend.storage import Extent, StorageError
from backend.storage.chunked import ChunkedStorage, chunk_key
from backend.storage.objects import DirectoryObjectStore, FaultyObjectStore
from tests.unit.storage.conformance import *  # noqa: F403
from tests.unit.storage.conformance import StorageFactory, pattern
from tests.unit.storage.model import make_model_test
from tests.unit.storage.stores import (
    CHUNK,
    DisposableDirectoryStore,
    MemoryObjectStore,
    directory_chunked,
)

KIB = 1024


def _directory_offset_chunked(size: int) -> ChunkedStorage:
    return ChunkedStorage(DisposableDirectoryStore(), size, chunk_size=CHUNK, workers=4)


def _memory_chunked(size: int) -> ChunkedStorage:
    return ChunkedStorage(MemoryObjectStore(), size, chunk_size=CHUNK, prefix="vol/", workers=4)


@pytest.fixture(params=["directory", "directory-offset-writes", "memory"])
def storage_factory(request: pytest.FixtureRequest) -> StorageFactory:
    return {
        "directory": directory_chunked,
        "directory-offset-writes": _directory_offset_chunked,
        "memory": _memory_chunked,
    }[request.param]


@pytest.fixture
def read_only_storage_factory() -> StorageFactory:
    return lambda size: ChunkedStorage(MemoryObjectStore(), size, chunk_size=CHUNK, read_only=True)


TestChunkedDirectoryModel = make_model_test(directory_chunked, max_examples=30)
TestChunkedDirectoryOffsetModel = make_model_test(_directory_offset_chunked, max_examples=30)
TestChunkedMemoryModel = make_model_test(_memory_chunked, max_examples=30)


@pytest.fixture
def directory(tmp_path: Path) -> DirectoryObjectStore:
    return DirectoryObjectStore(tmp_path / "objects")


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# -- Geometry and capabilities -----------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [0, 4096, 32 * KIB, 96 * KIB, 64 * 1024 * KIB])
def test_bad_chunk_size(chunk_size: int) -> None:
    with pytest.raises(ValueError, match="chunk size"):
        ChunkedStorage(MemoryObjectStore(), 10 * CHUNK, chunk_size=chunk_size)


def test_capabilities(directory: DirectoryObjectStore) -> None:
    rmw = ChunkedStorage(
        DirectoryObjectStore(directory.root, offset_writes=False), CHUNK, chunk_size=CHUNK
    )
    ranged = ChunkedStorage(MemoryObjectStore(), CHUNK, chunk_size=CHUNK)
    assert rmw.capabilities.preferred_block == CHUNK
    assert ranged.capabilities.preferred_block == 4096
    for storage in (rmw, ranged):
        caps = storage.capabilities
        assert not caps.inline
        assert caps.thread_safe
        assert caps.can_multi_conn
        assert caps.can_fast_zero
        storage.close()


def test_keys_and_last_partial_chunk(directory: DirectoryObjectStore) -> None:
    storage = ChunkedStorage(directory, 2 * CHUNK + 100, chunk_size=CHUNK, prefix="v1/")
    storage.write(0, pattern(1, 2 * CHUNK + 100))
    assert directory.keys() == [chunk_key("v1/", i) for i in range(3)]
    assert directory.keys() == ["v1/0000000000000000", "v1/0000000000000001", "v1/0000000000000002"]
    assert len(directory.get("v1/0000000000000002") or b"") == 100
    storage.close()


# -- Sparseness --------------------------------------------------------------------------------


def test_trim_and_zeroes_delete_whole_chunks(directory: DirectoryObjectStore) -> None:
    storage = ChunkedStorage(directory, 8 * CHUNK, chunk_size=CHUNK)
    storage.write(0, pattern(1, 8 * CHUNK))
    assert len(_files(directory.root)) == 8
    storage.trim(CHUNK - 1, 2 * CHUNK + 2)  # chunks 1 and 2 whole, 0 and 3 partly
    assert len(_files(directory.root)) == 6
    storage.write_zeroes(4 * CHUNK, 2 * CHUNK)
    assert len(_files(directory.root)) == 4
    storage.write_zeroes(6 * CHUNK, CHUNK, may_trim=False)  # NO_HOLE: stays, zero-filled
    assert len(_files(directory.root)) == 4
    assert directory.get(chunk_key("", 6)) == bytes(CHUNK)
    assert storage.extents(0, 8 * CHUNK) == [
        Extent(0, CHUNK),
        Extent(CHUNK, 2 * CHUNK, hole=True, zero=True),
        Extent(3 * CHUNK, CHUNK),
        Extent(4 * CHUNK, 2 * CHUNK, hole=True, zero=True),
        Extent(6 * CHUNK, 2 * CHUNK),
    ]
    # Zeroing a missing chunk partly creates nothing.
    storage.write_zeroes(CHUNK + 5, 10)
    assert len(_files(directory.root)) == 4
    storage.close()


def test_huge_sparse_volume(directory: DirectoryObjectStore) -> None:
    size = 2**40
    storage = ChunkedStorage(directory, size, chunk_size=CHUNK)
    storage.write(2**39 + 3, b"x")
    first = storage.extents(0, size)
    assert first[0] == Extent(0, first[0].length, hole=True, zero=True)
    assert sum(e.length for e in first) <= size
    assert storage.extents(2**39, 2 * CHUNK) == [
        Extent(2**39, CHUNK),
        Extent(2**39 + CHUNK, CHUNK, hole=True, zero=True),
    ]
    storage.trim(0, size)
    assert directory.keys() == []
    storage.close()


def test_partial_writes_use_put_range_when_offered() -> None:
    store = MemoryObjectStore()
    storage = ChunkedStorage(store, 4 * CHUNK, chunk_size=CHUNK)
    storage.write(100, b"abc")
    storage.write(CHUNK, bytes(CHUNK))
    assert (store.put_ranges, store.puts) == (1, 1)
    assert storage.read(99, 5) == b"\0abc\0"
    storage.close()


def test_short_object_reads_as_zero_padded() -> None:
    store = MemoryObjectStore()
    storage = ChunkedStorage(store, 2 * CHUNK, chunk_size=CHUNK)
    store.put(chunk_key("", 0), b"short")
    assert storage.read(0, 10) == b"short" + bytes(5)
    storage.close()


# -- Concurrency -------------------------------------------------------------------------------


def _run_threads(count: int, target: Callable[[int], object]) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def run(index: int) -> None:
        try:
            barrier.wait()
            target(index)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


@pytest.mark.parametrize("factory", [directory_chunked, _memory_chunked])
def test_read_modify_write_never_loses_a_write(factory: StorageFactory) -> None:
    storage = factory(4 * CHUNK)
    threads, piece = 8, 512
    # Thread t owns every 8th 512-byte piece: all of them share the same chunks.

    def worker(t: int) -> None:
        rng = random.Random(t)
        slots = list(range(t, 4 * CHUNK // piece, threads))
        rng.shuffle(slots)
        for slot in slots[:40]:
            storage.write(slot * piece, bytes([t + 1]) * piece)

    _run_threads(threads, worker)
    expected = bytearray(4 * CHUNK)
    for t in range(threads):
        slots = list(range(t, 4 * CHUNK // piece, threads))
        random.Random(t).shuffle(slots)
        for slot in slots[:40]:
            expected[slot * piece : (slot + 1) * piece] = bytes([t + 1]) * piece
    assert storage.read(0, 4 * CHUNK) == expected
    storage.close()


def test_overlapping_multi_chunk_writes_apply_in_order() -> None:
    storage = directory_chunked(4 * CHUNK)
    span = (CHUNK // 2, 2 * CHUNK)  # three chunks, partial at both ends

    def worker(t: int) -> None:
        for _ in range(10):
            storage.write(span[0], bytes([t + 1]) * span[1])

    _run_threads(6, worker)
    data = storage.read(*span)
    assert len(set(data)) == 1, "the last write is not whole: writes interleaved"
    storage.close()


# -- Errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC, errno.EPERM])
def test_store_errors_keep_their_errno(code: int) -> None:
    store = FaultyObjectStore(MemoryObjectStore(), fail_rate=1.0, errno=code, fail_ops={"put"})
    storage = ChunkedStorage(store, 4 * CHUNK, chunk_size=CHUNK)
    with pytest.raises(StorageError) as excinfo:
        storage.write(0, bytes(3 * CHUNK))
    assert excinfo.value.errno == code
    assert store.failures["put"] == 3
    assert storage.read(0, 10) == bytes(10)  # reads still work
    storage.close()


def test_closed_storage_refuses_requests() -> None:
    storage = _memory_chunked(CHUNK)
    storage.close()
    with pytest.raises(StorageError) as excinfo:
        storage.read(0, 1)
    assert excinfo.value.errno == errno.EBADF


# -- Object stores -----------------------------------------------------------------------------


def test_directory_store_basics(directory: DirectoryObjectStore) -> None:
    assert directory.get("a") is None
    assert directory.get_range("a/b", 0, 5) is None
    directory.delete("missing")  # idempotent
    directory.put("a/b/c", b"hello")
    directory.put("a/d", bytearray(b"x"))
    directory.put("e", memoryview(b"yy"))
    assert directory.get("a/b/c") == b"hello"
    assert directory.get_range("a/b/c", 1, 3) == b"ell"
    assert directory.get_range("a/b/c", 3, 10) == b"lo"
    assert directory.get("a/b") is None  # a directory is not an object
    assert directory.keys() == ["a/b/c", "a/d", "e"]
    assert directory.keys("a/") == ["a/b/c", "a/d"]
    assert directory.keys("a/b") == ["a/b/c"]
    directory.put("a/d", b"new")
    assert directory.get("a/d") == b"new"
    directory.delete("a/d")
    assert directory.get("a/d") is None
    assert directory.supports_offset_writes
    directory.put_range("e", 1, b"zz")  # in place, growing
    directory.put_range("f/g", 3, b"new")  # creates; the gap reads as zeroes
    assert directory.get("e") == b"yzz"
    assert directory.get("f/g") == b"\0\0\0new"
    directory.sync()
    no_offsets = DirectoryObjectStore(directory.root, offset_writes=False)
    assert not no_offsets.supports_offset_writes
    with pytest.raises(NotImplementedError):
        no_offsets.put_range("e", 0, b"z")
    directory.close()
    directory.close()
    with pytest.raises(StorageError) as excinfo:
        directory.get("e")
    assert excinfo.value.errno == errno.EBADF


def test_directory_sync_makes_offset_writes_durable(
    directory: DirectoryObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    directory.put_range("v/0001", 0, b"x")
    directory.put_range("v/0001", 10, b"y")
    directory.put_range("v/0002", 0, b"z")
    monkeypatch.setattr(os, "fsync", fsync)
    directory.sync()
    root = str(directory.root)
    assert sorted(synced) == [f"{root}/v", f"{root}/v/0001", f"{root}/v/0002"]
    synced.clear()
    directory.sync()  # nothing new
    assert synced == []


@pytest.mark.parametrize("key", ["", "../x", "a/../b", "a//b", "/abs", "a/", "sp ace", "a~b", "."])
def test_directory_store_refuses_bad_keys(directory: DirectoryObjectStore, key: str) -> None:
    with pytest.raises(StorageError) as excinfo:
        directory.put(key, b"x")
    assert excinfo.value.errno == errno.EINVAL


def test_interrupted_put_never_shows_a_torn_object(directory: DirectoryObjectStore) -> None:
    directory.put("vol/0001", b"old" * 100)
    # A put interrupted before its rename leaves a temporary file beside the object.
    (directory.root / "vol" / ".0001~abc123.tmp").write_bytes(b"new" * 10)
    (directory.root / ".0002~zz.tmp").write_bytes(b"torn")
    assert directory.get("vol/0001") == b"old" * 100
    assert directory.keys() == ["vol/0001"]
    storage = ChunkedStorage(directory, 4 * CHUNK, chunk_size=CHUNK, prefix="vol/")
    assert storage.extents(0, 4 * CHUNK)[0] == Extent(0, 4 * CHUNK, hole=True, zero=True)
    storage.close()


def test_put_failing_mid_write_leaves_the_old_object(directory: DirectoryObjectStore) -> None:
    directory.put("k", b"old")
    # A file-size limit makes the temp file's write fail part-way (EFBIG), for real.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        with pytest.raises(StorageError) as caught:
            directory.put("k", b"n" * 5000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert caught.value.errno == errno.EFBIG
    assert directory.get("k") == b"old"
    assert directory.keys() == ["k"]


def test_faulty_store_hangs_and_counts(directory: DirectoryObjectStore) -> None:
    release = threading.Event()
    store = FaultyObjectStore(directory, hang=release, seed=1)
    done = threading.Event()

    def put_then_say_so() -> None:
        store.put("k", b"v")
        done.set()

    thread = threading.Thread(target=put_then_say_so)
    thread.start()
    assert not done.wait(0.05)
    release.set()
    thread.join()
    assert store.get("k") == b"v"
    assert store.calls["put"] == 1
    assert store.calls["get"] == 1
    store.fail_rate, store.fail_keys = 1.0, {"bad"}
    assert store.get("k") == b"v"
    with pytest.raises(StorageError) as excinfo:
        store.get("bad")
    assert excinfo.value.errno == errno.EIO
    assert store.failures == {"get": 1}
