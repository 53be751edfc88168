"""The allocation bitmap of copy-on-write layers (backend/storage/cow/bitmap.py): bit runs and
fills against a list of booleans, and what reaches the map file when.  The bitmap's place in
the durability ordering is tested through CowStorage in test_cow.py (power cut, SIGKILL)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backend.storage.cow.bitmap import (
    MAP_PAGE,
    AllocationBitmap,
    bit,
    fill_bits,
    mask_tail,
    ranges,
    run_end,
)
from backend.storage.cow.format import HEADER_SIZE

BITS = 200  # several whole bytes and partial ones at both ends


def as_bits(model: list[bool]) -> bytearray:
    bits = bytearray((len(model) + 7) // 8)
    for index, value in enumerate(model):
        if value:
            bits[index >> 3] |= 1 << (index & 7)
    return bits


spans = st.tuples(st.integers(0, BITS), st.integers(0, BITS)).map(sorted)
models = st.lists(st.booleans(), min_size=BITS, max_size=BITS)


@given(models, spans, st.booleans())
def test_fill_bits(model: list[bool], span: list[int], value: bool) -> None:
    first, stop = span
    bits = as_bits(model)
    fill_bits(bits, first, stop, value)
    model[first:stop] = [value] * (stop - first)
    assert bits == as_bits(model)
    assert [bit(bits, i) for i in range(BITS)] == [int(v) for v in model]


@given(models, spans, st.sampled_from([0, 1]))
def test_run_end(model: list[bool], span: list[int], value: int) -> None:
    first, stop = span
    expected = next((i for i in range(first, stop) if model[i] != value), stop)
    assert run_end(as_bits(model), first, stop, value) == expected


def test_mask_tail_and_ranges() -> None:
    bits = bytearray(b"\xff\xff")
    mask_tail(bits, 11)
    assert bits == bytearray(b"\xff\x07")
    mask_tail(bits, 16)  # a whole last byte: nothing past it
    assert bits == bytearray(b"\xff\x07")
    assert list(ranges([1, 2, 3, 7, 9, 10])) == [(1, 4), (7, 8), (9, 11)]
    assert list(ranges([])) == []


@pytest.fixture
def map_file(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "map", os.O_RDWR | os.O_CREAT)
    yield fd
    os.close(fd)


def on_disk(fd: int, length: int) -> bytes:
    return os.pread(fd, length, HEADER_SIZE)


def test_marks_reach_the_map_only_when_written_back(map_file: int) -> None:
    nbytes = 3 * MAP_PAGE
    os.ftruncate(map_file, HEADER_SIZE + nbytes)
    bitmap = AllocationBitmap(map_file, bytearray(nbytes))
    bitmap.mark(3, 5, True)  # page 0
    bitmap.mark(2 * MAP_PAGE * 8 + 1, 2 * MAP_PAGE * 8 + 2, True)  # page 2
    bitmap.mark(3, 4, True)  # already set: dirties nothing new
    assert on_disk(map_file, nbytes) == bytes(nbytes)
    captured = bitmap.capture()
    assert [(first, stop) for first, stop, _ in captured] == [(0, 1), (2, 3)]
    # Marks after the capture are not in it: they wait for the next write-back.
    bitmap.mark(8, 9, True)
    bitmap.write_back(captured)
    expected = bytearray(nbytes)
    expected[0] = 0b11000
    expected[2 * MAP_PAGE] = 0b10
    assert on_disk(map_file, nbytes) == expected
    bitmap.write_back(bitmap.capture())
    expected[1] = 1
    assert on_disk(map_file, nbytes) == expected
    assert bitmap.capture() == []


def test_restored_pages_are_written_next_time(map_file: int) -> None:
    os.ftruncate(map_file, HEADER_SIZE + 2)
    bitmap = AllocationBitmap(map_file, bytearray(2))
    bitmap.mark(0, 16, True)
    bitmap.restore(bitmap.capture())  # as after a failed data sync
    bitmap.write_back(bitmap.capture())
    assert on_disk(map_file, 2) == b"\xff\xff"
    bitmap.mark(0, 16, False)
    assert on_disk(map_file, 2) == b"\xff\xff"


def test_grow_and_shrink(map_file: int) -> None:
    os.ftruncate(map_file, HEADER_SIZE + 1)
    bitmap = AllocationBitmap(map_file, bytearray(b"\x01"))
    bitmap.grow(3, [(9, 12)], first_changed=8)
    assert bitmap.bits == bytearray(b"\x01\x0e\x00")
    assert on_disk(map_file, 8) == b"\x00\x0e\x00"  # from the first changed byte on
    bitmap.mark(0, 1, False)
    bitmap.shrink(2, 10)  # forgets chunks 10 and up, and the dirty page
    assert bitmap.bits == bytearray(b"\x00\x02")
    assert bitmap.capture() == []
    bitmap.truncate_file()
    assert os.fstat(map_file).st_size == HEADER_SIZE + 2
