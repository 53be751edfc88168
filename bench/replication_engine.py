#!/usr/bin/env python3
"""What the replication engine itself costs, in-process: ReplicatedStorage over 1 and 3
MemoryStorage members against a bare MemoryStorage (no network, no replica servers: the
engine's own overhead — range lock, change tracking, fan-out through a thread pool).

Prints per configuration: 4 KiB write at queue depth 1 (p50 and p99 latency), 4 KiB
writes at queue depth 16 (16 threads; IOPS), CPU µs per I/O (process time over I/Os, all
threads), 4 KiB reads at QD1; then a resync of one member that missed 64 MiB of writes.
Writes go to regions already in doubt (the steady state between flushes: the region map
needs no I/O); the first write to a region costs one fdatasync of the map, measured by
bench/tracking.py.

With ``--nbd`` every member (and the bare baseline) is an NbdStorage to this project's
server in the same process (MemoryStorage behind it, loopback TCP): the engine's submit path
(docs/decisions/0106) instead of its pool; the servers share the interpreter with the engine,
so the figures are the whole stack's, for comparison before/after a change only.

How to rerun (from the repository root)::

    .venv/bin/python bench/replication_engine.py [--seconds 2] [--nbd]
"""

from __future__ import annotations

import argparse
import errno
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from backend.replication.engine import ReplicatedStorage
from backend.replication.membership import InMemoryMembershipStore, Membership
from backend.replication.tracking import RegionMap
from backend.server.exports import Export, ExportTable
from backend.server.server import Server, TCPAddress
from backend.storage import MemoryStorage, Storage, StorageError
from backend.storage.layers.forwarding import ForwardingStorage
from backend.storage.nbd import NbdStorage, NbdTarget

MIB = 1024 * 1024
SIZE = 256 * MIB
BLOCK = 4096
G = 64 * 1024


def qd1(storage: Storage, op: Callable[[Storage, int], object], seconds: float) -> list[float]:
    rng = random.Random(1)
    samples = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        offset = rng.randrange(SIZE // BLOCK) * BLOCK
        start = time.perf_counter()
        op(storage, offset)
        samples.append(time.perf_counter() - start)
    return samples


def qd16(storage: Storage, seconds: float) -> tuple[float, float]:
    """IOPS and CPU µs per I/O of 16 threads writing 4 KiB at random."""
    counts = [0] * 16
    stop = threading.Event()
    data = b"q" * BLOCK

    def worker(i: int) -> None:
        rng = random.Random(i)
        while not stop.is_set():
            storage.write(rng.randrange(SIZE // BLOCK) * BLOCK, data)
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    cpu, wall = time.process_time(), time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    ios = sum(counts)
    return ios / wall, cpu / ios * 1e6


class Served:
    """MemoryStorages served by in-process servers on loopback; ``open`` connects to one."""

    def __init__(self) -> None:
        self.servers: list[Server] = []

    def open(self) -> NbdStorage:
        server = Server(
            ExportTable([Export("disk", MemoryStorage(SIZE))]), tcp=[TCPAddress("127.0.0.1", 0)]
        )
        server.bind()
        server.start()
        self.servers.append(server)
        port = int(server.uris[0].rsplit(":", 1)[1])
        return NbdStorage(NbdTarget.from_uri(f"nbd://127.0.0.1:{port}/disk"))

    def stop(self) -> None:
        for server in self.servers:
            server.shutdown(grace=5)


def engine(
    directory: Path, n: int, served: Served | None = None
) -> tuple[ReplicatedStorage, RegionMap]:
    store = InMemoryMembershipStore()
    names = [f"r{i}" for i in range(n)]
    store.commit(Membership.new("bench", names), None)
    regions = RegionMap.create(directory / f"map{n}", SIZE, G)
    disks: dict[str, Storage] = {m: served.open() if served else MemoryStorage(SIZE) for m in names}
    replicated = ReplicatedStorage("bench", SIZE, store, regions, lambda m, _e: disks[m])
    for offset in range(0, SIZE, G):  # steady state: every region already in doubt
        replicated.write(offset, b"w")
    return replicated, regions


def report(name: str, storage: Storage, seconds: float) -> None:
    data = b"w" * BLOCK
    writes = qd1(storage, lambda s, o: s.write(o, data), seconds)
    reads = qd1(storage, lambda s, o: s.read(o, BLOCK), seconds)
    iops, cpu = qd16(storage, seconds)
    p50, p99 = statistics.median(writes), statistics.quantiles(writes, n=100)[98]
    print(
        f"{name:<22} write QD1 p50 {p50 * 1e6:7.1f} µs  p99 {p99 * 1e6:7.1f} µs  "
        f"read QD1 p50 {statistics.median(reads) * 1e6:6.1f} µs  "
        f"write QD16 {iops:8.0f} IOPS  {cpu:6.1f} CPU µs/IO"
    )


class Switchable(ForwardingStorage):
    """A member that can be cut off (writes fail) and come back with its data."""

    broken = False

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        if self.broken:
            raise StorageError(errno.EIO, "cut off")
        super().write(offset, data, fua)


def resync_rate(directory: Path) -> None:
    store = InMemoryMembershipStore()
    store.commit(Membership.new("bench", ["r0", "r1", "r2"]), None)
    regions = RegionMap.create(directory / "resync", SIZE, G)
    disks = {m: Switchable(MemoryStorage(SIZE)) for m in ("r0", "r1", "r2")}
    replicated = ReplicatedStorage(
        "bench", SIZE, store, regions, lambda m, _e: ForwardingStorage(disks[m], owns_inner=False)
    )
    disks["r2"].broken = True
    rng = random.Random(2)
    piece = b"r" * MIB
    for _ in range(64):
        replicated.write(rng.randrange(SIZE // MIB) * MIB, piece)
    replicated.flush()
    assert replicated.membership.state("r2") == "out"
    disks["r2"].broken = False
    result = replicated.resync("r2")
    assert disks["r0"].read(0, SIZE) == disks["r2"].read(0, SIZE)
    print(
        f"resync: {result.bytes_done / MIB:.0f} MiB of missed regions, "
        f"{result.bytes_copied / MIB:.0f} MiB copied in {result.elapsed:.2f} s = "
        f"{result.bytes_done / result.elapsed / 1e6:.0f} MB/s"
    )
    replicated.close()
    regions.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--nbd", action="store_true", help="members over NBD (in-process)")
    args = parser.parse_args()
    served = Served() if args.nbd else None
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        bare = served.open() if served else MemoryStorage(SIZE)
        report("NbdStorage" if served else "MemoryStorage", bare, args.seconds)
        bare.close()
        for n in (1, 3):
            replicated, regions = engine(directory, n, served)
            report(f"replicated, {n} member(s)", replicated, args.seconds)
            replicated.close()
            regions.close()
        if served:
            served.stop()
        else:
            resync_rate(directory)


if __name__ == "__main__":
    main()
