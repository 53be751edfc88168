"""Chunk geometry shared by the storages that cut a volume into fixed-size chunks
(:class:`~backend.storage.cow.CowStorage` and :class:`~backend.storage.chunked.ChunkedStorage`).

Chunk ``i`` covers ``[i * chunk_size, (i + 1) * chunk_size)``; the volume's last chunk may be
shorter.  Chunk sizes are powers of two; each storage has its own bounds.
"""

from __future__ import annotations

from collections.abc import Iterator


def check_geometry(size: int, chunk_size: int, minimum: int, maximum: int) -> None:
    """``ValueError`` unless ``size >= 0`` and ``chunk_size`` is a power of two in
    ``[minimum, maximum]``."""
    if size < 0:
        raise ValueError(f"size must be >= 0, not {size}")
    if chunk_size < minimum or chunk_size > maximum or chunk_size & (chunk_size - 1):
        raise ValueError(
            f"chunk size must be a power of two in [{minimum}, {maximum}], not {chunk_size}"
        )


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks ``size`` bytes make (the last one may be short)."""
    return -(-size // chunk_size)


def chunk_span(offset: int, length: int, chunk_size: int) -> tuple[int, int]:
    """``(first, stop)``: the chunks ``[offset, offset+length)`` touches (``length > 0``)."""
    return offset // chunk_size, (offset + length - 1) // chunk_size + 1


def whole_chunks(offset: int, length: int, chunk_size: int, size: int) -> tuple[int, int]:
    """``(first, stop)``: the chunks ``[offset, offset+length)`` covers whole, in a volume of
    ``size`` bytes (empty when ``first >= stop``).  The volume's last chunk may be short:
    covering it up to the end covers it whole."""
    end = offset + length
    stop = (end - 1) // chunk_size + 1 if end == size else end // chunk_size
    return -(-offset // chunk_size), stop


def chunk_pieces(offset: int, length: int, chunk_size: int) -> Iterator[tuple[int, int, int]]:
    """``(chunk index, start in chunk, length)`` for each chunk ``[offset, +length)`` touches,
    in order."""
    end = offset + length
    while offset < end:
        index, start = divmod(offset, chunk_size)
        piece = min(chunk_size - start, end - offset)
        yield index, start, piece
        offset += piece
