"""Bulk and concurrent I/O: nbdcopy over several connections and fio's nbd engine with verify."""

from __future__ import annotations

import filecmp
import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import NbsServer, require_tool
from tests.integration.helpers import fio

MiB = 1 << 20
SIZE = 32 * MiB


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def sparse_file(path: Path, size: int = SIZE) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    return {
        "a": sparse_file(tmp_path / "a.img"),
        "b": sparse_file(tmp_path / "b.img"),
    }


@pytest.fixture
def served(nbs_server: Callable[..., NbsServer], images: dict[str, Path]) -> NbsServer:
    return nbs_server(
        "--listen", "127.0.0.1:0", "--export", f"a={images['a']}", "--export", f"b={images['b']}"
    )


@pytest.fixture
def random_source(tmp_path: Path) -> Path:
    path = tmp_path / "random.img"
    path.write_bytes(random.Random(21).randbytes(SIZE))
    return path


def nbdcopy(*args: str) -> subprocess.CompletedProcess[str]:
    result = run(
        require_tool("nbdcopy"), "--connections=4", "--threads=4", "--flush", "--verbose", *args
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # nbdcopy only opens several connections when the server advertises multi-conn.
    summary = [line for line in result.stderr.splitlines() if line.startswith("nbdcopy:")]
    assert any("connections=4" in line for line in summary), summary
    return result


def test_nbdcopy_with_four_connections_in_and_out(
    served: NbsServer, images: dict[str, Path], random_source: Path, tmp_path: Path
) -> None:
    assert run(require_tool("nbdinfo"), "--can", "multi-conn", served.uri("a")).returncode == 0
    nbdcopy(str(random_source), served.uri("a"))
    assert filecmp.cmp(random_source, images["a"], shallow=False)

    out = tmp_path / "out.img"
    nbdcopy(served.uri("a"), str(out))
    assert out.stat().st_size == SIZE
    assert filecmp.cmp(random_source, out, shallow=False)


def test_nbdcopy_between_two_exports_of_one_server(
    served: NbsServer, images: dict[str, Path], random_source: Path
) -> None:
    # Stale data in the target where the source has data; all of it must be replaced.
    with images["b"].open("r+b") as f:
        f.write(b"\xff" * SIZE)
    nbdcopy(str(random_source), served.uri("a"))
    nbdcopy(served.uri("a"), served.uri("b"))
    assert filecmp.cmp(random_source, images["b"], shallow=False)


def test_nbdcopy_of_a_sparse_source_zeroes_the_target(
    served: NbsServer, images: dict[str, Path], tmp_path: Path
) -> None:
    source = sparse_file(tmp_path / "sparse.img")
    with source.open("r+b") as f:
        f.seek(5 * MiB)
        f.write(b"\x42" * MiB)
    with images["a"].open("r+b") as f:
        f.write(b"\xee" * SIZE)
    nbdcopy(str(source), served.uri("a"))
    assert filecmp.cmp(source, images["a"], shallow=False)


@pytest.mark.parametrize(
    "options",
    [
        ("--rw=randwrite", "--bs=4k", "--iodepth=16"),
        ("--rw=randwrite", "--bsrange=512-128k", "--iodepth=8"),
        ("--rw=write", "--bs=1m", "--iodepth=4"),
    ],
    ids=["randwrite-4k-qd16", "randwrite-mixed-qd8", "write-1m-qd4"],
)
def test_fio_nbd_engine_writes_and_verifies_without_errors(
    served: NbsServer, images: dict[str, Path], tmp_path: Path, options: tuple[str, ...]
) -> None:
    report = fio(served.uri("a"), tmp_path, *options)
    jobs = report["jobs"]
    assert isinstance(jobs, list)
    assert len(jobs) == 1
    job = jobs[0]
    assert job["error"] == 0
    assert job.get("total_err", 0) == 0
    # Everything was written, then everything was read back and checksummed.
    assert job["write"]["io_bytes"] == SIZE
    assert job["read"]["io_bytes"] == SIZE
    assert job["write"]["total_ios"] > 0
    assert job["read"]["total_ios"] == job["write"]["total_ios"]
    # fio's verify headers landed in the file itself.
    assert os.stat(images["a"]).st_blocks * 512 >= SIZE // 2
