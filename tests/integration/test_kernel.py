"""The kernel nbd fallback against a real kernel: a TCG guest attaching ``nbs serve`` volumes.

The host kernel has no nbd driver, so one module-scoped tiny guest (images/tiny.py) runs the
host's own Python from the read-only 9p share (``chroot /host``) and reaches ``nbs serve`` on
the host through guestfwd 10.0.2.100:10809. The server listens on a fixed free port so that it
can be restarted in place. The SSH path (hypervisor.remote) is checked on the host against an
sshd started here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hypervisor import kernel, remote
from images.tiny import TinyImage
from tests.integration.conftest import NbsServer, require, require_tool, start_server
from tests.integration.vm import CompletedRun, TinyVM

ROOT = Path(__file__).resolve().parents[2]
GUEST_PORT = 10809
URI = f"nbd://10.0.2.100:{GUEST_PORT}/vol"
BACKEND = "nbs:" + URI
DISK_SIZE = 64 << 20
STATE = "/host/run/nbs/kernel"  # the kernel CLI's default state dir, seen from outside the chroot


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class Guest:
    """The guest, the host's server it reaches, and the kernel CLI run inside it."""

    vm: TinyVM
    workdir: Path
    disk: Path
    port: int
    server: NbsServer | None = None
    restarts: int = 0

    def start_server(self) -> None:
        self.restarts += 1
        self.server = start_server(
            [
                "--listen",
                f"127.0.0.1:{self.port}",
                "--export",
                f"vol={self.disk}",
                "--export",
                f"ro={self.disk},ro",
            ],
            self.workdir / f"nbs-{self.restarts}.log",
        )

    def stop_server(self, sig: int = signal.SIGTERM) -> None:
        if self.server is not None and self.server.alive():
            self.server.stop(sig)
        self.server = None

    def run(self, command: str, timeout: float = 120) -> CompletedRun:
        return self.vm.run(command, timeout)

    def check(self, command: str, timeout: float = 120) -> str:
        return self.vm.check(command, timeout)

    def kernel(self, *args: str, timeout: float = 120, **env: str) -> CompletedRun:
        """``python -m hypervisor.kernel ARGS`` in the guest, with the host's interpreter."""
        variables = [f"{k}={v}" for k, v in {"PYTHONPATH": str(ROOT), **env}.items()]
        python = ["env", *variables, sys.executable, "-m", "hypervisor.kernel"]
        return self.run(f"chroot /host {shlex.join([*python, *args])}", timeout)

    def kernel_json(self, *args: str, ok: bool = True, **env: str) -> Any:
        result = self.kernel(*args, "--json", timeout=120, **env)
        assert (result.rc == 0) == ok, result.output
        return json.loads(result.output)

    def sysfs(self, index: int, name: str) -> str | None:
        result = self.run(f"cat /sys/block/nbd{index}/{name}", 10)
        return result.output.strip() if result.rc == 0 else None

    def connected(self) -> list[int]:
        out = self.check("for d in /sys/block/nbd*; do [ -e $d/pid ] && echo ${d##*nbd}; done; :")
        return sorted(int(i) for i in out.split())

    def process_running(self, pid: int) -> bool:
        state = self.run(f"cut -d' ' -f3 /proc/{pid}/stat", 10)
        return state.rc == 0 and state.output.strip() not in ("Z", "X")

    def io_errors(self) -> list[str]:
        return [line for line in self.check("dmesg").splitlines() if "I/O error" in line]

    def reconnected_sockets(self) -> int:
        """How many sockets RECONFIGURE swapped in so far (the kernel logs each)."""
        return self.check("dmesg").count("reconnected socket")


@pytest.fixture(scope="module")
def guest(tiny_image: TinyImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    qemu = require_tool("qemu-system-x86_64")
    workdir = tmp_path_factory.mktemp("kernel")
    disk = workdir / "vol.img"
    with disk.open("wb") as f:
        f.truncate(DISK_SIZE)
    port = free_port()
    vm = TinyVM(
        tiny_image,
        workdir,
        name="kernel",
        qemu=qemu,
        memory_mib=512,
        host_root=True,
        shares={"work": workdir},  # /host is read-only: patterns go here
        guestfwd=[(GUEST_PORT, port)],
    )
    setup = Guest(vm, workdir, disk, port)
    try:
        setup.start_server()
        vm.start()
        vm.wait_ready(120)
        require(vm.run("[ -d /sys/module/nbd ]", 10).rc == 0, "the guest kernel has no nbd module")
        yield setup
    finally:
        vm.stop()
        setup.stop_server()


@pytest.fixture
def clean(guest: Guest) -> Iterator[Guest]:
    """The guest with nothing attached before and after the test (whatever it left behind)."""
    if guest.server is None or not guest.server.alive():
        guest.start_server()
    assert guest.connected() == []
    yield guest
    for index in guest.connected():
        guest.kernel("detach", f"/dev/nbd{index}")
    guest.run(f"rm -rf {STATE}", 10)


def pattern_file(guest: Guest, name: str, size: int) -> str:
    """Random bytes written on the host; returns the path the guest reads them at (9p)."""
    (guest.workdir / name).write_bytes(os.urandom(size))
    return f"/mnt/work/{name}"


def host_bytes(guest: Guest, name: str) -> bytes:
    return (guest.workdir / name).read_bytes()


def test_attach_write_read_detach(clean: Guest) -> None:
    guest = clean
    started = time.monotonic()
    device = guest.kernel_json("attach", URI)
    attach_seconds = time.monotonic() - started
    assert device["path"] == "/dev/nbd0"
    assert device["size"] == DISK_SIZE
    assert device["backend_id"] == BACKEND
    assert device["connections"] == 1  # one CPU in the guest
    assert device["interface"] == "netlink"
    pid = device["supervisor_pid"]
    assert pid
    assert guest.process_running(pid)
    assert guest.sysfs(0, "backend") == BACKEND
    assert guest.sysfs(0, "size") == str(DISK_SIZE // 512)
    assert guest.sysfs(0, "queue/logical_block_size") == "4096"

    data = pattern_file(guest, "pattern-1", 4 << 20)
    guest.check(f"dd if={data} of=/dev/nbd0 bs=1M seek=1 conv=fsync 2>&1")
    guest.check(f"dd if=/dev/nbd0 bs=1M skip=1 count=4 iflag=direct 2>/dev/null | cmp - {data}")
    with guest.disk.open("rb") as f:
        f.seek(1 << 20)
        assert f.read(4 << 20) == host_bytes(guest, "pattern-1")

    listed = guest.kernel_json("attached")
    assert [(d["path"], d["backend_id"], d["supervisor_pid"]) for d in listed] == [
        ("/dev/nbd0", BACKEND, pid)
    ]
    record = json.loads(guest.check(f"cat {STATE}/0.json"))
    assert (record["target"], record["pid"], record["backend_id"]) == (URI, pid, BACKEND)

    result = guest.kernel_json("detach", URI)
    assert result == {
        "detached": True,
        "message": "detached /dev/nbd0",
        "index": 0,
        "backend_id": BACKEND,
    }
    assert guest.sysfs(0, "size") == "0"
    assert guest.sysfs(0, "pid") is None
    assert guest.sysfs(0, "backend") is None
    assert not guest.process_running(pid)
    assert guest.run(f"[ -e {STATE}/0.json ]", 10).rc != 0
    assert guest.kernel_json("attached") == []
    again = guest.kernel_json("detach", URI)
    assert again["detached"] is False
    assert again["message"] == f"{URI} is not attached"
    print(f"attach took {attach_seconds:.1f} s in the TCG guest")


def test_a_read_only_export_needs_read_only(clean: Guest) -> None:
    """The kernel would quietly make a read-only device of it (as of a volume another client
    holds writable): without --read-only the attach is refused, in one line."""
    guest = clean
    uri = URI.rsplit("/", 1)[0] + "/ro"
    refused = guest.kernel("attach", uri)
    assert refused.rc != 0
    assert "read-only to this client" in refused.output
    assert guest.connected() == []
    device = guest.kernel_json("attach", uri, "--read-only")
    assert guest.sysfs(0, "ro") == "1"
    assert guest.run(f"dd if=/dev/zero of={device['path']} bs=4k count=1 oflag=direct").rc != 0
    guest.kernel_json("detach", uri)


def test_attach_twice_returns_the_same_device(clean: Guest) -> None:
    first = clean.kernel_json("attach", URI)
    second = clean.kernel_json("attach", URI)
    assert second == first
    assert clean.connected() == [first["index"]]
    # A volume name on the same server is the same volume.
    server = f"nbd://10.0.2.100:{GUEST_PORT}"
    assert clean.kernel_json("attach", "vol", NBS_SERVER=server) == first
    assert clean.check("ps | grep -c '[h]ypervisor.kernel.*supervise'").strip() == "1"


def test_attach_missing_export_fails_clearly_and_leaves_nothing(clean: Guest) -> None:
    answer = clean.kernel_json("attach", f"nbd://10.0.2.100:{GUEST_PORT}/missing", ok=False)
    assert answer["error"]["type"] == "NoSuchExportError"
    assert "no export 'missing'" in answer["error"]["message"]
    assert clean.connected() == []
    assert clean.kernel_json("attached") == []


def test_attach_with_the_server_down_fails_clearly(clean: Guest) -> None:
    clean.stop_server()
    answer = clean.kernel_json("attach", URI, ok=False)
    assert answer["error"]["type"] in ("ServerDownError", "ExportError")
    assert clean.connected() == []


@pytest.mark.parametrize(
    ("connections", "how"),
    [(1, signal.SIGKILL), (2, signal.SIGKILL), (1, signal.SIGTERM)],
    ids=["1-kill", "2-kill", "1-sigterm"],
)
def test_device_survives_a_server_restart_during_io(
    clean: Guest, connections: int, how: signal.Signals
) -> None:
    guest = clean
    device = guest.kernel_json("attach", URI, "--connections", str(connections), "--timeout", "5")
    index = device["index"]
    assert device["connections"] == connections
    errors_before = len(guest.io_errors())
    reconnected_before = guest.reconnected_sockets()
    name = f"pattern-restart-{connections}-{how.name}"
    data = pattern_file(guest, name, 8 << 20)
    guest.check(
        f"(dd if={data} of=/dev/nbd{index} bs=256k oflag=direct conv=fsync;"
        " echo rc=$? > /tmp/dd.rc) > /tmp/dd.log 2>&1 &"
    )
    guest.check("sleep 1")
    assert guest.run("cat /tmp/dd.rc", 10).rc != 0, "dd finished before the restart"
    started = time.monotonic()
    guest.stop_server(how)  # a crash, or a graceful restart
    time.sleep(1)
    guest.start_server()
    deadline = time.monotonic() + 180
    while guest.run("cat /tmp/dd.rc", 10).rc != 0:
        assert time.monotonic() < deadline, guest.check("cat /tmp/dd.log; dmesg | tail -20")
        time.sleep(1)
    recovered = time.monotonic() - started
    assert guest.check("cat /tmp/dd.rc").strip() == "rc=0", guest.check("cat /tmp/dd.log")
    assert guest.io_errors()[errors_before:] == []
    guest.check(f"dd if=/dev/nbd{index} bs=1M count=8 iflag=direct 2>/dev/null | cmp - {data}")
    assert guest.disk.read_bytes()[: 8 << 20] == host_bytes(guest, name)
    log = guest.check(f"cat {STATE}/{index}.log")
    assert "reconnected" in log, log
    # One LINK_DEAD per connection, and one new socket for each.
    died = re.findall(r"(\d+) connection\(s\) of /dev/nbd\d+ died", log)
    assert sum(int(n) for n in died) == connections, log
    assert guest.reconnected_sockets() - reconnected_before == connections
    assert guest.sysfs(index, "backend") == BACKEND
    guest.check("rm -f /tmp/dd.rc /tmp/dd.log")
    print(f"{connections} connection(s): dd finished {recovered:.1f} s after the crash")
    assert guest.kernel_json("detach", f"/dev/nbd{index}")["detached"] is True


def test_attach_gives_an_unsupervised_device_a_new_supervisor(clean: Guest) -> None:
    guest = clean
    device = guest.kernel_json("attach", URI)
    old = device["supervisor_pid"]
    guest.check(f"kill -9 {old}")
    deadline = time.monotonic() + 10
    while guest.process_running(old):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert guest.kernel_json("attached")[0]["supervisor_pid"] is None
    again = guest.kernel_json("attach", URI)
    assert again["index"] == device["index"]
    assert again["supervisor_pid"] not in (None, old)
    assert guest.process_running(again["supervisor_pid"])
    # It revived the device first (a spare socket is dropped by the kernel), in case a
    # LINK_DEAD came while nobody listened.
    assert "reconnected" in guest.check(f"cat {STATE}/{device['index']}.log")
    data = pattern_file(guest, "pattern-revive", 1 << 20)
    guest.check(f"dd if={data} of={device['path']} bs=1M conv=fsync 2>&1")
    guest.check(f"dd if={device['path']} bs=1M count=1 iflag=direct 2>/dev/null | cmp - {data}")


def test_ioctl_interface(clean: Guest) -> None:
    guest = clean
    device = guest.kernel_json("attach", URI, "--interface", "ioctl")
    index = device["index"]
    assert device["interface"] == "ioctl"
    assert device["size"] == DISK_SIZE
    pid = device["supervisor_pid"]
    assert pid
    assert guest.process_running(pid)
    assert guest.sysfs(index, "backend") is None  # netlink-only
    assert guest.kernel_json("attach", URI)["index"] == index  # idempotent by its record
    data = pattern_file(guest, "pattern-ioctl", 1 << 20)
    guest.check(f"dd if={data} of=/dev/nbd{index} bs=1M conv=fsync 2>&1")
    guest.check(f"dd if=/dev/nbd{index} bs=1M count=1 iflag=direct 2>/dev/null | cmp - {data}")
    assert guest.kernel_json("detach", URI)["detached"] is True
    assert guest.sysfs(index, "pid") is None
    assert guest.sysfs(index, "size") == "0"
    assert not guest.process_running(pid)


# -- over SSH -------------------------------------------------------------------------------


def find_sshd() -> str:
    path = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/sbin")
    require(path is not None, "sshd is not installed (apt-get install openssh-server)")
    assert path is not None
    return path


@dataclasses.dataclass
class Sshd:
    host: str
    key: Path
    host_key: Path
    workdir: Path


def keygen(path: Path) -> Path:
    subprocess.run(
        [require_tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
    )
    return path


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """An sshd on 127.0.0.1 (free port) with a fresh host key and one authorized key."""
    binary = find_sshd()
    require(os.geteuid() == 0, "the sshd test logs in as root")
    workdir = tmp_path_factory.mktemp("sshd")
    host_key = keygen(workdir / "host_key")
    client_key = keygen(workdir / "client_key")
    (workdir / "authorized_keys").write_text((workdir / "client_key.pub").read_text())
    port = free_port()
    config = workdir / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
        f"PidFile {workdir / 'sshd.pid'}\nAuthorizedKeysFile {workdir / 'authorized_keys'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nLogLevel VERBOSE\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege separation directory
    with (workdir / "sshd.log").open("wb") as log:
        process = subprocess.Popen(
            [binary, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    if sock.recv(4).startswith(b"SSH-"):
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sshd did not start: {(workdir / 'sshd.log').read_text()}")
            time.sleep(0.1)
        yield Sshd(f"root@127.0.0.1:{port}", client_key, host_key, workdir)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def options(sshd: Sshd, tmp_path: Path, **changes: Any) -> remote.SshOptions:
    base = remote.SshOptions(
        key_filename=sshd.key,
        known_hosts=tmp_path / "known_hosts",
        python=sys.executable,
        state_dir=str(tmp_path / "state"),
    )
    return dataclasses.replace(base, **changes)


def test_remote_attached_over_ssh(sshd: Sshd, tmp_path: Path) -> None:
    started = time.monotonic()
    assert (
        remote.remote_attached(sshd.host, ssh=options(sshd, tmp_path, accept_new_host_key=True))
        == []
    )
    print(f"remote attached took {time.monotonic() - started:.1f} s")
    known = (tmp_path / "known_hosts").read_text()
    assert sshd.host_key.with_suffix(".pub").read_text().split()[1] in known
    # Now known: accepted without accept_new_host_key.
    assert remote.remote_attached(sshd.host, ssh=options(sshd, tmp_path)) == []


def test_remote_unknown_host_key_is_refused(sshd: Sshd, tmp_path: Path) -> None:
    listed = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(sshd.host_key.with_suffix(".pub"))],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[1]
    with pytest.raises(remote.HostKeyError, match="not in known_hosts") as info:
        remote.remote_attached(sshd.host, ssh=options(sshd, tmp_path))
    assert listed in str(info.value)  # the fingerprint as OpenSSH shows it
    assert not (tmp_path / "known_hosts").exists()


def test_remote_changed_host_key_is_refused(sshd: Sshd, tmp_path: Path) -> None:
    other = keygen(tmp_path / "other_key").with_suffix(".pub").read_text().split()
    port = sshd.host.rsplit(":", 1)[1]
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{port} {other[0]} {other[1]}\n")
    with pytest.raises(remote.HostKeyError, match="CHANGED"):
        remote.remote_attached(sshd.host, ssh=options(sshd, tmp_path, accept_new_host_key=True))


def test_remote_errors_surface_with_their_message(sshd: Sshd, tmp_path: Path) -> None:
    ssh = options(sshd, tmp_path, accept_new_host_key=True)
    with pytest.raises(kernel.TlsUnsupportedError, match=r"^root@127\.0\.0\.1:\d+: nbds://"):
        remote.remote_attach(sshd.host, "nbds://127.0.0.1/vol", ssh=ssh)
    result = remote.remote_detach(sshd.host, URI, ssh=ssh)
    assert (result.detached, result.message) == (False, f"{URI} is not attached")
    with pytest.raises(remote.RemoteError, match="exited 127"):
        remote.remote_attached(sshd.host, ssh=dataclasses.replace(ssh, python="/no/python3"))


def test_remote_wrong_key_is_an_authentication_error(sshd: Sshd, tmp_path: Path) -> None:
    wrong = keygen(tmp_path / "wrong_key")
    ssh = options(sshd, tmp_path, accept_new_host_key=True, key_filename=wrong)
    with pytest.raises(remote.RemoteError, match="authentication failed"):
        remote.remote_attached(sshd.host, ssh=ssh)
