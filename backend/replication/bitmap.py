"""Bit operations on a bitmap held in a ``bytearray``: set, clear, count, and runs.

Bit ``i`` is bit ``i % 8`` of byte ``i // 8`` (least significant first), so a slice of bytes
read as a little-endian integer has bit ``k`` for index ``8 * first_byte + k``.  Ranges are
half-open index ranges ``[first, stop)``.  Nothing here locks: the caller does.
"""

from __future__ import annotations

from collections.abc import Iterator

PAGE = 4096  # bytes of bitmap per page: the unit of I/O and of the zero-page index
PAGE_BITS = PAGE * 8
_SUB = 64  # at most this many bytes are scanned as one integer
_NONZERO = bytes.maketrans(bytes(range(256)), b"\0" + b"\1" * 255)
_ZERO_PAGE = bytes(PAGE)
_FULL_PAGE = b"\xff" * PAGE


def _mask(first: int, stop: int) -> tuple[int, int, int]:
    """The byte span covering ``[first, stop)`` and the mask of those bits within it."""
    lo, hi = first >> 3, (stop + 7) >> 3
    return lo, hi, ((1 << (stop - first)) - 1) << (first - (lo << 3))


def set_range(bits: bytearray, first: int, stop: int) -> int:
    """Set bits ``[first, stop)``; return how many were clear before."""
    if first >= stop:
        return 0
    lo, hi, mask = _mask(first, stop)
    old = int.from_bytes(bits[lo:hi], "little")
    new = old | mask
    if new == old:
        return 0
    bits[lo:hi] = new.to_bytes(hi - lo, "little")
    return (new ^ old).bit_count()


def clear_range(bits: bytearray, first: int, stop: int) -> int:
    """Clear bits ``[first, stop)``; return how many were set before."""
    if first >= stop:
        return 0
    lo, hi, mask = _mask(first, stop)
    old = int.from_bytes(bits[lo:hi], "little")
    new = old & ~mask
    if new == old:
        return 0
    bits[lo:hi] = new.to_bytes(hi - lo, "little")
    return (new ^ old).bit_count()


def count_range(bits: bytes | bytearray, first: int, stop: int) -> int:
    """How many of bits ``[first, stop)`` are set."""
    if first >= stop:
        return 0
    lo, hi, mask = _mask(first, stop)
    return (int.from_bytes(bits[lo:hi], "little") & mask).bit_count()


def page_is_zero(bits: bytes | bytearray, page: int) -> bool:
    return bits[page * PAGE : (page + 1) * PAGE] == _ZERO_PAGE


def page_runs(page_bytes: bytes, base: int) -> Iterator[tuple[int, int]]:
    """The runs of set bits in a snapshot of bitmap bytes whose first bit has index ``base``.

    Zero bytes are skipped by memchr searches and non-zero stretches are walked as
    integers of at most 64 bytes: one integer for the whole page would make every run cost
    a shift of 32 Kibit, and a byte-by-byte loop costs a Python step per byte.
    """
    if page_bytes == _FULL_PAGE:
        yield base, base + PAGE_BITS
        return
    size = len(page_bytes)
    nonzero = page_bytes.translate(_NONZERO)  # so that memchr finds the next non-zero byte
    start = -1  # the run still open at the end of the previous stretch
    pos = 0
    while pos < size:
        if not page_bytes[pos]:
            if start >= 0:
                yield start, base + pos * 8
                start = -1
            pos = nonzero.find(1, pos)
            if pos < 0:
                break
            continue
        end = page_bytes.find(b"\0", pos, pos + _SUB)
        if end < 0:
            end = min(size, pos + _SUB)
        x = int.from_bytes(page_bytes[pos:end], "little")
        width = (end - pos) * 8
        at = base + pos * 8  # index of bit 0 of x
        done = 0  # bits of x consumed
        while x:
            low = (x & -x).bit_length() - 1  # clear bits before the next run
            if low and start >= 0:
                yield start, at + done
                start = -1
            x >>= low
            ones = (~x & (x + 1)).bit_length() - 1  # length of the run of ones
            if start < 0:
                start = at + done + low
            done += low + ones
            x >>= ones
            if done < width:  # the run ended inside this stretch
                yield start, at + done
                start = -1
        pos = end
    if start >= 0:
        yield start, base + size * 8


def merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint, non-adjacent intervals covering exactly the given ones."""
    out: list[tuple[int, int]] = []
    for first, stop in sorted(intervals):
        if first >= stop:
            continue
        if out and first <= out[-1][1]:
            if stop > out[-1][1]:
                out[-1] = (out[-1][0], stop)
        else:
            out.append((first, stop))
    return out


def subtract(first: int, stop: int, holes: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """``[first, stop)`` minus the merged intervals ``holes``."""
    for a, b in holes:
        if b <= first:
            continue
        if a >= stop:
            break
        if a > first:
            yield first, a
        first = max(first, b)
        if first >= stop:
            return
    if first < stop:
        yield first, stop
