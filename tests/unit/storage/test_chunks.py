"""What the chunked storages share: chunk geometry (backend/storage/chunks.py) and the rules
of copy-on-write chains (backend/storage/chains.py), each checked against a definition written
out by brute force.  How each storage applies them is tested with it (test_cow.py,
test_chunked_layers.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backend.storage.chains import UNLIMITED, visible_limits, zeroing_drops
from backend.storage.chunks import (
    check_geometry,
    chunk_count,
    chunk_pieces,
    chunk_span,
    whole_chunks,
)

CHUNK = 16
SIZE = 200  # 12 whole chunks and a short one

ranges = st.integers(0, SIZE - 1).flatmap(
    lambda offset: st.tuples(st.just(offset), st.integers(1, SIZE - offset))
)


def chunk_bytes(index: int) -> range:
    return range(index * CHUNK, min((index + 1) * CHUNK, SIZE))


@given(ranges)
def test_chunks_of_a_range(span: tuple[int, int]) -> None:
    offset, length = span
    wanted = set(range(offset, offset + length))
    touched = [i for i in range(chunk_count(SIZE, CHUNK)) if wanted & set(chunk_bytes(i))]
    whole = [i for i in range(chunk_count(SIZE, CHUNK)) if set(chunk_bytes(i)) <= wanted]
    assert chunk_span(offset, length, CHUNK) == (touched[0], touched[-1] + 1)
    first, stop = whole_chunks(offset, length, CHUNK, SIZE)
    assert list(range(first, stop)) == whole
    pieces = list(chunk_pieces(offset, length, CHUNK))
    assert [index for index, _, _ in pieces] == touched
    covered = [index * CHUNK + start + i for index, start, n in pieces for i in range(n)]
    assert covered == sorted(wanted)


def test_chunk_count() -> None:
    assert [chunk_count(size, CHUNK) for size in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]


def test_check_geometry() -> None:
    check_geometry(0, 512, 512, 4096)
    for size, chunk_size in [(-1, 512), (10, 256), (10, 8192), (10, 1000)]:
        with pytest.raises(ValueError, match="must be"):
            check_geometry(size, chunk_size, 512, 4096)


bounds = st.integers(0, 1000) | st.just(UNLIMITED)


@given(st.lists(st.tuples(bounds, bounds), max_size=6))
def test_visible_limits(layers: list[tuple[int, int]]) -> None:
    ends = [end for end, _ in layers]
    cuts = [cut for _, cut in layers]
    assert visible_limits(ends, cuts) == [
        min([ends[i], *cuts[i + 1 :]]) for i in range(len(layers))
    ]


def test_visible_limits_of_a_shrunk_snapshot() -> None:
    # Bottom 100 bytes; a snapshot taken at 40 bytes; the top grown to 300 since.
    assert visible_limits([100, 40, 300], [100, 40, UNLIMITED]) == [40, 40, 300]


def test_zeroing_drops_only_what_hides_nothing() -> None:
    assert zeroing_drops(may_trim=True, held_below=False)
    assert not zeroing_drops(may_trim=True, held_below=True)
    assert not zeroing_drops(may_trim=False, held_below=False)
    assert not zeroing_drops(may_trim=False, held_below=True)
