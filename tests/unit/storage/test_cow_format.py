"""The copy-on-write layer format (backend/storage/cow/format.py): pinned byte for byte, then
creating layers and refusing corrupt ones.

The golden files are built here from the format as docs/storage.md describes it, not with
the code under test: a chain the code writes must be exactly these bytes, and a chain of
these bytes (what volumes created by any earlier release hold) must open and read back.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import zlib
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from backend.storage import StorageError
from backend.storage.cow import (
    DEFAULT_CHUNK_SIZE,
    HEADER_SIZE,
    MAGIC,
    CowStorage,
    allocated_bytes,
    create_layer,
    layer_chunk_size,
    layer_files,
    layer_size,
)
from tests.unit.storage.conformance import pattern

MIB = 1024 * 1024
CHUNK = DEFAULT_CHUNK_SIZE

GOLDEN_CHUNK = 512
BOTTOM_SIZE = 16 * GOLDEN_CHUNK - 100  # the last chunk is short
CUT = 5_900  # the top is shrunk to this after the snapshot...
TOP_SIZE = 10_000  # ...then grown past the bottom
BOTTOM_BITS = {0, 1, 2, 3, 5, 11, 13, 14, 15}
TOP_BITS = {0, 11, 13, 14, 15, 18}


def golden_map(size: int, bits: set[int]) -> bytes:
    """A map file as the format defines it: a 4 KiB header, then one bit per chunk."""
    fields = (
        b"NBSCOWL\0"
        + (1).to_bytes(4, "little")  # version
        + GOLDEN_CHUNK.to_bytes(4, "little")
        + size.to_bytes(8, "little")
        + (0).to_bytes(4, "little")  # flags
    )
    header = fields + zlib.crc32(fields).to_bytes(4, "little")
    bitmap = bytearray((-(-size // GOLDEN_CHUNK) + 7) // 8)
    for chunk in bits:
        bitmap[chunk // 8] |= 1 << (chunk % 8)
    return header.ljust(4096, b"\0") + bytes(bitmap)


def expected_volumes() -> tuple[bytes, bytes]:
    """What the chain reads as: ``(bottom alone, bottom + top)``, following write_chain."""
    bottom = bytearray(BOTTOM_SIZE)
    bottom[0:3000] = pattern(1, 3000)
    bottom[5700:5900] = pattern(3, 200)
    bottom[7000:BOTTOM_SIZE] = pattern(2, BOTTOM_SIZE - 7000)
    bottom[2 * GOLDEN_CHUNK : 3 * GOLDEN_CHUNK] = bytes(GOLDEN_CHUNK)
    bottom[4 * GOLDEN_CHUNK : 5 * GOLDEN_CHUNK] = bytes(GOLDEN_CHUNK)
    chain = bytearray(bottom)
    chain[100:400] = b"top" * 100
    chain[CUT:] = bytes(TOP_SIZE - CUT)
    chain[9500:9503] = b"end"
    return bytes(bottom), bytes(chain)


def golden_data(content: bytes, bits: set[int]) -> bytes:
    """A data file: the chunks the layer holds at their offsets, zeroes (holes) elsewhere."""
    data = bytearray(len(content))
    for chunk in bits:
        piece = slice(chunk * GOLDEN_CHUNK, (chunk + 1) * GOLDEN_CHUNK)
        data[piece] = content[piece]
    return bytes(data)


def write_chain(directory: Path) -> tuple[Path, Path]:
    """Make a two-layer chain through every path that changes a map: writes with copy-up,
    zeroing with and without NO_HOLE, trim, snapshot, shrinking and growing."""
    bottom, top = directory / "bottom", directory / "top"
    create_layer(bottom, BOTTOM_SIZE, GOLDEN_CHUNK)
    with closing(CowStorage([bottom])) as storage:
        storage.write(0, pattern(1, 3000))
        storage.write(5700, pattern(3, 200))
        storage.write(7000, pattern(2, BOTTOM_SIZE - 7000))
        storage.write_zeroes(2 * GOLDEN_CHUNK, GOLDEN_CHUNK, may_trim=False)  # stays allocated
        storage.trim(4 * GOLDEN_CHUNK, GOLDEN_CHUNK)  # nothing below: a real hole
        storage.flush()
        storage.snapshot(top)
        storage.write(100, b"top" * 100)  # copies chunk 0 up
        storage.write_zeroes(13 * GOLDEN_CHUNK, 2 * GOLDEN_CHUNK)  # hides the bottom's chunks
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
    assert allocated_bytes(bottom) == len(BOTTOM_BITS) * GOLDEN_CHUNK
    assert allocated_bytes(top) == len(TOP_BITS) * GOLDEN_CHUNK
    with closing(CowStorage([bottom], read_only=True)) as storage:
        assert storage.chunk_size == GOLDEN_CHUNK
        assert storage.read(0, BOTTOM_SIZE) == bottom_content
    with closing(CowStorage([bottom, top])) as storage:
        assert storage.size == TOP_SIZE
        assert storage.read(0, TOP_SIZE) == chain_content
        # Still writable in that format: a new chunk's bit lands where the format says.
        storage.write(7 * GOLDEN_CHUNK, b"x")
        storage.flush()
    assert layer_files(top)[1].read_bytes() == golden_map(TOP_SIZE, TOP_BITS | {7})


def _layer(stem: Path, size: int, chunk_size: int = CHUNK) -> Path:
    create_layer(stem, size, chunk_size)
    return stem


def _hashes(stems: list[Path]) -> list[str]:
    return [
        hashlib.sha256(path.read_bytes()).hexdigest()
        for stem in stems
        for path in layer_files(stem)
    ]


# -- Creating layers ---------------------------------------------------------------------------


def test_create_layer(tmp_path: Path) -> None:
    stem = _layer(tmp_path / "vol@snap.1", 10 * CHUNK + 1)
    data, map_ = layer_files(stem)
    assert data.name == "vol@snap.1.data"
    assert map_.name == "vol@snap.1.map"
    assert data.stat().st_size == 10 * CHUNK + 1
    assert map_.stat().st_size == HEADER_SIZE + 2
    assert layer_size(stem) == 10 * CHUNK + 1
    assert layer_chunk_size(stem) == CHUNK
    assert allocated_bytes(stem) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [data.name, map_.name]


def test_create_layer_refuses_to_overwrite(tmp_path: Path) -> None:
    stem = _layer(tmp_path / "vol", CHUNK)
    before = _hashes([stem])
    for size in (CHUNK, 2 * CHUNK):
        with pytest.raises(StorageError) as excinfo:
            create_layer(stem, size)
        assert excinfo.value.errno == errno.EEXIST
    assert _hashes([stem]) == before
    # Half a layer (a data file left by a crash) is refused too, and left alone.
    layer_files(stem)[1].unlink()
    with pytest.raises(StorageError) as excinfo:
        create_layer(stem, CHUNK)
    assert excinfo.value.errno == errno.EEXIST
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vol.data"]


def test_create_layer_rejects_bad_geometry(tmp_path: Path) -> None:
    for size, chunk_size in [(-1, CHUNK), (CHUNK, 3000), (CHUNK, 256), (CHUNK, 32 * MIB)]:
        with pytest.raises(ValueError, match="must be"):
            create_layer(tmp_path / "bad", size, chunk_size)
    assert not list(tmp_path.iterdir())


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as excinfo:
        create_layer(tmp_path / "no" / "vol", CHUNK)
    assert excinfo.value.errno == errno.ENOENT


# -- Corrupt layers ----------------------------------------------------------------------------


def _corrupt(stem: Path, offset: int, data: bytes) -> None:
    with layer_files(stem)[1].open("r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda stem: _corrupt(stem, 0, b"NOTALAYR"), "bad magic"),
        (lambda stem: _corrupt(stem, 20, b"\1"), "checksum"),
        (lambda stem: os.truncate(layer_files(stem)[1], HEADER_SIZE + 1), "truncated"),
        (lambda stem: os.truncate(layer_files(stem)[0], 100), "its map says"),
    ],
)
def test_corrupt_layer(tmp_path: Path, damage: Callable[[Path], object], message: str) -> None:
    stem = _layer(tmp_path / "vol", 20 * CHUNK)
    damage(stem)
    with pytest.raises(StorageError) as excinfo:
        CowStorage([stem])
    assert excinfo.value.errno == errno.EINVAL
    assert message in str(excinfo.value)
    assert str(tmp_path / "vol") in str(excinfo.value)


def test_unsupported_version(tmp_path: Path) -> None:
    stem = _layer(tmp_path / "vol", CHUNK)
    fields = struct.pack("<8sIIQI", MAGIC, 2, CHUNK, CHUNK, 0)
    _corrupt(stem, 0, fields + struct.pack("<I", zlib.crc32(fields)))
    with pytest.raises(StorageError) as excinfo:
        layer_size(stem)
    assert excinfo.value.errno == errno.EINVAL
    assert "version 2" in str(excinfo.value)
