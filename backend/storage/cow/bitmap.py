"""The allocation bitmap of a copy-on-write layer: one bit per chunk, set when the layer holds
the chunk; how runs of equal bits are found and filled, and how changes reach the map file.

Bits change in memory and mark their map page dirty; :meth:`AllocationBitmap.capture` copies
the dirty pages and :meth:`~AllocationBitmap.write_back` writes that copy (the engine syncs the
data file in between: see the durability ordering in backend/storage/cow/__init__.py).
"""

from __future__ import annotations

import errno
import os
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from backend.storage.base import StorageError
from backend.storage.chunks import chunk_count
from backend.storage.cow.format import (
    HEADER_SIZE,
    bitmap_bytes,
    open_map,
    read_header,
    read_map_bytes,
)
from backend.storage.fileio import pwrite_all

# The map is written back in pages of this many bitmap bytes (one page: 32768 chunks).
MAP_PAGE = 4096

# A byte that is not all clear / not all set: how a run of equal bits ends, found in C.
_NOT_CLEAR = re.compile(rb"[^\x00]")
_NOT_SET = re.compile(rb"[^\xff]")


def bit(bits: bytearray, index: int) -> int:
    return bits[index >> 3] >> (index & 7) & 1


def run_end(bits: bytearray, pos: int, stop: int, value: int) -> int:
    """The first index in ``[pos, stop)`` whose bit is not ``value``; ``stop`` if none."""
    while pos < stop and pos & 7:
        if bits[pos >> 3] >> (pos & 7) & 1 != value:
            return pos
        pos += 1
    if pos + 8 <= stop:
        pattern = _NOT_SET if value else _NOT_CLEAR
        found = pattern.search(bits, pos >> 3, stop >> 3)
        pos = (stop & ~7) if found is None else found.start() << 3
    while pos < stop:
        if bits[pos >> 3] >> (pos & 7) & 1 != value:
            return pos
        pos += 1
    return stop


def fill_bits(bits: bytearray, first: int, stop: int, value: bool) -> None:
    """Set (or clear) the bits ``[first, stop)``."""

    def one(index: int) -> None:
        if value:
            bits[index >> 3] |= 1 << (index & 7)
        else:
            bits[index >> 3] &= ~(1 << (index & 7)) & 0xFF

    while first < stop and first & 7:
        one(first)
        first += 1
    whole = (stop - first) >> 3
    if whole > 0:
        bits[first >> 3 : (first >> 3) + whole] = (b"\xff" if value else b"\0") * whole
        first += whole << 3
    while first < stop:
        one(first)
        first += 1


def mask_tail(bits: bytearray, chunks: int) -> None:
    """Clear the bits past ``chunks`` in the last byte (they belong to no chunk)."""
    if chunks & 7 and bits:
        bits[-1] &= (1 << (chunks & 7)) - 1


def ranges(indexes: list[int]) -> Iterator[tuple[int, int]]:
    """``[first, stop)`` runs of consecutive numbers in the sorted ``indexes``."""
    start = previous = -2
    for index in indexes:
        if index != previous + 1:
            if start >= 0:
                yield start, previous + 1
            start = index
        previous = index
    if start >= 0:
        yield start, previous + 1


def read_bitmap(fd: int, path: Path, size: int, chunk_size: int) -> bytearray:
    """The bitmap of the map open at ``fd`` whose header says ``size`` and ``chunk_size``;
    ``StorageError(EINVAL)`` if the file is too short to hold it."""
    nbytes = bitmap_bytes(size, chunk_size)
    bits = bytearray(read_map_bytes(fd, nbytes, HEADER_SIZE))
    if len(bits) != nbytes:
        raise StorageError(errno.EINVAL, f"{path}: truncated map ({nbytes} bitmap bytes)")
    # A crash during a resize may leave bits past the end: they belong to no chunk.
    mask_tail(bits, chunk_count(size, chunk_size))
    return bits


def allocated_bytes(stem: Path) -> int:
    """Space the layer holds: chunks set in its map on disk times the chunk size.

    This is the "space used" of a snapshot (its frozen layer) or of a volume (its top).  A
    live top's map on disk lags by the writes since its last flush.
    """
    with open_map(stem) as (fd, path):
        chunk_size, size = read_header(fd, path)
        bits = read_bitmap(fd, path, size, chunk_size)
    return int.from_bytes(bits, "little").bit_count() * chunk_size


class AllocationBitmap:
    """The bitmap of one open layer, ``bits``, persisted in its map file ``fd``.

    ``bits`` may be read without a lock (a byte read is atomic; the engine's chunk locks order
    readers and writers of one chunk); every change goes through this class, under its lock,
    since neighbouring chunks share bytes.
    """

    def __init__(self, fd: int, bits: bytearray) -> None:
        self.fd = fd
        self.bits = bits
        # Map pages (MAP_PAGE bitmap bytes each) changed in memory since the last write-back.
        self._dirty: set[int] = set()
        self._lock = threading.Lock()

    def mark(self, first: int, stop: int, value: bool) -> None:
        """Set (or clear) the bits ``[first, stop)``, dirtying the map pages that change."""
        bits, dirty = self.bits, self._dirty
        with self._lock:
            pos = first
            while pos < stop:
                current = bits[pos >> 3] >> (pos & 7) & 1
                end = run_end(bits, pos, stop, current)
                if current != value:
                    fill_bits(bits, pos, end, value)
                    dirty.update(range((pos >> 3) // MAP_PAGE, ((end - 1) >> 3) // MAP_PAGE + 1))
                pos = end

    def capture(self) -> list[tuple[int, int, bytes]]:
        """Take the dirty pages, which are no longer dirty: ``(first, stop, content)`` runs.
        Every bit in the copy was set after its chunk was written: sync the data, then
        :meth:`write_back` the copy."""
        with self._lock:
            pages = sorted(self._dirty)
            self._dirty.clear()
            return [
                (first, stop, bytes(self.bits[first * MAP_PAGE : stop * MAP_PAGE]))
                for first, stop in ranges(pages)
            ]

    def write_back(self, captured: Sequence[tuple[int, int, bytes]]) -> None:
        """Write captured pages to the map and sync it (``OSError`` as raised)."""
        if captured:
            for first, _, content in captured:
                pwrite_all(self.fd, content, HEADER_SIZE + first * MAP_PAGE)
            os.fdatasync(self.fd)

    def restore(self, captured: Sequence[tuple[int, int, bytes]]) -> None:
        """Mark captured pages dirty again (their write-back failed)."""
        with self._lock:
            for first, stop, _ in captured:
                self._dirty.update(range(first, stop))

    def grow(self, nbytes: int, runs: Sequence[tuple[int, int]], first_changed: int) -> None:
        """Extend to ``nbytes`` bytes, set the bits of ``runs`` and write everything from the
        byte of chunk ``first_changed`` on to the map, durably (its header comes after)."""
        with self._lock:
            self.bits.extend(bytes(nbytes - len(self.bits)))
            for a, b in runs:
                fill_bits(self.bits, a, b, True)
            first_byte = first_changed >> 3
            tail = bytes(self.bits[first_byte:])
        pwrite_all(self.fd, tail, HEADER_SIZE + first_byte)
        os.fdatasync(self.fd)

    def shrink(self, nbytes: int, chunks: int) -> None:
        """Forget every bit past ``chunks`` (and every dirty page: the caller flushed)."""
        with self._lock:
            del self.bits[nbytes:]
            mask_tail(self.bits, chunks)
            self._dirty.clear()

    def truncate_file(self) -> None:
        """Cut the map file after the bitmap (once its header records the smaller size)."""
        os.ftruncate(self.fd, HEADER_SIZE + len(self.bits))
