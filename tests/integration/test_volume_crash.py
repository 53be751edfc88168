"""kill -9 in the middle of volume operations never loses data or leaves debris.

A child process runs create / write+flush / snapshot / clone / delete-snapshot / delete in a
loop on one data directory; it is killed with SIGKILL at random moments.  After each kill a
fresh service (whose start-up runs gc) must find a consistent catalogue: every volume opens and
reads back what was flushed to it, every snapshot opens, and no layer file is unreferenced.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from backend.volumes.service import VolumeService

WORKER = r"""
import json, os, sys, random
from pathlib import Path
from backend.volumes.service import VolumeService
from backend.volumes.model import CreateRequest, VolumeError

data, journal = Path(sys.argv[1]), Path(sys.argv[2])
svc = VolumeService(data)
rng = random.Random(int(sys.argv[3]))
# Marks grow across rounds too: a round's first write may land, unjournalled, before the
# kill, and must compare as newer than what the rounds before journalled.
i = int(sys.argv[3]) * 1_000_000
while True:
    i += 1
    name = f"v{i % 4}"
    try:
        names = [v.name for v in svc.list()]
        if name not in names:
            svc.create(CreateRequest(name, "4MiB"))
            continue
        storage = svc.storage(name)
        mark = f"{name}-{i}".encode().ljust(32, b".")
        storage.write(0, mark)
        storage.flush()
        # Journal after the flush: what the journal says must survive any crash.
        with journal.open("a") as f:
            f.write(json.dumps({"volume": name, "mark": mark.decode()}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        action = rng.choice(["snapshot", "clone", "delete-snapshot", "delete", "resize"])
        snaps = [s for s in svc.snapshots(name)]
        if action == "snapshot":
            svc.snapshot(name, f"s{i}")
        elif action == "clone" and snaps:
            svc.clone(name, snaps[-1].name, f"c{i}")
        elif action == "delete-snapshot" and snaps:
            svc.delete_snapshot(name, snaps[0].name, flatten_clones=True)
        elif action == "delete" and rng.random() < 0.3:
            for c in [v.name for v in svc.list() if (v.origin or "").startswith(name + "@")]:
                svc.delete(c, force=True)
            svc.delete(name, force=True)
            with journal.open("a") as f:
                f.write(json.dumps({"volume": name, "deleted": True}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        elif action == "resize":
            svc.resize(name, "8MiB")
    except VolumeError as err:
        print("refused:", err, file=sys.stderr)
"""


def check_consistent(data: Path, journal: Path) -> int:
    svc = VolumeService(data)
    svc.gc()  # what a server start or the next change runs
    try:
        live = {v.name for v in svc.list()}
        referenced: set[str] = set()
        for row in svc.catalogue.volumes(state=None):
            assert row.state == "ready", row
            referenced |= set(svc.catalogue.chain(row.top))
        for snap in svc.catalogue.snapshots():
            referenced |= set(svc.catalogue.chain(snap.layer))
            view = svc.open_view(snap.volume, snap.name)
            view.read(0, 4096)
            view.close()
        on_disk = {p.name.split(".")[0] for p in svc.layers.iterdir()}
        assert on_disk == referenced, (on_disk - referenced, referenced - on_disk)
        last: dict[str, str | None] = {}
        for line in journal.read_text().splitlines() if journal.exists() else []:
            entry = json.loads(line)
            last[entry["volume"]] = None if entry.get("deleted") else entry["mark"]
        for volume, mark in last.items():
            if mark is None:
                continue
            if volume in live:
                got = svc.storage(volume).read(0, 32).decode(errors="replace")
                # The newest journalled mark, or a newer unjournalled one of the same volume.
                assert got.startswith(volume + "-"), (volume, got)
                assert int(got.split("-")[1].rstrip(".")) >= int(mark.split("-")[1].rstrip("."))
        return len(live)
    finally:
        svc.close()


def test_sigkill_during_volume_operations_recovers_cleanly(tmp_path: Path) -> None:
    data, journal = tmp_path / "data", tmp_path / "journal"
    rng = random.Random(7)
    root = Path(__file__).resolve().parents[2]
    for round_ in range(12):
        child = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(data), str(journal), str(round_)],
            cwd=root,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        time.sleep(rng.uniform(0.3, 1.5))
        assert child.poll() is None, "the worker died by itself"
        child.send_signal(signal.SIGKILL)
        child.wait()
        check_consistent(data, journal)
    assert journal.read_text().count("\n") > 20, "the worker did too little to prove anything"
