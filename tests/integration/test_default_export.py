"""The default export (the empty name): which volume it is, and every client that names no
export working on it, BLOCK_STATUS included (nbdinfo --map, qemu-img map/convert, nbdcopy,
``nbs volume create --from-image nbd://HOST:PORT``)."""

from __future__ import annotations

import filecmp
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import NBS, NbsServer, require_tool

MiB = 1 << 20
SIZE = 64 * MiB
DATA_AT = 5 * MiB  # where the test image holds data; the rest is a hole


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def nbs(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(*NBS, *args, "--data-dir", str(data))


def create(data: Path, name: str) -> None:
    result = nbs(data, "volume", "create", name, "--size", f"{SIZE}")
    assert result.returncode == 0, result.stderr


def holds(server: NbsServer, name: str, pattern: int) -> bool:
    """Whether the first MiB of volume ``name`` is ``pattern`` (qemu-io exits 1 otherwise)."""
    uri = server.uri(name)
    result = run(require_tool("qemu-io"), "-f", "raw", "-c", f"read -P {pattern:#x} 0 1M", uri)
    assert result.returncode == 0 or "verification failed" in result.stdout, result.stderr
    return result.returncode == 0


# ---------------------------------------------------------------- which volume is the default


def test_catalogue_without_a_default_volume_has_no_default_export(
    nbs_server: Callable[..., NbsServer], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    create(data, "alpha")  # sorts first: it used to be written to through the empty name
    create(data, "beta")
    server = nbs_server("--listen", "127.0.0.1:0", "--data-dir", str(data))
    wrote = run(require_tool("qemu-io"), "-f", "raw", "-c", "write -P 0xab 0 1M", server.tcp)
    assert wrote.returncode != 0, wrote.stdout
    assert holds(server, "alpha", 0)
    info = run(require_tool("nbdinfo"), server.tcp)
    assert info.returncode != 0
    # libnbd's wording of NBD_REP_ERR_UNKNOWN (ENOENT) for the empty name.
    assert "No such file or directory for the default export" in info.stderr
    assert server.alive()


def test_catalogue_default_export_is_the_volume_named_default(
    nbs_server: Callable[..., NbsServer], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    create(data, "alpha")
    create(data, "default")
    server = nbs_server("--listen", "127.0.0.1:0", "--data-dir", str(data))
    wrote = run(require_tool("qemu-io"), "-f", "raw", "-c", "write -P 0xab 0 1M", server.tcp)
    assert wrote.returncode == 0, wrote.stderr
    assert holds(server, "default", 0xAB)
    assert holds(server, "alpha", 0)


# ---------------------------------------------------------------- BLOCK_STATUS with no export name


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A sparse image with 1 MiB of data at DATA_AT."""
    path = tmp_path / "source.img"
    with path.open("wb") as f:
        f.truncate(SIZE)
        f.seek(DATA_AT)
        f.write(b"\x5a" * MiB)
    return path


@pytest.fixture(params=["export", "catalogue"])
def default_server(
    request: pytest.FixtureRequest,
    nbs_server: Callable[..., NbsServer],
    source: Path,
    tmp_path: Path,
) -> NbsServer:
    """A server whose default export holds ``source``'s content: with ``--export`` (the first
    export is the default) or a catalogue with a volume ``default`` (among others)."""
    if request.param == "export":
        return nbs_server("--listen", "127.0.0.1:0", "--export", f"disk={source}")
    data = tmp_path / "data"
    create(data, "alpha")
    imported = nbs(data, "volume", "create", "default", "--from-image", str(source))
    assert imported.returncode == 0, imported.stderr
    return nbs_server("--listen", "127.0.0.1:0", "--data-dir", str(data))


def data_extents(entries: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(e["offset"], e["length"]) for e in entries if e["data"]]


def test_nbdinfo_map_of_the_default_export(default_server: NbsServer) -> None:
    result = run(require_tool("nbdinfo"), "--map", "--json", default_server.tcp)
    assert result.returncode == 0, result.stderr
    allocated = [(e["offset"], e["length"]) for e in json.loads(result.stdout) if e["type"] == 0]
    assert allocated == [(DATA_AT, MiB)]


def test_qemu_img_map_of_the_default_export(default_server: NbsServer) -> None:
    result = run(require_tool("qemu-img"), "map", "--output=json", default_server.tcp)
    assert result.returncode == 0, result.stderr
    assert data_extents(json.loads(result.stdout)) == [(DATA_AT, MiB)]


@pytest.mark.parametrize(
    "command",
    [["qemu-img", "convert", "-f", "raw", "URI", "-O", "raw", "OUT"], ["nbdcopy", "URI", "OUT"]],
    ids=["qemu-img-convert", "nbdcopy"],
)
def test_copy_from_the_default_export(
    default_server: NbsServer, source: Path, tmp_path: Path, command: list[str]
) -> None:
    out = tmp_path / "out.img"
    values = {"URI": default_server.tcp, "OUT": str(out)}
    result = run(require_tool(command[0]), *(values.get(arg, arg) for arg in command[1:]))
    assert result.returncode == 0, result.stderr
    assert filecmp.cmp(source, out, shallow=False)


def test_volume_create_from_the_default_export(
    default_server: NbsServer, source: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    result = nbs(other, "volume", "create", "copy", "--from-image", default_server.tcp)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "copy.img"
    exported = nbs(other, "volume", "export", "copy", str(out))
    assert exported.returncode == 0, exported.stderr
    assert filecmp.cmp(source, out, shallow=False)
