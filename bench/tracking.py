#!/usr/bin/env python3
"""What persistent change tracking costs: a region map of a 16 TiB volume at 64 KiB (32 MiB
per plane), on the data directory's filesystem.

Prints: create and open times; a mark whose bit is already durable (the common case: a
write into a region written since the last checkpoint); a mark that sets a new bit (one
fdatasync), alone and with writer threads sharing syncs (group commit); a checkpoint and a
scan of a plane; the process's peak memory.

How to rerun (from the repository root)::

    .venv/bin/python bench/tracking.py [--dir /path/on/the/data/disk]
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path

from backend.replication.tracking import IN_DOUBT, RegionMap, missed

TIB = 1024**4
SIZE = 16 * TIB
G = 64 * 1024


def timed(action: object) -> float:
    start = time.perf_counter()
    action()  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to put the map file")
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "map"
        rng = random.Random(1)
        start = time.perf_counter()
        regions = RegionMap.create(path, SIZE)
        print(f"create 16 TiB @ 64 KiB: {time.perf_counter() - start:.3f} s")
        regions.add_plane(missed("b"))

        regions.mark([IN_DOUBT], 0, 4096)
        n = 100_000
        took = timed(lambda: [regions.mark([IN_DOUBT], 0, 4096) for _ in range(n)])
        print(f"mark, bit already durable: {took / n * 1e6:.2f} µs")

        samples = []
        for _ in range(200):
            offset = rng.randrange(0, SIZE // G) * G
            samples.append(timed(lambda o=offset: regions.mark([IN_DOUBT], o, 4096)))
        print(
            f"mark, new bit, one writer: p50 {statistics.median(samples) * 1e3:.2f} ms, "
            f"p99 {sorted(samples)[197] * 1e3:.2f} ms"
        )

        before = regions.stats
        per_thread = 200

        def writer() -> None:
            local = random.Random(threading.get_ident())
            for _ in range(per_thread):
                offset = local.randrange(0, SIZE // G) * G
                regions.mark([IN_DOUBT, missed("b")], offset, 4096)

        threads = [threading.Thread(target=writer) for _ in range(args.threads)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        took = time.perf_counter() - start
        after = regions.stats
        marks = after.marks_new - before.marks_new
        syncs = after.syncs - before.syncs
        print(
            f"mark, new bits, {args.threads} writers, 2 planes: {marks / took:.0f} marks/s, "
            f"{marks} marks / {syncs} syncs = {marks / syncs:.1f} marks per sync"
        )

        set_bytes = regions.marked_bytes(IN_DOUBT)
        took = timed(lambda: sum(1 for _ in regions.regions(IN_DOUBT)))
        print(f"regions() of a plane with {set_bytes // G} set regions: {took * 1e3:.1f} ms")
        start = time.perf_counter()
        with regions.checkpoint([IN_DOUBT]):
            pass
        print(f"checkpoint clearing them: {(time.perf_counter() - start) * 1e3:.1f} ms")
        took = timed(lambda: regions.add_plane(missed("c"), copy_from=missed("b")))
        print(f"add_plane copying a plane: {took * 1e3:.1f} ms")
        regions.close()
        start = time.perf_counter()
        RegionMap.open(path).close()
        print(f"open with 3 planes: {time.perf_counter() - start:.3f} s")
        size = path.stat()
        print(f"file: {size.st_size >> 20} MiB long, {size.st_blocks * 512 >> 20} MiB allocated")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    print(f"peak RSS: {peak} MiB")


if __name__ == "__main__":
    main()
