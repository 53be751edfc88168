"""A throwaway single-node Ceph cluster (one mon, one mgr, one bluestore OSD) in a directory.

Built from the Debian ceph-mon/ceph-mgr/ceph-osd binaries the way FIELD-NOTES describes (no
vstart.sh): a monmap, ``ceph-mon --mkfs``, mon and mgr started, then ``ceph osd new``,
``ceph-osd --mkfs`` on a sparse file and the OSD started.  Every daemon runs in the foreground
as a child of this process and is stopped by its PID, never by name: other Ceph processes may
run on the machine.

* auth none, messenger v2 only in crc mode, everything on 127.0.0.1 on ports this rig picked
  (the mon's own port, and a private ``ms bind port`` range for the mgr and OSD).
* The OSD is bluestore on a sparse 4 GiB file (``osd/ceph-0.block``): it survives ``kill -9``
  (memstore would lose its data), so tests can crash and restart it on the same store.
* Pools ``nbs`` (RADOS objects) and ``rbd`` (``rbd pool init``) of size 1, 8 PGs each,
  ``osd crush chooseleaf type = 0`` so that one OSD satisfies the CRUSH rule.
* ``osd client watch timeout`` is 10 s (Ceph's default is 30 s): a killed RBD client's watch,
  and so its exclusive lock, expires that much sooner.

Measured here (2 cores, shared machine): ``start()`` 15-20 s from nothing to both pools
active; ``start_osd()`` after a ``kill -9`` ~5-8 s until the PGs are active again.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

BINARIES = ("ceph", "ceph-mon", "ceph-mgr", "ceph-osd", "monmaptool", "rados", "rbd")
POOLS = ("nbs", "rbd")
OSD_BLOCK_SIZE = 4 << 30  # sparse: costs only what is written
# Ports the rig binds: the mon's, then a range the mgr and OSD pick theirs from.
PORT_SPAN = 24


class CephError(RuntimeError):
    """A cluster command failed or the cluster did not get ready in time."""


def _free_port_range(span: int) -> int:
    """The first of ``span`` consecutive ports on 127.0.0.1 that are free right now."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - span)
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + span):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return base
    raise CephError(f"no {span} consecutive free ports found")


class CephCluster:
    """A single-node cluster under ``root``; ``start()`` builds and starts it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.conf_path = self.root / "ceph.conf"
        self.fsid = str(uuid.uuid4())
        self.osd_uuid = str(uuid.uuid4())
        self.osd_id = 0
        base = _free_port_range(PORT_SPAN)
        self.mon_port = base
        self.bind_ports = (base + 1, base + PORT_SPAN - 1)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.start_seconds = 0.0

    # -- Lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 180) -> None:
        """Build the cluster and start mon, mgr and OSD; return once the pools are active."""
        started = time.monotonic()
        for sub in ("mon/ceph-a", "mgr/ceph-x", f"osd/ceph-{self.osd_id}", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._write_conf()
        self._run(
            "monmaptool", "--create", "--fsid", self.fsid,
            "--addv", "a", f"[v2:127.0.0.1:{self.mon_port}]", str(self.root / "monmap"),
        )  # fmt: skip
        self._run("ceph-mon", "-c", str(self.conf_path), "--mkfs", "-i", "a",
                  "--monmap", str(self.root / "monmap"))  # fmt: skip
        self._spawn("mon.a", "ceph-mon", "-i", "a")
        self.ceph("status", timeout=60)
        self._spawn("mgr.x", "ceph-mgr", "-i", "x")

        osd_id = self.ceph("osd", "new", self.osd_uuid).strip()
        if osd_id != str(self.osd_id):
            raise CephError(f"ceph osd new gave id {osd_id!r}, expected {self.osd_id}")
        block = self.root / f"osd/ceph-{self.osd_id}.block"
        with block.open("wb") as f:
            f.truncate(OSD_BLOCK_SIZE)
        self._run("ceph-osd", "-c", str(self.conf_path), "-i", str(self.osd_id), "--mkfs",
                  "--osd-uuid", self.osd_uuid)  # fmt: skip
        self.start_osd(timeout=timeout, previous_epoch=-1, create_pools=True)
        self.start_seconds = time.monotonic() - started

    def kill_osd(self) -> None:
        """SIGKILL the OSD (a crash: nothing is flushed or handed over)."""
        process = self.processes.pop("osd", None)
        if process is None:
            raise CephError("the OSD is not running")
        process.kill()
        process.wait()

    def start_osd(
        self, timeout: float = 120, *, previous_epoch: int | None = None, create_pools: bool = False
    ) -> None:
        """Start the OSD on its existing store; return once it is up and in and every PG of
        the pools is active, as reported by the restarted OSD itself."""
        if "osd" in self.processes:
            raise CephError("the OSD is already running")
        if previous_epoch is None:
            previous_epoch = self._osd_up_from()
        self._spawn("osd", "ceph-osd", "-i", str(self.osd_id))
        deadline = time.monotonic() + timeout
        up_from = self._wait(deadline, lambda: self._osd_up_from(after=previous_epoch), "OSD up")
        if create_pools:
            self._create_pools()
        self._wait(deadline, lambda: self._pgs_active(since=up_from), "PGs active")

    def stop(self) -> None:
        """Stop every daemon this rig started, by PID (OSD, mgr, then mon)."""
        for name in ("osd", "mgr.x", "mon.a"):
            process = self.processes.pop(name, None)
            if process is None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    # -- Commands ---------------------------------------------------------------------------

    def ceph(self, *args: str, timeout: float = 60) -> str:
        """Run ``ceph ARGS`` against this cluster; its stdout."""
        return self._run("ceph", "-c", str(self.conf_path), "--connect-timeout", "30", *args,
                         timeout=timeout)  # fmt: skip

    def ceph_json(self, *args: str, timeout: float = 60) -> Any:
        return json.loads(self.ceph(*args, "-f", "json", timeout=timeout))

    def rbd(self, *args: str, timeout: float = 60) -> str:
        return self._run("rbd", "-c", str(self.conf_path), *args, timeout=timeout)

    def pid(self, name: str) -> int | None:
        """PID of ``osd``, ``mgr.x`` or ``mon.a`` if this rig runs it."""
        process = self.processes.get(name)
        return None if process is None else process.pid

    def log(self, name: str) -> str:
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    # -- Internals --------------------------------------------------------------------------

    def _write_conf(self) -> None:
        root = self.root
        low, high = self.bind_ports
        self.conf_path.write_text(
            f"""[global]
fsid = {self.fsid}
mon host = [v2:127.0.0.1:{self.mon_port}]
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind msgr2 = true
ms bind port min = {low}
ms bind port max = {high}
ms cluster mode = crc
ms service mode = crc
ms client mode = crc
ms mon cluster mode = crc
ms mon service mode = crc
ms mon client mode = crc
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = false
run dir = {root}/run
admin socket = {root}/run/$name.asok
log file = {root}/log/$name.log
pid file = {root}/run/$name.pid
keyring = /dev/null
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
mgr stats period = 1
osd client watch timeout = 10

[mon]
mon data = {root}/mon/ceph-$id

[mgr]
mgr data = {root}/mgr/ceph-$id

[osd]
osd data = {root}/osd/ceph-$id
osd objectstore = bluestore
bluestore block path = {root}/osd/ceph-$id.block
bluestore block create = false
bluestore fsck on mount = false
osd memory target = 1073741824
osd mon report interval = 1
osd op complaint time = 120
"""
        )

    def _spawn(self, name: str, binary: str, *args: str) -> None:
        log = (self.root / "log" / f"{name}.stderr").open("ab")
        try:
            self.processes[name] = subprocess.Popen(
                [binary, "-c", str(self.conf_path), "-f", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()

    def _run(self, *argv: str, timeout: float = 120) -> str:
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                    check=False, stdin=subprocess.DEVNULL)  # fmt: skip
        except subprocess.TimeoutExpired as err:
            raise CephError(f"{' '.join(argv)} timed out after {timeout} s") from err
        if result.returncode != 0:
            raise CephError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr}")
        return result.stdout

    def _wait(self, deadline: float, probe: Any, what: str) -> Any:
        while True:
            self._check_alive()
            value = probe()
            if value is not None and value is not False:
                return value
            if time.monotonic() > deadline:
                raise CephError(f"timed out waiting for {what}; osd log: {self.log('osd.0')}")
            time.sleep(0.5)

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise CephError(f"{name} exited {process.returncode}: {self.log(name)}")

    def _osd_up_from(self, after: int | None = None) -> int | None:
        """The epoch the OSD is up and in since, or None (also when not newer than ``after``)."""
        dump = self.ceph_json("osd", "dump")
        for osd in dump["osds"]:
            if osd["osd"] == self.osd_id and osd["up"] == 1 and osd["in"] == 1:
                up_from = int(osd["up_from"])
                if after is None or up_from > after:
                    return up_from
        return None if after is not None else -1

    def _pgs_active(self, since: int) -> bool:
        try:
            pgs = self.ceph_json("pg", "dump", "pgs", timeout=20)
        except CephError:  # no active mgr yet
            return False
        stats = pgs["pg_stats"] if isinstance(pgs, dict) else pgs
        if not stats:
            return False
        return all("active" in pg["state"] and int(pg["reported_epoch"]) >= since for pg in stats)

    def _create_pools(self) -> None:
        for pool in POOLS:
            self.ceph("osd", "pool", "create", pool, "8", "8")
        self.ceph("osd", "pool", "application", "enable", "nbs", "nbs")
        self.rbd("pool", "init", "rbd")


def missing_binaries() -> list[str]:
    """The Ceph tools this rig needs that are not installed."""
    return [name for name in BINARIES if shutil.which(name) is None]


@contextlib.contextmanager
def running_cluster(root: Path) -> Any:
    """A started cluster under ``root``, stopped (by PID) on exit."""
    cluster = CephCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


if __name__ == "__main__":  # a manual check: python -m tests.integration.cephrig
    import tempfile

    with running_cluster(Path(tempfile.mkdtemp(prefix="nbs-ceph-"))) as c:
        print(f"started in {c.start_seconds:.1f} s; conf {c.conf_path}; pids {c.processes}")
        t = time.monotonic()
        c.kill_osd()
        c.start_osd()
        print(f"osd restart {time.monotonic() - t:.1f} s")
