#!/usr/bin/env python3
"""Compare NBD clients for the ``nbd`` storage kind against one ``nbs serve`` on loopback.

Clients: NbdStorage over the project's own sans-IO core (``backend.storage.nbd``), and
libnbd's Python binding (``import nbd``, python3-libnbd) when importable.  Workloads, each
``--seconds`` long, alternating the clients: 4k random write QD1 (p50 latency), 4k random
write QD16 (IOPS; NbdStorage from 16 threads, libnbd with 16 AIO requests in flight from
one thread, its best case, and from 16 threads on one handle), 1M write and read QD1
(MB/s), and the client's CPU time per I/O (``time.process_time``: every thread of this
process; the server is another process).  Decision record: docs/decisions/0090-nbd-client.md.

Run from the repository root (the server is ``python -m backend.cli`` of this checkout)::

    PYTHONPATH=$PWD .venv/bin/python bench/nbd_client.py --seconds 3
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from backend.storage.nbd import NbdStorage, NbdTarget

KIB = 1024
MIB = 1024 * KIB
SIZE = 256 * MIB
LISTENING = re.compile(r"nbs: listening on (nbd://\S+)")

Op = Callable[[int, bytes], None]


def start_server(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    image = directory / "disk.img"
    # Written, not sparse: block allocation on the server would weigh on whichever client
    # writes first.
    with image.open("wb") as out:
        for _ in range(SIZE // (4 * MIB)):
            out.write(random.randbytes(4 * MIB))
    log = directory / "nbs.log"
    cmd = [sys.executable, "-m", "backend.cli", "serve", "--listen", "127.0.0.1:0"]
    cmd += ["--export", f"disk={image}"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = LISTENING.search(log.read_text(errors="replace"))
        if match:
            return proc, match.group(1).split("/")[2]
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"nbs serve did not start:\n{log.read_text(errors='replace')}")


def timed(seconds: float, threads: int, op: Op, block: int) -> dict[str, float]:
    """Run ``op`` from ``threads`` threads for ``seconds``; latency from thread 0."""
    data = random.randbytes(block)
    stop = time.monotonic() + seconds
    counts = [0] * threads
    latencies: list[float] = []

    def worker(index: int) -> None:
        rng = random.Random(index)
        blocks = SIZE // block
        while time.monotonic() < stop:
            offset = rng.randrange(blocks) * block
            start = time.perf_counter()
            op(offset, data)
            if index == 0:
                latencies.append(time.perf_counter() - start)
            counts[index] += 1

    cpu, wall = time.process_time(), time.perf_counter()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    total = sum(counts)
    return {
        "iops": total / wall,
        "mb_s": total * block / wall / 1e6,
        "p50_us": statistics.median(latencies) * 1e6,
        "cpu_us_per_io": cpu / total * 1e6,
    }


def libnbd_aio(handle: object, seconds: float, depth: int, block: int) -> dict[str, float]:
    """libnbd's own pipelining: ``depth`` AIO writes in flight from one thread."""
    h: object = handle
    data = random.randbytes(block)
    rng = random.Random(1)
    blocks = SIZE // block
    done = 0
    cpu, wall = time.process_time(), time.perf_counter()
    stop = time.monotonic() + seconds
    in_flight = 0
    while time.monotonic() < stop or in_flight:
        while in_flight < depth and time.monotonic() < stop:
            h.aio_pwrite(data, rng.randrange(blocks) * block)  # type: ignore[attr-defined]
            in_flight += 1
        h.poll(-1)  # type: ignore[attr-defined]
        finished = in_flight - h.aio_in_flight()  # type: ignore[attr-defined]
        while finished > 0:
            cookie = h.aio_peek_command_completed()  # type: ignore[attr-defined]
            h.aio_command_completed(cookie)  # type: ignore[attr-defined]
            finished -= 1
            in_flight -= 1
            done += 1
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"iops": done / wall, "cpu_us_per_io": cpu / done * 1e6}


def _discard(_data: object) -> None:
    """Reads are timed, their bytes dropped."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    seconds = args.seconds
    try:
        import nbd  # noqa: PLC0415 - optional: python3-libnbd
    except ImportError:
        nbd = None
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start_server(Path(tmp))
        try:
            uri = f"nbd://{address}/disk"
            ours = NbdStorage(NbdTarget.from_uri(uri))
            clients: dict[str, tuple[Op, Op]] = {
                "nbs-core": (
                    ours.write,
                    lambda off, data: _discard(ours.read(off, len(data))),
                )
            }
            handle = None
            if nbd is not None:
                handle = nbd.NBD()
                handle.connect_uri(uri)
                clients["libnbd"] = (
                    lambda off, data: handle.pwrite(data, off),
                    lambda off, data: _discard(handle.pread(len(data), off)),
                )
            rows: dict[str, dict[str, float]] = {name: {} for name in clients}
            workloads = [
                ("4k write QD1", 1, 0, 4 * KIB),
                ("4k write QD16 threads", 16, 0, 4 * KIB),
                ("1M write QD1", 1, 0, MIB),
                ("1M read QD1", 1, 1, MIB),
                ("4k read QD1", 1, 1, 4 * KIB),
            ]
            order = list(clients)
            for title, threads, which, block in workloads:
                for name in order:
                    result = timed(seconds, threads, clients[name][which], block)
                    rows[name][title] = result
                    print(
                        f"{title:24} {name:9} "
                        + "  ".join(f"{k} {v:,.1f}" for k, v in result.items())
                    )
                order.reverse()  # spread drift over both clients
            if handle is not None:
                result = libnbd_aio(handle, seconds, 16, 4 * KIB)
                print(
                    f"{'4k write QD16 aio':24} {'libnbd':9} "
                    + "  ".join(f"{k} {v:,.1f}" for k, v in result.items())
                )
                handle.shutdown()
            ours.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
