"""Hot-plugging NBS volumes into running QEMU guests over QMP, with `nbs attach --qmp`.

Real QEMU (TCG), the tiny Debian-kernel guest, and a real `nbs serve`; the guest itself checks
what it sees (serial, size, a filesystem written in one VM and read in another).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from images.tiny import build_rootfs
from tests.integration.conftest import NbsServer, require_tool
from tests.integration.helpers import SIZE, free_port, guest_disk, nbs, volume_file
from tests.integration.vm import TinyVM


def test_hotplug_mkfs_detach_then_read_back_in_another_vm(
    nbs_server: Callable[..., NbsServer], tiny_vm: Callable[..., TinyVM], tmp_path: Path
) -> None:
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"data1={volume_file(tmp_path)}")
    first, second = tiny_vm(name="first"), tiny_vm(name="second")

    out = nbs("attach", server.uri("data1"), "--qmp", str(first.qmp_path)).stdout
    assert "nbs-data1" in out
    disk = guest_disk(first, "data1")
    name = disk.rsplit("/", 1)[1]
    assert int(first.check(f"cat /sys/block/{name}/size")) * 512 == SIZE
    first.check(f"mke2fs -q {disk} && mkdir -p /mnt/v && mount {disk} /mnt/v")
    first.check(
        "echo hello from the first vm > /mnt/v/greeting"
        " && dd if=/dev/urandom of=/mnt/v/blob bs=1k count=512 2>/dev/null"
    )
    digest = first.check("md5sum /mnt/v/blob | cut -d' ' -f1").strip()
    first.check("sync && umount /mnt/v")

    listed = json.loads(nbs("attached", "--qmp", str(first.qmp_path), "--json").stdout)
    assert [(a["volume"], a["device"], a["serial"]) for a in listed] == [
        ("data1", "nbs-data1", "data1")
    ]
    assert "detached data1" in nbs("detach", "data1", "--qmp", str(first.qmp_path)).stdout
    assert json.loads(nbs("attached", "--qmp", str(first.qmp_path), "--json").stdout) == []
    assert first.run(f"test -e {disk}").rc != 0

    nbs("attach", server.uri("data1"), "--qmp", str(second.qmp_path))
    disk2 = guest_disk(second, "data1")
    second.check(f"mkdir -p /mnt/v && mount {disk2} /mnt/v")
    assert second.check("cat /mnt/v/greeting").strip() == "hello from the first vm"
    assert second.check("md5sum /mnt/v/blob | cut -d' ' -f1").strip() == digest
    second.check("umount /mnt/v")
    nbs("detach", "data1", "--qmp", str(second.qmp_path))


def test_attach_is_idempotent_and_detaching_twice_is_harmless(
    nbs_server: Callable[..., NbsServer], tiny_vm: Callable[..., TinyVM], tmp_path: Path
) -> None:
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"v={volume_file(tmp_path)}")
    vm = tiny_vm()
    nbs("attach", server.uri("v"), "--qmp", str(vm.qmp_path))
    nbs("attach", server.uri("v"), "--qmp", str(vm.qmp_path))
    guest_disk(vm, "v")
    assert vm.check("ls /sys/block | grep -c vd").strip() == "1"
    nbs("detach", server.uri("v"), "--qmp", str(vm.qmp_path))
    second = nbs("detach", "v", "--qmp", str(vm.qmp_path))
    assert "v was not attached" in second.stdout


def test_bad_attach_requests_fail_clearly_and_leave_nothing_behind(
    nbs_server: Callable[..., NbsServer], tiny_vm: Callable[..., TinyVM], tmp_path: Path
) -> None:
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"v={volume_file(tmp_path)}")
    vm = tiny_vm()
    missing = nbs("attach", server.uri("nope"), "--qmp", str(vm.qmp_path), check=False)
    assert missing.returncode == 1
    assert "no export 'nope'" in missing.stderr
    dead = nbs("attach", f"nbd://127.0.0.1:{free_port()}/v", "--qmp", str(vm.qmp_path), check=False)
    assert dead.returncode == 1
    assert "unreachable" in dead.stderr
    no_vm = nbs("attach", server.uri("v"), "--qmp", str(tmp_path / "no.sock"), check=False)
    assert no_vm.returncode == 1
    assert "cannot reach QEMU" in no_vm.stderr
    bad = nbs("attach", "not a volume!", "--qmp", str(vm.qmp_path), check=False)
    assert bad.returncode == 2
    assert json.loads(nbs("attached", "--qmp", str(vm.qmp_path), "--json").stdout) == []
    assert vm.qmp("query-status")["status"] == "running"
    assert vm.run("true").rc == 0


def test_detaching_from_a_paused_guest_is_refused_until_it_runs(
    nbs_server: Callable[..., NbsServer], tiny_vm: Callable[..., TinyVM], tmp_path: Path
) -> None:
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"v={volume_file(tmp_path)}")
    vm = tiny_vm()
    nbs("attach", server.uri("v"), "--qmp", str(vm.qmp_path))
    guest_disk(vm, "v")
    vm.qmp("stop")
    refused = nbs("detach", "v", "--qmp", str(vm.qmp_path), check=False)
    assert refused.returncode == 1
    assert "paused" in refused.stderr
    assert len(json.loads(nbs("attached", "--qmp", str(vm.qmp_path), "--json").stdout)) == 1
    vm.qmp("cont")
    nbs("detach", "v", "--qmp", str(vm.qmp_path))
    assert json.loads(nbs("attached", "--qmp", str(vm.qmp_path), "--json").stdout) == []


@pytest.mark.parametrize("how", ["sigterm", "kill-9"])
def test_server_restart_under_guest_io_causes_no_guest_error(
    nbs_server: Callable[..., NbsServer],
    tiny_vm: Callable[..., TinyVM],
    tmp_path: Path,
    how: str,
) -> None:
    image = volume_file(tmp_path)
    port = free_port()
    args = ("--listen", f"127.0.0.1:{port}", "--export", f"v={image}")
    server = nbs_server(*args)
    vm = tiny_vm()
    nbs("attach", server.uri("v"), "--qmp", str(vm.qmp_path), "--reconnect-delay", "20")
    disk = guest_disk(vm, "v")
    # Writes with fsync and read-backs in a loop until told to stop, in the background; its
    # exit status lands in /tmp/rc.
    loop = (
        "i=0; while [ ! -e /tmp/stop ]; do "
        "dd if=/dev/urandom of=/tmp/b bs=64k count=1 2>/dev/null; "
        f"dd if=/tmp/b of={disk} bs=64k seek=$((i % 1000)) conv=fsync 2>/dev/null || exit 10; "
        f"dd if={disk} of=/tmp/r bs=64k skip=$((i % 1000)) count=1 2>/dev/null || exit 11; "
        "cmp /tmp/b /tmp/r || exit 12; i=$((i+1)); echo $i > /tmp/count; done; exit 0"
    )
    vm.check(f"(sh -c '{loop}'; echo $? > /tmp/rc) > /dev/null 2>&1 &")
    time.sleep(2)
    if how == "sigterm":
        assert server.stop() == 0
    else:
        server.stop(sig=9)
    before = int(vm.check("cat /tmp/count"))
    time.sleep(3)  # the guest keeps issuing I/O into the outage
    assert vm.run("cat /tmp/rc").rc != 0, "the guest I/O loop failed during the outage"
    nbs_server(*args)
    deadline = time.monotonic() + 120
    while int(vm.check("cat /tmp/count")) < before + 20:
        assert vm.run("test -e /tmp/rc").rc != 0, vm.check("cat /tmp/rc")
        assert time.monotonic() < deadline, "guest I/O did not resume after the restart"
        time.sleep(1)
    vm.check("touch /tmp/stop")
    while vm.run("test -e /tmp/rc").rc != 0:
        assert time.monotonic() < deadline, "the guest I/O loop never finished"
        time.sleep(1)
    assert vm.check("cat /tmp/rc").strip() == "0"
    assert "I/O error" not in vm.check("dmesg")


def test_guest_boots_with_an_nbs_data_disk_present_from_the_start(
    nbs_server: Callable[..., NbsServer], tiny_vm: Callable[..., TinyVM], tmp_path: Path
) -> None:
    image = volume_file(tmp_path)
    with image.open("r+b") as f:
        f.write(b"present at boot\n")
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"boot={image}")
    vm = tiny_vm(
        extra_args=[
            "-blockdev",
            f"driver=nbd,node-name=nbs-boot,server.type=inet,server.host=127.0.0.1,"
            f"server.port={server.port},export=boot,reconnect-delay=10",
            "-device",
            "virtio-blk-pci,drive=nbs-boot,id=nbs-boot,serial=boot",
        ]
    )
    disk = guest_disk(vm, "boot")
    assert vm.check(f"head -c 16 {disk}") == "present at boot\n"
    listed = json.loads(nbs("attached", "--qmp", str(vm.qmp_path), "--json").stdout)
    assert [a["volume"] for a in listed] == ["boot"]


def test_guest_boots_with_an_nbs_volume_as_its_root_disk(
    nbs_server: Callable[..., NbsServer], tiny_vm: Callable[..., TinyVM], tmp_path: Path
) -> None:
    rootfs = build_rootfs(tmp_path / "root.ext4", files={"etc/nbs-marker": b"served by nbs\n"})
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"root={rootfs}")
    vm = tiny_vm(
        name="nbsroot",
        append="nbs.root=/dev/vda",
        extra_args=[
            "-blockdev",
            f"driver=nbd,node-name=nbs-root,server.type=inet,server.host=127.0.0.1,"
            f"server.port={server.port},export=root,reconnect-delay=10",
            "-device",
            "virtio-blk-pci,drive=nbs-root,id=nbs-root,serial=root",
        ],
    )
    assert vm.check("grep ' / ' /proc/mounts").split()[:3] == ["/dev/vda", "/", "ext4"]
    assert vm.check("cat /etc/nbs-marker") == "served by nbs\n"
    vm.check("echo written to the root volume > /proof && sync")
    vm.stop()
    server.stop()
    debugfs = require_tool("debugfs")
    proof = subprocess.run(
        [debugfs, "-R", "cat /proof", str(rootfs)], capture_output=True, text=True, check=True
    )
    assert proof.stdout == "written to the root volume\n"


def test_long_and_similar_volume_names_get_distinct_disks_in_the_guest(
    nbs_server: Callable[..., NbsServer], tiny_vm: Callable[..., TinyVM], tmp_path: Path
) -> None:
    """Serials cut to 20 bytes used to collide; node names of 28+ characters failed attach."""
    names = ["abcdefghijklmnopqrst-1", "abcdefghijklmnopqrst-2", "long-" + "x" * 55]
    exports = [f"{n}={volume_file(tmp_path, f'{i}.img')}" for i, n in enumerate(names)]
    server = nbs_server("--listen", "127.0.0.1:0", *(a for e in exports for a in ("--export", e)))
    vm = tiny_vm()
    qmp = ("--qmp", str(vm.qmp_path))
    done = {}
    for name in names:
        done[name] = json.loads(nbs("attach", server.uri(name), *qmp, "--json").stdout)
    serials = [done[n]["serial"] for n in names]
    assert len(set(serials)) == 3
    assert len({done[n]["by_id"] for n in names}) == 3
    assert all(done[n]["by_id"] == f"/dev/disk/by-id/virtio-{done[n]['serial']}" for n in names)
    # The guest sees each disk under the serial attach reported (udev's by-id name).
    disks = {guest_disk(vm, serial) for serial in serials}
    assert len(disks) == 3
    text = nbs("attach", server.uri(names[2]), *qmp).stdout  # idempotent, says the by-id path
    assert done[names[2]]["by_id"] in text
    listed = json.loads(nbs("attached", *qmp, "--json").stdout)
    assert sorted((a["volume"], a["serial"]) for a in listed) == sorted(
        zip(names, serials, strict=True)
    )
    for name in names:
        assert f"detached {name}" in nbs("detach", name, *qmp).stdout
    assert json.loads(nbs("attached", *qmp, "--json").stdout) == []
    assert all(vm.run(f"test -e {disk}").rc != 0 for disk in disks)


NO_LIBVIRT = (
    "import sys; sys.modules['libvirt'] = None; sys.modules['libvirt_qemu'] = None;"
    " from backend.cli import main; sys.exit(main(sys.argv[1:]))"
)


def nbs_without_libvirt(*args: str, state: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI where ``import libvirt`` fails, as after ``pip install nbs`` without extras."""
    env = dict(os.environ)
    if state is not None:
        env["NBS_KERNEL_STATE_DIR"] = str(state)
    return subprocess.run(
        [sys.executable, "-c", NO_LIBVIRT, *args],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_qmp_attach_works_without_the_libvirt_binding(
    nbs_server: Callable[..., NbsServer], tiny_vm: Callable[..., TinyVM], tmp_path: Path
) -> None:
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"v={volume_file(tmp_path)}")
    vm = tiny_vm(ready=False, extra_args=["-S"])  # QEMU only: attach needs no booted guest
    qmp = ("--qmp", str(vm.qmp_path))
    attached = nbs_without_libvirt("attach", server.uri("v"), *qmp)
    assert attached.returncode == 0, attached.stderr
    assert "nbs-v" in attached.stdout
    listed = nbs_without_libvirt("attached", *qmp, "--json")
    assert [a["volume"] for a in json.loads(listed.stdout)] == ["v"]
    assert "<disk" in nbs_without_libvirt("xml", server.uri("v")).stdout
    missing = nbs_without_libvirt("attached", "--qmp", str(tmp_path / "no.sock"))
    assert (missing.returncode, missing.stderr.count("\n")) == (1, 1)
    assert "cannot reach QEMU" in missing.stderr
    kernel = nbs_without_libvirt("detach", "v", "--kernel", state=tmp_path)
    assert (kernel.returncode, kernel.stderr) == (0, "")
    assert "not attached" in kernel.stdout
    assert nbs_without_libvirt("attached", "--kernel", state=tmp_path).returncode == 0

    for command in (["attach", server.uri("v")], ["detach", "v"], ["attached"]):
        refused = nbs_without_libvirt(*command, "--domain", "d")
        assert refused.returncode == 2
        assert refused.stderr.count("\n") == 1, refused.stderr
        assert "pip install 'nbs[libvirt]'" in refused.stderr
        assert "python3-libvirt" in refused.stderr
