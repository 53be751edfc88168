"""FileStorage: the conformance suite and the model test over sparse files, then what is
specific to files: holes, deallocation, fallocate fallbacks, short I/O, block devices."""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.storage import Extent, FileStorage, StorageError
from backend.storage import file as file_module
from tests.unit.storage.conformance import *  # noqa: F403
from tests.unit.storage.conformance import (
    SIZE,
    StorageFactory,
    assert_extents_consistent,
    collect_extents,
    pattern,
)
from tests.unit.storage.model import make_model_test

KIB = 1024
MIB = 1024 * KIB


def _sparse_file(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def storage_factory(tmp_path: Path) -> StorageFactory:
    names = itertools.count()
    return lambda size: FileStorage(_sparse_file(tmp_path / f"disk{next(names)}.img", size))


@pytest.fixture
def read_only_storage_factory(tmp_path: Path) -> StorageFactory:
    def factory(size: int) -> FileStorage:
        path = tmp_path / "read-only.img"
        path.write_bytes(pattern(42, size))
        return FileStorage(path, read_only=True)

    return factory


def _unlinked_file_storage(size: int) -> FileStorage:
    # The model makes many storages; unlinked files vanish when the storage closes them.
    fd, path = tempfile.mkstemp(prefix="nbs-model-", suffix=".img")
    try:
        os.ftruncate(fd, size)
        return FileStorage(path)
    finally:
        os.close(fd)
        os.unlink(path)


TestFileModel = make_model_test(_unlinked_file_storage)


@pytest.fixture
def image(tmp_path: Path) -> Iterator[FileStorage]:
    storage = FileStorage(_sparse_file(tmp_path / "image.img", 4 * MIB))
    yield storage
    storage.close()


def _allocated_bytes(storage: FileStorage) -> int:
    return os.fstat(storage.fileno()).st_blocks * 512


def test_extents_report_exactly_the_holes(image: FileStorage) -> None:
    # Allocation happens in filesystem blocks (4 KiB on ext4, a whole record on ZFS): write
    # whole blocks so the holes are exactly where nothing was written.
    block = max(os.fstat(image.fileno()).st_blksize, 4 * KIB)
    image.write(block, b"\1" * block)
    image.write(8 * block, b"\2" * 2 * block)
    image.write(image.size - block, b"\3" * block)
    assert collect_extents(image, 0, image.size) == [
        Extent(0, block, hole=True, zero=True),
        Extent(block, block),
        Extent(2 * block, 6 * block, hole=True, zero=True),
        Extent(8 * block, 2 * block),
        Extent(10 * block, image.size - 11 * block, hole=True, zero=True),
        Extent(image.size - block, block),
    ]
    # A range starting inside a hole or inside data is cut at the asked offset.
    assert image.extents(1000, block) == [
        Extent(1000, block - 1000, hole=True, zero=True),
        Extent(block, 1000),
    ]
    assert image.extents(block + 7, 1) == [Extent(block + 7, 1)]


def test_extents_are_capped(image: FileStorage) -> None:
    for block in range(0, 256, 2):
        image.write(block * 4 * KIB, b"x")
    capped = 10
    file_module.MAX_EXTENTS, saved = capped, file_module.MAX_EXTENTS
    try:
        answer = image.extents(0, image.size)
    finally:
        file_module.MAX_EXTENTS = saved
    assert len(answer) == capped
    assert answer[0] == Extent(0, 4 * KIB)
    assert_extents_consistent(image, answer)


def test_trim_deallocates(image: FileStorage) -> None:
    image.write(0, pattern(1, image.size))
    image.flush()
    full = _allocated_bytes(image)
    assert full >= image.size
    # Only whole filesystem blocks are freed; a block at each edge of the range is kept.
    block = max(os.fstat(image.fileno()).st_blksize, 4 * KIB)
    image.trim(MIB - 1, MIB + 2)
    assert _allocated_bytes(image) <= full - (MIB - 2 * block)
    image.write_zeroes(2 * MIB + 1, MIB, may_trim=True)
    assert _allocated_bytes(image) <= full - (2 * MIB - 4 * block)
    assert image.read(MIB - 1, 2 * MIB + 2) == bytes(2 * MIB + 2)


def test_zeroing_without_trim_keeps_blocks_allocated(image: FileStorage) -> None:
    image.write(0, pattern(2, image.size))
    image.flush()
    image.write_zeroes(0, image.size, may_trim=False)
    assert _allocated_bytes(image) >= image.size
    assert image.read(0, image.size) == bytes(image.size)


def test_file_size_never_changes(image: FileStorage, tmp_path: Path) -> None:
    size = image.size
    image.write(size - 3, b"end", fua=True)
    image.write_zeroes(size - 5000, 5000, may_trim=False)
    image.write_zeroes(size - 4096, 4096, fast=True)
    image.trim(size - 70_000, 70_000)
    image.flush()
    assert (tmp_path / "image.img").stat().st_size == size
    assert image.size == size


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "no-such.img"
    with pytest.raises(StorageError) as excinfo:
        FileStorage(missing)
    assert excinfo.value.errno == errno.ENOENT
    assert str(missing) in str(excinfo.value)


def test_neither_file_nor_block_device(tmp_path: Path) -> None:
    for path in ("/dev/null", tmp_path):
        with pytest.raises(StorageError) as excinfo:
            FileStorage(path, read_only=True)
        assert excinfo.value.errno == errno.EINVAL


def test_read_only_file(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(b"frozen" * 1000)
    path.chmod(0o444)
    storage = FileStorage(path, read_only=True)
    try:
        assert storage.capabilities.read_only
        assert not storage.capabilities.can_trim
        assert not storage.capabilities.can_zero
        assert storage.read(0, 6) == b"frozen"
        with pytest.raises(StorageError) as excinfo:
            storage.write(0, b"thawed")
        assert excinfo.value.errno == errno.EPERM
        assert str(path) in str(excinfo.value)
    finally:
        storage.close()
    assert path.read_bytes() == b"frozen" * 1000


def test_closed_storage_raises_storage_error(image: FileStorage) -> None:
    image.close()
    for call in (lambda: image.read(0, 1), lambda: image.write(0, b"x"), image.flush):
        with pytest.raises(StorageError) as excinfo:
            call()
        assert excinfo.value.errno == errno.EBADF
    image.close()


def _refuse_fallocate(monkeypatch: pytest.MonkeyPatch, refused_modes: set[int] | None) -> None:
    """Make fallocate fail with EOPNOTSUPP for ``refused_modes`` (every mode if None)."""
    real = file_module.fallocate

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        if refused_modes is None or mode in refused_modes:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        real(fd, mode, offset, length)

    monkeypatch.setattr(file_module, "fallocate", fallocate)


ZERO_RANGE = file_module.FALLOC_FL_ZERO_RANGE | file_module.FALLOC_FL_KEEP_SIZE


def test_without_fallocate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _refuse_fallocate(monkeypatch, None)
    storage = FileStorage(_sparse_file(tmp_path / "plain.img", SIZE))
    try:
        caps = storage.capabilities
        assert not caps.can_trim
        assert not caps.can_fast_zero
        assert caps.can_zero
        data = pattern(3, SIZE)
        storage.write(0, data)
        with pytest.raises(StorageError) as excinfo:
            storage.write_zeroes(0, 4096, fast=True)
        assert excinfo.value.errno == errno.ENOTSUP
        assert storage.read(0, SIZE) == data
        # Trim is advisory: without support it does nothing.
        storage.trim(0, SIZE)
        assert storage.read(0, SIZE) == data
        storage.write_zeroes(10, SIZE - 20)
        assert storage.read(0, SIZE) == data[:10] + bytes(SIZE - 20) + data[-10:]
    finally:
        storage.close()


def test_zero_fallback_writes_bounded_chunks(
    image: FileStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    _refuse_fallocate(monkeypatch, None)
    image.write(0, pattern(4, image.size))
    sizes: list[int] = []
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        sizes.append(len(data))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(file_module, "ZERO_CHUNK", 64 * KIB)
    monkeypatch.setattr(file_module, "_ZERO_CHUNK", memoryview(bytes(64 * KIB)))
    monkeypatch.setattr(os, "pwrite", pwrite)
    image.write_zeroes(1, image.size - 2)
    assert max(sizes) == 64 * KIB
    assert sum(sizes) == image.size - 2
    assert image.read(1, image.size - 2) == bytes(image.size - 2)


def test_zero_without_zero_range_punches_and_reallocates(
    image: FileStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tmpfs can punch holes but not ZERO_RANGE; NO_HOLE zeroing must stay fast and allocated.
    _refuse_fallocate(monkeypatch, {ZERO_RANGE})
    image.write(0, pattern(5, image.size))
    image.flush()
    image.write_zeroes(4096, 512 * KIB, may_trim=False, fast=True)
    assert image.read(4096, 512 * KIB) == bytes(512 * KIB)
    assert _allocated_bytes(image) >= image.size
    assert image.read(0, 4096) == pattern(5, image.size)[:4096]


def test_short_reads_and_writes_are_completed(
    image: FileStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pread, real_pwrite = os.pread, os.pwrite

    def pread(fd: int, length: int, offset: int) -> bytes:
        return real_pread(fd, min(length, 1000), offset)

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        return real_pwrite(fd, memoryview(data)[:1000], offset)

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "pwrite", pwrite)
    data = pattern(6, 10_001)
    image.write(77, data)
    assert image.read(77, len(data)) == data


def test_write_of_wide_memoryview(image: FileStorage) -> None:
    data = pattern(7, 4000)
    image.write(3, memoryview(data).cast("I"))
    assert image.read(3, 4000) == data


def test_read_past_truncated_end_is_an_error(image: FileStorage, tmp_path: Path) -> None:
    image.write(0, b"x" * 8192)
    os.truncate(tmp_path / "image.img", 4096)
    with pytest.raises(StorageError) as excinfo:
        image.read(0, 8192)
    assert excinfo.value.errno == errno.EIO


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    losetup = shutil.which("losetup")
    if losetup is None or not os.path.exists("/dev/loop-control"):
        pytest.skip("losetup or /dev/loop-control unavailable")
    backing = _sparse_file(tmp_path / "loop.img", 8 * 1024 * KIB)
    result = subprocess.run(
        [losetup, "--find", "--show", str(backing)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"cannot attach a loop device: {result.stderr.strip()}")
    device = Path(result.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run([losetup, "--detach", str(device)], check=True)


def test_block_device(loop_device: Path) -> None:
    storage = FileStorage(loop_device)
    try:
        assert storage.is_block_device
        size = storage.size
        assert size == 8 * 1024 * KIB
        data = pattern(8, 300_000)
        storage.write(1001, data, fua=True)
        assert storage.read(1001, len(data)) == data
        # Unaligned edges are written, the aligned middle goes to BLKZEROOUT.
        storage.write_zeroes(1501, 100_000)
        expected = data[:500] + bytes(100_000) + data[100_500:]
        assert storage.read(1001, len(data)) == expected
        with pytest.raises(StorageError) as excinfo:
            storage.write_zeroes(0, 4096, fast=True)
        assert excinfo.value.errno == errno.ENOTSUP
        assert not storage.capabilities.can_fast_zero
        # A loop device discards by punching its backing file, so trimmed blocks read zero.
        storage.trim(8192, 65536)
        assert storage.read(8192, 65536) == bytes(65536)
        assert storage.read(1001, 8192 - 1001) == expected[: 8192 - 1001]
        storage.trim(1, 100)  # no whole sector inside: nothing to discard
        assert storage.extents(5, size - 5) == [Extent(5, size - 5)]
        storage.write(size - 2, b"\xfe\xff")
        storage.flush()
        assert storage.read(size - 2, 2) == b"\xfe\xff"
    finally:
        storage.close()
    read_only = FileStorage(loop_device, read_only=True)
    try:
        assert read_only.read(size - 2, 2) == b"\xfe\xff"
        with pytest.raises(StorageError) as excinfo:
            read_only.trim(0, 4096)
        assert excinfo.value.errno == errno.EPERM
    finally:
        read_only.close()
