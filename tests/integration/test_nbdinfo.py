"""nbdinfo (libnbd's command line client) against the real ``nbs serve``.

Every expectation is checked with nbdinfo's own output; the file behind an export is read
directly with SEEK_DATA/SEEK_HOLE to know what the block status must say.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import NbsServer, require_tool
from tests.integration.helpers import file_layout, merge

MiB = 1 << 20
SIZE = 64 * MiB

CAPABILITIES = ["flush", "fua", "trim", "zero", "fast-zero", "cache", "df", "multi-conn"]


def run(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=check)


def nbdinfo_json(*args: str) -> dict[str, Any]:
    out = run(require_tool("nbdinfo"), "--json", *args, check=True)
    data = json.loads(out.stdout)
    assert isinstance(data, dict)
    return data


def sparse_file(path: Path, size: int = SIZE) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def served(nbs_server: Callable[..., NbsServer], disk: Path, tmp_path: Path) -> NbsServer:
    """A writable export ``disk`` and a read-only export ``ro``."""
    ro = sparse_file(tmp_path / "ro.img")
    return nbs_server(
        "--listen", "127.0.0.1:0", "--export", f"disk={disk}", "--export", f"ro={ro},ro"
    )


def test_json_reports_every_capability_of_a_writable_file_export(served: NbsServer) -> None:
    info = nbdinfo_json(served.uri("disk"))
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    assert info["TLS"] is False
    exports = info["exports"]
    assert isinstance(exports, list)
    assert len(exports) == 1
    export = exports[0]
    assert export["export-name"] == "disk"
    assert export["export-size"] == SIZE
    assert export["is_read_only"] is False
    for capability in CAPABILITIES:
        key = "can_" + capability.replace("-", "_")
        assert export[key] is True, f"{key} is {export[key]!r}"
    assert "base:allocation" in export["contexts"]
    assert export["block_size_minimum"] == 1
    assert export["block_size_maximum"] >= MiB


@pytest.mark.parametrize("capability", [*CAPABILITIES, "read", "write"])
def test_can_query_is_true_on_writable_export(served: NbsServer, capability: str) -> None:
    # nbdinfo --can exits 0 for true, 2 for false, 1 for an error.
    result = run(require_tool("nbdinfo"), "--can", capability, served.uri("disk"))
    assert result.returncode == 0, result.stderr


def test_is_read_only_is_false_on_writable_export(served: NbsServer) -> None:
    result = run(require_tool("nbdinfo"), "--is", "read-only", served.uri("disk"))
    assert result.returncode == 2, result.stderr


def test_read_only_export_reports_read_only(served: NbsServer) -> None:
    nbdinfo = require_tool("nbdinfo")
    assert run(nbdinfo, "--is", "read-only", served.uri("ro")).returncode == 0
    for capability in ("write", "trim", "zero", "fast-zero"):
        result = run(nbdinfo, "--can", capability, served.uri("ro"))
        assert result.returncode == 2, f"--can {capability}: {result.returncode} {result.stderr}"
    export = nbdinfo_json(served.uri("ro"))["exports"][0]
    assert export["is_read_only"] is True
    assert export["can_trim"] is False
    assert export["can_zero"] is False


def test_size_matches_the_file(served: NbsServer) -> None:
    out = run(require_tool("nbdinfo"), "--size", served.uri("disk"), check=True)
    assert int(out.stdout) == SIZE


def test_map_shows_the_same_data_and_holes_as_the_file(
    nbs_server: Callable[..., NbsServer], disk: Path
) -> None:
    fd = os.open(disk, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xaa" * 4096, 0)
        os.pwrite(fd, os.urandom(128 * 1024), 1 * MiB)
        os.pwrite(fd, b"x" * 1000, 10 * MiB + 512)
        os.pwrite(fd, b"\x55" * (2 * MiB), 20 * MiB)
        os.pwrite(fd, b"\x01" * MiB, SIZE - MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    expected = merge(file_layout(disk))
    # The layout really is mixed, or the comparison would prove little.
    assert sum(1 for run_ in expected if run_[2]) >= 4
    assert sum(1 for run_ in expected if not run_[2]) >= 4

    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"disk={disk}")
    out = run(require_tool("nbdinfo"), "--map", "--json", server.uri("disk"), check=True)
    entries = json.loads(out.stdout)
    for entry in entries:
        if entry["type"] & 1:
            # A hole of a sparse file reads as zeroes: hole and zero.
            assert entry["type"] == 3, entry
        else:
            # Data that is not zero must never be reported as zero (clients would skip it).
            assert entry["type"] == 0, entry
    reported = merge([(e["offset"], e["length"], not e["type"] & 1) for e in entries])
    assert reported == expected
    assert reported[-1][0] + reported[-1][1] == SIZE


def test_map_of_an_empty_sparse_export_is_one_hole(served: NbsServer) -> None:
    out = run(require_tool("nbdinfo"), "--map", "--json", served.uri("disk"), check=True)
    entries = json.loads(out.stdout)
    assert [(e["offset"], e["length"], e["type"]) for e in entries] == [(0, SIZE, 3)]


def test_list_shows_every_export_with_its_description(
    nbs_server: Callable[..., NbsServer], tmp_path: Path
) -> None:
    a = sparse_file(tmp_path / "a.img")
    b = sparse_file(tmp_path / "b.img", 32 * MiB)
    c = sparse_file(tmp_path / "c.img", 16 * MiB)
    server = nbs_server(
        "--listen",
        "127.0.0.1:0",
        "--export",
        f"alpha={a},description=First disk",
        "--export",
        f"beta={b},ro,description=Golden image",
        "--export",
        f"gamma={c}",
    )
    info = nbdinfo_json("--list", server.tcp)
    exports = {e["export-name"]: e for e in info["exports"]}
    assert set(exports) == {"alpha", "beta", "gamma"}
    assert exports["alpha"].get("description") == "First disk"
    assert exports["beta"].get("description") == "Golden image"
    assert "description" not in exports["gamma"]
    assert exports["alpha"]["export-size"] == SIZE
    assert exports["beta"]["export-size"] == 32 * MiB
    assert exports["gamma"]["export-size"] == 16 * MiB
    assert exports["beta"]["is_read_only"] is True
    assert exports["alpha"]["is_read_only"] is False


def test_json_of_one_export_shows_its_description(
    nbs_server: Callable[..., NbsServer], disk: Path
) -> None:
    server = nbs_server(
        "--listen", "127.0.0.1:0", "--export", f"disk={disk},description=Scratch space"
    )
    export = nbdinfo_json(server.uri("disk"))["exports"][0]
    assert export.get("description") == "Scratch space"


def test_plain_list_names_every_export(served: NbsServer) -> None:
    out = run(require_tool("nbdinfo"), "--list", served.tcp, check=True)
    assert re.findall(r'^export="([^"]*)":$', out.stdout, re.MULTILINE) == ["disk", "ro"]


def test_unix_socket_listener_serves_exports(
    nbs_server: Callable[..., NbsServer], disk: Path, tmp_path: Path
) -> None:
    sock = tmp_path / "nbs.sock"
    server = nbs_server("--socket", str(sock), "--export", f"disk={disk}")
    assert server.uris == [f"nbd+unix:///?socket={sock}"]
    assert sock.is_socket()
    info = nbdinfo_json(f"nbd+unix:///disk?socket={sock}")
    export = info["exports"][0]
    assert export["export-name"] == "disk"
    assert export["export-size"] == SIZE
    assert export["can_multi_conn"] is True
    # The default export (empty name) is the only one configured.
    out = run(require_tool("nbdinfo"), "--size", f"nbd+unix:///?socket={sock}", check=True)
    assert int(out.stdout) == SIZE
    assert server.stop() == 0
    assert not sock.exists()
