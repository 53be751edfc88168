"""ansible/ against a real Debian 12 VM: provision, idempotence, a volume end to end, reload.

One QEMU guest (images/debian.py, TCG, user networking with ``restrict=on`` and hostfwd on
127.0.0.1 only) is booted per module and provisioned with ``ansible-playbook site.yml`` over
SSH (paramiko) as both a storage node and a hypervisor; the tests then check it from the host.
The module-scoped fixture owns the QEMU process and stops it by PID.  Timings are printed
(``pytest -s``) and recorded in docs/deployment.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paramiko
import pytest
import yaml

from images import debian
from tests.integration.conftest import require, require_module, require_tool
from tests.integration.helpers import free_port
from tests.integration.vm import qemu_accel, stop_qemu

# The module fixture boots and provisions the VM inside the first test's time limit.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
NBD_PORT = 10809
API_PORT = 10810
_RECAP = re.compile(
    r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)


def _tool(name: str) -> str:
    """``name`` from this interpreter's environment (tox, .venv), else from PATH."""
    sibling = Path(sys.executable).parent / name
    return str(sibling) if sibling.exists() else require_tool(name)


@dataclasses.dataclass
class PlaybookRun:
    """One ``ansible-playbook`` run: its output, and the recap's counters for the VM."""

    output: str
    seconds: float
    recap: dict[str, int]

    def handlers(self) -> list[str]:
        """Names of the handlers that ran, in order."""
        return re.findall(r"^RUNNING HANDLER \[(?:[^\]:]+ : )?([^\]]+)\]", self.output, re.M)


class DebianVM:
    """The Debian guest under QEMU: an overlay of the cached image, SSH/NBD/API forwarded.

    Only ``127.0.0.1`` ports are forwarded into the guest (``hostfwd``); the guest reaches
    nothing (``restrict=on``).  :meth:`stop` ends QEMU by PID (QMP quit, then signals).
    """

    def __init__(self, image: debian.DebianImage, workdir: Path, qemu: str) -> None:
        self.image = image
        self.workdir = workdir
        self.qemu = qemu
        self.ssh_port = free_port()
        self.nbd_port = free_port()
        self.api_port = free_port()
        self.overlay = workdir / "debian.qcow2"
        self.console = workdir / "debian-console.log"
        self.qmp_path = workdir / "debian-qmp.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self.boot_seconds: float | None = None

    def start(self) -> None:
        subprocess.run(
            [
                "qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                "-b", str(self.image.rootfs), str(self.overlay),
            ],
            check=True,
        )  # fmt: skip
        forwards = ",".join(
            f"hostfwd=tcp:127.0.0.1:{host}-:{guest}"
            for host, guest in (
                (self.ssh_port, 22),
                (self.nbd_port, NBD_PORT),
                (self.api_port, API_PORT),
            )
        )
        args = [
            self.qemu, "-accel", qemu_accel(), "-machine", "pc", "-m", "2048", "-smp", "2",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", str(self.image.boot_kernel), "-initrd", str(self.image.initrd),
            "-append", debian.KERNEL_APPEND,
            "-drive", f"file={self.overlay},if=virtio,format=qcow2,cache=unsafe",
            "-netdev", f"user,id=n0,restrict=on,{forwards}",
            "-device", "virtio-net-pci,netdev=n0",
            "-device", "virtio-rng-pci",
            "-serial", f"file:{self.console}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip
        with (self.workdir / "debian-qemu.log").open("wb") as log:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def wait_ssh(self, timeout: float = 300) -> float:
        """Wait until root can log in over SSH; returns (and records) the boot time."""
        started = time.monotonic()
        # paramiko logs every refused attempt while sshd is not up yet
        paramiko_log = logging.getLogger("paramiko")
        level = paramiko_log.level
        paramiko_log.setLevel(logging.CRITICAL)
        try:
            return self._wait_ssh(started, timeout)
        finally:
            paramiko_log.setLevel(level)

    def _wait_ssh(self, started: float, timeout: float) -> float:
        deadline = started + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"QEMU exited {self.process.returncode}:\n{self.diagnostics()}")
            try:
                self.ssh("true", timeout=20)
            except (OSError, paramiko.SSHException, EOFError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no SSH after {timeout} s:\n{self.diagnostics()}") from None
                time.sleep(1)
            else:
                self.boot_seconds = time.monotonic() - started
                return self.boot_seconds

    @contextlib.contextmanager
    def _client(self, timeout: float) -> Iterator[paramiko.SSHClient]:
        """An SSH connection to the guest as root (closed on exit)."""
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        try:
            client.connect(
                "127.0.0.1", port=self.ssh_port, username="root",
                key_filename=str(self.image.ssh_key), timeout=timeout, banner_timeout=timeout,
                auth_timeout=timeout, look_for_keys=False, allow_agent=False,
            )  # fmt: skip
            yield client
        finally:
            client.close()

    def ssh(self, command: str, timeout: float = 120) -> tuple[int, str]:
        """Run ``command`` as root in the guest; returns its exit status and stdout+stderr."""
        with self._client(timeout) as client:
            _stdin, stdout, _stderr = client.exec_command(command, timeout=timeout, get_pty=True)
            output = stdout.read().decode(errors="replace").replace("\r\n", "\n")
            return stdout.channel.recv_exit_status(), output

    def put(self, files: dict[Path, str]) -> None:
        """Copy local files to guest paths over SFTP (their directories must exist)."""
        with self._client(60) as client, client.open_sftp() as sftp:
            for local, remote in files.items():
                sftp.put(str(local), remote)

    def check(self, command: str, timeout: float = 120) -> str:
        rc, output = self.ssh(command, timeout)
        assert rc == 0, f"{command!r} exited {rc}:\n{output}"
        return output.strip()

    def diagnostics(self) -> str:
        with contextlib.suppress(OSError):
            return self.console.read_text(errors="replace")[-6000:]
        return ""

    def stop(self) -> None:
        if self.process is not None:
            stop_qemu(self.process, self.qmp_path)


@dataclasses.dataclass
class Provisioned:
    """The VM after the first two playbook runs."""

    vm: DebianVM
    workdir: Path
    inventory: Path
    first: PlaybookRun
    second: PlaybookRun
    build_seconds: float
    wheelhouse_seconds: float

    def playbook(self, playbook: str, *extra: str) -> PlaybookRun:
        return run_playbook(self.inventory, self.workdir, playbook, *extra)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.vm.api_port}"

    def token(self) -> str:
        return (self.workdir / "api-token").read_text().strip()

    def create_volume(self, name: str, size: int) -> None:
        """Create a volume through the VM's API (bearer token, forwarded port)."""
        httpx.post(
            f"{self.api}/v1/volumes",
            json={"name": name, "size": size},
            headers={"Authorization": f"Bearer {self.token()}"},
            timeout=60,
        ).raise_for_status()


def run_playbook(inventory: Path, workdir: Path, playbook: str, *extra: str) -> PlaybookRun:
    """``ansible-playbook PLAYBOOK`` against the VM; fails the test unless it succeeded."""
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
        ANSIBLE_HOME=str(workdir / "ansible-home"),
        ANSIBLE_LOCAL_TEMP=str(workdir / "ansible-tmp"),
        ANSIBLE_HOST_KEY_CHECKING="False",
        ANSIBLE_PARAMIKO_RECORD_HOST_KEYS="False",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
    )
    started = time.monotonic()
    log = workdir / f"playbook-{len(list(workdir.glob('playbook-*.log')))}.log"
    with log.open("w") as out:
        result = subprocess.run(
            [_tool("ansible-playbook"), "-i", str(inventory), playbook, *extra],
            cwd=ANSIBLE_DIR,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=1200,
            check=False,
        )
    seconds = time.monotonic() - started
    output = log.read_text()
    assert result.returncode == 0, f"ansible-playbook exited {result.returncode}:\n{output[-8000:]}"
    recaps = {m["host"]: m for m in _RECAP.finditer(output)}
    assert "nbs-test" in recaps, f"no PLAY RECAP for nbs-test:\n{output[-4000:]}"
    recap = {k: int(v) for k, v in recaps["nbs-test"].groupdict().items() if k != "host"}
    print(f"ansible-playbook {playbook} {' '.join(extra)}: {seconds:.1f} s, {recap}")
    return PlaybookRun(output, seconds, recap)


def _build_image() -> tuple[debian.DebianImage, float]:
    require(os.geteuid() == 0, "building the Debian guest (debootstrap) needs root")
    require_tool("qemu-img")
    started = time.monotonic()
    try:
        image = debian.build()
    except debian.BuildError as e:
        require(False, f"cannot build the Debian guest: {e}")
        raise
    return image, time.monotonic() - started


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provisioned]:
    """A booted Debian VM, provisioned twice with site.yml (storage node + hypervisor)."""
    qemu = require_tool("qemu-system-x86_64")
    _tool("ansible-playbook")
    workdir = tmp_path_factory.mktemp("ansible")
    image, build_seconds = _build_image()
    print(f"debian image: {build_seconds:.1f} s (built in {image.build_seconds} s)")

    started = time.monotonic()
    wheelhouse = workdir / "wheelhouse.tar"
    subprocess.run(
        [str(ANSIBLE_DIR / "build-wheelhouse"), str(wheelhouse)],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    wheelhouse_seconds = time.monotonic() - started

    vm = DebianVM(image, workdir, qemu)
    vm.start()
    try:
        print(f"debian boot to SSH: {vm.wait_ssh():.1f} s")
        inventory = workdir / "inventory.yml"
        host = {
            "ansible_host": "127.0.0.1",
            "ansible_port": vm.ssh_port,
            "ansible_user": "root",
            "ansible_connection": "paramiko",
            "ansible_ssh_private_key_file": str(image.ssh_key),
            "ansible_become": False,
        }
        inventory.write_text(
            yaml.safe_dump(
                {
                    "all": {
                        "hosts": {"nbs-test": host},
                        "children": {
                            "nbs_storage": {"hosts": {"nbs-test": None}},
                            "nbs_hypervisors": {"hosts": {"nbs-test": None}},
                        },
                        "vars": {
                            "nbs_storage_wheelhouse": str(wheelhouse),
                            "nbs_storage_ceph": True,
                            "nbs_storage_api_listen": [f"0.0.0.0:{API_PORT}"],
                            # hostfwd reaches the guest's external address, not its loopback.
                            "nbs_storage_nbd_listen": [str(NBD_PORT)],
                            "nbs_storage_nbd_plaintext": True,
                            "nbs_storage_api_token_fetch_dest": str(workdir / "api-token"),
                            "nbs_hypervisor_wheelhouse": str(wheelhouse),
                            "nbs_hypervisor_kernel_nbd": True,
                        },
                    }
                }
            )
        )
        first = run_playbook(inventory, workdir, "site.yml")
        second = run_playbook(inventory, workdir, "site.yml")
        yield Provisioned(vm, workdir, inventory, first, second, build_seconds, wheelhouse_seconds)
    finally:
        vm.stop()


def test_first_run_changes_and_second_run_changes_nothing(provisioned: Provisioned) -> None:
    first, second = provisioned.first, provisioned.second
    assert first.recap["changed"] > 0
    assert first.recap["failed"] == first.recap["unreachable"] == 0
    assert second.recap["changed"] == 0, second.output[-6000:]
    assert second.recap["ok"] > 0
    assert second.handlers() == []


def test_storage_node_runs_nbs_under_systemd(provisioned: Provisioned) -> None:
    vm = provisioned.vm
    assert vm.check("systemctl is-active nbs.socket nbs.service").split() == ["active"] * 2
    assert vm.check("systemctl is-enabled nbs.socket nbs.service").split() == ["enabled"] * 2
    assert vm.check("systemctl show -p Type --value nbs.service") == "notify"
    main_pid = vm.check("systemctl show -p MainPID --value nbs.service")
    assert vm.check(f"ps -o user= -p {main_pid}") == "nbs"
    assert "/opt/nbs/venv/bin/nbs serve --config /etc/nbs/nbs.yaml" in vm.check(
        f"tr '\\0' ' ' < /proc/{main_pid}/cmdline"
    )
    # the API token: mode 0600, owned by nbs, and fetched to the control node
    assert vm.check("stat -c '%a %U' /var/lib/nbs/api-token") == "600 nbs"
    assert vm.check("cat /var/lib/nbs/api-token") == provisioned.token()
    # nbs_storage_ceph: Debian's librados/librbd bindings are visible in the venv ...
    vm.check("/opt/nbs/venv/bin/python3 -c 'import rados, rbd, backend.storage.ceph'")
    assert vm.check("grep include-system-site-packages /opt/nbs/venv/pyvenv.cfg").endswith("true")
    # ... and the wheelhouse did not install libvirt-python into it (the 'libvirt' extra)
    assert vm.check("ls /opt/nbs/venv/lib/python3*/site-packages | grep -ci libvirt || true") == "0"


def test_hypervisor_has_libvirt_cli_and_kernel_nbd(provisioned: Provisioned) -> None:
    vm = provisioned.vm
    assert vm.check("systemctl is-enabled libvirtd.service") == "enabled"
    assert vm.check("systemctl is-active libvirtd.socket") == "active"
    # libvirtd answers (socket-activated if it had exited idle)
    assert vm.check("virsh -c qemu:///system list --all --name") == ""
    assert vm.check("test -d /sys/module/nbd && cat /etc/modules-load.d/nbs-nbd.conf").endswith(
        "nbd"
    )
    assert vm.check("readlink /usr/local/bin/nbs") == "/opt/nbs-hypervisor/venv/bin/nbs"
    # Debian's python3-libvirt through --system-site-packages, and the CLI that uses it
    vm.check("/opt/nbs-hypervisor/venv/bin/python3 -c 'import libvirt, hypervisor.domain'")
    assert "--kernel" in vm.check("nbs attach --help")


def test_volume_created_through_the_api_is_served_and_attached_to_a_guest(
    provisioned: Provisioned, tiny_vm: Any
) -> None:
    qemu_io = require_tool("qemu-io")
    headers = {"Authorization": f"Bearer {provisioned.token()}"}
    response = httpx.post(
        f"{provisioned.api}/v1/volumes",
        json={"name": "ansible1", "size": 64 << 20},
        headers=headers,
        timeout=60,
    )
    assert response.status_code == 201, response.text
    uri = f"nbd://127.0.0.1:{provisioned.vm.nbd_port}/ansible1"
    subprocess.run(
        [qemu_io, "-f", "raw", "-c", "write -P 0x5a 1M 1M", "-c", "read -P 0x5a 1M 1M", uri],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert httpx.get(f"{provisioned.api}/v1/volumes/nope", headers=headers).status_code == 404

    # a guest on the host attaches the volume through `nbs attach --qmp` and reads it back
    guest = tiny_vm()
    subprocess.run(
        [
            sys.executable, "-m", "backend.cli", "attach", "ansible1",
            "--qmp", str(guest.qmp_path), "--server", f"nbd://127.0.0.1:{provisioned.vm.nbd_port}",
        ],
        check=True,
        cwd=REPO,
        timeout=120,
    )  # fmt: skip
    dev = guest.check(
        "for i in $(seq 100); do for s in /sys/block/vd*/serial; do "
        '[ "$(cat $s 2>/dev/null)" = ansible1 ] && basename $(dirname $s) && exit 0; done; '
        "sleep 0.1; done; exit 1"
    ).strip()
    digest = guest.check(f"dd if=/dev/{dev} bs=1M skip=1 count=1 2>/dev/null | md5sum")
    assert digest.split()[0] == hashlib.md5(b"\x5a" * (1 << 20)).hexdigest()


NESTED_DRIVER = """
import json, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, "/root/nested/src")
from images.tiny import TinyImage
from tests.integration.vm import TinyVM

here = Path("/root/nested")
image = TinyImage(here, here / "kernel", here / "initrd", "", (), "", vmlinux=here / "vmlinux")
guest = TinyVM(image, here / "run", name="nested", qemu="qemu-system-x86_64", accel="tcg")
guest.start()
try:
    boot = guest.wait_ready(900)
    started = time.monotonic()
    subprocess.run(["nbs", "attach", sys.argv[1], "--qmp", str(guest.qmp_path),
                    "--server", "nbd://127.0.0.1:10809"], check=True, timeout=300)
    attach = time.monotonic() - started
    dev = guest.check(
        "for i in $(seq 600); do for s in /sys/block/vd*/serial; do "
        '[ "$(cat $s 2>/dev/null)" = %s ] && basename $(dirname $s) && exit 0; done; '
        "sleep 0.1; done; exit 1" % sys.argv[1], timeout=120).strip()
    digest = guest.check(f"dd if=/dev/{dev} bs=1M count=1 2>/dev/null | md5sum", timeout=120)
    print(json.dumps({"boot": boot, "attach": attach, "md5": digest.split()[0]}))
finally:
    guest.stop()
"""


@pytest.mark.skipif(
    os.environ.get("NBS_NESTED") != "1",
    reason="opt-in (NBS_NESTED=1): a TCG guest inside the TCG VM boots in minutes",
)
def test_nested_guest_attaches_a_volume_with_the_hypervisor_tooling(
    provisioned: Provisioned, tiny_image: Any
) -> None:
    """In the provisioned VM, a tiny guest gets a volume through the role's ``nbs attach``."""
    qemu_io = require_tool("qemu-io")
    vm = provisioned.vm
    provisioned.create_volume("nested1", 16 << 20)
    subprocess.run(
        [qemu_io, "-f", "raw", "-c", "write -P 0xc3 0 1M",
         f"nbd://127.0.0.1:{vm.nbd_port}/nested1"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    vm.check("mkdir -p /root/nested/src/images /root/nested/src/tests/integration")
    driver = provisioned.workdir / "nested_driver.py"
    driver.write_text(NESTED_DRIVER)
    files = {
        tiny_image.kernel: "/root/nested/kernel",
        tiny_image.initrd: "/root/nested/initrd",
        tiny_image.boot_kernel: "/root/nested/vmlinux",
        driver: "/root/nested/driver.py",
    }
    for module in (
        "images/__init__.py", "images/tiny.py", "tests/__init__.py",
        "tests/integration/__init__.py", "tests/integration/vm.py",
    ):  # fmt: skip
        files[REPO / module] = f"/root/nested/src/{module}"
    vm.put(files)
    # the hypervisor venv's Python: what `nbs` on PATH runs with
    output = vm.check("/opt/nbs-hypervisor/venv/bin/python3 /root/nested/driver.py nested1", 1500)
    result = json.loads(output.strip().splitlines()[-1])
    print(f"nested guest: boot {result['boot']:.1f} s, attach {result['attach']:.1f} s")
    assert result["md5"] == hashlib.md5(b"\xc3" * (1 << 20)).hexdigest()


def test_config_change_reloads_and_keeps_clients_connected(provisioned: Provisioned) -> None:
    """Last in the module: it changes the VM's configuration."""
    nbd = require_module("nbd")  # python3-libnbd, a Debian package
    vm = provisioned.vm
    provisioned.create_volume("reload1", 16 << 20)
    handle = nbd.NBD()
    handle.connect_uri(f"nbd://127.0.0.1:{vm.nbd_port}/reload1")
    handle.pwrite(b"\xa5" * 65536, 0)
    pid_before = vm.check("systemctl show -p MainPID --value nbs.service")

    # storage.yml alone: the change is the storage node's (site.yml would do the same, slower)
    run = provisioned.playbook("storage.yml", "-e", "nbs_storage_log_level=debug")

    assert run.recap["changed"] >= 1
    assert "Reload NBS" in run.handlers()
    assert "Restart NBS" not in run.handlers()
    assert vm.check("systemctl show -p MainPID --value nbs.service") == pid_before
    assert "log_level: debug" in vm.check("cat /etc/nbs/nbs.yaml")
    # the connection opened before the reload still works, on the same server process
    assert handle.pread(65536, 0) == b"\xa5" * 65536
    handle.pwrite(b"\x3c" * 4096, 65536)
    handle.flush()
    assert handle.pread(4096, 65536) == b"\x3c" * 4096
    handle.shutdown()
    journal = vm.check("journalctl -u nbs.service --no-pager -o cat")
    assert re.search(r"reload", journal, re.IGNORECASE), journal[-3000:]
    print(
        f"ansible timings: image {provisioned.build_seconds:.1f} s, "
        f"wheelhouse {provisioned.wheelhouse_seconds:.1f} s, boot {vm.boot_seconds:.1f} s, "
        f"runs {provisioned.first.seconds:.1f} / {provisioned.second.seconds:.1f} / "
        f"{run.seconds:.1f} s"
    )
