"""The tiny test guest (images/tiny.py) and its harness (tests/integration/vm.py).

One module-scoped guest with every option (boot disk, host root over 9p, guestfwd to a host
echo server) serves most tests, so the file boots only three guests under TCG: that one, a
libvirt domain and a guest whose root filesystem is an ext4 image on a virtio disk.
"""

from __future__ import annotations

import json
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from images.tiny import TinyImage, build, build_rootfs
from tests.integration.conftest import require_tool
from tests.integration.vm import (
    GuestCommandError,
    LibvirtVM,
    TinyVM,
    qmp_execute,
)

DISK_SIZE = 48 << 20
DISK_MARK = b"NBS-BOOT-DISK-MARK"
DISK_MARK_OFFSET = 5 << 20
ECHO_GUEST_PORT = 7777


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    """A TCP echo server on 127.0.0.1 (until EOF from the client); yields its port."""
    server = _EchoServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def guest(
    tiny_image: TinyImage, tmp_path_factory: pytest.TempPathFactory, echo_port: int
) -> Iterator[TinyVM]:
    """A running guest with a boot disk, the host root over 9p and a guestfwd to echo_port."""
    qemu = require_tool("qemu-system-x86_64")
    workdir = tmp_path_factory.mktemp("guest")
    shared = workdir / "shared"
    shared.mkdir()
    (shared / "from-host.txt").write_text("written on the host\n")
    disk = workdir / "disk.img"
    with disk.open("wb") as f:
        f.truncate(DISK_SIZE)
        f.seek(DISK_MARK_OFFSET)
        f.write(DISK_MARK)
    vm = TinyVM(
        tiny_image,
        workdir,
        name="full",
        qemu=qemu,
        host_root=True,
        shares={"work": shared},
        guestfwd=[(ECHO_GUEST_PORT, echo_port)],
        extra_args=[
            "-blockdev",
            f"driver=file,filename={disk},node-name=boot-file",
            "-blockdev",
            "driver=raw,file=boot-file,node-name=boot",
            "-device",
            "virtio-blk-pci,drive=boot,serial=bootdisk",
        ],
    )
    try:
        vm.start()
        vm.wait_ready(120)
        yield vm
    finally:
        vm.stop()


def test_guest_boots_and_reports_ready(guest: TinyVM) -> None:
    assert guest.boot_seconds is not None
    assert guest.boot_seconds < 120
    assert "nbs-init[initramfs]: ready after" in guest.console_log()
    assert guest.check("cat /etc/nbs/stage") == "initramfs\n"


def test_agent_round_trips_status_and_output(guest: TinyVM) -> None:
    assert guest.check("echo hello") == "hello\n"
    assert guest.run("exit 7").rc == 7
    both = guest.run("echo to-stdout; echo to-stderr >&2; exit 3")
    assert both.rc == 3
    assert both.output == "to-stdout\nto-stderr\n"
    assert guest.check("true") == ""
    assert guest.check("echo 'héllo wörld ✓'") == "héllo wörld ✓\n"


def test_agent_preserves_quoting(guest: TinyVM) -> None:
    command = """printf '%s|' "a  b" 'c"d' "e'f" '$HOME' 'back\\slash' "$((6 * 7))"; echo"""
    assert guest.check(command) == "a  b|c\"d|e'f|$HOME|back\\slash|42|\n"
    multi_line = "x=1\nif [ $x = 1 ]; then\n  echo one\nfi\n"
    assert guest.check(multi_line) == "one\n"


def test_agent_carries_binary_and_large_output(guest: TinyVM) -> None:
    assert guest.run(r"printf '\000\001\377\r\n\033[0m'").raw == b"\x00\x01\xff\r\n\x1b[0m"
    every_byte = guest.run(
        'i=0; while [ $i -lt 256 ]; do printf "\\\\$(printf %o $i)"; i=$((i + 1)); done'
    )
    assert every_byte.raw == bytes(range(256))
    lines = guest.check("seq 1 20000")
    assert lines.splitlines() == [str(i) for i in range(1, 20001)]
    long_arg = "x" * 8000
    assert guest.check(f"echo {long_arg} | wc -c").strip() == "8001"


def test_check_raises_with_output(guest: TinyVM) -> None:
    with pytest.raises(GuestCommandError, match="exited 2") as info:
        guest.check("echo something went wrong; exit 2")
    assert info.value.result.output == "something went wrong\n"


def test_guest_side_timeout_kills_the_command(guest: TinyVM) -> None:
    started = time.monotonic()
    result = guest.run("echo started; sleep 30", timeout=1)
    assert result.rc == 137
    assert result.output.startswith("started\n")  # busybox sh then reports "Killed"
    assert time.monotonic() - started < 15
    assert guest.check("echo still-alive") == "still-alive\n"


def test_kernel_modules_are_loaded(guest: TinyVM) -> None:
    for module in ("virtio_pci", "virtio_blk", "virtio_net", "nbd", "9p", "ext4"):
        guest.check(f"test -d /sys/module/{module}")
    assert guest.check("ls /dev/nbd0 && echo ok").endswith("ok\n")


def test_boot_disk_from_extra_args_is_vda(guest: TinyVM) -> None:
    assert int(guest.check("cat /sys/block/vda/size")) * 512 == DISK_SIZE
    assert guest.check("cat /sys/block/vda/serial").strip() == "bootdisk"
    mark = guest.run(
        f"dd if=/dev/vda bs=512 skip={DISK_MARK_OFFSET // 512} count=1 2>/dev/null"
        f" | head -c {len(DISK_MARK)}"
    )
    assert mark.raw == DISK_MARK


def test_host_root_runs_host_python(guest: TinyVM) -> None:
    started = time.monotonic()
    assert guest.check("chroot /host /usr/bin/python3 -c 'print(1)'") == "1\n"
    print(f"host python3 in the guest (9p): {time.monotonic() - started:.1f} s")
    assert guest.run("touch /host/usr/nbs-readonly-probe").rc != 0
    # The host's /tmp is visible as it is (tox venvs and CI checkouts may live there).
    marker = guest.workdir / "shared" / "from-host.txt"
    assert guest.check(f"cat /host{marker}") == "written on the host\n"


def test_shared_directory_is_read_write(guest: TinyVM) -> None:
    assert guest.check("cat /mnt/work/from-host.txt") == "written on the host\n"
    guest.check("echo written in the guest > /mnt/work/from-guest.txt")
    assert (guest.workdir / "shared" / "from-guest.txt").read_text() == "written in the guest\n"


def test_guestfwd_reaches_host_echo_server(guest: TinyVM) -> None:
    assert guest.check("ip -4 addr show eth0 | grep -c 10.0.2.15").strip() == "1"
    reply = guest.check(f"echo hello-from-guest | nc 10.0.2.100 {ECHO_GUEST_PORT}", timeout=20)
    assert reply == "hello-from-guest\n"


def test_qmp_sockets_answer(guest: TinyVM) -> None:
    assert guest.qmp("query-status")["status"] == "running"
    assert qmp_execute(guest.qmp_path, "query-status")["running"] is True
    assert guest.qmp_path.is_socket()


def test_hotplugged_disk_appears_in_the_guest(guest: TinyVM, tmp_path: Path) -> None:
    disk = tmp_path / "hot.img"
    with disk.open("wb") as f:
        f.truncate(16 << 20)
    guest.qmp("blockdev-add", {"driver": "file", "filename": str(disk), "node-name": "hot-file"})
    guest.qmp("blockdev-add", {"driver": "raw", "file": "hot-file", "node-name": "hot"})
    guest.qmp(
        "device_add", {"driver": "virtio-blk-pci", "drive": "hot", "id": "hot0", "serial": "hot"}
    )
    find = "for d in /sys/block/vd*; do grep -qx hot $d/serial 2>/dev/null && basename $d; done"
    deadline = time.monotonic() + 30
    while not (name := guest.run(find).output.strip()) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert name == "vdb"
    assert int(guest.check("cat /sys/block/vdb/size")) * 512 == 16 << 20


def test_qemu_failure_is_reported_with_its_log(tiny_vm: Callable[..., TinyVM]) -> None:
    vm = tiny_vm(name="broken", ready=False, extra_args=["-device", "no-such-device"])
    with pytest.raises(RuntimeError, match="no-such-device"):
        vm.wait_ready(30)
    assert vm.stop() == 1


def test_image_build_is_cached_by_content(tmp_path: Path) -> None:
    first = build(tmp_path)
    started = time.monotonic()
    second = build(tmp_path)
    assert time.monotonic() - started < 2
    assert second == first
    assert first.directory.parent == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.directory.name]
    assert sorted(p.name for p in first.directory.iterdir()) == [
        "initrd.gz",
        "manifest.json",
        "vmlinux",
        "vmlinuz",
    ]
    assert first.boot_kernel == first.vmlinux
    assert "nbd" in first.modules
    assert first.modules.index("virtio_ring") < first.modules.index("virtio_pci")


def test_concurrent_builds_share_one_entry(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "images.tiny", "--cache-dir", str(tmp_path)]
    root = Path(__file__).resolve().parents[2]
    builders = [
        subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [json.loads(builder.communicate(timeout=120)[0]) for builder in builders]
    assert [builder.returncode for builder in builders] == [0, 0]
    assert outputs[0]["initrd"] == outputs[1]["initrd"]
    assert [p.name for p in tmp_path.iterdir()] == [f"tiny-{outputs[0]['key']}"]


def test_libvirt_domain_boots_and_agent_works(
    libvirt_vm: Callable[..., LibvirtVM],
) -> None:
    vm = libvirt_vm(append="nbs.test=libvirt")
    print(f"libvirt guest ready in {vm.boot_seconds:.1f} s")
    assert vm.domain is not None
    assert vm.domain.name() == vm.domain_name
    assert "nbs.test=libvirt" in vm.check("cat /proc/cmdline")
    vm.check("test -d /sys/module/nbd && test -d /sys/module/virtio_blk")
    assert vm.run("exit 5").rc == 5
    vm.stop()
    assert not vm.alive()


def test_rootfs_image_boots_as_root_disk(tiny_vm: Callable[..., TinyVM], tmp_path: Path) -> None:
    rootfs = build_rootfs(tmp_path / "root.ext4", files={"etc/nbs-marker": b"from-rootfs\n"})
    vm = tiny_vm(
        name="rootfs",
        append="nbs.root=/dev/vda",
        extra_args=["-drive", f"file={rootfs},format=raw,if=virtio"],
    )
    print(f"rootfs guest ready in {vm.boot_seconds:.1f} s")
    assert vm.check("cat /etc/nbs/stage") == "rootfs\n"
    assert vm.check("cat /etc/nbs-marker") == "from-rootfs\n"
    root_mount = vm.check("grep ' / ' /proc/mounts").split()
    assert root_mount[:3] == ["/dev/vda", "/", "ext4"]
    vm.check("echo persisted > /written-in-guest && sync")
    vm.stop()
    debugfs = require_tool("debugfs")
    listing = subprocess.run(
        [debugfs, "-R", "cat /written-in-guest", str(rootfs)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert listing.stdout == "persisted\n"
