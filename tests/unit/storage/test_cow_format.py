"""The copy-on-write layer format (backend.storage.cow), pinned byte for byte.

The expected files are built here from the format as docs/storage.md describes it, not with
the code under test: a chain the code writes must be exactly these bytes, and a chain of
these bytes (what volumes created by any earlier release hold) must open and read back.
"""

from __future__ import annotations

import zlib
from contextlib import closing
from pathlib import Path

from backend.storage.cow import CowStorage, allocated_bytes, create_layer, layer_files
from tests.unit.storage.conformance import pattern

CHUNK = 512
BOTTOM_SIZE = 16 * CHUNK - 100  # the last chunk is short
CUT = 5_900  # the top is shrunk to this after the snapshot...
TOP_SIZE = 10_000  # ...then grown past the bottom
BOTTOM_BITS = {0, 1, 2, 3, 5, 11, 13, 14, 15}
TOP_BITS = {0, 11, 13, 14, 15, 18}


def golden_map(size: int, bits: set[int]) -> bytes:
    """A map file as the format defines it: a 4 KiB header, then one bit per chunk."""
    fields = (
        b"NBSCOWL\0"
        + (1).to_bytes(4, "little")  # version
        + CHUNK.to_bytes(4, "little")
        + size.to_bytes(8, "little")
        + (0).to_bytes(4, "little")  # flags
    )
    header = fields + zlib.crc32(fields).to_bytes(4, "little")
    bitmap = bytearray((-(-size // CHUNK) + 7) // 8)
    for chunk in bits:
        bitmap[chunk // 8] |= 1 << (chunk % 8)
    return header.ljust(4096, b"\0") + bytes(bitmap)


def expected_volumes() -> tuple[bytes, bytes]:
    """What the chain reads as: ``(bottom alone, bottom + top)``, following write_chain."""
    bottom = bytearray(BOTTOM_SIZE)
    bottom[0:3000] = pattern(1, 3000)
    bottom[5700:5900] = pattern(3, 200)
    bottom[7000:BOTTOM_SIZE] = pattern(2, BOTTOM_SIZE - 7000)
    bottom[2 * CHUNK : 3 * CHUNK] = bytes(CHUNK)
    bottom[4 * CHUNK : 5 * CHUNK] = bytes(CHUNK)
    chain = bytearray(bottom)
    chain[100:400] = b"top" * 100
    chain[CUT:] = bytes(TOP_SIZE - CUT)
    chain[9500:9503] = b"end"
    return bytes(bottom), bytes(chain)


def golden_data(content: bytes, bits: set[int]) -> bytes:
    """A data file: the chunks the layer holds at their offsets, zeroes (holes) elsewhere."""
    data = bytearray(len(content))
    for chunk in bits:
        data[chunk * CHUNK : (chunk + 1) * CHUNK] = content[chunk * CHUNK : (chunk + 1) * CHUNK]
    return bytes(data)


def write_chain(directory: Path) -> tuple[Path, Path]:
    """Make a two-layer chain through every path that changes a map: writes with copy-up,
    zeroing with and without NO_HOLE, trim, snapshot, shrinking and growing."""
    bottom, top = directory / "bottom", directory / "top"
    create_layer(bottom, BOTTOM_SIZE, CHUNK)
    with closing(CowStorage([bottom])) as storage:
        storage.write(0, pattern(1, 3000))
        storage.write(5700, pattern(3, 200))
        storage.write(7000, pattern(2, BOTTOM_SIZE - 7000))
        storage.write_zeroes(2 * CHUNK, CHUNK, may_trim=False)  # stays allocated
        storage.trim(4 * CHUNK, CHUNK)  # nothing below: a real hole
        storage.flush()
        storage.snapshot(top)
        storage.write(100, b"top" * 100)  # copies chunk 0 up
        storage.write_zeroes(13 * CHUNK, 2 * CHUNK)  # hides the bottom's chunks
        # Shrinking forgets the top's chunks past the cut; growing copies up the bottom's
        # chunk 11 cut short and masks the bottom's chunks 13-15 in the new range.
        storage.resize(CUT, allow_shrink=True)
        storage.resize(TOP_SIZE)
        storage.write(9500, b"end")
        storage.flush()
    return bottom, top


def test_written_layers_are_the_golden_bytes(tmp_path: Path) -> None:
    bottom, top = write_chain(tmp_path)
    bottom_content, chain_content = expected_volumes()
    assert layer_files(bottom)[1].read_bytes() == golden_map(BOTTOM_SIZE, BOTTOM_BITS)
    assert layer_files(top)[1].read_bytes() == golden_map(TOP_SIZE, TOP_BITS)
    assert layer_files(bottom)[0].read_bytes() == golden_data(bottom_content, BOTTOM_BITS)
    assert layer_files(top)[0].read_bytes() == golden_data(chain_content, TOP_BITS)


def test_golden_layers_open_and_read_back(tmp_path: Path) -> None:
    bottom_content, chain_content = expected_volumes()
    layers = {
        "bottom": (BOTTOM_SIZE, BOTTOM_BITS, bottom_content),
        "top": (TOP_SIZE, TOP_BITS, chain_content),
    }
    for name, (size, bits, content) in layers.items():
        data, map_ = layer_files(tmp_path / name)
        data.write_bytes(golden_data(content, bits))
        map_.write_bytes(golden_map(size, bits))
    bottom, top = tmp_path / "bottom", tmp_path / "top"
    assert allocated_bytes(bottom) == len(BOTTOM_BITS) * CHUNK
    assert allocated_bytes(top) == len(TOP_BITS) * CHUNK
    with closing(CowStorage([bottom], read_only=True)) as storage:
        assert storage.chunk_size == CHUNK
        assert storage.read(0, BOTTOM_SIZE) == bottom_content
    with closing(CowStorage([bottom, top])) as storage:
        assert storage.size == TOP_SIZE
        assert storage.read(0, TOP_SIZE) == chain_content
        # Still writable in that format: a new chunk's bit lands where the format says.
        storage.write(7 * CHUNK, b"x")
        storage.flush()
    assert layer_files(top)[1].read_bytes() == golden_map(TOP_SIZE, TOP_BITS | {7})
