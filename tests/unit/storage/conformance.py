"""The storage conformance suite: the contract of backend/storage/base.py, as tests.

Plug a storage in from its test module::

    from tests.unit.storage.conformance import *  # noqa: F403

    @pytest.fixture
    def storage_factory(tmp_path) -> StorageFactory:
        return lambda size: MyStorage(..., size)

    # Only if the storage has a read-only mode; otherwise leave it out and the read-only
    # test skips, saying why.
    @pytest.fixture
    def read_only_storage_factory(tmp_path) -> StorageFactory:
        return lambda size: MyStorage(..., size, read_only=True)

``storage_factory(size)`` returns a fresh, writable, zero-filled storage of exactly ``size``
bytes; ``read_only_storage_factory(size)`` a read-only one of that size with any content.  The
suite closes every storage it gets.  It sends byte-granular requests, as the NBD core does for
``min_block == 1``.
"""

from __future__ import annotations

import errno
import random
import threading
from collections.abc import Callable, Iterator

import pytest

from backend.storage.base import Extent, Request, Storage, StorageError

StorageFactory = Callable[[int], Storage]

KIB = 1024
MIB = 1024 * KIB
# Not a multiple of any page or block size, so the last page of every layout is partial.
SIZE = 2 * MIB + 12345


def pattern(seed: int, length: int) -> bytes:
    """Reproducible bytes that are never all zero (0 is mapped to 1)."""
    return random.Random(seed).randbytes(length).replace(b"\0", b"\1")


def collect_extents(storage: Storage, offset: int, length: int) -> list[Extent]:
    """Ask for extents until ``[offset, offset+length)`` is covered, checking each answer."""
    end = offset + length
    result: list[Extent] = []
    pos = offset
    while pos < end:
        answer = storage.extents(pos, end - pos)
        assert answer, f"extents({pos}, {end - pos}) returned nothing"
        for extent in answer:
            assert extent.offset == pos, f"gap or overlap at {pos}: {answer}"
            assert extent.length > 0, f"empty extent in {answer}"
            pos += extent.length
        assert pos <= end, f"extents({pos}, {end - pos}) went past the range: {answer}"
        result.extend(answer)
    return result


def assert_extents_consistent(storage: Storage, extents: list[Extent]) -> None:
    """Extents flagged zero or hole must read as zeroes (holes read as zeroes)."""
    for extent in extents:
        if extent.zero or extent.hole:
            data = storage.read(extent.offset, extent.length)
            assert data == bytes(extent.length), f"{extent} does not read as zeroes"


def _read_all(storage: Storage) -> bytes:
    step = min(storage.capabilities.max_block, 4 * MIB)
    return b"".join(
        storage.read(off, min(step, storage.size - off)) for off in range(0, storage.size, step)
    )


@pytest.fixture
def read_only_storage_factory() -> StorageFactory | None:
    """Default: the storage has no read-only mode.  Test modules override this fixture."""
    return None


@pytest.fixture
def opened_storages() -> Iterator[list[Storage]]:
    created: list[Storage] = []
    yield created
    for storage in created:
        storage.close()


@pytest.fixture
def make_storage(storage_factory: StorageFactory, opened_storages: list[Storage]) -> StorageFactory:
    def factory(size: int) -> Storage:
        storage = storage_factory(size)
        opened_storages.append(storage)
        return storage

    return factory


@pytest.fixture
def storage(make_storage: StorageFactory) -> Storage:
    return make_storage(SIZE)


def test_size(make_storage: StorageFactory) -> None:
    for size in (SIZE, 4096, 1):
        assert make_storage(size).size == size


def test_capabilities(storage: Storage) -> None:
    caps = storage.capabilities
    assert not caps.read_only
    assert caps == storage.capabilities
    assert 1 <= caps.min_block <= caps.preferred_block <= caps.max_block
    for block in (caps.min_block, caps.preferred_block):
        assert block & (block - 1) == 0, f"{block} is not a power of two"
    if caps.can_fast_zero:
        assert caps.can_zero


def test_fresh_storage_reads_zeroes(storage: Storage) -> None:
    assert _read_all(storage) == bytes(SIZE)
    assert storage.read(SIZE - 1, 1) == b"\0"
    assert storage.read(12345, 100_000) == bytes(100_000)


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 1),
        (0, 4096),
        (1, 4095),
        (4095, 2),
        (65536 - 3, 7),
        (65536 * 3 - 100, 65536 * 2 + 200),
        (MIB - 7, 70_000),
        (12345, 1),
    ],
)
def test_write_read_round_trip(storage: Storage, offset: int, length: int) -> None:
    data = pattern(offset, length)
    storage.write(offset, data)
    assert storage.read(offset, length) == data
    # Neighbours are untouched, and a larger read sees the same bytes.
    before = min(offset, 1000)
    after = min(SIZE - offset - length, 1000)
    around = storage.read(offset - before, before + length + after)
    assert around == bytes(before) + data + bytes(after)


def test_overwrite_partially(storage: Storage) -> None:
    model = bytearray(SIZE)
    for seed, (offset, length) in enumerate(
        [(1000, 200_000), (65530, 20), (150_000, 100_000), (0, 1500), (199_999, 2)]
    ):
        data = pattern(seed, length)
        storage.write(offset, data)
        model[offset : offset + length] = data
    assert storage.read(0, 300_000) == model[:300_000]


def test_read_spanning_many_pages(storage: Storage) -> None:
    data = pattern(7, MIB + 3)
    storage.write(333, data)
    assert storage.read(333, len(data)) == data
    assert storage.read(0, SIZE) == bytes(333) + data + bytes(SIZE - 333 - len(data))


def test_write_at_end(storage: Storage) -> None:
    tail = pattern(1, 5000)
    storage.write(SIZE - len(tail), tail)
    storage.write(SIZE - 1, b"\xff")
    assert storage.read(SIZE - len(tail), len(tail)) == tail[:-1] + b"\xff"
    assert storage.read(SIZE - 1, 1) == b"\xff"


def test_write_accepts_buffer_types(storage: Storage) -> None:
    storage.write(0, b"bytes")
    storage.write(100, bytearray(b"bytearray"))
    backing = bytearray(b"..memoryview..")
    storage.write(200, memoryview(backing)[2:-2])
    assert storage.read(0, 5) == b"bytes"
    assert storage.read(100, 9) == b"bytearray"
    assert storage.read(200, 10) == b"memoryview"


def test_fua_write(storage: Storage) -> None:
    data = pattern(2, 70_000)
    storage.write(4097, data, fua=True)
    assert storage.read(4097, len(data)) == data


def test_flush(storage: Storage) -> None:
    storage.flush()
    data = pattern(3, 10_000)
    storage.write(500_000, data)
    storage.flush()
    storage.flush()
    assert storage.read(500_000, len(data)) == data


@pytest.mark.parametrize("may_trim", [True, False])
@pytest.mark.parametrize(
    ("offset", "length"),
    [(10, 20), (4096, 4096), (1000, 300_000), (65536, 65536), (0, SIZE)],
)
def test_write_zeroes(storage: Storage, may_trim: bool, offset: int, length: int) -> None:
    data = pattern(4, SIZE)
    storage.write(0, data)
    storage.write_zeroes(offset, length, may_trim=may_trim)
    expected = data[:offset] + bytes(length) + data[offset + length :]
    assert _read_all(storage) == expected


def test_write_zeroes_fua(storage: Storage) -> None:
    storage.write(0, pattern(5, 200_000))
    storage.write_zeroes(777, 100_000, fua=True)
    assert storage.read(777, 100_000) == bytes(100_000)
    assert storage.read(0, 777) != bytes(777)


@pytest.mark.parametrize("may_trim", [True, False])
def test_write_zeroes_fast(storage: Storage, may_trim: bool) -> None:
    data = pattern(6, 300_000)
    storage.write(0, data)
    refused: StorageError | None = None
    try:
        storage.write_zeroes(5000, 200_000, may_trim=may_trim, fast=True)
    except StorageError as err:
        refused = err
    if refused is not None:
        assert refused.errno == errno.ENOTSUP, refused
        assert not storage.capabilities.can_fast_zero, "can_fast_zero, yet fast zero failed"
        return
    assert storage.read(0, 300_000) == data[:5000] + bytes(200_000) + data[205_000:]


def test_trim_reads_zeroes(storage: Storage) -> None:
    data = pattern(7, 400_000)
    storage.write(0, data)
    storage.trim(3, 300_000)
    storage.trim(350_000, 1)
    after = storage.read(0, 400_000)
    assert after[:3] == data[:3]
    assert after[300_003:350_000] == data[300_003:350_000]
    assert after[350_001:] == data[350_001:]
    if storage.capabilities.can_trim:
        assert after[3:300_003] == bytes(300_000)
        assert after[350_000] == 0


def test_trim_whole_storage(storage: Storage) -> None:
    storage.write(0, pattern(8, SIZE))
    storage.trim(0, SIZE, fua=True)
    if storage.capabilities.can_trim:
        assert _read_all(storage) == bytes(SIZE)
    storage.write(100, b"after trim")
    assert storage.read(100, 10) == b"after trim"


def test_extents_of_fresh_storage(storage: Storage) -> None:
    extents = collect_extents(storage, 0, SIZE)
    assert_extents_consistent(storage, extents)


def test_extents_report_written_data(storage: Storage) -> None:
    written = [(0, 1), (70_000, 5000), (MIB - 1, 2), (SIZE - 10, 10)]
    for seed, (offset, length) in enumerate(written):
        storage.write(offset, pattern(seed, length))
    extents = collect_extents(storage, 0, SIZE)
    assert_extents_consistent(storage, extents)
    for offset, length in written:
        for extent in extents:
            if extent.offset < offset + length and offset < extent.offset + extent.length:
                assert not extent.zero, f"written [{offset}, +{length}) reported by {extent}"
                assert not extent.hole, f"written [{offset}, +{length}) reported by {extent}"


def test_extents_of_subrange_start_at_offset(storage: Storage) -> None:
    storage.write(65536, pattern(9, 65536))
    for offset, length in [(1, 1), (65535, 2), (65536 + 17, 100), (100_000, 500_000)]:
        answer = storage.extents(offset, length)
        assert answer
        assert answer[0].offset == offset
        assert sum(e.length for e in answer) <= length
        assert_extents_consistent(storage, answer)


@pytest.mark.parametrize("how", ["trim", "zero", "zero-no-hole"])
def test_extents_after_zeroing(storage: Storage, how: str) -> None:
    data = pattern(10, MIB)
    storage.write(0, data)
    if how == "trim":
        storage.trim(65536, 512 * KIB)
    else:
        storage.write_zeroes(65536, 512 * KIB, may_trim=how == "zero")
    # A sparse storage may now report the whole zeroed pages as a hole; any storage must keep
    # the data around it reported as data.
    extents = collect_extents(storage, 0, SIZE)
    assert_extents_consistent(storage, extents)
    for extent in extents:
        outside = extent.offset < 65536 or extent.offset + extent.length > 65536 + 512 * KIB
        if outside and extent.offset < MIB:
            assert not extent.zero, extent
            assert not extent.hole, extent


def test_cache_keeps_data(storage: Storage) -> None:
    data = pattern(11, 300_000)
    storage.write(1234, data)
    storage.cache(0, SIZE)
    storage.cache(1000, 1)
    assert storage.read(1234, len(data)) == data
    assert storage.read(0, 1234) == bytes(1234)


def test_resize_is_declared(storage: Storage) -> None:
    """``can_resize`` says whether ``resize`` works; without it, ENOTSUP and nothing changes."""
    tail = pattern(12, 1000)
    storage.write(SIZE - 1000, tail)
    if not storage.capabilities.can_resize:
        with pytest.raises(StorageError) as excinfo:
            storage.resize(SIZE + 5000)
        assert excinfo.value.errno == errno.ENOTSUP
        assert storage.size == SIZE
        assert storage.read(SIZE - 1000, 1000) == tail
        return
    storage.resize(SIZE + 5000)
    assert storage.size == SIZE + 5000
    assert storage.read(SIZE - 1000, 6000) == tail + bytes(5000)
    storage.resize(SIZE - 500, allow_shrink=True)
    assert storage.size == SIZE - 500
    assert storage.read(SIZE - 1000, 500) == tail[:500]


def test_submit_is_declared(storage: Storage) -> None:
    """``can_submit`` says whether ``submit``/``wait`` work; without it, ENOTSUP.  With it, a
    request submitted is done once ``wait`` says so (or, when ``submit`` declines, by its
    ``apply``), several may be in flight at once, and each reads back as sent."""
    first, second = pattern(13, 5000), pattern(14, 3000)
    requests = [
        Request("write", 100, len(first), first),
        Request("write", 300_000, len(second), second, fua=True),
        Request("zero", 200, 1000),
        Request("trim", 300_500, 100),
        Request("flush"),
    ]
    if not storage.capabilities.can_submit:
        with pytest.raises(StorageError) as excinfo:
            storage.submit(requests[0])
        assert excinfo.value.errno == errno.ENOTSUP
        assert storage.read(100, 5000) == bytes(5000)
        return
    for batch in (requests[:2], requests[2:]):
        handles = [(r, storage.submit(r)) for r in batch]
        for request, handle in handles:
            if handle is None:
                request.apply(storage)
            else:
                assert storage.wait(handle, 10)
    assert storage.read(100, 5000) == first[:100] + bytes(1000) + first[1100:]
    assert storage.read(300_000, 3000) == second[:500] + bytes(100) + second[600:]


def test_concurrent_disjoint_writes(storage: Storage) -> None:
    threads_count, writes_per_thread, length = 8, 16, 3001
    # A storage that is not thread safe is serialised by the server; do the same.
    serialise = threading.Lock() if not storage.capabilities.thread_safe else None
    errors: list[BaseException] = []
    start = threading.Barrier(threads_count)

    def worker(index: int) -> None:
        try:
            start.wait()
            for i in range(writes_per_thread):
                offset = (i * threads_count + index) * length
                data = pattern(offset, length)
                if serialise is None:
                    storage.write(offset, data)
                else:
                    with serialise:
                        storage.write(offset, data)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    total = threads_count * writes_per_thread
    expected = b"".join(pattern(n * length, length) for n in range(total))
    assert storage.read(0, total * length) == expected


def test_close_is_idempotent(storage_factory: StorageFactory) -> None:
    storage = storage_factory(4096)
    storage.write(0, b"x")
    storage.close()
    storage.close()


def test_read_only_rejects_writes(
    read_only_storage_factory: StorageFactory | None, opened_storages: list[Storage]
) -> None:
    if read_only_storage_factory is None:
        pytest.skip("this storage has no read-only mode (no read_only_storage_factory fixture)")
    storage = read_only_storage_factory(SIZE)
    opened_storages.append(storage)
    assert storage.size == SIZE
    assert storage.capabilities.read_only
    before = _read_all(storage)
    attempts: list[Callable[[], None]] = [
        lambda: storage.write(0, b"nope"),
        lambda: storage.write(SIZE - 1, b"x", fua=True),
        lambda: storage.write_zeroes(0, 4096),
        lambda: storage.write_zeroes(0, SIZE, may_trim=False),
        lambda: storage.write_zeroes(100, 100, fast=True),
        lambda: storage.trim(0, SIZE),
    ]
    for attempt in attempts:
        with pytest.raises(StorageError) as excinfo:
            attempt()
        assert excinfo.value.errno == errno.EPERM
        assert excinfo.value.message
    storage.flush()
    storage.cache(0, SIZE)
    assert _read_all(storage) == before
    assert_extents_consistent(storage, collect_extents(storage, 0, SIZE))


# Everything a test module needs from ``import *``: the tests, the fixtures they use and the
# helpers.  Computed, so that a new test cannot be forgotten here.
__all__ = [
    name
    for name in list(globals())
    if name.startswith("test_")
    or name
    in {
        "SIZE",
        "StorageFactory",
        "assert_extents_consistent",
        "collect_extents",
        "make_storage",
        "opened_storages",
        "pattern",
        "read_only_storage_factory",
        "storage",
    }
]
