"""Helpers shared by the attach tests (QMP, libvirt): the nbs CLI, volumes, guest disks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.integration.conftest import NBS, require_tool
from tests.integration.vm import AgentGuest

SIZE = 64 << 20


def nbs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*NBS, *args], check=False, capture_output=True, text=True, timeout=180)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def volume_file(tmp_path: Path, name: str = "vol.img") -> Path:
    path = tmp_path / name
    with path.open("wb") as f:
        f.truncate(SIZE)
    return path


def guest_disk(vm: AgentGuest, serial: str, timeout: float = 30) -> str:
    """The /dev name of the virtio disk with ``serial`` once the guest sees it."""
    deadline = time.monotonic() + timeout
    find = (
        'for d in /sys/block/vd*; do [ "$(cat $d/serial 2>/dev/null)" = '
        f"{serial} ] && basename $d; done"
    )
    while time.monotonic() < deadline:
        name = vm.run(find).output.strip()
        if name:
            return f"/dev/{name}"
        time.sleep(0.5)
    raise AssertionError(
        f"no disk with serial {serial} in the guest: {vm.run('ls /sys/block').output}"
    )


def file_layout(path: Path) -> list[tuple[int, int, bool]]:
    """``(offset, length, is_data)`` runs of a file, from SEEK_DATA/SEEK_HOLE."""
    runs: list[tuple[int, int, bool]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                data = size
            if data > pos:
                runs.append((pos, data - pos, False))
                pos = data
                continue
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            runs.append((pos, hole - pos, True))
            pos = hole
    finally:
        os.close(fd)
    return runs


def merge(runs: list[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    out: list[tuple[int, int, bool]] = []
    for offset, length, is_data in runs:
        if out and out[-1][2] == is_data and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length, is_data)
        else:
            out.append((offset, length, is_data))
    return out


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def fio(uri: str, tmp_path: Path, *options: str) -> dict[str, Any]:
    """fio's nbd engine on ``uri`` (32 MiB unless ``options`` say otherwise), writing blocks
    with crc32c headers and reading every one back; the JSON report."""
    output = tmp_path / "fio.json"
    result = subprocess.run(
        [
            require_tool("fio"),
            "--name=verify",
            "--ioengine=nbd",
            f"--uri={uri}",
            "--size=32m",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_state_save=0",  # else fio leaves a state file in the working directory
            "--output-format=json",
            f"--output={output}",
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(output.read_text())
    assert isinstance(report, dict)
    return report
