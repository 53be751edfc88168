"""MemoryStorage: the conformance suite, the model test and its sparseness."""

from __future__ import annotations

import errno

import pytest

from backend.storage import Extent, MemoryStorage, StorageError
from backend.storage.memory import MAX_EXTENTS, PAGE_SIZE
from tests.unit.storage.conformance import *  # noqa: F403
from tests.unit.storage.conformance import StorageFactory
from tests.unit.storage.model import make_model_test


@pytest.fixture
def storage_factory() -> StorageFactory:
    return MemoryStorage


@pytest.fixture
def read_only_storage_factory() -> StorageFactory:
    return lambda size: MemoryStorage(size, read_only=True)


TestMemoryModel = make_model_test(MemoryStorage)


def test_huge_storage_costs_nothing_until_written() -> None:
    storage = MemoryStorage(2**50)
    assert storage.read(2**50 - 10, 10) == bytes(10)
    assert storage.extents(0, 2**50) == [Extent(0, 2**50, hole=True, zero=True)]
    storage.write(2**40 + 1, b"x")
    assert storage.allocated_pages == 1
    assert storage.extents(2**40, PAGE_SIZE * 2) == [
        Extent(2**40, PAGE_SIZE, hole=False, zero=False),
        Extent(2**40 + PAGE_SIZE, PAGE_SIZE, hole=True, zero=True),
    ]
    storage.trim(0, 2**50)
    assert storage.allocated_pages == 0


def test_zeroing_drops_pages_only_when_allowed() -> None:
    storage = MemoryStorage(PAGE_SIZE * 4)
    storage.write(0, b"\1" * PAGE_SIZE * 4)
    storage.write_zeroes(0, PAGE_SIZE, may_trim=False)
    assert storage.allocated_pages == 4
    storage.write_zeroes(0, PAGE_SIZE * 2 - 1)
    assert storage.allocated_pages == 3, "the first page is whole and dropped"
    storage.trim(PAGE_SIZE * 2 - 1, 1)
    assert storage.allocated_pages == 2, "the second page became all zeroes and is dropped"
    storage.trim(PAGE_SIZE * 3 + 1, 10)
    assert storage.allocated_pages == 2, "the last page still holds data"
    expected = bytes(PAGE_SIZE * 2) + b"\1" * (PAGE_SIZE + 1) + bytes(10) + b"\1" * (PAGE_SIZE - 11)
    assert storage.read(0, PAGE_SIZE * 4) == expected


def test_extents_are_capped() -> None:
    storage = MemoryStorage(PAGE_SIZE * (MAX_EXTENTS * 2 + 2))
    for page in range(0, MAX_EXTENTS * 2 + 2, 2):
        storage.write(page * PAGE_SIZE, b"x")
    answer = storage.extents(0, storage.size)
    assert len(answer) == MAX_EXTENTS
    assert answer[0] == Extent(0, PAGE_SIZE)
    assert answer[-1].offset + answer[-1].length == MAX_EXTENTS * PAGE_SIZE


def test_closed_storage_refuses_requests() -> None:
    storage = MemoryStorage(4096)
    storage.write(0, b"data")
    storage.close()
    with pytest.raises(StorageError) as excinfo:
        storage.read(0, 4)
    assert excinfo.value.errno == errno.EBADF


def test_negative_size_is_refused() -> None:
    with pytest.raises(ValueError, match="size"):
        MemoryStorage(-1)
