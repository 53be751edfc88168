"""Storage nodes for the replicated-volume tests: real ``nbs serve`` processes on loopback.

Each :class:`StorageNode` is one ``nbs serve`` in catalogue mode with its own data directory,
NBD on ``127.0.0.1:nbd_port`` and the management API on ``http://127.0.0.1:api_port`` (bearer
token from ``DATA/api-token``).  Both ports are picked once, up front, and passed explicitly, so
``restart()`` brings the node back at the same addresses and an engine can reconnect to them.

The ``storage_nodes`` fixture (conftest.py) owns every node it started: at teardown each is
continued (if stopped) and killed by PID.
"""

from __future__ import annotations

import contextlib
import signal
import tempfile
import time
from pathlib import Path

import httpx

from backend.api.client import RemoteVolumes
from backend.volumes.model import CreateRequest
from tests.integration.conftest import NbsServer, require_module, start_server
from tests.integration.helpers import free_port, nbs

_PORT_ATTEMPTS = 5


class StorageNode:
    """One ``nbs serve`` storage node; not started until :meth:`start`."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.nbd_port = free_port()
        self.api_port = free_port()
        self.server: NbsServer | None = None
        self.stopped = False  # SIGSTOPped
        self._starts = 0

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def token(self) -> str:
        return (self.data_dir / "api-token").read_text().strip()

    @property
    def pid(self) -> int:
        assert self.server is not None, f"{self.name} was never started"
        return self.server.process.pid

    def uri(self, volume: str) -> str:
        return f"nbd://127.0.0.1:{self.nbd_port}/{volume}"

    def alive(self) -> bool:
        return self.server is not None and self.server.alive()

    # ------------------------------------------------------------------ process control

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until its API answers.

        The ports were free when picked, but another process may take one meanwhile (or a
        just-killed server's socket may linger): a start that fails on a taken address is
        retried a few times before giving up, with new ports if the node never ran (nobody
        knows its addresses yet), else with the same ones.
        """
        assert not self.alive(), f"{self.name} is already running"
        for attempt in range(_PORT_ATTEMPTS):
            self._starts += 1
            log = self.workdir / f"serve-{self._starts}.log"
            try:
                self.server = start_server(self._args(), log, timeout)
                break
            except RuntimeError:
                if "in use" not in log.read_text() or attempt + 1 == _PORT_ATTEMPTS:
                    raise
                if self.server is None:
                    self.nbd_port, self.api_port = free_port(), free_port()
                time.sleep(0.2 * (attempt + 1))
        self.stopped = False
        self._wait_api(timeout)

    def _args(self) -> list[str]:
        config = self.workdir / "nbs.yaml"
        config.write_text(f'api:\n  listen: ["127.0.0.1:{self.api_port}"]\n')
        args = ["--listen", f"127.0.0.1:{self.nbd_port}", "--data-dir", str(self.data_dir)]
        return [*args, "--config", str(config)]

    def _wait_api(self, timeout: float) -> None:
        # nbs serve prints the NBD line before the API's thread is up.
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.api_url}/healthz", timeout=2).status_code == 200:
                    return
            assert self.alive(), f"{self.name} exited: {self.log()}"
            assert time.monotonic() < deadline, f"{self.name}'s API did not answer: {self.log()}"
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL by PID (a crash: nothing flushed, no goodbye) and reap it."""
        assert self.server is not None
        self.cont()
        self.server.process.kill()
        self.server.process.wait()
        if self.server.process.stdout is not None:
            self.server.process.stdout.close()

    def restart(self, timeout: float = 30) -> None:
        """Start again on the same data directory and ports (a running node is killed first)."""
        if self.alive():
            self.kill()
        self.start(timeout)

    def stop(self) -> None:
        """SIGSTOP: the process is frozen; its sockets stay open and answer nothing."""
        assert self.server is not None, f"{self.name} was never started"
        assert self.alive(), f"{self.name} is not running"
        self.server.process.send_signal(signal.SIGSTOP)
        self.stopped = True
        # kill() returns before the signal took effect: a request sent at once could still
        # be answered (seen once in CI).  Frozen means every thread is in state T.
        _wait_stopped(self.server.process.pid)

    def cont(self) -> None:
        """SIGCONT after :meth:`stop` (a no-op otherwise)."""
        if self.stopped and self.server is not None and self.alive():
            self.server.process.send_signal(signal.SIGCONT)
        self.stopped = False

    def terminate(self) -> None:
        """Teardown: continue if stopped, then kill by PID if still running."""
        if self.alive():
            self.kill()

    def log(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.workdir.glob("serve-*.log")))

    # ------------------------------------------------------------------ volumes

    def api(self) -> RemoteVolumes:
        """A client of this node's management API (close it, or use ``with``)."""
        return RemoteVolumes(self.api_url, self.token)

    def create_volume(self, name: str, size: int | str) -> None:
        with self.api() as api:
            api.create(CreateRequest(name, size))

    def volume_bytes(self, name: str) -> bytes:
        """The whole volume: through NBD (libnbd) while the node serves, else exported from
        the data directory with ``nbs volume export`` (the server must not be frozen)."""
        assert not self.stopped, f"{self.name} is SIGSTOPped: cont() it first"
        if self.alive():
            return _read_nbd(self.uri(name))
        with tempfile.TemporaryDirectory() as tmp:
            dest = Path(tmp) / f"{name}.raw"
            nbs(
                "volume",
                "export",
                name,
                str(dest),
                "--format",
                "raw",
                "--data-dir",
                str(self.data_dir),
            )
            return dest.read_bytes()


def _read_nbd(uri: str) -> bytes:
    nbd = require_module("nbd")
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        size = h.get_size()
        step = 32 << 20
        return b"".join(h.pread(min(step, size - off), off) for off in range(0, size, step))
    finally:
        h.shutdown()


class StorageNodes:
    """Owns the nodes it made: ``nodes.start(n)`` returns n running nodes; ``close()``
    continues and kills every one by PID."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.nodes: list[StorageNode] = []

    def start(self, count: int) -> list[StorageNode]:
        made = []
        for _ in range(count):
            name = f"node{len(self.nodes)}"
            node = StorageNode(name, self.workdir / name)
            self.nodes.append(node)
            node.start()
            made.append(node)
        return made

    def close(self) -> None:
        for node in self.nodes:
            node.terminate()


def _wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Until every thread of ``pid`` is stopped (``T`` in /proc/PID/task/*/stat)."""
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
        if states and all(state in ("T", "t") for state in states):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} did not stop within {timeout} s: {states}")
        time.sleep(0.005)
