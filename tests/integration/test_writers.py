"""One writer per volume: a second client of a volume held writable reads only.

Real `nbs serve` on a catalogue, real clients (python3-libnbd, qemu-io) and a real QEMU guest
for `nbs attach`; `nbs volume info` (through the server's API) shows who holds what.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.integration.conftest import NbsServer, require_module, require_tool
from tests.integration.helpers import guest_disk, nbs
from tests.integration.vm import TinyVM

if TYPE_CHECKING:
    import nbd as libnbd  # for annotations: at run time require_module gives nbd

nbd = require_module("nbd")


@pytest.fixture
def catalogue(nbs_server: Callable[..., NbsServer], tmp_path: Path) -> tuple[NbsServer, Path]:
    data = tmp_path / "data"
    nbs("volume", "create", "v", "--size", "64MiB", "--data-dir", str(data))
    nbs("volume", "create", "s", "--size", "64MiB", "--shared", "--data-dir", str(data))
    return nbs_server("--listen", "127.0.0.1:0", "--data-dir", str(data)), data


def _connect(uri: str) -> libnbd.NBD:
    handle = nbd.NBD()
    handle.connect_uri(uri)
    return handle


def _holders(data: Path, volume: str) -> list[dict[str, Any]]:
    info = json.loads(nbs("volume", "info", volume, "--json", "--data-dir", str(data)).stdout)
    holders: list[dict[str, Any]] = info["holders"]
    assert info["connections"] == len(holders)
    return holders


def test_a_second_client_of_a_held_volume_reads_only(catalogue: tuple[NbsServer, Path]) -> None:
    server, data = catalogue
    qemu_io = require_tool("qemu-io")
    first = _connect(server.uri("v"))
    assert not first.is_read_only()
    assert not first.can_multi_conn()  # a second connection of the same client would read only
    first.pwrite(b"A" * 4096, 0)

    second = _connect(server.uri("v"))
    assert second.is_read_only()
    with pytest.raises(nbd.Error) as refused:
        second.pwrite(b"B" * 4096, 0)
    assert refused.value.errno is not None
    assert second.pread(4096, 0) == b"A" * 4096

    holders = _holders(data, "v")
    assert [h["writable"] for h in holders] == [True, False]
    assert all(str(h["peer"]).startswith("127.0.0.1:") for h in holders)
    assert holders[0]["since"] <= holders[1]["since"]

    # A writer that knows nothing of NBS fails to open, and nothing is written.
    write = _run(qemu_io, "-f", "raw", "-c", "write -P 0x42 0 4k", server.uri("v"))
    assert write.returncode != 0
    read = _run(qemu_io, "-r", "-f", "raw", "-c", "read -P 0x41 0 4k", server.uri("v"))
    assert read.returncode == 0, read.stdout + read.stderr

    first.shutdown()
    second.shutdown()
    third = _connect(server.uri("v"))  # the writer left: the next client may write
    assert not third.is_read_only()
    third.pwrite(b"C" * 4096, 0)
    third.shutdown()
    assert _holders(data, "v") == []


def test_a_shared_volume_takes_several_writers(catalogue: tuple[NbsServer, Path]) -> None:
    server, data = catalogue
    one, two = _connect(server.uri("s")), _connect(server.uri("s"))
    assert not one.is_read_only()
    assert not two.is_read_only()
    one.pwrite(b"1" * 4096, 0)
    two.pwrite(b"2" * 4096, 4096)
    one.flush()
    two.flush()
    assert one.pread(8192, 0) == b"1" * 4096 + b"2" * 4096
    assert [h["writable"] for h in _holders(data, "s")] == [True, True]
    info = json.loads(nbs("volume", "info", "s", "--json", "--data-dir", str(data)).stdout)
    assert info["shared"] is True
    one.shutdown()
    two.shutdown()


def test_attach_refuses_a_volume_held_writable_elsewhere(
    catalogue: tuple[NbsServer, Path], tiny_vm: Callable[..., TinyVM]
) -> None:
    server, data = catalogue
    vm = tiny_vm()
    holder = _connect(server.uri("v"))
    refused = nbs("attach", server.uri("v"), "--qmp", str(vm.qmp_path), check=False)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert "read-only to this client" in refused.stderr
    assert "nbs volume info v" in refused.stderr
    assert json.loads(nbs("attached", "--qmp", str(vm.qmp_path), "--json").stdout) == []

    # Asked for read-only, the guest gets the volume read-only beside the writer.
    nbs("attach", server.uri("v"), "--qmp", str(vm.qmp_path), "--read-only")
    disk = guest_disk(vm, "v")
    assert vm.check(f"cat /sys/block/{disk.rsplit('/', 1)[1]}/ro").strip() == "1"
    assert [h["writable"] for h in _holders(data, "v")] == [True, False]
    nbs("detach", "v", "--qmp", str(vm.qmp_path))
    holder.shutdown()

    nbs("attach", server.uri("v"), "--qmp", str(vm.qmp_path))
    disk = guest_disk(vm, "v")
    assert vm.check(f"cat /sys/block/{disk.rsplit('/', 1)[1]}/ro").strip() == "0"
    assert _connect(server.uri("v")).is_read_only()  # now the VM is the writer
    nbs("detach", "v", "--qmp", str(vm.qmp_path))


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
