"""NbdStorage against real servers in other processes: nbdkit's memory plugin (a server
nobody here wrote) under the storage conformance suite, nbdkit's error filter, ``nbs serve``
killed with SIGKILL mid-I/O and restarted, TLS and Unix sockets; and ``nbs serve`` proxying a
volume of kind ``nbd`` to a second ``nbs serve``."""

from __future__ import annotations

import errno
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backend.storage import StorageError
from backend.storage.nbd import NbdStorage, NbdTarget
from tests.integration.conftest import NbsServer, require_tool, start_server
from tests.integration.helpers import free_port, nbs
from tests.integration.pki import issue_client, issue_server, make_ca
from tests.unit.storage.conformance import *  # noqa: F403
from tests.unit.storage.conformance import StorageFactory, pattern

MiB = 1 << 20
Nbdkit = Callable[..., NbdTarget]


@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[Nbdkit]:
    """``nbdkit(*plugin_args, read_only=False)`` serves on a Unix socket; stopped by PID."""
    binary = require_tool("nbdkit")
    processes: list[subprocess.Popen[bytes]] = []

    def start(*args: str, read_only: bool = False) -> NbdTarget:
        sock = tmp_path / f"nbdkit-{len(processes)}.sock"
        # nbdkit writes its PID file once it listens (the socket file comes earlier).
        pidfile = tmp_path / f"nbdkit-{len(processes)}.pid"
        cmd = [binary, "-f", "--exit-with-parent", "-U", str(sock), "-P", str(pidfile)]
        cmd += ["-r"] if read_only else []
        proc = subprocess.Popen([*cmd, *args], stdin=subprocess.DEVNULL)
        processes.append(proc)
        deadline = time.monotonic() + 20
        while not pidfile.exists() or not pidfile.read_text().strip():
            assert proc.poll() is None, f"nbdkit {args} exited {proc.returncode}"
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.02)
        return NbdTarget(socket_path=str(sock))

    yield start
    for proc in processes:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def storage_factory(nbdkit: Nbdkit) -> StorageFactory:
    return lambda size: NbdStorage(nbdkit("memory", f"size={size}"))


@pytest.fixture
def read_only_storage_factory(nbdkit: Nbdkit) -> StorageFactory:
    return lambda size: NbdStorage(nbdkit("memory", f"size={size}", read_only=True))


@pytest.mark.parametrize(("name", "code"), [("ENOSPC", errno.ENOSPC), ("EIO", errno.EIO)])
def test_errors_of_nbdkits_error_filter_keep_their_errno(
    nbdkit: Nbdkit, name: str, code: int
) -> None:
    target = nbdkit(
        "--filter=error", "memory", "size=1M", f"error-pwrite={name}", "error-pwrite-rate=1"
    )
    storage = NbdStorage(target)
    try:
        with pytest.raises(StorageError) as excinfo:
            storage.write(0, b"data")
        assert excinfo.value.errno == code
        assert storage.read(0, 4) == bytes(4)  # reads still work: the connection is fine
    finally:
        storage.close()


def test_writes_to_a_read_only_export_fail_with_eperm(nbdkit: Nbdkit) -> None:
    storage = NbdStorage(nbdkit("memory", "size=1M", read_only=True))
    try:
        assert storage.capabilities.read_only
        with pytest.raises(StorageError) as excinfo:
            storage.write(0, b"x")
        assert excinfo.value.errno == errno.EPERM
    finally:
        storage.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "vol.img"
    with path.open("wb") as f:
        f.truncate(64 * MiB)
    return path


def test_io_resumes_after_the_server_is_killed_and_restarted(image: Path, tmp_path: Path) -> None:
    port = free_port()
    args = ["--listen", f"127.0.0.1:{port}", "--export", f"vol={image}"]
    servers: list[NbsServer] = [start_server(args, tmp_path / "nbs-0.log")]
    storage = NbdStorage(NbdTarget(export="vol", port=port), connections=2, reconnect_deadline=60)
    written: dict[int, bytes] = {}
    errors: list[BaseException] = []
    halfway = threading.Event()

    def writer(index: int) -> None:
        try:
            for round_ in range(60):
                offset = (index * 60 + round_) * 65536
                data = pattern(index * 100 + round_, 65536)
                storage.write(offset, data)
                written[offset] = data
                if round_ == 20:
                    halfway.set()
        except BaseException as err:
            errors.append(err)

    try:
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        assert halfway.wait(60)
        servers[0].stop(signal.SIGKILL)
        time.sleep(0.5)  # requests pile up against a dead server
        servers.append(start_server(args, tmp_path / "nbs-1.log"))
        for thread in threads:
            thread.join(120)
        assert not errors, errors[0]
        assert len(written) == 8 * 60
        storage.flush()
        assert storage.connected
        with image.open("rb") as f:
            for offset, data in written.items():
                f.seek(offset)
                assert f.read(len(data)) == data, f"bytes at {offset} differ"
    finally:
        storage.close()
        for server in servers:
            if server.alive():
                server.stop()


def test_a_server_that_stays_away_fails_requests_after_the_deadline(
    image: Path, tmp_path: Path
) -> None:
    port = free_port()
    server = start_server(
        ["--listen", f"127.0.0.1:{port}", "--export", f"vol={image}"], tmp_path / "nbs.log"
    )
    storage = NbdStorage(NbdTarget(export="vol", port=port), reconnect_deadline=1.5)
    try:
        storage.write(0, b"x")
        server.stop(signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(StorageError) as excinfo:
            storage.write(0, b"y")
        assert excinfo.value.errno in (errno.ECONNRESET, errno.ECONNREFUSED)
        assert time.monotonic() - started >= 1.5
        assert not storage.connected
    finally:
        storage.close()
        server.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("pki-work")
    out = tmp_path_factory.mktemp("pki")
    make_ca(work, out)
    issue_server(work, out)
    issue_client(work, out)
    return out


def test_tls_and_unix_socket(image: Path, tmp_path: Path, pki: Path) -> None:
    sock = tmp_path / "nbs.sock"
    server = start_server(
        [
            "--listen",
            "127.0.0.1:0",
            "--socket",
            str(sock),
            "--tls-cert",
            str(pki / "server-cert.pem"),
            "--tls-key",
            str(pki / "server-key.pem"),
            "--tls-ca",
            str(pki / "ca-cert.pem"),
            "--export",
            f"vol={image},tls=required",
        ],
        tmp_path / "nbs.log",
    )
    try:
        tls = NbdStorage(
            NbdTarget.from_uri(f"nbds://127.0.0.1:{server.port}/vol?tls-certificates={pki}")
        )
        unix = NbdStorage(
            NbdTarget.from_uri(
                f"nbds+unix:///vol?socket={sock}&tls-certificates={pki}&tls-hostname=localhost"
            )
        )
        try:
            data = pattern(7, 3 * MiB)
            tls.write(4096, data)
            tls.flush()
            assert unix.read(4096, len(data)) == data
        finally:
            tls.close()
            unix.close()
        with pytest.raises(StorageError, match="GO refused"):
            NbdStorage(NbdTarget(export="vol", port=server.port))  # no TLS: refused
    finally:
        server.stop()


def test_nbs_serve_proxies_a_volume_of_kind_nbd(
    image: Path, tmp_path: Path, nbs_server: Callable[..., NbsServer]
) -> None:
    """qemu-io writes through the first server's volume; the bytes land in the second's file."""
    qemu_io = require_tool("qemu-io")
    node = nbs_server("--listen", "127.0.0.1:0", "--export", f"vol={image}")
    data = tmp_path / "data"
    nbs(
        "volume", "create", "px", "--storage", f"nbd:url={node.uri('vol')}", "--data-dir", str(data)
    )
    gateway = nbs_server("--listen", "127.0.0.1:0", "--data-dir", str(data))
    write = subprocess.run(
        [qemu_io, "-f", "raw", "-c", "write -P 0x5a 1M 192k", "-c", "flush", gateway.uri("px")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert write.returncode == 0, write.stderr
    read = subprocess.run(
        [
            qemu_io,
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 1M 192k",
            "-c",
            "read -P 0 0 1M",
            gateway.uri("px"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert read.returncode == 0, read.stderr + read.stdout
    assert "Pattern verification failed" not in read.stdout
    with image.open("rb") as f:
        f.seek(MiB)
        assert f.read(192 * 1024) == b"\x5a" * 192 * 1024
    # Snapshots of an adopted export are refused in one line, exit 2.
    refused = nbs("snapshot", "create", "px", "s1", "--data-dir", str(data), check=False)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1
    assert "not possible on a volume of kind nbd" in refused.stderr
    # The gateway goes first: its shutdown flushes through to the node.
    assert gateway.stop() == 0
