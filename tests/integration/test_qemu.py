"""qemu-img and qemu-io (QEMU's NBD client) against the real ``nbs serve``.

Data is checked by reading the export's file directly and with ``cmp``-style comparisons; the
allocation map is checked against the file's own SEEK_DATA/SEEK_HOLE layout.
"""

from __future__ import annotations

import filecmp
import json
import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import NbsServer, require_tool
from tests.integration.helpers import file_layout, merge

MiB = 1 << 20
SIZE = 64 * MiB


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def ok(*args: str) -> str:
    result = run(*args)
    assert result.returncode == 0, f"{args} failed ({result.returncode}): {result.stderr}"
    return result.stdout


def qemu_io(uri: str, *commands: str, read_only: bool = False) -> subprocess.CompletedProcess[str]:
    args = [require_tool("qemu-io"), "-f", "raw"]
    if read_only:
        args.append("-r")
    for command in commands:
        args += ["-c", command]
    return run(*args, uri)


def sparse_file(path: Path, size: int = SIZE) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.fixture
def ro_file(tmp_path: Path) -> Path:
    path = sparse_file(tmp_path / "ro.img")
    write_at(path, 0, b"\x5e" * 4096)
    return path


@pytest.fixture
def served(nbs_server: Callable[..., NbsServer], disk: Path, ro_file: Path) -> NbsServer:
    return nbs_server(
        "--listen", "127.0.0.1:0", "--export", f"disk={disk}", "--export", f"ro={ro_file},ro"
    )


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A 64 MiB raw image with random data in a few places and holes elsewhere."""
    path = sparse_file(tmp_path / "source.img")
    rng = random.Random(11)
    write_at(path, 0, rng.randbytes(4 * MiB))
    write_at(path, 20 * MiB + 4096, rng.randbytes(MiB))
    write_at(path, SIZE - 64 * 1024, rng.randbytes(64 * 1024))
    return path


def test_qemu_img_info_sees_a_raw_64m_image(served: NbsServer) -> None:
    info = json.loads(ok(require_tool("qemu-img"), "info", "--output=json", served.uri("disk")))
    assert info["virtual-size"] == SIZE
    assert info["format"] == "raw"
    info = json.loads(
        ok(require_tool("qemu-img"), "info", "--output=json", "-f", "raw", served.uri("ro"))
    )
    assert info["virtual-size"] == SIZE


def test_convert_file_into_export_then_back_out(
    served: NbsServer, disk: Path, source: Path, tmp_path: Path
) -> None:
    qemu_img = require_tool("qemu-img")
    # Stale data where the source has holes: the copy must zero it.
    write_at(disk, 30 * MiB, b"\xff" * MiB)
    write_at(disk, 20 * MiB, b"\xff" * 4096)
    ok(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(source), served.uri("disk"))
    assert filecmp.cmp(source, disk, shallow=False)

    out = tmp_path / "out.img"
    ok(qemu_img, "convert", "-f", "raw", "-O", "raw", served.uri("disk"), str(out))
    assert out.stat().st_size == SIZE
    assert filecmp.cmp(source, out, shallow=False)


def test_compare_detects_equal_and_different_content(
    served: NbsServer, disk: Path, source: Path
) -> None:
    qemu_img = require_tool("qemu-img")
    ok(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(source), served.uri("disk"))
    same = run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(source), served.uri("disk"))
    assert same.returncode == 0, same.stdout + same.stderr
    assert "Images are identical" in same.stdout

    changed = qemu_io(served.uri("disk"), "write -P 0x01 12345 1")
    assert changed.returncode == 0, changed.stderr
    assert file_bytes(disk, 12345, 1) == b"\x01"
    differ = run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(source), served.uri("disk"))
    assert differ.returncode == 1, differ.stdout + differ.stderr
    # qemu-img compare reports the first differing 512-byte sector.
    assert f"Content mismatch at offset {12345 // 512 * 512}!" in differ.stdout


def test_map_holes_match_the_file(nbs_server: Callable[..., NbsServer], disk: Path) -> None:
    write_at(disk, 0, b"\x01" * 65536)
    write_at(disk, 3 * MiB, b"\x02" * (2 * MiB))
    write_at(disk, 17 * MiB + 8192, b"\x03" * 4096)
    write_at(disk, SIZE - MiB, b"\x04" * MiB)
    expected = merge(file_layout(disk))
    assert sum(1 for r in expected if r[2]) == 4
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"disk={disk}")
    out = ok(require_tool("qemu-img"), "map", "--output=json", "-f", "raw", server.uri("disk"))
    entries = json.loads(out)
    for entry in entries:
        if not entry["data"]:
            assert entry["zero"] is True, entry
    reported = merge([(e["start"], e["length"], e["data"]) for e in entries])
    assert reported == expected


def test_qemu_io_write_then_read_pattern(served: NbsServer, disk: Path) -> None:
    uri = served.uri("disk")
    wrote = qemu_io(uri, "write -P 0xab 0 1M")
    assert wrote.returncode == 0, wrote.stderr
    assert "wrote 1048576/1048576 bytes at offset 0" in wrote.stdout
    read = qemu_io(uri, "read -P 0xab 0 1M")
    assert read.returncode == 0, read.stdout + read.stderr
    assert "Pattern verification failed" not in read.stdout
    assert "read 1048576/1048576 bytes at offset 0" in read.stdout
    # The pattern check itself can fail: a wrong pattern is reported.
    wrong = qemu_io(uri, "read -P 0xcd 0 1M")
    assert "Pattern verification failed" in wrong.stdout
    assert file_bytes(disk, 0, MiB) == b"\xab" * MiB
    assert file_bytes(disk, MiB, 4096) == bytes(4096)


@pytest.mark.parametrize("unmap", [False, True], ids=["zero", "zero-unmap"])
def test_qemu_io_write_zeroes(served: NbsServer, disk: Path, unmap: bool) -> None:
    uri = served.uri("disk")
    assert qemu_io(uri, "write -P 0x11 2M 1M").returncode == 0
    zero = qemu_io(uri, f"write -z{' -u' if unmap else ''} 2M 512k")
    assert zero.returncode == 0, zero.stdout + zero.stderr
    assert "wrote 524288/524288 bytes at offset 2097152" in zero.stdout
    check = qemu_io(uri, "read -P 0 2M 512k", "read -P 0x11 2560k 512k")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "Pattern verification failed" not in check.stdout
    assert file_bytes(disk, 2 * MiB, 512 * 1024) == bytes(512 * 1024)
    assert file_bytes(disk, 2 * MiB + 512 * 1024, 512 * 1024) == b"\x11" * (512 * 1024)


def test_qemu_io_discard(served: NbsServer, disk: Path) -> None:
    uri = served.uri("disk")
    assert qemu_io(uri, "write -P 0x22 4M 2M").returncode == 0
    discard = qemu_io(uri, "discard 4M 1M")
    assert discard.returncode == 0, discard.stdout + discard.stderr
    assert "discard 1048576/1048576 bytes at offset 4194304" in discard.stdout
    assert file_bytes(disk, 4 * MiB, MiB) == bytes(MiB)
    assert file_bytes(disk, 5 * MiB, MiB) == b"\x22" * MiB
    data_runs = [(o, n) for o, n, is_data in file_layout(disk) if is_data]
    assert not [(o, n) for o, n in data_runs if o < 5 * MiB and o + n > 4 * MiB]
    # qemu sees the discarded range as unallocated zeroes.
    entries = json.loads(ok(require_tool("qemu-img"), "map", "--output=json", "-f", "raw", uri))
    covering = [e for e in entries if e["start"] <= 4 * MiB < e["start"] + e["length"]]
    assert len(covering) == 1
    assert covering[0]["data"] is False
    assert covering[0]["zero"] is True


def test_read_only_export_rejects_qemu_io_writes(served: NbsServer, ro_file: Path) -> None:
    uri = served.uri("ro")
    write = qemu_io(uri, "write -P 0xab 0 4k")
    assert write.returncode != 0
    assert "wrote" not in write.stdout
    assert file_bytes(ro_file, 0, 8192) == b"\x5e" * 4096 + bytes(4096)
    read = qemu_io(uri, "read -P 0x5e 0 4k", read_only=True)
    assert read.returncode == 0, read.stdout + read.stderr
    assert "Pattern verification failed" not in read.stdout
    info = json.loads(ok(require_tool("qemu-img"), "info", "--output=json", "-f", "raw", uri))
    assert info["virtual-size"] == SIZE
