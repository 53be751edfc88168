#!/usr/bin/env python3
"""Benchmark ``nbs serve`` against nbdkit's file plugin on the same image file.

What it measures
    * Throughput and latency with fio's nbd ioengine (one job, ``time_based``), against
      each server in turn, for: 4k random read QD16, 4k random write QD16, 1M sequential
      read QD4, 1M sequential write QD4 and 4k random read QD1.  The order of the servers
      alternates per workload (nbdkit, nbs / nbs, nbdkit / ...) so drift on a shared machine
      is spread over both.  Per run: IOPS, MB/s (10^6 bytes/s), p50 latency (fio's ``lat``:
      submission to completion; ``clat`` alone is misleading with the nbd engine, whose
      submit call can already see the reply, and is kept in the JSON), the server's CPU
      use (from /proc/PID/stat) and the nbs/nbdkit IOPS ratio.
    * Memory of each server process (VmRSS from /proc/PID/status): idle after start, with
      N idle connections that completed the handshake (reported as cost per connection),
      after the fio runs, and the peak (VmHWM).
    * The machine: CPUs, CPU model, kernel, Python, nbdkit, fio and libnbd versions, load.

Both servers serve one file of random data (not sparse), read once beforehand so that it
is in the page cache; the write workloads overwrite it in place.

How to rerun (from the repository root, on an otherwise idle machine)::

    .venv/bin/python bench/run.py --runtime 10 --markdown --json bench/results.json

Options: ``--size 1G``, ``--fill-block 4k`` (see ``make_image``), ``--runtime SECONDS``,
``--only nbs|nbdkit``, ``--dir DIR`` (where the image goes; default: a temporary directory),
``--connections N`` (default 20), ``--json OUT`` (every raw number, including fio's job
output), ``--markdown``, ``--baseline REV`` (also run the ``nbs`` of git revision REV of this
repository, e.g. ``main`` or ``HEAD~1``, as a third server ``nbs@REV`` in the same run, and
report nbs / nbs@REV: how a change moved the hot path, measured side by side), ``--volume``
(nbs serves the image imported into a catalogue volume, copy-on-write files, instead of the
file itself; nbdkit still serves the file).

Standard library only.  Needs nbdkit (file plugin), fio with its nbd engine, and ``nbs``
installed next to the interpreter running this script.  Idle connections use the ``nbd``
module (python3-libnbd) when importable and a raw NBD handshake otherwise.  Both servers are
children of this script and are stopped by PID on exit, Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import nbd  # python3-libnbd
except ImportError:  # pragma: no cover - depends on the machine
    nbd = None

HOST = "127.0.0.1"
EXPORT = "disk"
SERVERS = ("nbdkit", "nbs")
KIB = 1024
MIB = 1024 * KIB
CHUNK = 4 * MIB
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
SETTLE = 0.5  # seconds to let a server settle before reading its memory
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1
LISTENING = re.compile(r"nbs: listening on (nbd://\S+)")

# NBD handshake constants (doc/proto.md), for the raw-socket fallback.
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
CLIENT_FLAGS = 0x3  # FIXED_NEWSTYLE | NO_ZEROES
OPT_ABORT = 2
OPT_GO = 7
REP_ACK = 1
REP_ERROR_BIT = 1 << 31


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    rw: str
    bs: str
    iodepth: int

    @property
    def direction(self) -> str:
        return "write" if "write" in self.rw else "read"


WORKLOADS = (
    Workload("randread-4k-qd16", "4k randread QD16", "randread", "4k", 16),
    Workload("randwrite-4k-qd16", "4k randwrite QD16", "randwrite", "4k", 16),
    Workload("read-1m-qd4", "1M seq read QD4", "read", "1M", 4),
    Workload("write-1m-qd4", "1M seq write QD4", "write", "1M", 4),
    Workload("randread-4k-qd1", "4k randread QD1", "randread", "4k", 1),
)


@dataclass
class Server:
    name: str
    command: list[str]
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    memory: dict[str, Any] = field(default_factory=dict)
    log_tail: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def describe(self) -> dict[str, Any]:
        """For the JSON output: how it ran and how it ended."""
        return {
            "pid": self.pid,
            "command": self.command,
            "exit_code": self.proc.returncode,
            "log_tail": self.log_tail,
        }

    @property
    def uri(self) -> str:
        return f"nbd://{HOST}:{self.port}/{EXPORT}"


# ---------------------------------------------------------------------- image


def parse_size(text: str) -> int:
    """``1G``, ``512M``, ``64k``, ``1GiB`` or plain bytes."""
    match = re.fullmatch(r"(\d+)\s*([kmgt]?)(i?b)?", text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    number, unit = int(match[1]), str(match[2])
    exponent = " kmgt".index(unit or " ")
    return number << (10 * exponent)


def make_image(directory: Path, size: int, block: int) -> Path:
    """A file of ``size`` random bytes (every block allocated), written ``block`` at a time.

    The write size decides the size of the page-cache folios the file is cached in, and on
    ext4 with large folios (Linux >= 6.16) a 4 KiB write into a 2 MiB folio costs ~50 us of
    kernel time, which would cap 4k random writes at ~20k IOPS for *any* server.  Writing
    4 KiB at a time keeps 4 KiB folios so the servers, not that, are measured.
    """
    path = directory / "bench.img"
    with path.open("wb", buffering=0) as f:
        for offset in range(0, size, CHUNK):
            data = memoryview(os.urandom(min(CHUNK, size - offset)))
            for start in range(0, len(data), block):
                f.write(data[start : start + block])
        os.fsync(f.fileno())  # no writeback of the image overlapping the runs
    return path


def warm_cache(path: Path) -> None:
    """Read the file once so both servers start from a warm page cache."""
    with path.open("rb", buffering=0) as f:
        while f.read(CHUNK):
            pass


# ---------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if this script dies without cleaning up."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def nbs_command() -> list[str]:
    """The ``nbs`` console script of this interpreter's environment."""
    here = Path(sys.executable).parent / "nbs"
    found = str(here) if here.exists() else shutil.which("nbs")
    if found is None:
        raise SystemExit("bench: cannot find the nbs command next to the interpreter")
    return [found]


def start_nbdkit(image: Path, workdir: Path) -> Server:
    port = free_port()
    log = workdir / "nbdkit.log"
    cmd = ["nbdkit", "-f", "--exit-with-parent", "-i", HOST, "-p", str(port)]
    cmd += ["file", str(image)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    server = Server("nbdkit", cmd, proc, port, log)
    wait_greeting(server)
    return server


def start_nbs(
    image: Path,
    workdir: Path,
    *,
    name: str = "nbs",
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
    volume: bool = False,
) -> Server:
    nbs = command or nbs_command()
    cmd = ["--listen", f"{HOST}:0"]
    if volume:
        # The image imported into a catalogue volume (copy-on-write files): the path a VM's
        # volume takes, rather than a plain file export.
        data = workdir / f"{name}-data"
        create = [*nbs, "volume", "create", EXPORT, "--from-image", str(image)]
        subprocess.run([*create, "--data-dir", str(data)], env=env, check=True, capture_output=True)
        cmd += ["--data-dir", str(data)]
    else:
        cmd += ["--export", f"{EXPORT}={image}"]
    return start_serve(name, cmd, workdir, command=nbs, env=env)


def start_serve(
    name: str,
    args: list[str],
    workdir: Path,
    *,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Server:
    """``nbs serve ARGS`` (output in WORKDIR/NAME.log), once it printed its listening line;
    ``port`` is the port it listens on."""
    log = workdir / f"{name}.log"
    cmd = [*(command or nbs_command()), "serve", *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads in this script
        )
    server = Server(name, cmd, proc, 0, log)
    uri = wait_log_line(server, LISTENING)
    server.port = int(uri.rsplit(":", 1)[1].split("/")[0])
    return server


def checkout_baseline(revision: str, workdir: Path) -> tuple[str, Path]:
    """Extract ``backend/`` of ``revision`` of this repository; returns its short id and tree."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "--verify", f"{revision}^{{commit}}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"bench: --baseline {revision}: not a commit of {repo}") from err
    tree = workdir / f"baseline-{commit}"
    tree.mkdir()
    archive = subprocess.Popen(
        ["git", "-C", str(repo), "archive", "--format=tar", commit, "backend"],
        stdout=subprocess.PIPE,
    )
    subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"bench: git archive {commit} failed")
    return commit, tree


def start_baseline(
    image: Path, workdir: Path, commit: str, tree: Path, *, volume: bool = False
) -> Server:
    """``nbs serve`` from the extracted tree, on this interpreter (same dependencies)."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    command = [sys.executable, "-m", "backend.cli"]
    name = f"nbs@{commit}"
    return start_nbs(image, workdir, name=name, command=command, env=env, volume=volume)


def check_alive(server: Server) -> None:
    if server.proc.poll() is not None:
        tail = server.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{tail}")


def wait_log_line(server: Server, pattern: re.Pattern[str]) -> str:
    """Wait until the server's output matches ``pattern``; returns group 1."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        match = pattern.search(server.log.read_text(errors="replace"))
        if match:
            return match[1]
        check_alive(server)
        time.sleep(0.05)
    raise TimeoutError(f"{server.name} not ready after {READY_TIMEOUT}s")


def wait_greeting(server: Server) -> None:
    """Poll until the server accepts a connection and completes an NBD greeting."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        check_alive(server)
        with contextlib.suppress(OSError):
            probe_and_abort(server.port)
            return
        time.sleep(0.05)
    raise TimeoutError(f"{server.name} not ready after {READY_TIMEOUT}s")


def keep_log_tails(servers: list[Server]) -> None:
    """Save the end of each server's output before the work directory goes."""
    for server in servers:
        with contextlib.suppress(OSError):
            server.log_tail = server.log.read_text(errors="replace")[-4000:]


def stop_server(server: Server) -> None:
    """SIGTERM by PID, then SIGKILL if it does not exit in time."""
    proc = server.proc
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------- /proc


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in KiB and the thread count, from /proc/PID/status."""
    wanted = {"VmRSS": "rss_kib", "VmHWM": "hwm_kib", "Threads": "threads"}
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            out[wanted[key]] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of the process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def pressure_total_us(resource: str) -> int | None:
    """Cumulative µs during which some task waited for ``resource`` (PSI); None without PSI."""
    try:
        text = Path(f"/proc/pressure/{resource}").read_text()
    except OSError:
        return None
    return int(text.split("total=", 1)[1].split()[0])


@dataclass(frozen=True)
class Snapshot:
    """Counters read before and after a run: wall clock, server CPU, machine-wide PSI."""

    wall: float
    server_cpu: float
    cpu_pressure_us: int | None
    io_pressure_us: int | None

    @classmethod
    def take(cls, *pids: int) -> Snapshot:
        """``server_cpu``: the CPU time of every process in ``pids``, summed."""
        cpu = sum(cpu_seconds(pid) for pid in pids)
        return cls(time.monotonic(), cpu, pressure_total_us("cpu"), pressure_total_us("io"))


def _pressure_pct(before: int | None, after: int | None, wall: float) -> float | None:
    if before is None or after is None:
        return None
    return (after - before) / 1e4 / wall


def usage_between(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    wall = after.wall - before.wall
    return {
        "wall_s": wall,
        "server_cpu_s": after.server_cpu - before.server_cpu,
        "server_cpu_pct": 100 * (after.server_cpu - before.server_cpu) / wall,
        "cpu_pressure_pct": _pressure_pct(before.cpu_pressure_us, after.cpu_pressure_us, wall),
        "io_pressure_pct": _pressure_pct(before.io_pressure_us, after.io_pressure_us, wall),
    }


# ---------------------------------------------------------------------- idle connections


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("server closed the connection")
        data += chunk
    return data


def _greet(sock: socket.socket) -> None:
    """Read the server's greeting and send our client flags."""
    magic, opt_magic, _flags = struct.unpack(">QQH", _recv_exact(sock, 18))
    if (magic, opt_magic) != (NBDMAGIC, IHAVEOPT):
        raise ConnectionError("not a fixed-newstyle NBD server")
    sock.sendall(struct.pack(">I", CLIENT_FLAGS))


def probe_and_abort(port: int) -> None:
    """Greeting, then NBD_OPT_ABORT: proves the server is up without an error in its log."""
    with socket.create_connection((HOST, port), 1) as sock:
        sock.settimeout(1)
        _greet(sock)
        sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_ABORT, 0))
        with contextlib.suppress(OSError):
            _recv_exact(sock, 20)  # the ACK; servers may also just close


def raw_handshake(port: int) -> socket.socket:
    """Connect and negotiate NBD_OPT_GO for EXPORT; returns the socket in transmission."""
    sock = socket.create_connection((HOST, port), 10)
    try:
        _greet(sock)
        name = EXPORT.encode()
        payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(payload)) + payload)
        while True:
            reply_magic, _opt, kind, length = struct.unpack(">QIII", _recv_exact(sock, 20))
            if reply_magic != OPT_REPLY_MAGIC:
                raise ConnectionError("bad option reply magic")
            _recv_exact(sock, length)
            if kind & REP_ERROR_BIT:
                raise ConnectionError(f"NBD_OPT_GO refused ({kind:#x})")
            if kind == REP_ACK:
                return sock
    except BaseException:
        sock.close()
        raise


@contextlib.contextmanager
def idle_connections(server: Server, count: int) -> Iterator[str]:
    """Hold ``count`` connections that completed the handshake; yields the client used."""
    closers: list[Callable[[], None]] = []
    try:
        for _ in range(count):
            if nbd is not None:
                handle = nbd.NBD()
                handle.connect_uri(server.uri)
                closers.append(handle.shutdown)
            else:
                sock = raw_handshake(server.port)
                closers.append(sock.close)
        yield "libnbd" if nbd is not None else "raw socket"
    finally:
        for close in closers:
            with contextlib.suppress(Exception):
                close()


def measure_idle_memory(server: Server, count: int) -> None:
    """Idle RSS, then RSS with ``count`` idle connections; stored in ``server.memory``."""
    time.sleep(SETTLE)
    idle = proc_status(server.pid)
    with idle_connections(server, count) as client:
        time.sleep(SETTLE)
        loaded = proc_status(server.pid)
    server.memory.update(
        idle_rss_kib=idle["rss_kib"],
        idle_threads=idle["threads"],
        connections=count,
        connection_client=client,
        rss_with_connections_kib=loaded["rss_kib"],
        threads_with_connections=loaded["threads"],
        per_connection_kib=(loaded["rss_kib"] - idle["rss_kib"]) / count,
    )


def measure_final_memory(server: Server) -> None:
    time.sleep(SETTLE)
    final = proc_status(server.pid)
    server.memory.update(after_fio_rss_kib=final["rss_kib"], peak_hwm_kib=final["hwm_kib"])


# ---------------------------------------------------------------------- fio


def fio_command(uri: str, workload: Workload, runtime: int, output: Path) -> list[str]:
    return [
        "fio",
        f"--name={workload.key}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={workload.rw}",
        f"--bs={workload.bs}",
        f"--iodepth={workload.iodepth}",
        "--numjobs=1",
        "--time_based",
        f"--runtime={runtime}",
        "--lat_percentiles=1",  # total latency (submission + completion) percentiles
        "--clat_percentiles=1",
        "--output-format=json",
        f"--output={output}",
    ]


def _percentile_us(stats: dict[str, Any], percent: str) -> float:
    value: float = stats["percentile"][f"{percent}.000000"] / 1000
    return value


def run_fio(server: Server, workload: Workload, runtime: int, workdir: Path) -> dict[str, Any]:
    """One fio run; returns its numbers (and fio's whole job object under ``fio_job``)."""
    return measure_fio(server.uri, server.name, workload, runtime, workdir, pids=[server.pid])


def measure_fio(
    uri: str, name: str, workload: Workload, runtime: int, workdir: Path, *, pids: list[int]
) -> dict[str, Any]:
    """One fio run against ``uri``, reported under server ``name``; the server CPU is that
    of every process in ``pids`` (e.g. an engine and its storage nodes)."""
    output = workdir / f"{workload.key}-{name}.json"
    cmd = fio_command(uri, workload, runtime, output)
    before = Snapshot.take(*pids)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 120, check=False)
    usage = usage_between(before, Snapshot.take(*pids))
    if done.returncode != 0 or not output.exists():
        raise RuntimeError(f"fio failed ({done.returncode}): {done.stderr[-2000:]}")
    job = json.loads(output.read_text())["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio job error {job['error']} against {name}")
    side = job[workload.direction]
    ios = side["total_ios"]
    return {
        "workload": workload.key,
        "server": name,
        "iops": side["iops"],
        "mb_s": side["bw_bytes"] / 1e6,
        "p50_lat_us": _percentile_us(side["lat_ns"], "50"),
        "p99_lat_us": _percentile_us(side["lat_ns"], "99"),
        "p50_clat_us": _percentile_us(side["clat_ns"], "50"),
        "p99_clat_us": _percentile_us(side["clat_ns"], "99"),
        "mean_lat_us": side["lat_ns"]["mean"] / 1000,
        "mean_slat_us": side["slat_ns"]["mean"] / 1000,
        "total_ios": ios,
        **usage,
        "server_cpu_us_per_io": 1e6 * usage["server_cpu_s"] / ios if ios else None,
        "fio_usr_cpu_pct": job["usr_cpu"],
        "fio_sys_cpu_pct": job["sys_cpu"],
        "fio_stderr": done.stderr.strip(),
        "fio_job": job,
    }


def run_workloads(servers: list[Server], runtime: int, workdir: Path) -> list[dict[str, Any]]:
    results = []
    for index, workload in enumerate(WORKLOADS):
        order = servers if index % 2 == 0 else servers[::-1]
        for server in order:
            print(f"bench: {workload.label} on {server.name} ...", file=sys.stderr, flush=True)
            results.append(run_fio(server, workload, runtime, workdir))
    return results


# ---------------------------------------------------------------------- machine


def _first_line(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return None
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else None


def cpu_model() -> str | None:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def machine_info() -> dict[str, Any]:
    uname = platform.uname()
    repo = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(repo), "rev-parse", "HEAD"]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": f"{uname.system} {uname.release}",
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "nbs_version": importlib.metadata.version("nbs"),
        "nbs_commit": _first_line(git),
        "nbdkit": _first_line(["nbdkit", "--version"]),
        "fio": _first_line(["fio", "--version"]),
        "libnbd": nbd.NBD().get_version() if nbd is not None else None,
        "loadavg_start": os.getloadavg(),
    }


# ---------------------------------------------------------------------- output


def table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = [header, ["---"] * len(header), *rows]
        return "\n".join("| " + " | ".join(row) + " |" for row in lines)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    )


def by_key(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["workload"], r["server"]): r for r in results}


def num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def optional(value: float | None) -> str:
    return "n/a" if value is None else num(value)


def performance_table(results: list[dict[str, Any]], names: list[str], markdown: bool) -> str:
    found = by_key(results)
    header = ["workload"]
    for name in names:
        header += [f"{name} IOPS", f"{name} MB/s", f"{name} p50 lat µs"]
    compare = set(SERVERS) <= set(names)
    if compare:
        header.append("nbs/nbdkit")
    baseline = next((n for n in names if n.startswith("nbs@")), None)
    if baseline is not None:
        header += [f"IOPS nbs/{baseline}", f"p50 {baseline}/nbs"]
    rows = []
    for workload in WORKLOADS:
        row = [workload.label]
        for name in names:
            r = found[(workload.key, name)]
            row += [num(r["iops"]), num(r["mb_s"]), num(r["p50_lat_us"], 1)]
        if compare:
            ratio = found[(workload.key, "nbs")]["iops"] / found[(workload.key, "nbdkit")]["iops"]
            row.append(f"{ratio:.2f}")
        if baseline is not None:
            new, old = found[(workload.key, "nbs")], found[(workload.key, baseline)]
            row.append(f"{new['iops'] / old['iops']:.2f}")
            row.append(f"{old['p50_lat_us'] / new['p50_lat_us']:.2f}")
        rows.append(row)
    return table(header, rows, markdown)


def cpu_table(results: list[dict[str, Any]], names: list[str], markdown: bool) -> str:
    found = by_key(results)
    header = ["workload"]
    for name in names:
        header += [f"{name} CPU %", f"{name} CPU µs/IO", f"{name} run: CPU pressure %"]
    rows = []
    for workload in WORKLOADS:
        row = [workload.label]
        for name in names:
            r = found[(workload.key, name)]
            row += [
                num(r["server_cpu_pct"]),
                num(r["server_cpu_us_per_io"] or 0, 1),
                optional(r["cpu_pressure_pct"]),
            ]
        rows.append(row)
    return table(header, rows, markdown)


def memory_table(servers: list[Server], markdown: bool) -> str:
    header = [
        "server",
        "idle RSS MiB",
        "RSS with N conns MiB",
        "per conn KiB",
        "RSS after fio MiB",
        "peak (VmHWM) MiB",
        "threads idle / N conns",
    ]
    rows = []
    for server in servers:
        m = server.memory
        rows.append(
            [
                server.name,
                num(m["idle_rss_kib"] / KIB, 1),
                num(m["rss_with_connections_kib"] / KIB, 1),
                num(m["per_connection_kib"]),
                num(m["after_fio_rss_kib"] / KIB, 1),
                num(m["peak_hwm_kib"] / KIB, 1),
                f"{m['idle_threads']} / {m['threads_with_connections']}",
            ]
        )
    return table(header, rows, markdown)


def report(
    machine: dict[str, Any],
    config: dict[str, Any],
    results: list[dict[str, Any]],
    servers: list[Server],
    markdown: bool,
) -> str:
    names = [s.name for s in servers]
    conns = config["connections"]
    client = servers[0].memory["connection_client"]
    lines = [
        f"date {machine['date']}, {machine['nproc']} CPUs ({machine['cpu_model']}),"
        f" {machine['kernel']}, Python {machine['python']}, {machine['nbdkit']},"
        f" {machine['fio']}, libnbd {machine['libnbd']}",
        f"image {config['size']} bytes of random data written {config['fill_block']} at a time,"
        f" runtime {config['runtime']} s per run,"
        f" load average {machine['loadavg_start'][0]:.2f} at start,"
        f" {machine['loadavg_end'][0]:.2f} at end",
        "",
        performance_table(results, names, markdown),
        "",
        "Server CPU (100 % = one core), CPU time per I/O, and machine-wide CPU pressure during"
        " the run (PSI 'some': share of time a runnable task waited for a CPU; high = noisy):",
        "",
        cpu_table(results, names, markdown),
        "",
        f"Memory (N = {conns} idle connections, opened with {client}):",
        "",
        memory_table(servers, markdown),
    ]
    return "\n".join(lines)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1G"))
    parser.add_argument(
        "--fill-block",
        type=parse_size,
        default=parse_size("4k"),
        help="write size used to create the image (sets its page-cache folio size)",
    )
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio run")
    parser.add_argument("--only", choices=SERVERS, help="benchmark one server only")
    parser.add_argument("--dir", type=Path, help="where to create the image (default: a tmpdir)")
    parser.add_argument("--connections", type=int, default=20, help="idle connections for RSS")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write every raw number here")
    parser.add_argument("--markdown", action="store_true", help="print tables as Markdown")
    parser.add_argument(
        "--volume",
        action="store_true",
        help="nbs serves the image imported into a catalogue volume, not the file itself",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run nbs from this git revision (e.g. main, HEAD~1) and compare",
    )
    args = parser.parse_args(argv)
    if args.baseline and args.only == "nbdkit":
        parser.error("--baseline compares nbs with an older nbs: not with --only nbdkit")
    return args


def start_servers(
    names: list[str], image: Path, workdir: Path, stack: contextlib.ExitStack, volume: bool
) -> list[Server]:
    servers = []
    for name in names:
        if name == "nbdkit":
            server = start_nbdkit(image, workdir)
        else:
            server = start_nbs(image, workdir, volume=volume)
        stack.callback(stop_server, server)
        servers.append(server)
    return servers


def on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    names = [args.only] if args.only else list(SERVERS)
    machine = machine_info()
    config: dict[str, Any] = {
        "size": args.size,
        "fill_block": args.fill_block,
        "runtime": args.runtime,
        "connections": args.connections,
        "nbs_export": "catalogue volume" if args.volume else "file",
    }
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.dir)))
        print(f"bench: writing {args.size} random bytes to {workdir}", file=sys.stderr)
        image = make_image(workdir, args.size, args.fill_block)
        warm_cache(image)
        servers: list[Server] = []
        stack.callback(keep_log_tails, servers)  # runs after the servers stopped
        servers += start_servers(names, image, workdir, stack, args.volume)
        if args.baseline:
            commit, tree = checkout_baseline(args.baseline, workdir)
            server = start_baseline(image, workdir, commit, tree, volume=args.volume)
            stack.callback(stop_server, server)
            servers.append(server)
            config["baseline"] = {"revision": args.baseline, "commit": commit}
        for server in servers:
            measure_idle_memory(server, args.connections)
        results = run_workloads(servers, args.runtime, workdir)
        for server in servers:
            measure_final_memory(server)
    machine["loadavg_end"] = os.getloadavg()
    print(report(machine, config, results, servers, args.markdown))
    if args.json:
        document = {
            "machine": machine,
            "config": config,
            "servers": {s.name: s.describe() for s in servers},
            "memory": {s.name: s.memory for s in servers},
            "results": results,
        }
        write_json(args.json, document)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # servers and the image are already cleaned up
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
