"""Attaching NBS volumes to libvirt domains: `nbs attach --domain`, `nbs xml` + virsh.

Real libvirtd (started by the `libvirtd` fixture when none runs), transient domains of the tiny
guest, and the guest checking what it sees.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.integration.conftest import NbsServer, require_tool
from tests.integration.helpers import SIZE, free_port, guest_disk, nbs, volume_file
from tests.integration.vm import LibvirtVM


def test_attach_write_detach_and_read_back_in_another_domain(
    nbs_server: Callable[..., NbsServer], libvirt_vm: Callable[..., LibvirtVM], tmp_path: Path
) -> None:
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"lv1={volume_file(tmp_path)}")
    first, second = libvirt_vm(), libvirt_vm()

    out = nbs("attach", server.uri("lv1"), "--domain", first.domain_name).stdout
    assert "ua-nbs-lv1" in out
    disk = guest_disk(first, "lv1")
    assert int(first.check(f"cat /sys/block/{disk[5:]}/size")) * 512 == SIZE
    first.check(f"mke2fs -q {disk} && mkdir -p /mnt/v && mount {disk} /mnt/v")
    first.check("echo written through libvirt > /mnt/v/note && sync && umount /mnt/v")
    listed = json.loads(nbs("attached", "--domain", first.domain_name, "--json").stdout)
    assert [(d["volume"], d["alias"], d["serial"]) for d in listed] == [
        ("lv1", "ua-nbs-lv1", "lv1")
    ]
    assert "detached lv1" in nbs("detach", "lv1", "--domain", first.domain_name).stdout
    assert json.loads(nbs("attached", "--domain", first.domain_name, "--json").stdout) == []
    assert first.run(f"test -e {disk}").rc != 0
    again = nbs("detach", "lv1", "--domain", first.domain_name)
    assert "was not attached" in again.stdout

    nbs("attach", server.uri("lv1"), "--domain", second.domain_name)
    nbs("attach", server.uri("lv1"), "--domain", second.domain_name)  # idempotent
    disk2 = guest_disk(second, "lv1")
    second.check(f"mkdir -p /mnt/v && mount {disk2} /mnt/v")
    assert second.check("cat /mnt/v/note").strip() == "written through libvirt"
    second.check("umount /mnt/v")


def test_nbs_xml_works_with_virsh_attach_device(
    nbs_server: Callable[..., NbsServer], libvirt_vm: Callable[..., LibvirtVM], tmp_path: Path
) -> None:
    virsh = require_tool("virsh")
    image = volume_file(tmp_path)
    with image.open("r+b") as f:
        f.write(b"via virsh\n")
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"vx={image}")
    vm = libvirt_vm()
    xml = tmp_path / "disk.xml"
    xml.write_text(nbs("xml", server.uri("vx"), "--dev", "vdc").stdout)
    connect = ["-c", "qemu:///system"]
    subprocess.run(
        [virsh, *connect, "attach-device", vm.domain_name, str(xml), "--live"],
        check=True,
        capture_output=True,
        text=True,
    )
    disk = guest_disk(vm, "vx")
    assert vm.check(f"head -c 10 {disk}") == "via virsh\n"
    listed = json.loads(nbs("attached", "--domain", vm.domain_name, "--json").stdout)
    assert [d["target_dev"] for d in listed] == ["vdc"]
    nbs("detach", "vx", "--domain", vm.domain_name)
    assert json.loads(nbs("attached", "--domain", vm.domain_name, "--json").stdout) == []


def test_bad_requests_fail_clearly_and_the_domain_keeps_running(
    nbs_server: Callable[..., NbsServer], libvirt_vm: Callable[..., LibvirtVM], tmp_path: Path
) -> None:
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"v={volume_file(tmp_path)}")
    vm = libvirt_vm()
    missing = nbs("attach", server.uri("nope"), "--domain", vm.domain_name, check=False)
    assert missing.returncode == 1
    assert "no export 'nope'" in missing.stderr
    dead = nbs(
        "attach", f"nbd://127.0.0.1:{free_port()}/v", "--domain", vm.domain_name, check=False
    )
    assert dead.returncode == 1
    assert "unreachable" in dead.stderr
    nodom = nbs("attach", server.uri("v"), "--domain", "no-such-domain", check=False)
    assert nodom.returncode == 1
    assert "no libvirt domain" in nodom.stderr
    assert json.loads(nbs("attached", "--domain", vm.domain_name, "--json").stdout) == []

    nbs("attach", server.uri("v"), "--domain", vm.domain_name)
    guest_disk(vm, "v")
    subprocess.run(
        ["virsh", "-c", "qemu:///system", "suspend", vm.domain_name],
        check=True,
        capture_output=True,
    )
    paused = nbs("detach", "v", "--domain", vm.domain_name, check=False)
    assert paused.returncode == 1
    assert "paused" in paused.stderr
    subprocess.run(
        ["virsh", "-c", "qemu:///system", "resume", vm.domain_name], check=True, capture_output=True
    )
    nbs("detach", "v", "--domain", vm.domain_name)
    assert vm.alive()
    assert vm.run("true").rc == 0


def _io_loop(disk: str) -> str:
    return (
        "i=0; while [ ! -e /tmp/stop ]; do "
        "dd if=/dev/urandom of=/tmp/b bs=64k count=1 2>/dev/null; "
        f"dd if=/tmp/b of={disk} bs=64k seek=$((i % 1000)) conv=fsync 2>/dev/null || exit 10; "
        f"dd if={disk} of=/tmp/r bs=64k skip=$((i % 1000)) count=1 2>/dev/null || exit 11; "
        "cmp /tmp/b /tmp/r || exit 12; i=$((i+1)); echo $i > /tmp/count; done; exit 0"
    )


def _restart_during_io(
    nbs_server: Callable[..., NbsServer],
    vm: LibvirtVM,
    server: NbsServer,
    disk: str,
    args: tuple[str, ...],
) -> str:
    """Restart the server (kill -9) while the guest writes; returns the loop's exit status."""
    vm.check(f"(sh -c '{_io_loop(disk)}'; echo $? > /tmp/rc) > /dev/null 2>&1 &")
    time.sleep(2)
    server.stop(sig=9)
    time.sleep(4)
    nbs_server(*args)
    deadline = time.monotonic() + 120
    time.sleep(5)
    vm.check("touch /tmp/stop")
    while vm.run("test -e /tmp/rc").rc != 0:
        assert time.monotonic() < deadline, "the guest I/O loop never finished"
        time.sleep(1)
    return vm.check("cat /tmp/rc").strip()


def test_reconnect_delay_through_the_monitor_survives_a_server_restart(
    nbs_server: Callable[..., NbsServer], libvirt_vm: Callable[..., LibvirtVM], tmp_path: Path
) -> None:
    args = ("--listen", f"127.0.0.1:{free_port()}", "--export", f"r={volume_file(tmp_path)}")
    server = nbs_server(*args)
    vm = libvirt_vm()
    nbs("attach", server.uri("r"), "--domain", vm.domain_name, "--reconnect-delay", "30")
    disk = guest_disk(vm, "r")
    assert _restart_during_io(nbs_server, vm, server, disk, args) == "0"
    assert "I/O error" not in vm.check("dmesg")
    # libvirt still knows the disk under its own names, so its detach works.
    nbs("detach", "r", "--domain", vm.domain_name)
    assert vm.run(f"test -e {disk}").rc != 0


def test_without_reconnect_delay_libvirt_disks_fail_guest_io_on_restart(
    nbs_server: Callable[..., NbsServer], libvirt_vm: Callable[..., LibvirtVM], tmp_path: Path
) -> None:
    """The limit of libvirt 9.0 on its own (docs/hypervisor.md): no reconnect-delay for NBD."""
    args = ("--listen", f"127.0.0.1:{free_port()}", "--export", f"n={volume_file(tmp_path)}")
    server = nbs_server(*args)
    vm = libvirt_vm()
    nbs("attach", server.uri("n"), "--domain", vm.domain_name, "--reconnect-delay", "0")
    disk = guest_disk(vm, "n")
    assert _restart_during_io(nbs_server, vm, server, disk, args) != "0"


def _inactive_xml(domain: str) -> str:
    return subprocess.run(
        ["virsh", "-c", "qemu:///system", "dumpxml", "--inactive", domain],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def test_persistent_attachment_left_in_the_config_is_listed_and_detached(
    nbs_server: Callable[..., NbsServer], libvirt_vm: Callable[..., LibvirtVM], tmp_path: Path
) -> None:
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"pv={volume_file(tmp_path)}")
    vm = libvirt_vm(persistent=True)
    domain = ("--domain", vm.domain_name)

    def listed() -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(nbs("attached", *domain, "--json").stdout)
        return rows

    nbs("attach", server.uri("pv"), *domain, "--persistent")
    guest_disk(vm, "pv")
    assert [d["volume"] for d in listed()] == ["pv"]

    # A live detach leaves the disk in the saved configuration, and the listing says so.
    assert "detached pv" in nbs("detach", "pv", *domain).stdout
    assert [d["volume"] for d in listed()] == ["pv"]
    assert [(d["live"], d["persistent"]) for d in listed()] == [(False, True)]  # config-only
    assert "ua-nbs-pv" in _inactive_xml(vm.domain_name)
    assert "nothing attached" not in nbs("attached", *domain).stdout
    without = nbs("detach", "pv", *domain, check=False)
    assert without.returncode == 2
    assert "--persistent" in without.stderr
    assert without.stderr.count("\n") == 1
    nbs("detach", "pv", *domain, "--persistent")  # from the config alone
    assert listed() == []
    assert "ua-nbs-pv" not in _inactive_xml(vm.domain_name)

    # Attach adds it only where it is missing; detach --persistent removes it from both.
    nbs("attach", server.uri("pv"), *domain, "--persistent")
    nbs("detach", "pv", *domain)
    nbs("attach", server.uri("pv"), *domain, "--persistent")
    guest_disk(vm, "pv")
    assert [(d["live"], d["persistent"]) for d in listed()] == [(True, True)]
    assert "detached pv" in nbs("detach", "pv", *domain, "--persistent").stdout
    assert listed() == []
    assert "ua-nbs-pv" not in _inactive_xml(vm.domain_name)
    assert "was not attached" in nbs("detach", "pv", *domain, "--persistent").stdout
    assert vm.alive()


def test_long_and_dotted_volume_names_attach_under_a_valid_alias_and_unique_serial(
    nbs_server: Callable[..., NbsServer], libvirt_vm: Callable[..., LibvirtVM], tmp_path: Path
) -> None:
    """libvirt refuses "." in aliases; serials cut to 20 bytes used to collide."""
    names = ["my.volume-with-a-long-name-1", "my.volume-with-a-long-name-2"]
    exports = [f"{n}={volume_file(tmp_path, f'{i}.img')}" for i, n in enumerate(names)]
    server = nbs_server("--listen", "127.0.0.1:0", *(a for e in exports for a in ("--export", e)))
    vm = libvirt_vm()
    domain = ("--domain", vm.domain_name)
    done = [json.loads(nbs("attach", server.uri(n), *domain, "--json").stdout) for n in names]
    assert len({d["serial"] for d in done}) == 2
    assert all(d["by_id"] == f"/dev/disk/by-id/virtio-{d['serial']}" for d in done)
    assert len({guest_disk(vm, d["serial"]) for d in done}) == 2
    rows = json.loads(nbs("attached", *domain, "--json").stdout)
    assert sorted((d["volume"], d["serial"]) for d in rows) == sorted(
        (n, d["serial"]) for n, d in zip(names, done, strict=True)
    )
    for name in names:
        assert f"detached {name}" in nbs("detach", name, *domain).stdout
    assert json.loads(nbs("attached", *domain, "--json").stdout) == []
