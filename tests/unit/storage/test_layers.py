"""Layers: ForwardingStorage (their base), CachingStorage (write-through and write-back) and
RetryingStorage, each through the conformance suite and the model test, then what each adds."""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable

import pytest

from backend.storage import Capabilities, MemoryStorage, Storage, StorageError
from backend.storage.chunked import ChunkedStorage, create_layer, open_chain
from backend.storage.layers import (
    CachingStorage,
    ForwardingStorage,
    ReadOnlyStorage,
    RetryingStorage,
)
from backend.storage.objects import FaultyObjectStore
from tests.unit.storage.conformance import *  # noqa: F403
from tests.unit.storage.conformance import StorageFactory, pattern
from tests.unit.storage.model import make_model_test
from tests.unit.storage.stores import CHUNK, MemoryObjectStore, directory_chunked

KIB = 1024


def _no_sleep(_: float) -> None:
    pass


def _cached(inner: StorageFactory, write_back: bool, capacity: int = 512 * KIB) -> StorageFactory:
    return lambda size: CachingStorage(inner(size), capacity, block=16 * KIB, write_back=write_back)


def _flaky(size: int, fail_rate: float = 0.01) -> RetryingStorage:
    store = FaultyObjectStore(MemoryObjectStore(), fail_rate=fail_rate, seed=7)
    chunked = ChunkedStorage(store, size, chunk_size=CHUNK, workers=4)
    return RetryingStorage(chunked, attempts=30, sleep=_no_sleep)


def _borrowed(size: int) -> Storage:
    """A borrowed storage over one only it uses: the suite's ``close`` must then reach the
    inner storage some other way, so this one closes it as its owner would, afterwards."""

    class _Lender(ForwardingStorage):
        def close(self) -> None:
            super().close()
            self.inner.close()

    return _Lender(ForwardingStorage(MemoryStorage(size), owns_inner=False))


FACTORIES: dict[str, StorageFactory] = {
    "forward-memory": lambda size: ForwardingStorage(MemoryStorage(size)),
    "forward-borrowed-memory": _borrowed,
    "forward-chunked": lambda size: ForwardingStorage(directory_chunked(size)),
    "cache-through-memory": _cached(MemoryStorage, False),
    "cache-back-memory": _cached(MemoryStorage, True),
    "cache-through-chunked": _cached(directory_chunked, False),
    "cache-back-chunked": _cached(directory_chunked, True),
    "retry-flaky-chunked": _flaky,
}


@pytest.fixture(params=sorted(FACTORIES))
def storage_factory(request: pytest.FixtureRequest) -> StorageFactory:
    return FACTORIES[request.param]


@pytest.fixture
def read_only_storage_factory() -> StorageFactory:
    return lambda size: RetryingStorage(
        CachingStorage(MemoryStorage(size, read_only=True), 64 * KIB)
    )


TestCacheWriteBackModel = make_model_test(_cached(MemoryStorage, True, 64 * KIB))
TestCacheWriteThroughChunkedModel = make_model_test(
    _cached(directory_chunked, False, 64 * KIB), max_examples=25
)
TestRetryFlakyModel = make_model_test(_flaky, max_examples=25)


# -- ForwardingStorage ------------------------------------------------------------------------


def test_forwarding_storage_forwards_every_method_explicitly() -> None:
    # A method inherited from Storage instead would be a silent fall-through (nbdkit's warning):
    # a new Storage method must be forwarded here before any layer can exist.
    public = {name for name in vars(Storage) if not name.startswith("_")}
    assert public <= set(vars(ForwardingStorage)), public - set(vars(ForwardingStorage))


def test_forwarding_storage_closes_inner_only_when_owned() -> None:
    owned_inner, borrowed_inner = MemoryStorage(4 * KIB), MemoryStorage(4 * KIB)
    ForwardingStorage(owned_inner).close()
    borrowed = ForwardingStorage(borrowed_inner, owns_inner=False)
    borrowed.write(0, b"kept")
    borrowed.close()
    assert borrowed_inner.read(0, 4) == b"kept"  # still open for its owner
    with pytest.raises(StorageError) as excinfo:
        owned_inner.read(0, 4)
    assert excinfo.value.errno == errno.EBADF
    borrowed_inner.close()


# -- ReadOnlyStorage ---------------------------------------------------------------------------


def test_read_only_view_reads_through_and_never_writes_its_borrowed_storage() -> None:
    inner = MemoryStorage(64 * KIB)
    inner.write(0, pattern(3, 64 * KIB))
    view = ReadOnlyStorage(inner)
    assert view.read(10, 100) == pattern(3, 64 * KIB)[10:110]
    caps = view.capabilities
    assert caps.read_only
    assert not caps.can_trim
    assert not caps.can_zero
    assert not caps.can_flush
    assert not caps.can_resize
    attempts: tuple[Callable[[], object], ...] = (
        lambda: view.write(0, b"x"),
        lambda: view.write_zeroes(0, 10),
        lambda: view.trim(0, 10),
        lambda: view.resize(128 * KIB),
    )
    for attempt in attempts:
        with pytest.raises(StorageError) as excinfo:
            attempt()
        assert excinfo.value.errno == errno.EPERM
    view.flush()
    view.close()
    inner.write(0, b"owner")  # still open: the view borrowed it
    assert inner.read(0, 64 * KIB) == b"owner" + pattern(3, 64 * KIB)[5:]
    inner.close()


# -- CachingStorage ----------------------------------------------------------------------------


def test_cache_serves_reads_and_stays_bounded() -> None:
    mib = 1024 * KIB
    storage = CachingStorage(MemoryStorage(mib), 64 * KIB, block=16 * KIB)
    storage.write(0, pattern(1, mib))
    assert storage.read(0, 16 * KIB) == pattern(1, mib)[: 16 * KIB]
    misses = storage.misses
    assert storage.read(100, 10) == pattern(1, mib)[100:110]
    assert storage.misses == misses
    assert storage.read(0, mib) == pattern(1, mib)
    assert storage.cached_blocks <= 4
    storage.close()


def test_write_through_never_serves_stale_data() -> None:
    inner = MemoryStorage(256 * KIB)
    storage = CachingStorage(inner, 128 * KIB, block=16 * KIB)
    storage.read(0, 64 * KIB)  # cached
    storage.write(10, b"new")
    assert inner.read(10, 3) == b"new"  # written through
    assert storage.read(0, 20) == bytes(10) + b"new" + bytes(7)
    storage.write(0, b"\1" * 64 * KIB)
    storage.read(0, 64 * KIB)
    storage.trim(16 * KIB, 16 * KIB)
    storage.write_zeroes(40 * KIB, 100)
    expected = b"\1" * 16 * KIB + bytes(16 * KIB) + b"\1" * 8 * KIB + bytes(100)
    assert storage.read(0, len(expected)) == expected
    storage.close()


def test_write_back_holds_writes_until_flush() -> None:
    inner = MemoryStorage(256 * KIB)
    storage = CachingStorage(inner, 128 * KIB, block=16 * KIB, write_back=True)
    storage.write(5, b"dirty")
    assert storage.dirty_blocks == 1
    assert inner.read(5, 5) == bytes(5)  # not yet: a crash now loses it
    assert storage.read(5, 5) == b"dirty"
    storage.flush()
    assert storage.dirty_blocks == 0
    assert inner.read(5, 5) == b"dirty"
    storage.write(20 * KIB, b"fua", fua=True)
    assert inner.read(20 * KIB, 3) == b"fua"
    storage.write(40 * KIB, b"close")
    assert inner.read(40 * KIB, 5) == bytes(5)
    storage.close()  # hands the dirty block down, then closes the inner storage
    assert storage.dirty_blocks == 0


def test_write_back_eviction_writes_dirty_blocks() -> None:
    inner = MemoryStorage(256 * KIB)
    storage = CachingStorage(inner, 32 * KIB, block=16 * KIB, write_back=True)
    for n in range(6):
        storage.write(n * 16 * KIB + 1, bytes([n + 1]))
    assert storage.cached_blocks == 2
    assert [inner.read(n * 16 * KIB + 1, 1) for n in range(4)] == [bytes([n + 1]) for n in range(4)]
    assert storage.extents(0, 256 * KIB)  # hands the dirty blocks down first
    assert inner.read(5 * 16 * KIB + 1, 1) == b"\6"
    storage.close()


def test_cache_keeps_inner_capabilities() -> None:
    inner = directory_chunked(CHUNK)
    storage = CachingStorage(inner, 64 * KIB, write_back=True)
    assert storage.capabilities == inner.capabilities
    assert storage.capabilities.can_multi_conn
    storage.close()


def _resizable(size: int) -> ChunkedStorage:
    store = MemoryObjectStore()
    create_layer(store, "a/", size, CHUNK)
    return open_chain(store, ["a/"], owns_store=True)


def test_cache_resize_hands_dirty_blocks_down_and_forgets_the_rest() -> None:
    inner = _resizable(4 * CHUNK)
    storage = CachingStorage(inner, 256 * KIB, block=16 * KIB, write_back=True)
    assert storage.capabilities.can_resize
    storage.write(4 * CHUNK - 3, b"end")  # dirty, in the block the shrink cuts
    storage.read(0, 64 * KIB)
    storage.resize(4 * CHUNK - 1, allow_shrink=True)
    assert (storage.size, storage.cached_blocks, storage.dirty_blocks) == (4 * CHUNK - 1, 0, 0)
    assert inner.read(4 * CHUNK - 3, 2) == b"en"
    storage.resize(4 * CHUNK)
    assert storage.read(4 * CHUNK - 3, 3) == b"en\0"  # not the cached "end"
    storage.close()


class _FixedSize(MemoryStorage):
    """A memory storage that declares no resize (the base class's refusal)."""

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(super().capabilities, can_resize=False)

    resize = Storage.resize


def test_cache_refuses_resize_it_cannot_forward_without_touching_the_cache() -> None:
    storage = CachingStorage(_FixedSize(256 * KIB), 128 * KIB, block=16 * KIB, write_back=True)
    assert not storage.capabilities.can_resize
    storage.write(0, b"dirty")
    with pytest.raises(StorageError) as excinfo:
        storage.resize(512 * KIB)
    assert excinfo.value.errno == errno.ENOTSUP
    assert storage.dirty_blocks == 1
    storage.close()


def test_retry_forwards_resize_once() -> None:
    # Not retried: a resize that half failed is not idempotent.
    store = FaultyObjectStore(MemoryObjectStore(), fail_rate=0.0)
    create_layer(store, "a/", 4 * CHUNK, CHUNK)
    storage = RetryingStorage(open_chain(store, ["a/"], owns_store=True), sleep=_no_sleep)
    store.fail_rate = 1.0
    with pytest.raises(StorageError) as excinfo:
        storage.resize(8 * CHUNK)
    assert excinfo.value.errno == errno.EIO
    assert storage.retries == 0
    store.fail_rate = 0.0
    storage.resize(8 * CHUNK)
    assert storage.size == 8 * CHUNK
    storage.close()


# -- RetryingStorage ---------------------------------------------------------------------------


def _faulty(code: int, fail_rate: float = 1.0) -> tuple[FaultyObjectStore, Storage]:
    store = FaultyObjectStore(MemoryObjectStore(), fail_rate=fail_rate, errno=code)
    storage = RetryingStorage(
        ChunkedStorage(store, 4 * CHUNK, chunk_size=CHUNK), attempts=4, sleep=_no_sleep
    )
    return store, storage


def test_retries_hide_transient_faults() -> None:
    # A request is retried whole: every chunk it touches must succeed in the same attempt.
    storage = _flaky(4 * CHUNK, fail_rate=0.3)
    storage.write(100, pattern(1, 2 * CHUNK))
    assert storage.read(100, 2 * CHUNK) == pattern(1, 2 * CHUNK)
    assert storage.retries > 0
    storage.close()


def test_persistent_eio_reaches_the_caller() -> None:
    store, storage = _faulty(errno.EIO)
    with pytest.raises(StorageError) as excinfo:
        storage.read(0, 10)
    assert excinfo.value.errno == errno.EIO
    assert store.calls["get_range"] == 4  # attempts
    storage.close()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EPERM, errno.EINVAL, errno.ENOTSUP])
def test_permanent_errors_are_not_retried(code: int) -> None:
    store, storage = _faulty(code)
    with pytest.raises(StorageError) as excinfo:
        storage.write(0, b"x")
    assert excinfo.value.errno == code
    assert store.calls["put_range"] == 1
    storage.close()


def test_deadline_bounds_retries() -> None:
    store = FaultyObjectStore(MemoryObjectStore(), fail_rate=1.0)
    storage = RetryingStorage(
        ChunkedStorage(store, CHUNK, chunk_size=CHUNK), attempts=100, backoff=1.0, deadline=0.0
    )
    with pytest.raises(StorageError):
        storage.flush()
    assert store.calls["sync"] == 1
    storage.close()
