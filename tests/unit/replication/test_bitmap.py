"""The bit operations behind the region map, against a set of indices as the model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from backend.replication import bitmap
from backend.replication.bitmap import PAGE, PAGE_BITS

BITS = 3 * PAGE_BITS  # three pages: runs cross page and sub-block boundaries


def model_runs(on: set[int], first: int, stop: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i in sorted(x for x in on if first <= x < stop):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def all_runs(bits: bytearray) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for page in range(len(bits) // PAGE):
        for a, b in bitmap.page_runs(
            bytes(bits[page * PAGE : (page + 1) * PAGE]), page * PAGE_BITS
        ):
            if runs and runs[-1][1] == a:
                runs[-1] = (runs[-1][0], b)
            else:
                runs.append((a, b))
    return runs


# Mostly short ranges (a few bits around sub-block edges), some up to three pages long.
ranges = st.integers(0, BITS).flatmap(
    lambda first: st.tuples(
        st.just(first),
        st.one_of(st.integers(first, min(BITS, first + 130)), st.integers(first, BITS)),
    )
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), ranges), max_size=25))
def test_set_clear_count_and_runs_agree_with_a_set_model(
    ops: list[tuple[bool, tuple[int, int]]],
) -> None:
    bits = bytearray(BITS // 8)
    on: set[int] = set()
    for setting, (first, stop) in ops:
        span = set(range(first, stop))
        if setting:
            assert bitmap.set_range(bits, first, stop) == len(span - on)
            on |= span
        else:
            assert bitmap.clear_range(bits, first, stop) == len(span & on)
            on -= span
        assert bitmap.count_range(bits, first, stop) == (len(span) if setting else 0)
    assert bitmap.count_range(bits, 0, BITS) == len(on)
    assert all_runs(bits) == model_runs(on, 0, BITS)
    for page in range(3):
        has = any(page * PAGE_BITS <= x < (page + 1) * PAGE_BITS for x in on)
        assert bitmap.page_is_zero(bits, page) == (not has)


def test_runs_of_patterns_that_stress_the_scanner() -> None:
    full = bytearray(b"\xff" * PAGE)
    assert list(bitmap.page_runs(bytes(full), 100)) == [(100, 100 + PAGE_BITS)]
    alternating = bytes(b"\x55" * PAGE)  # bits 0, 2, 4, …: one run per set bit
    runs = list(bitmap.page_runs(alternating, 0))
    assert len(runs) == PAGE_BITS // 2
    assert runs[:2] == [(0, 1), (2, 3)]
    assert runs[-1] == (PAGE_BITS - 2, PAGE_BITS - 1)
    # A run across the boundary between two 64-byte sub-blocks, and one ending at the page end.
    page = bytearray(PAGE)
    bitmap.set_range(page, 500, 530)
    bitmap.set_range(page, PAGE_BITS - 3, PAGE_BITS)
    assert list(bitmap.page_runs(bytes(page), 0)) == [(500, 530), (PAGE_BITS - 3, PAGE_BITS)]


def test_merge_and_subtract() -> None:
    assert bitmap.merge([(5, 7), (0, 2), (1, 3), (7, 9), (4, 4)]) == [(0, 3), (5, 9)]
    holes = bitmap.merge([(2, 4), (6, 7)])
    assert list(bitmap.subtract(0, 10, holes)) == [(0, 2), (4, 6), (7, 10)]
    assert list(bitmap.subtract(2, 4, holes)) == []
    assert list(bitmap.subtract(3, 6, holes)) == [(4, 6)]
    assert list(bitmap.subtract(0, 10, [])) == [(0, 10)]
