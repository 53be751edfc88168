"""The metrics endpoint scraped over HTTP after real NBD I/O, and the log formats.

The I/O comes from independent clients (python3-libnbd with exact request counts, fio's nbd
engine, qemu-io, nbdinfo); the counts are read back the way Prometheus reads them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backend.logs import JSONFormatter
from tests.integration.conftest import NbsServer, require_module, require_tool
from tests.integration.helpers import free_port

if TYPE_CHECKING:
    import nbd as libnbd  # for annotations: at run time require_module gives nbd

nbd = require_module("nbd")  # python3-libnbd, a Debian package

KiB = 1 << 10
MiB = 1 << 20
SIZE = 32 * MiB


class Scrape:
    """One scrape of the endpoint: ``scrape["name", {"label": "value"}]`` is a sample."""

    def __init__(self, url: str) -> None:
        with urllib.request.urlopen(url, timeout=10) as answer:
            self.text = answer.read().decode()
        self.samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(self.text)
            for s in family.samples
        }

    def __getitem__(self, key: tuple[str, dict[str, str]]) -> float:
        name, labels = key
        return self.samples[name, frozenset(labels.items())]

    def requests(self, export: str, command: str) -> float:
        return self["nbs_requests_total", {"export": export, "command": command}]


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    paths = {}
    for name in ("disk", "ro"):
        paths[name] = tmp_path / f"{name}.img"
        with paths[name].open("wb") as f:
            f.truncate(SIZE)
    return paths


@pytest.fixture
def served(nbs_server: Callable[..., NbsServer], images: dict[str, Path]) -> tuple[NbsServer, str]:
    """A server with metrics on: (server, metrics URL)."""
    port = free_port()
    server = nbs_server(
        "--listen", "127.0.0.1:0",
        "--export", f"disk={images['disk']}",
        "--export", f"ro={images['ro']},ro",
        "--metrics-listen", f"127.0.0.1:{port}",
    )  # fmt: skip
    return server, f"http://127.0.0.1:{port}/metrics"


@contextlib.contextmanager
def connect(uri: str) -> Iterator[libnbd.NBD]:
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_strict_mode(0)  # let bad requests reach the server
    h.connect_uri(uri)
    try:
        yield h
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_libnbd_requests_bytes_errors_and_latency_are_counted_exactly(
    served: tuple[NbsServer, str],
) -> None:
    server, url = served
    with connect(server.uri("disk")) as h:
        h.pwrite(b"\x5a" * 64 * KiB, 0)
        h.pwrite(b"\xa5" * MiB, MiB)  # large: runs on the worker pool
        assert h.pread(128 * KiB, 0)[: 64 * KiB] == b"\x5a" * 64 * KiB
        h.pread(4 * KiB, 2 * MiB)
        h.flush()
        h.trim(64 * KiB, 4 * MiB)
        h.zero(64 * KiB, 8 * MiB)
        h.cache(64 * KiB, 0)
        h.block_status(MiB, 0, lambda *_: 0)
        with pytest.raises(nbd.Error) as beyond:
            h.pread(4 * KiB, SIZE)  # past the end: refused before the storage sees it
        assert beyond.value.errnum == errno.EINVAL
        live = Scrape(url)
        assert live["nbs_export_connections_open", {"export": "disk"}] == 1
    with connect(server.uri("ro")) as h, pytest.raises(nbd.Error) as read_only:
        h.pwrite(b"x" * 512, 0)
    assert read_only.value.errnum == errno.EPERM

    wait_for(lambda: Scrape(url)["nbs_connections_open", {}] == 0, "connections to close")
    found = Scrape(url)
    expected = {
        "write": 2, "read": 2, "flush": 1, "trim": 1, "write_zeroes": 1, "cache": 1,
        "block_status": 1,
    }  # fmt: skip
    for command, times in expected.items():
        assert found.requests("disk", command) == times, command
    assert found["nbs_written_bytes_total", {"export": "disk"}] == 64 * KiB + MiB
    assert found["nbs_read_bytes_total", {"export": "disk"}] == 128 * KiB + 4 * KiB
    rejected = "nbs_requests_rejected_total"
    assert found[rejected, {"export": "disk", "command": "read", "error": "EINVAL"}] == 1
    assert found[rejected, {"export": "ro", "command": "write", "error": "EPERM"}] == 1
    assert found.requests("ro", "write") == 0  # rejected requests are not executed ones
    assert not any(name == "nbs_request_errors_total" for name, _ in found.samples)

    count, total = "nbs_request_duration_seconds_count", "nbs_request_duration_seconds_sum"
    assert found[count, {"export": "disk", "op": "read"}] == 2
    assert found[count, {"export": "disk", "op": "write"}] == 2
    assert found[count, {"export": "disk", "op": "other"}] == 5
    assert 0 < found[total, {"export": "disk", "op": "write"}] < 10
    inf = {"export": "disk", "op": "write", "le": "+Inf"}
    assert found["nbs_request_duration_seconds_bucket", inf] == 2
    assert found["nbs_export_connections_open", {"export": "disk"}] == 0
    assert found["nbs_export_connections_total", {"export": "disk"}] == 1
    assert found["nbs_connections_total", {}] == 2
    assert found["process_resident_memory_bytes", {}] > 0


def test_fio_request_counts_match_the_metrics(
    served: tuple[NbsServer, str], tmp_path: Path
) -> None:
    server, url = served
    output = tmp_path / "fio.json"
    uri = f"--uri={server.uri('disk')}"
    small = ["--name=small", "--ioengine=nbd", uri, "--rw=randrw", "--bs=4k", "--iodepth=8"]
    large = ["--name=large", "--ioengine=nbd", uri, "--rw=read", "--bs=1m", "--iodepth=4"]
    result = run(
        require_tool("fio"),
        *small, "--size=4m", "--io_size=8m",
        *large, "--size=16m",
        "--output-format=json", f"--output={output}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    jobs = json.loads(output.read_text())["jobs"]
    reads = sum(job["read"]["total_ios"] for job in jobs)
    writes = sum(job["write"]["total_ios"] for job in jobs)
    read_bytes = sum(job["read"]["io_bytes"] for job in jobs)
    written = sum(job["write"]["io_bytes"] for job in jobs)
    assert reads > 16
    assert writes > 0

    found = Scrape(url)
    assert found.requests("disk", "read") == reads
    assert found.requests("disk", "write") == writes
    assert found["nbs_read_bytes_total", {"export": "disk"}] == read_bytes
    assert found["nbs_written_bytes_total", {"export": "disk"}] == written
    count = "nbs_request_duration_seconds_count"
    assert found[count, {"export": "disk", "op": "read"}] == reads


def test_qemu_io_writes_are_counted(served: tuple[NbsServer, str]) -> None:
    server, url = served
    result = run(
        require_tool("qemu-io"), "-f", "raw", "-c", "write -P 7 0 256k", server.uri("disk")
    )
    assert result.returncode == 0, result.stderr
    found = Scrape(url)
    assert found["nbs_written_bytes_total", {"export": "disk"}] == 256 * KiB
    assert found.requests("disk", "write") == 1


def listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on (its fds matched against /proc/net/tcp*)."""
    ports = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                ports[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:[") and target[8:-1] in ports:
                found.add(ports[target[8:-1]])
    return found


def test_metrics_are_off_unless_configured(
    nbs_server: Callable[..., NbsServer], served: tuple[NbsServer, str], images: dict[str, Path]
) -> None:
    with_metrics, url = served
    metrics_port = int(url.rsplit(":", 1)[1].split("/")[0])
    assert listening_ports(with_metrics.process.pid) == {with_metrics.port, metrics_port}
    plain = nbs_server("--listen", "127.0.0.1:0", "--export", f"other={images['ro']}")
    assert listening_ports(plain.process.pid) == {plain.port}


@pytest.mark.parametrize("how", ["--log-format", "config"])
def test_json_logs_are_one_object_per_line(
    nbs_server: Callable[..., NbsServer], images: dict[str, Path], tmp_path: Path, how: str
) -> None:
    if how == "config":
        config = tmp_path / "nbs.yaml"
        config.write_text("log_format: json\nlog_level: debug\n")
        args = ["--config", str(config)]
    else:
        args = ["--log-format", "json", "--log-level", "debug"]
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"disk={images['disk']}", *args)
    info = run(require_tool("nbdinfo"), server.uri("disk"))
    assert info.returncode == 0, info.stderr
    assert server.stop() == 0
    entries = [json.loads(line) for line in server.log().splitlines()]
    assert entries
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys()
        assert entry["time"].endswith("+00:00")
    messages = {(e["level"], e["logger"], e["message"]) for e in entries}
    assert ("info", "nbs", "received SIGTERM, shutting down") in messages
    sessions = [
        m for logger, m in ((e["logger"], e["message"]) for e in entries) if "session" in logger
    ]
    assert any("serving export 'disk'" in m for m in sessions)
    assert any(e["level"] == "debug" for e in entries)


def test_json_lines_carry_extra_fields_and_tracebacks() -> None:
    formatter = JSONFormatter()
    record = logging.makeLogRecord(
        {"name": "backend.server.session", "levelno": logging.WARNING, "levelname": "WARNING",
         "msg": "%s: closing", "args": ("192.0.2.7:50622",), "created": 0.25,
         "peer": "192.0.2.7:50622", "export": "vm1"}
    )  # fmt: skip
    assert json.loads(formatter.format(record)) == {
        "time": "1970-01-01T00:00:00.250+00:00",
        "level": "warning",
        "logger": "backend.server.session",
        "message": "192.0.2.7:50622: closing",
        "peer": "192.0.2.7:50622",
        "export": "vm1",
    }
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.makeLogRecord({"msg": "failed", "exc_info": sys.exc_info()})
    entry = json.loads(formatter.format(record))
    assert entry["message"] == "failed"
    assert entry["exception"].endswith("ValueError: boom")
