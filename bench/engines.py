#!/usr/bin/env python3
"""Benchmark volumes on each storage engine through ``nbs serve``, against the engines' own
clients in the same run.

What it measures (fio, one job, ``time_based``, same workloads as bench/run.py):

* local: a volume on ``file`` (copy-on-write files) and on ``dir`` (chunks in a directory),
  both through ``nbs serve`` (fio's nbd engine);
* Ceph (a single-node cluster started here: one bluestore OSD on a sparse file): a volume as
  an RBD image and a volume of chunks on RADOS, both through ``nbs serve``, against fio's own
  ``rbd`` engine on an image of the same pool, which is librbd, the library QEMU's rbd
  driver uses.  The ratio ``nbs rbd / native rbd`` is the issue's goal (within 1.3x).

Every target gets a volume of ``--size`` (default 256 MiB) filled with data first (a
sequential 1M write pass), so reads read data.  The order of targets alternates per workload.

How to rerun (from the repository root, on an otherwise idle machine)::

    .venv/bin/python bench/engines.py --runtime 10 --markdown --json bench/engines.json

Needs fio with its nbd and rbd engines, the Ceph daemons (scripts/setup installs them) and
``nbs`` installed next to this interpreter.  Every process it starts is stopped by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import WORKLOADS, Workload  # noqa: E402
from tests.integration.cephrig import CephCluster  # noqa: E402

MiB = 1 << 20


@dataclass
class Target:
    name: str
    fio: list[str]  # engine options
    pid: int | None = None  # the nbs server, for CPU use


NBS = [sys.executable, "-m", "backend.cli"]


def nbs(*args: str) -> None:
    subprocess.run([*NBS, *args], check=True, cwd=ROOT)


@contextlib.contextmanager
def served(data: Path, log: Path) -> Iterator[tuple[int, int]]:
    """``nbs serve`` on ``data``; yields (port, pid); stopped by PID."""
    with log.open("w") as err:
        process = subprocess.Popen(
            [*NBS, "serve", "--data-dir", str(data), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=ROOT,
        )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        found = re.search(r"listening on nbd://[^:]+:(\d+)", line)
        if found is None:
            raise RuntimeError(f"nbs serve did not start: {log.read_text()}")
        yield int(found.group(1)), process.pid
    finally:
        process.terminate()
        process.wait(30)


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fio(target: Target, rw: str, bs: str, *, depth: int, runtime: int | None, size: int) -> Any:
    output = Path(tempfile.mktemp(prefix="fio-", suffix=".json"))
    cmd = [
        "fio",
        f"--name={target.name}",
        *target.fio,
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={depth}",
        f"--size={size}",
        "--numjobs=1",
        "--lat_percentiles=1",
        "--output-format=json",
        f"--output={output}",
    ]
    if runtime is not None:
        cmd += ["--time_based", f"--runtime={runtime}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"fio against {target.name} failed: {done.stderr[-2000:]}")
    job = json.loads(output.read_text())["jobs"][0]
    output.unlink()
    if job["error"]:
        raise RuntimeError(f"fio job error {job['error']} against {target.name}")
    return job


def measure(target: Target, workload: Workload, runtime: int, size: int) -> dict[str, Any]:
    before = cpu_seconds(target.pid)
    job = fio(target, workload.rw, workload.bs, depth=workload.iodepth, runtime=runtime, size=size)
    side = job[workload.direction]
    cpu = cpu_seconds(target.pid) - before
    ios = side["total_ios"]
    client_cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1000
    return {
        "workload": workload.key,
        "target": target.name,
        "iops": side["iops"],
        "mb_s": side["bw_bytes"] / 1e6,
        "p50_lat_us": side["lat_ns"]["percentile"]["50.000000"] / 1000,
        "server_cpu_us_per_io": 1e6 * cpu / ios if ios else None,
        # fio's own CPU: the nbd client, or (native-rbd) librbd itself.
        "client_cpu_us_per_io": 1e6 * client_cpu / ios if ios else None,
    }


def cpu_table(results: list[dict[str, Any]], names: list[str], markdown: bool) -> str:
    """CPU per I/O (µs): nbs server + fio, or fio alone (native librbd in fio)."""
    by = {(r["workload"], r["target"]): r for r in results}
    header = ["workload", *[f"{n} CPU µs/IO" for n in names]]
    rows = []
    for workload in WORKLOADS:
        row = [workload.label]
        for name in names:
            r = by.get((workload.key, name))
            total = (r["server_cpu_us_per_io"] or 0) + (r["client_cpu_us_per_io"] or 0) if r else 0
            row.append(f"{total:.0f}" if r else "-")
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    return "\n".join("  ".join(f"{c:>16}" for c in row) for row in [header, *rows])


def table(results: list[dict[str, Any]], names: list[str], markdown: bool) -> str:
    by = {(r["workload"], r["target"]): r for r in results}
    ratios = [("nbs-rbd", "native-rbd"), ("nbs-rados", "native-rbd"), ("nbs-dir", "nbs-file")]
    ratios = [(a, b) for a, b in ratios if a in names and b in names]
    header = ["workload", *[f"{n} IOPS" for n in names], *[f"{a}/{b}" for a, b in ratios]]
    rows = []
    for workload in WORKLOADS:
        row = [workload.label]
        for name in names:
            result = by.get((workload.key, name))
            row.append(f"{result['iops']:.0f}" if result else "-")
        for a, b in ratios:
            ra, rb = by.get((workload.key, a)), by.get((workload.key, b))
            row.append(f"{ra['iops'] / rb['iops']:.2f}" if ra and rb and rb["iops"] else "-")
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    return "\n".join("  ".join(f"{c:>14}" for c in row) for row in [header, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", type=int, default=10)
    parser.add_argument("--size", type=int, default=256, help="MiB per volume")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--no-ceph", action="store_true", help="only file and dir")
    args = parser.parse_args(argv)
    size = args.size * MiB
    work = Path(tempfile.mkdtemp(prefix="nbs-bench-engines-"))
    ceph: CephCluster | None = None
    results: list[dict[str, Any]] = []
    try:
        data = work / "data"
        d = ["--data-dir", str(data)]
        nbs("volume", "create", "file", "--size", f"{args.size}MiB", *d)
        nbs("volume", "create", "dir", "--size", f"{args.size}MiB", "--storage", "dir", *d)
        env_conf = None
        if not args.no_ceph:
            ceph = CephCluster(work / "ceph")
            ceph.start()
            print(f"ceph started in {ceph.start_seconds:.1f} s", file=sys.stderr)
            conf = str(ceph.conf_path)
            env_conf = conf
            ceph.rbd("create", "--size", f"{args.size}M", "rbd/native")
            rbd_spec = f"rbd:pool=rbd,conf={conf}"
            nbs("volume", "create", "rbd", "--size", f"{args.size}MiB", "--storage", rbd_spec, *d)
            rados_spec = f"rados:pool=nbs,namespace=bench,conf={conf}"
            nbs(
                "volume",
                "create",
                "rados",
                "--size",
                f"{args.size}MiB",
                "--storage",
                rados_spec,
                *d,
            )
        with served(data, work / "nbs.log") as (port, pid):
            targets = [
                Target("nbs-file", ["--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/file"], pid),
                Target("nbs-dir", ["--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/dir"], pid),
            ]
            if env_conf is not None:
                os.environ["CEPH_CONF"] = env_conf
                targets += [
                    Target("nbs-rbd", ["--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/rbd"], pid),
                    Target(
                        "nbs-rados", ["--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/rados"], pid
                    ),
                    Target(
                        "native-rbd",
                        ["--ioengine=rbd", "--clientname=admin", "--pool=rbd", "--rbdname=native"],
                    ),
                ]
            for target in targets:  # fill: reads then read data
                started = time.monotonic()
                fio(target, "write", "1M", depth=4, runtime=None, size=size)
                print(
                    f"filled {target.name} in {time.monotonic() - started:.1f} s", file=sys.stderr
                )
            for i, workload in enumerate(WORKLOADS):
                order = targets if i % 2 == 0 else targets[::-1]
                for target in order:
                    result = measure(target, workload, args.runtime, size)
                    print(json.dumps(result), file=sys.stderr)
                    results.append(result)
        names = [t.name for t in targets]
        print(table(results, names, args.markdown))
        print()
        print(cpu_table(results, names, args.markdown))
        if args.json:
            args.json.write_text(json.dumps({"results": results, "size": size}, indent=2))
    finally:
        if ceph is not None:
            ceph.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
