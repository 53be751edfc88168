"""The engine side of the replicated-volume tests: an engine ``nbs serve`` whose config names
the storage nodes (tests/integration/storage_nodes.py), and small helpers shared by
test_replicated_volumes.py and test_replication_faults.py.

The engine reaches each node at ``nbd://127.0.0.1:PORT``; ``links`` replaces a node's port
(e.g. by a FaultProxy's, tests/integration/faultproxy.py) so its member link can be broken
while the node's management API stays reachable.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from backend.replication.membership import Membership
from backend.volumes.catalogue import Catalogue
from tests.integration.conftest import NbsServer, require_tool, start_server
from tests.integration.helpers import free_port, nbs
from tests.integration.storage_nodes import StorageNode

MiB = 1 << 20


class Engine:
    """The engine: ``nbs serve`` over ``workdir/NAME`` (its data directory), ``nodes:`` naming
    the storage nodes (``bad_token`` gives the named node a wrong token; ``links`` maps a node
    name to the port the engine dials instead of the node's own NBD port; ``data_dir`` makes
    a second engine over another's data directory)."""

    def __init__(
        self,
        workdir: Path,
        nodes: list[StorageNode],
        bad_token: str = "",
        *,
        name: str = "engine",
        links: Mapping[str, int] | None = None,
        probe_interval: float = 0.2,
        data_dir: Path | None = None,
    ) -> None:
        self.data_dir = data_dir or workdir / name
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / f"{name}.yaml"
        self.metrics_port = free_port()
        self.probe_interval = probe_interval
        self.write_config(nodes, bad_token, links=links)
        self.port = free_port()
        self.name = name
        self.log = workdir / f"{name}.log"
        self.starts: list[Path] = []
        self.server: NbsServer | None = None
        self.stopped = False  # SIGSTOPped

    def write_config(
        self,
        nodes: list[StorageNode],
        bad_token: str = "",
        *,
        links: Mapping[str, int] | None = None,
    ) -> None:
        """(Re)write the config file with ``nodes:`` naming ``nodes`` (arguments as for the
        constructor); a running engine reads it at its next start or :meth:`reload`."""
        lines = [
            f"replication: {{probe_interval: {self.probe_interval}}}",
            f'metrics: {{listen: "127.0.0.1:{self.metrics_port}"}}',
            "nodes:",
        ]
        for node in nodes:
            token = "wrong" if node.name == bad_token else node.token
            port = (links or {}).get(node.name, node.nbd_port)
            lines += [
                f"  {node.name}:",
                f"    api: {node.api_url}",
                f"    token: {token}",
                f"    nbd: nbd://127.0.0.1:{port}",
            ]
        self.config.write_text("\n".join(lines) + "\n")

    def reload(self, expect: str = "reloaded", timeout: float = 30) -> None:
        """SIGHUP, then wait (bounded) until the current log says ``expect`` once more."""
        assert self.server is not None
        seen = self.log.read_text().count(expect)
        self.server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self.log.read_text().count(expect) <= seen:
            assert time.monotonic() < deadline, f"no {expect!r} after SIGHUP: {self.logs()}"
            time.sleep(0.05)

    def start(self) -> None:
        """Start (again) on the same data directory and ports; each start logs to its own
        file, ``log`` is the current one and :meth:`logs` all of them."""
        args = ["--listen", f"127.0.0.1:{self.port}", "--data-dir", str(self.data_dir)]
        if self.server is not None:
            self.log = self.log.with_name(f"{self.name}-{len(self.starts) + 1}.log")
        self.starts.append(self.log)
        self.server = start_server([*args, "--config", str(self.config)], self.log, 30)

    def logs(self) -> str:
        return "".join(path.read_text() for path in self.starts)

    def alive(self) -> bool:
        return self.server is not None and self.server.alive()

    def stop(self) -> None:
        """SIGTERM (continued first if frozen), then SIGKILL after 30 s; by PID."""
        if self.server is not None and self.server.alive():
            self.cont()
            self.server.process.terminate()
            try:
                self.server.process.wait(30)
            except subprocess.TimeoutExpired:
                self.server.process.kill()
                self.server.process.wait()
        self._close_output()

    def kill(self) -> None:
        """SIGKILL by PID (a crash), reaped."""
        assert self.server is not None
        assert self.server.alive()
        self.cont()
        self.server.process.kill()
        self.server.process.wait()
        self._close_output()

    def freeze(self) -> None:
        """SIGSTOP: its sockets stay open and it answers nothing until :meth:`cont`."""
        assert self.server is not None
        assert self.server.alive()
        self.server.process.send_signal(signal.SIGSTOP)
        self.stopped = True

    def cont(self) -> None:
        if self.stopped and self.server is not None and self.server.alive():
            self.server.process.send_signal(signal.SIGCONT)
        self.stopped = False

    def _close_output(self) -> None:
        if self.server is not None and self.server.process.stdout is not None:
            self.server.process.stdout.close()

    def membership(self, replica: str) -> Membership:
        """The committed membership of the volume whose replicas are named ``replica``."""
        catalogue = Catalogue(self.data_dir / "catalogue.sqlite3")
        try:
            found = catalogue.membership(replica.removeprefix("r-"))
        finally:
            catalogue.close()
        assert found is not None
        return found

    def info(self, volume: str) -> dict[str, Any]:
        """``nbs volume info --json`` (answered by the engine's API: it serves the catalogue)."""
        info: dict[str, Any] = json.loads(self.volume("info", volume, "--json").stdout)
        return info

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample of the metrics page, None when absent (labels in sorted order)."""
        shown = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        found = re.search(rf"^{re.escape(name)}{{{re.escape(shown)}}} (\S+)$", self.metrics(), re.M)
        return float(found.group(1)) if found else None

    def uri(self, volume: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{volume}"

    def volume(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.nbs("volume", *args, check=check)

    def nbs(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return nbs(*args, "--data-dir", str(self.data_dir), check=check)

    def wait_in_sync(self, replica: str, members: set[str], timeout: float = 60) -> Membership:
        """Wait (bounded) until the committed in-sync set is ``members``."""
        deadline = time.monotonic() + timeout
        while (m := self.membership(replica)).in_sync != members:
            assert time.monotonic() < deadline, f"in sync {m.in_sync}: {self.logs()}"
            time.sleep(0.1)
        return m


def replicas_on(node: StorageNode) -> list[str]:
    with node.api() as api:
        return [v.name for v in api.list() if v.name.startswith("r-")]


def create_replicated(
    engine: Engine, name: str, nodes: list[StorageNode], *extra: str, size: int = 16 * MiB
) -> str:
    """Create a replicated volume on ``nodes``; returns its replicas' name (``r-LAYER``)."""
    spec = "replicated:nodes=" + "/".join(n.name for n in nodes) + "".join(extra)
    engine.volume("create", name, "--size", str(size), "--storage", spec)
    return str(engine.info(name)["replication"]["replicas"][0]["volume"])


def qemu_io(
    uri: str, *commands: str, timeout: float = 120, read_only: bool = False
) -> subprocess.CompletedProcess[str]:
    args = [require_tool("qemu-io"), "-f", "raw", *(["-r"] if read_only else [])]
    for command in commands:
        args += ["-c", command]
    return subprocess.run(
        [*args, uri], capture_output=True, text=True, timeout=timeout, check=False
    )


class QemuIoSession:
    """One qemu-io kept open on ``uri`` while a test breaks things around it: ``send``
    queues commands, ``finish`` sends the last ones and ends it (end of input quits qemu-io)
    and returns what it printed.  Left running (a failed test), it is killed by PID."""

    def __init__(self, uri: str) -> None:
        self.process = subprocess.Popen(
            [require_tool("qemu-io"), "-f", "raw", uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def __enter__(self) -> QemuIoSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill it if it still runs."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, *commands: str) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write("".join(f"{command}\n" for command in commands))
        stdin.flush()

    def finish(self, *commands: str, timeout: float = 120) -> str:
        if commands:
            self.send(*commands)
        output, _ = self.process.communicate(timeout=timeout)
        return output

    @property
    def returncode(self) -> int | None:
        return self.process.returncode


def replica_bytes(nodes: list[StorageNode], replica: str) -> list[bytes]:
    return [node.volume_bytes(replica) for node in nodes]
