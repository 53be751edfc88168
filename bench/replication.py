#!/usr/bin/env python3
"""Benchmark replicated volumes: 3 replicas against 1 replica and an unreplicated volume.

One engine (``nbs serve`` whose config names three storage nodes) and three storage nodes
(``nbs serve`` with their management API), all on loopback, all children of this script.
The engine serves three volumes of ``--size``:

* ``r3``: replicated on the three nodes (``replicated:nodes=node0/node1/node2``, every
  other option at its default, so ``min_insync`` is 2);
* ``r1``: replicated on one node (``replicated:nodes=node0``): the same engine path with
  one member, so ``r3 / r1`` is the cost of the fan-out itself;
* ``plain``: a catalogue volume of the ``file`` kind in the engine's own data directory.

What it measures
    * Each volume is filled first (a sequential 1M write pass through the engine), so reads
      read data, then fio's nbd engine runs (one job, ``time_based``) 4k randwrite QD16,
      4k randwrite QD1, 1M seq write QD4, 4k randread QD16 and 1M seq read QD4 against each
      volume in turn, the order of the volumes alternating per workload (r3, r1, plain /
      plain, r1, r3 / ...) so drift on a shared machine is spread over all three.  Per run:
      IOPS, MB/s, p50 latency (fio's ``lat``), and the CPU time of the engine and of the
      nodes from /proc/PID/stat, per I/O.
    * Resync: node2 is killed (SIGKILL), ``--resync-size`` bytes are written to ``r3`` with it
      away (a sequential 1M pass), node2 is started again on the same ports, and the engine's
      resync supervisor (``replication.probe_interval`` 0.2 s here) brings it back.  The rate
      is the engine's own count: bytes copied and seconds taken, from its log line ``volume
      r3: node2 in sync again (N bytes copied in S s)``; the metrics
      (``nbs_replica_in_sync``, ``nbs_replica_resync_bytes_total``) give the wall time from
      the restart to in-sync and a cross-check of the bytes, and ``nbs volume info --json``
      the final state.
    * Scrub: then ``nbs volume scrub r3 --json`` (every replica in sync): bytes compared per
      second by the engine's own count, and the engine's and nodes' CPU meanwhile.
    * The goals of issue 12: r3/r1 QD1 write p50 <= 1.3, r3/r1 QD16 write IOPS >= 0.7,
      r3/r1 reads >= 0.95, r3/plain QD1 write p50 <= 2, resync >= 200 MB/s; each is
      reported as met or not.

How to rerun (from the repository root, on an otherwise idle machine)::

    .venv/bin/python bench/replication.py --runtime 10 --markdown --json OUT.json

Options: ``--size 1G`` (each volume), ``--resync-size`` (bytes written while node2 is away;
default ``--size``), ``--runtime SECONDS``, ``--dir DIR`` (work directory parent),
``--json OUT``, ``--markdown``, ``--profile-engine OUT`` (the engine runs under cProfile on
every thread, bench/profile_serve.py, and OUT gets its profile: slower, for finding where its
time goes, not for the figures).

Standard library and this repository only (the servers run this tree's ``backend.cli`` on
this interpreter).  Needs fio with its nbd engine.  Every process it starts is stopped by
PID on exit, Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402
    HOST,
    WORKLOADS,
    Server,
    Snapshot,
    Workload,
    by_key,
    check_alive,
    cpu_seconds,
    free_port,
    keep_log_tails,
    machine_info,
    measure_fio,
    num,
    on_sigterm,
    optional,
    parse_size,
    start_serve,
    stop_server,
    table,
    usage_between,
    write_json,
)

NBS = [sys.executable, "-m", "backend.cli"]
ENV = dict(
    os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
)
NODES = ("node0", "node1", "node2")
AWAY = "node2"  # the node taken away for the resync measurement
PROBE_INTERVAL = 0.2  # the engine's resync supervisor: how soon it sees the node back
RESYNC_TIMEOUT = 900.0
POLL = 0.1

_WORKLOAD = {w.key: w for w in WORKLOADS}
BENCH_WORKLOADS = (
    _WORKLOAD["randwrite-4k-qd16"],
    Workload("randwrite-4k-qd1", "4k randwrite QD1", "randwrite", "4k", 1),
    _WORKLOAD["write-1m-qd4"],
    _WORKLOAD["randread-4k-qd16"],
    _WORKLOAD["read-1m-qd4"],
)


@dataclasses.dataclass(frozen=True)
class Volume:
    """A volume of the engine: its name doubles as the configuration's name in reports."""

    name: str
    label: str
    storage: str | None  # the --storage spec; None: the default kind (file)


VOLUMES = (
    Volume("r3", "3 replicas", "replicated:nodes=" + "/".join(NODES)),
    Volume("r1", "1 replica", f"replicated:nodes={NODES[0]}"),
    Volume("plain", "unreplicated", None),
)


@dataclasses.dataclass(frozen=True)
class Goal:
    """One goal of issue 12: ``metric`` of ``workload`` on ``volume`` divided by the same on
    ``versus``, at most (``at_most``) or at least ``limit``."""

    label: str
    workload: str
    metric: str  # a key of a result: "iops" or "p50_lat_us"
    volume: str
    versus: str
    limit: float
    at_most: bool

    def ratio(self, results: list[dict[str, Any]]) -> float:
        found = by_key(results)
        mine = found[(self.workload, self.volume)][self.metric]
        theirs = found[(self.workload, self.versus)][self.metric]
        return float(mine / theirs)

    def met(self, ratio: float) -> bool:
        return ratio <= self.limit if self.at_most else ratio >= self.limit


GOALS = (
    Goal("QD1 write p50, 3 vs 1 replica", "randwrite-4k-qd1", "p50_lat_us", "r3", "r1", 1.3, True),
    Goal("QD16 write IOPS, 3 vs 1 replica", "randwrite-4k-qd16", "iops", "r3", "r1", 0.7, False),
    Goal("4k read IOPS QD16, 3 vs 1 replica", "randread-4k-qd16", "iops", "r3", "r1", 0.95, False),
    Goal("1M read MB/s, 3 vs 1 replica", "read-1m-qd4", "mb_s", "r3", "r1", 0.95, False),
    Goal(
        "QD1 write p50, 3 replicas vs unreplicated",
        "randwrite-4k-qd1",
        "p50_lat_us",
        "r3",
        "plain",
        2.0,
        True,
    ),
)
RESYNC_GOAL_MB_S = 200.0

# The resync supervisor's line when a member is back in sync (backend/replication/supervisor.py).
IN_SYNC_AGAIN = re.compile(
    r"volume (\S+): (\S+) in sync again \((\d+) bytes copied in ([\d.]+) s\)"
)
# One Prometheus sample: name{labels} value.
SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


# ---------------------------------------------------------------------- processes


class Cluster:
    """The three storage nodes and the engine, started in order; ``close()`` stops every
    process by PID.  Each node's ports are picked once so a restarted node is found again."""

    def __init__(self, workdir: Path, profile: Path | None = None) -> None:
        self.workdir = workdir
        self.profile = profile
        self.nodes: dict[str, Server] = {}
        self.node_ports = {name: (free_port(), free_port()) for name in NODES}  # nbd, api
        self.engine: Server | None = None
        self.engine_data = workdir / "engine"
        self.metrics_port = free_port()
        self.servers: list[Server] = []  # every process ever started, for logs and cleanup

    # nodes

    def node_data(self, name: str) -> Path:
        return self.workdir / name

    def start_node(self, name: str) -> Server:
        nbd_port, api_port = self.node_ports[name]
        data = self.node_data(name)
        data.mkdir(exist_ok=True)
        config = self.workdir / f"{name}.yaml"
        config.write_text(f'api:\n  listen: ["{HOST}:{api_port}"]\n')
        args = ["--listen", f"{HOST}:{nbd_port}", "--data-dir", str(data), "--config", str(config)]
        log_name = f"{name}-{sum(s.name == name for s in self.servers)}"
        server = start_serve(log_name, args, self.workdir, command=NBS, env=ENV)
        server.name = name
        self.servers.append(server)
        self.nodes[name] = server
        wait_http(f"http://{HOST}:{api_port}/healthz", server)
        return server

    def kill_node(self, name: str) -> None:
        """SIGKILL by PID: the node is gone without a goodbye, as in a crash."""
        proc = self.nodes[name].proc
        proc.kill()
        proc.wait()

    # engine

    def start_engine(self) -> Server:
        self.engine_data.mkdir()
        lines = [
            f"replication: {{probe_interval: {PROBE_INTERVAL}}}",
            f'metrics: {{listen: "{HOST}:{self.metrics_port}"}}',
            "nodes:",
        ]
        for name in NODES:
            nbd_port, api_port = self.node_ports[name]
            token = (self.node_data(name) / "api-token").read_text().strip()
            lines += [
                f"  {name}:",
                f"    api: http://{HOST}:{api_port}",
                f"    token: {token}",
                f"    nbd: nbd://{HOST}:{nbd_port}",
            ]
        config = self.workdir / "engine.yaml"
        config.write_text("\n".join(lines) + "\n")
        args = ["--listen", f"{HOST}:0", "--data-dir", str(self.engine_data)]
        command = NBS
        if self.profile is not None:
            command = [sys.executable, str(ROOT / "bench" / "profile_serve.py"), str(self.profile)]
        self.engine = start_serve(
            "engine", [*args, "--config", str(config)], self.workdir, command=command, env=ENV
        )
        self.servers.append(self.engine)
        wait_http(f"http://{HOST}:{self.metrics_port}/metrics", self.engine)
        return self.engine

    def volume(self, *args: str) -> str:
        """``nbs volume ARGS`` against the engine (through its API socket); its stdout."""
        done = subprocess.run(
            [*NBS, "volume", *args, "--data-dir", str(self.engine_data)],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"nbs volume {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def uri(self, volume: str) -> str:
        assert self.engine is not None
        return f"nbd://{HOST}:{self.engine.port}/{volume}"

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}/metrics", timeout=10) as r:
            return parse_metrics(r.read().decode())

    @property
    def pids(self) -> list[int]:
        """The engine's and the running nodes' PIDs."""
        assert self.engine is not None
        return [self.engine.pid, *(s.pid for s in self.nodes.values() if s.proc.poll() is None)]

    def close(self) -> None:
        for server in reversed(self.servers):
            stop_server(server)
        keep_log_tails(self.servers)


def wait_http(url: str, server: Server, timeout: float = 30.0) -> None:
    """Until ``url`` answers 200 (nbs serve prints its NBD line before the API is up)."""
    deadline = time.monotonic() + timeout
    while True:
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(url, timeout=2) as answer,
        ):
            if answer.status == 200:
                return
        check_alive(server)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.05)


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text format: {(name, labels): value} (comments skipped)."""
    samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        labels = frozenset(LABEL.findall(match[2] or ""))
        samples[match[1], labels] = float(match[3])
    return samples


def replica_sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float],
    name: str,
    volume: str,
    member: str,
) -> float | None:
    return samples.get((name, frozenset({("volume", volume), ("member", member)})))


def in_sync_again(log: str, volume: str, member: str) -> tuple[int, float] | None:
    """(bytes copied, seconds) of the last resync of ``member`` the engine's log reports."""
    found = None
    for match in IN_SYNC_AGAIN.finditer(log):
        if (match[1], match[2]) == (volume, member):
            found = int(match[3]), float(match[4])
    return found


# ---------------------------------------------------------------------- fio


def fio_fill(uri: str, size: int, name: str, workdir: Path) -> dict[str, Any]:
    """A sequential 1M write of ``size`` bytes (QD4, not time based); fio's job numbers."""
    output = workdir / f"fill-{name}.json"
    cmd = [
        "fio",
        f"--name=fill-{name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--rw=write",
        "--bs=1M",
        "--iodepth=4",
        f"--size={size}",
        "--numjobs=1",
        "--output-format=json",
        f"--output={output}",
    ]
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode != 0 or not output.exists():
        raise RuntimeError(f"fio fill of {name} failed ({done.returncode}): {done.stderr[-2000:]}")
    job = json.loads(output.read_text())["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio job error {job['error']} filling {name}")
    return {"seconds": time.monotonic() - started, "mb_s": job["write"]["bw_bytes"] / 1e6}


def run_workloads(cluster: Cluster, runtime: int, workdir: Path) -> list[dict[str, Any]]:
    assert cluster.engine is not None
    results = []
    for index, workload in enumerate(BENCH_WORKLOADS):
        order = VOLUMES if index % 2 == 0 else VOLUMES[::-1]
        for volume in order:
            print(f"bench: {workload.label} on {volume.label} ...", file=sys.stderr, flush=True)
            engine_before = cpu_seconds(cluster.engine.pid)
            uri = cluster.uri(volume.name)
            result = measure_fio(uri, volume.name, workload, runtime, workdir, pids=cluster.pids)
            engine_cpu = cpu_seconds(cluster.engine.pid) - engine_before
            ios = result["total_ios"]
            result["engine_cpu_us_per_io"] = 1e6 * engine_cpu / ios if ios else None
            result["nodes_cpu_us_per_io"] = (
                1e6 * (result["server_cpu_s"] - engine_cpu) / ios if ios else None
            )
            results.append(result)
    return results


# ---------------------------------------------------------------------- resync


def measure_resync(cluster: Cluster, size: int, workdir: Path) -> dict[str, Any]:
    """Take AWAY away, write ``size`` bytes to r3, bring it back, time its resync."""
    volume = "r3"
    print(f"bench: resync: {AWAY} away, writing {size} bytes to {volume} ...", file=sys.stderr)
    cluster.kill_node(AWAY)
    degraded = fio_fill(cluster.uri(volume), size, "degraded", workdir)
    if replica_sample(cluster.metrics(), "nbs_replica_in_sync", volume, AWAY) != 0:
        raise RuntimeError(f"{AWAY} is still in sync after the writes it missed")
    before = Snapshot.take(*cluster.pids)
    restarted = time.monotonic()
    cluster.start_node(AWAY)
    print(f"bench: resync: {AWAY} back, waiting for it to be in sync ...", file=sys.stderr)
    deadline = restarted + RESYNC_TIMEOUT
    while True:
        samples = cluster.metrics()
        if replica_sample(samples, "nbs_replica_in_sync", volume, AWAY) == 1:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{AWAY} not in sync {RESYNC_TIMEOUT:.0f} s after its restart")
        time.sleep(POLL)
    wall = time.monotonic() - restarted
    after = Snapshot.take(*cluster.pids)
    assert cluster.engine is not None
    counted = in_sync_again(cluster.engine.log.read_text(errors="replace"), volume, AWAY)
    if counted is None:
        raise RuntimeError(f"the engine's log has no 'in sync again' line for {AWAY}")
    copied, seconds = counted
    info = json.loads(cluster.volume("info", volume, "--json"))
    return {
        "volume": volume,
        "member": AWAY,
        "written_while_away": size,
        "degraded_write_mb_s": degraded["mb_s"],
        "bytes_copied": copied,
        "engine_seconds": seconds,
        "mb_s": copied / seconds / 1e6 if seconds else None,
        "metrics_bytes_copied": replica_sample(
            samples, "nbs_replica_resync_bytes_total", volume, AWAY
        ),
        "wall_seconds_from_restart": wall,
        "wall_mb_s": copied / wall / 1e6,
        "copied_per_written": copied / size,
        "cpu_s": after.server_cpu - before.server_cpu,
        **{k: v for k, v in usage_between(before, after).items() if "pressure" in k},
        "replication": info.get("replication"),
    }


# ---------------------------------------------------------------------- scrub


def measure_scrub(cluster: Cluster) -> dict[str, Any]:
    """Scrub r3 (every replica in sync after the resync): its duration, rate and CPU."""
    volume = "r3"
    print(f"bench: scrubbing {volume} ...", file=sys.stderr, flush=True)
    before = Snapshot.take(*cluster.pids)
    started = time.monotonic()
    found = json.loads(cluster.volume("scrub", volume, "--json"))
    wall = time.monotonic() - started
    after = Snapshot.take(*cluster.pids)
    seconds = float(found["seconds"])
    return {
        "volume": volume,
        "replicas": found["replicas"],
        "compared": found["compared"],
        "mismatches": len(found["mismatches"]),
        "engine_seconds": seconds,
        "mb_s": found["compared"] / seconds / 1e6 if seconds else None,
        "wall_seconds": wall,
        "cpu_s": after.server_cpu - before.server_cpu,
    }


def scrub_lines(scrub: dict[str, Any]) -> list[str]:
    return [
        f"Scrub: {scrub['volume']}'s {scrub['compared']:,} bytes compared on"
        f" {len(scrub['replicas'])} replicas in {scrub['engine_seconds']:.1f} s ="
        f" {optional(scrub['mb_s'])} MB/s of volume ({scrub['mismatches']} mismatches);"
        f" engine + nodes CPU {scrub['cpu_s']:.1f} s.",
    ]


# ---------------------------------------------------------------------- output


def performance_table(results: list[dict[str, Any]], markdown: bool) -> str:
    found = by_key(results)
    header = ["workload"]
    for volume in VOLUMES:
        header += [f"{volume.label} IOPS", f"{volume.label} MB/s", f"{volume.label} p50 µs"]
    header += ["IOPS 3/1", "p50 3/1", "p50 3/unrepl."]
    rows = []
    for workload in BENCH_WORKLOADS:
        row = [workload.label]
        for volume in VOLUMES:
            r = found[(workload.key, volume.name)]
            row += [num(r["iops"]), num(r["mb_s"]), num(r["p50_lat_us"], 1)]
        r3, r1, plain = (found[(workload.key, v.name)] for v in VOLUMES)
        row += [
            f"{r3['iops'] / r1['iops']:.2f}",
            f"{r3['p50_lat_us'] / r1['p50_lat_us']:.2f}",
            f"{r3['p50_lat_us'] / plain['p50_lat_us']:.2f}",
        ]
        rows.append(row)
    return table(header, rows, markdown)


def cpu_table(results: list[dict[str, Any]], markdown: bool) -> str:
    found = by_key(results)
    header = ["workload"]
    for volume in VOLUMES:
        header += [f"{volume.label} CPU µs/IO (engine + nodes)", f"{volume.label} pressure %"]
    rows = []
    for workload in BENCH_WORKLOADS:
        row = [workload.label]
        for volume in VOLUMES:
            r = found[(workload.key, volume.name)]
            total = r["server_cpu_us_per_io"] or 0
            row += [
                f"{num(total, 1)} ({num(r['engine_cpu_us_per_io'] or 0, 1)}"
                f" + {num(r['nodes_cpu_us_per_io'] or 0, 1)})",
                optional(r["cpu_pressure_pct"]),
            ]
        rows.append(row)
    return table(header, rows, markdown)


def goals(results: list[dict[str, Any]], resync: dict[str, Any]) -> list[dict[str, Any]]:
    verdicts = []
    for goal in GOALS:
        ratio = goal.ratio(results)
        limit = f"{'≤' if goal.at_most else '≥'} {goal.limit:g}x"
        verdicts.append(
            {
                "goal": goal.label,
                "measured": f"{ratio:.2f}x",
                "limit": limit,
                "met": goal.met(ratio),
            }
        )
    rate = resync["mb_s"] or 0.0
    verdicts.append(
        {
            "goal": "resync MB/s",
            "measured": f"{rate:,.0f} MB/s",
            "limit": f"≥ {RESYNC_GOAL_MB_S:g} MB/s",
            "met": rate >= RESYNC_GOAL_MB_S,
        }
    )
    return verdicts


def goals_table(verdicts: list[dict[str, Any]], markdown: bool) -> str:
    rows = [
        [v["goal"], v["measured"], v["limit"], "met" if v["met"] else "NOT met"] for v in verdicts
    ]
    return table(["goal", "measured", "target", "verdict"], rows, markdown)


def resync_lines(resync: dict[str, Any]) -> list[str]:
    return [
        f"Resync: {resync['written_while_away']:,} bytes written to r3 with {resync['member']}"
        f" away ({resync['degraded_write_mb_s']:,.0f} MB/s degraded);"
        f" the engine copied {resync['bytes_copied']:,} bytes in {resync['engine_seconds']:.1f} s"
        f" = {optional(resync['mb_s'])} MB/s ({resync['copied_per_written']:.2f}x the bytes"
        f" written); {resync['wall_seconds_from_restart']:.1f} s from the node's restart to in"
        f" sync (metrics) = {resync['wall_mb_s']:,.0f} MB/s; engine + nodes CPU"
        f" {resync['cpu_s']:.1f} s meanwhile.",
    ]


def report(
    machine: dict[str, Any],
    config: dict[str, Any],
    results: list[dict[str, Any]],
    resync: dict[str, Any],
    markdown: bool,
    *,
    scrub: dict[str, Any] | None = None,
) -> str:
    lines = [
        f"date {machine['date']}, {machine['nproc']} CPUs ({machine['cpu_model']}),"
        f" {machine['kernel']}, Python {machine['python']}, {machine['fio']},"
        f" nbs {machine['nbs_commit']}",
        f"volumes of {config['size']:,} bytes, filled first; runtime {config['runtime']} s per"
        f" run; load average {machine['loadavg_start'][0]:.2f} at start,"
        f" {machine['loadavg_end'][0]:.2f} at end",
        "",
        performance_table(results, markdown),
        "",
        "CPU per I/O, engine + the three nodes (engine + nodes), from /proc/PID/stat; machine-wide"
        " CPU pressure during the run (PSI 'some'):",
        "",
        cpu_table(results, markdown),
        "",
        *resync_lines(resync),
        *(scrub_lines(scrub) if scrub is not None else ()),
        "",
        goals_table(goals(results, resync), markdown),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1G"), help="each volume")
    parser.add_argument(
        "--resync-size",
        type=parse_size,
        help="bytes written while a node is away (default: --size)",
    )
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio run")
    parser.add_argument("--dir", type=Path, help="parent of the work directory (default: tmp)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write every raw number here")
    parser.add_argument("--markdown", action="store_true", help="print tables as Markdown")
    parser.add_argument(
        "--profile-engine", type=Path, metavar="OUT", help="profile the engine (cProfile) into OUT"
    )
    args = parser.parse_args(argv)
    args.resync_size = args.resync_size or args.size
    if args.resync_size > args.size:
        parser.error("--resync-size must not be more than --size")
    if args.size < 1 << 20 or args.runtime < 1:
        parser.error("--size must be at least 1M and --runtime at least 1 s")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("fio") is None:
        print("bench: fio is not installed (it needs fio with its nbd engine)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, on_sigterm)
    machine = machine_info()
    config = {"size": args.size, "resync_size": args.resync_size, "runtime": args.runtime}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.dir)))
        cluster = Cluster(workdir, args.profile_engine)
        stack.callback(cluster.close)
        for name in NODES:
            cluster.start_node(name)
        cluster.start_engine()
        fills = {}
        for volume in VOLUMES:
            storage = ["--storage", volume.storage] if volume.storage else []
            cluster.volume("create", volume.name, "--size", str(args.size), *storage)
            print(f"bench: filling {volume.label} ...", file=sys.stderr, flush=True)
            fills[volume.name] = fio_fill(cluster.uri(volume.name), args.size, volume.name, workdir)
        os.sync()  # no writeback of the fills during the runs
        results = run_workloads(cluster, args.runtime, workdir)
        resync = measure_resync(cluster, args.resync_size, workdir)
        scrub = measure_scrub(cluster)
    machine["loadavg_end"] = os.getloadavg()
    print(report(machine, config, results, resync, args.markdown, scrub=scrub))
    if args.profile_engine:
        print(f"bench: the engine's profile is in {args.profile_engine}", file=sys.stderr)
    if args.json:
        document = {
            "machine": machine,
            "config": config,
            "fills": fills,
            "servers": {s.log.name: s.describe() for s in cluster.servers},
            "results": results,
            "resync": resync,
            "scrub": scrub,
            "goals": goals(results, resync),
        }
        write_json(args.json, document)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # servers and the work directory are already cleaned up
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
