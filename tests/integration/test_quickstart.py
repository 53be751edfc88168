"""The README's quick start, verbatim in spirit: create, serve, write with qemu-io, snapshot
while served, clone, read the clone; plus qemu-img/qemu-io checks of snapshot/clone isolation.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.integration.conftest import NBS, NbsServer, require_tool


def nbs(data: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*NBS, *args, "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def qemu_io(uri: str, *commands: str) -> str:
    args = [require_tool("qemu-io"), "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    result = subprocess.run([*args, uri], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "failed" not in result.stdout, result.stdout  # qemu-io's pattern mismatches
    return result.stdout


def test_quick_start(nbs_server: Callable[..., NbsServer], tmp_path: Path) -> None:
    data = tmp_path / "data"
    nbs(data, "volume", "create", "golden", "--size", "64MiB", "--description", "base image")
    server = nbs_server("--listen", "127.0.0.1:0", "--data-dir", str(data))
    qemu_io(server.uri("golden"), "write -P 0xaa 0 1M", "flush")

    # While served: snapshot through the server's API, found via the data directory.
    nbs(data, "snapshot", "create", "golden", "v1")
    qemu_io(server.uri("golden"), "write -P 0xbb 0 1M")  # after the snapshot
    nbs(data, "volume", "clone", "golden@v1", "vm1")

    # The clone shows the snapshot, is served without a restart, and is independent.
    qemu_io(server.uri("vm1"), "read -P 0xaa 0 1M", "write -P 0xcc 1M 1M")
    qemu_io(server.uri("golden"), "read -P 0xbb 0 1M", "read -P 0 1M 1M")
    qemu_img = require_tool("qemu-img")
    export = tmp_path / "v1.raw"
    nbs(data, "volume", "export", "golden@v1", str(export))
    compare = subprocess.run(
        [qemu_img, "compare", "-f", "raw", "-F", "raw", str(export), server.uri("vm1")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert compare.returncode == 1, compare.stdout  # vm1 differs at 1M: it was written
    info = json.loads(nbs(data, "volume", "info", "vm1", "--json").stdout)
    assert info["origin"] == "golden@v1"
    assert info["connections"] == 0
    snaps = json.loads(nbs(data, "snapshot", "list", "golden", "--json").stdout)
    assert [(s["name"], s["clones"]) for s in snaps] == [("v1", ["vm1"])]

    refused = nbs(data, "snapshot", "delete", "golden@v1", check=False)
    assert refused.returncode == 1
    assert "clones" in refused.stderr
    nbs(data, "snapshot", "delete", "golden@v1", "--flatten-clones")
    qemu_io(server.uri("vm1"), "read -P 0xaa 0 1M", "read -P 0xcc 1M 1M")
    assert server.stop() == 0


def test_import_qcow2_and_export_compare_equal(tmp_path: Path) -> None:
    qemu_img = require_tool("qemu-img")
    source = tmp_path / "src.qcow2"
    subprocess.run(
        [qemu_img, "create", "-f", "qcow2", str(source), "48M"], check=True, capture_output=True
    )
    subprocess.run(
        [require_tool("qemu-io"), "-f", "qcow2", "-c", "write -P 0x42 4M 2M", str(source)],
        check=True,
        capture_output=True,
    )
    data = tmp_path / "data"
    created = nbs(data, "volume", "create", "img", "--from-image", str(source))
    assert "100%" in created.stderr  # progress was shown
    out = tmp_path / "out.qcow2"
    exported = nbs(data, "volume", "export", "img", str(out), "--format", "qcow2")
    assert "100%" in exported.stderr
    compare = subprocess.run(
        [qemu_img, "compare", str(source), str(out)], capture_output=True, text=True, check=False
    )
    assert compare.returncode == 0, compare.stdout
    info = json.loads(nbs(data, "volume", "info", "img", "--json").stdout)
    assert info["size"] == 48 << 20
    assert info["used_bytes"] <= 4 << 20  # sparse: only the written region is stored


def test_bad_volume_requests_are_refused_without_side_effects(tmp_path: Path) -> None:
    data = tmp_path / "data"
    nbs(data, "volume", "create", "keep", "--size", "8MiB")
    for args in (
        ["volume", "create", "a/b", "--size", "1MiB"],
        ["volume", "create", "..", "--size", "1MiB"],
        ["volume", "create", "", "--size", "1MiB"],
        ["volume", "create", "x" * 256, "--size", "1MiB"],
        ["volume", "create", "z", "--size", "0"],
        ["volume", "create", "z", "--size", "-5G"],
        ["volume", "create", "z", "--size", "1000"],
        ["volume", "create", "z", "--size", "999PiB"],
        ["volume", "create", "keep", "--size", "1MiB"],
        ["volume", "resize", "keep", "1MiB"],
    ):
        result = nbs(data, *args, check=False)
        assert result.returncode in (1, 2), args
        assert result.stderr.startswith("nbs: error:"), (args, result.stderr)
        assert result.stderr.count("\n") == 1, result.stderr
    volumes = json.loads(nbs(data, "volume", "list", "--json").stdout)
    assert [(v["name"], v["size"]) for v in volumes] == [("keep", 8 << 20)]
