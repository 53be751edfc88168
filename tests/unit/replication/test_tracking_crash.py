"""RegionMap after crashes: kill -9 of the process, loss of everything not synced (a power
cut), and torn header writes.

A kill -9 loses nothing the process handed to the kernel, so the power-cut test is the one
that checks the order of write and sync: its syncer photographs the file at every sync, and
the map is reopened from the last photograph.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from backend.replication.bitmap import PAGE
from backend.replication.mapfile import RegionMapError
from backend.replication.tracking import IN_DOUBT, RegionMap, missed

KIB = 1024
MIB = 1024 * KIB
G = 64 * KIB
SIZE = 64 * 1024 * MIB  # 64 GiB: 1 Mi regions, 128 KiB per plane

CHILD = """
import random, sys, threading
from backend.replication.tracking import IN_DOUBT, RegionMap, missed

regions = RegionMap.open(sys.argv[1])
say = threading.Lock()

def writer(seed):
    rng = random.Random(seed)
    while True:
        offset = rng.randrange(0, {size} - 1)
        length = rng.randrange(1, min(4 << 20, {size} - offset) + 1)
        regions.mark([IN_DOUBT, missed("b")], offset, length)
        with say:
            print(offset, length, flush=True)

threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
for thread in threads:
    thread.start()
"""


def covered(regions: RegionMap, plane: str, offset: int, length: int) -> bool:
    """Every region meeting the range is set."""
    first = offset // G * G
    end = min(-(-(offset + length) // G) * G, regions.size)
    return list(regions.regions(plane, first, end - first)) == [(first, end - first)]


def test_marks_survive_kill_9_right_after_they_returned(tmp_path: Path) -> None:
    path = tmp_path / "map"
    with RegionMap.create(path, SIZE) as regions:
        regions.add_plane(missed("b"))
    returned = []
    with subprocess.Popen(
        [sys.executable, "-c", CHILD.format(size=SIZE), str(path)],
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None
        try:
            for line in child.stdout:
                returned.append(tuple(map(int, line.split())))
                if len(returned) == 300:
                    child.send_signal(signal.SIGKILL)
                    break
        finally:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert len(returned) == 300
    with RegionMap.open(path) as regions:  # the lock died with the child
        for plane in (IN_DOUBT, missed("b")):
            lost = [r for r in returned if not covered(regions, plane, *r)]
            assert lost == [], plane


class Photographer:
    """A syncer that syncs, then keeps what the file holds: after a power cut only what was
    there at the last sync is left."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.image = b""

    def __call__(self, fd: int) -> None:
        os.fdatasync(fd)
        with self.lock:
            size = os.fstat(fd).st_size
            self.image = os.pread(fd, size, 0)

    def power_cut(self, path: Path) -> Path:
        with self.lock:
            path.write_bytes(self.image)
        return path


def test_marks_survive_a_power_cut_right_after_they_returned(tmp_path: Path) -> None:
    camera = Photographer()
    regions = RegionMap.create(tmp_path / "map", SIZE, syncer=camera)
    returned: list[tuple[str, int, int]] = []
    rng = random.Random(7)
    say = threading.Lock()
    checkpoints_over = threading.Event()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        for n in range(150):
            if n == 100:  # the last 50 after the checkpoints are over
                checkpoints_over.wait()
            offset = rng.randrange(0, SIZE - 1)
            length = rng.randrange(1, min(1 << 20, SIZE - offset) + 1)
            planes = [p for p in regions.planes if p == IN_DOUBT or rng.random() < 0.5]
            # A checkpoint may clear an in-doubt mark made before it ended (that is what it
            # is for); the missed plane is never cleared here.
            keep = [p for p in planes if p != IN_DOUBT or checkpoints_over.is_set()]
            regions.mark(planes, offset, length)
            with say:
                returned.extend((p, offset, length) for p in keep)

    threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(6)]
    for thread in threads:
        thread.start()
    regions.add_plane(missed("b"), copy_from=IN_DOUBT)  # while the writers run
    for _ in range(20):  # and checkpoints, whose clears are never synced on their own
        offset = rng.randrange(0, SIZE - G)
        with regions.checkpoint([IN_DOUBT], offset, rng.randrange(G, SIZE - offset)):
            pass
    checkpoints_over.set()
    for thread in threads:
        thread.join(120)
    with say:
        marked = list(returned)
    cut = camera.power_cut(tmp_path / "after-the-cut")
    with RegionMap.open(cut) as survivor:
        assert survivor.planes == (IN_DOUBT, missed("b"))
        assert any(m[0] == IN_DOUBT for m in marked)
        assert any(m[0] == missed("b") for m in marked)
        assert [m for m in marked if not covered(survivor, *m)] == []
    regions.close()


def test_a_torn_header_falls_back_to_the_one_before(tmp_path: Path) -> None:
    path = tmp_path / "map"
    with RegionMap.create(path, SIZE) as regions:
        regions.mark([IN_DOUBT], 5 * G, 1)
        regions.add_plane(missed("b"))  # header sequence 2, in slot 0
    with path.open("r+b") as f:  # half of the new header reached the disk
        f.seek(PAGE // 2)
        f.write(bytes(PAGE // 2))
    with RegionMap.open(path) as regions:
        assert regions.planes == (IN_DOUBT,)  # the add did not return before the crash
        assert list(regions.regions(IN_DOUBT)) == [(5 * G, G)]
        regions.add_plane(missed("c"))  # the next header overwrites the torn one
    with RegionMap.open(path) as regions:
        assert regions.planes == (IN_DOUBT, missed("c"))


def test_both_headers_damaged_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "map"
    with RegionMap.create(path, SIZE) as regions:
        regions.add_plane(missed("b"))
    with path.open("r+b") as f:
        f.seek(100)
        f.write(b"x")
        f.seek(PAGE + 100)
        f.write(b"x")
    with pytest.raises(RegionMapError, match="both of its headers are damaged"):
        RegionMap.open(path)
