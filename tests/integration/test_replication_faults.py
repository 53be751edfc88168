"""Replicated volumes under faults (issue 12 "Tests"), real processes on loopback.

Three storage nodes (tests/integration/storage_nodes.py) and one engine ``nbs serve``
(tests/integration/replication_rig.py) whose member links each go through a FaultProxy
(tests/integration/faultproxy.py): the engine config's ``nbd:`` URI of a node is its proxy's
port, so a link can be blackholed, reset or slowed while the node's API stays reachable.
Clients: qemu-io, and a TCG guest with the volume hot-plugged over QMP (one VM for the
module).  Every scenario ends by comparing the replicas' bytes, read through each node.

Timeouts are short (``timeout=2`` is the engine's child_timeout, ``reconnect=1``), and every
wait is bounded.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from backend.replication.tracking import DEFAULT_GRANULARITY
from images.tiny import TinyImage
from tests.integration.conftest import require_module, require_tool
from tests.integration.faultproxy import FaultProxy, Target
from tests.integration.helpers import fio, guest_disk, nbs
from tests.integration.replication_rig import (
    Engine,
    MiB,
    QemuIoSession,
    create_replicated,
    qemu_io,
    replica_bytes,
)
from tests.integration.storage_nodes import StorageNode
from tests.integration.vm import TinyVM

GRANULARITY = DEFAULT_GRANULARITY
TIMEOUT = 2.0  # the engine's child_timeout for every volume here
FAST = f",timeout={TIMEOUT:g},reconnect=1"


@dataclasses.dataclass
class Rig:
    engine: Engine
    nodes: list[StorageNode]
    links: list[FaultProxy]  # links[i]: the engine's member link to nodes[i]
    workdir: Path


@pytest.fixture
def rig(
    tmp_path: Path,
    storage_nodes: Callable[[int], list[StorageNode]],
    fault_proxy: Callable[[Target], FaultProxy],
) -> Iterator[Rig]:
    require_module("nbd")
    nodes = storage_nodes(3)
    links = [fault_proxy(("127.0.0.1", node.nbd_port)) for node in nodes]
    engine = Engine(
        tmp_path, nodes, links={n.name: link.port for n, link in zip(nodes, links, strict=True)}
    )
    engine.start()
    yield Rig(engine, nodes, links, tmp_path)
    engine.stop()


@pytest.fixture(scope="module")
def guest(tiny_image: TinyImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyVM]:
    """The module's one TCG guest (2 shared cores: never two at once), stopped by PID."""
    qemu = require_tool("qemu-system-x86_64")
    vm = TinyVM(tiny_image, tmp_path_factory.mktemp("guest"), qemu=qemu, name="faults")
    vm.start()
    try:
        vm.wait_ready(120)
        yield vm
    finally:
        vm.stop()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def states(engine: Engine, volume: str) -> dict[str, str]:
    return {r["node"]: r["state"] for r in engine.info(volume)["replication"]["replicas"]}


def assert_identical(nodes: list[StorageNode], replica: str) -> bytes:
    """Every replica holds the same bytes; returns them."""
    first, *others = replica_bytes(nodes, replica)
    for node, data in zip(nodes[1:], others, strict=True):
        differ = next(
            (i for i in range(0, len(first), 4096) if data[i : i + 4096] != first[i : i + 4096]),
            None,
        )
        assert differ is None, f"{node.name} differs from {nodes[0].name} at {differ}"
    return first


def ok(done: subprocess.CompletedProcess[str]) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "error" not in output.lower(), output
    assert "failed" not in output.lower(), output
    return output


# ---------------------------------------------------------------------------------- 1


def test_kill_9_of_a_replica_under_guest_io_then_resync(rig: Rig, guest: TinyVM) -> None:
    """A guest writes files (each fsync'd) on ext2 over the replicated volume while one node
    is killed with -9: no write fails, dmesg has no I/O error; the node comes back, the
    supervisor resyncs it, every replica is byte-identical and the files check out."""
    engine, nodes = rig.engine, rig.nodes
    replica = create_replicated(engine, "gvol", nodes, FAST, size=64 * MiB)
    nbs("attach", engine.uri("gvol"), "--qmp", str(guest.qmp_path))
    disk = guest_disk(guest, "gvol")
    guest.check("dmesg -c > /dev/null")
    guest.check(f"mke2fs -q {disk} && mkdir -p /mnt/r && mount {disk} /mnt/r")
    files = 24
    writer = (
        "rm -f /tmp/sums /tmp/status; "
        f"for i in $(seq 1 {files}); do "
        "dd if=/dev/urandom of=/mnt/r/f$i bs=64k count=4 conv=fsync 2>/dev/null; "
        "echo $i $? >> /tmp/status; md5sum /mnt/r/f$i >> /tmp/sums; done; sync"
    )
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(guest.run(writer, timeout=240)))
    before = rig.links[1].counters().bytes_to_server
    thread.start()
    try:
        # Kill while the guest writes: once the link has carried its first MiB.
        wait_for(
            lambda: rig.links[1].counters().bytes_to_server > before + MiB or not thread.is_alive(),
            60,
            "guest writes",
        )
        assert thread.is_alive(), "the guest finished before the kill: nothing was tested"
        nodes[1].kill()
    finally:
        thread.join(260)
    assert not thread.is_alive()
    run = result[0]
    assert getattr(run, "rc", None) == 0, run
    statuses = guest.check("cat /tmp/status").split()
    assert statuses == [x for i in range(1, files + 1) for x in (str(i), "0")], statuses
    dmesg = guest.check("dmesg")
    assert not re.search(r"I/O error|EXT\d-fs error|blk_update_request|error -5", dmesg), dmesg
    assert engine.membership(replica).state(nodes[1].name) == "out"

    nodes[1].restart()
    engine.wait_in_sync(replica, {n.name for n in nodes})
    copied = engine.metric("nbs_replica_resync_bytes_total", member=nodes[1].name, volume="gvol")
    print(f"guest scenario: resync copied {copied} bytes")
    assert copied is not None
    assert 0 < copied < 64 * MiB  # what it missed, not the whole volume
    # Read the files back from the volume itself, not the page cache.
    guest.check("umount /mnt/r")
    assert_identical(nodes, replica)
    guest.check(f"mount {disk} /mnt/r && md5sum -c /tmp/sums && umount /mnt/r")
    assert nbs("detach", "gvol", "--qmp", str(guest.qmp_path)).returncode == 0


# ---------------------------------------------------------------------------------- 2


def test_resync_copies_only_what_was_written_while_away(rig: Rig) -> None:
    engine, nodes = rig.engine, rig.nodes
    replica = create_replicated(engine, "vol", nodes, FAST, size=64 * MiB)
    # Data everywhere first (not counted): the resync must not copy it again.
    ok(qemu_io(engine.uri("vol"), "write -P 0x11 0 32M", "flush"))
    nodes[2].kill()
    # While away: 20 scattered granules and one 1 MiB run, all aligned to the granularity.
    writes = [f"write -P 0x{0x40 + i:x} {i * 3 * MiB // 2} {GRANULARITY}" for i in range(20)]
    writes.append("write -P 0x7e 40M 1M")
    written = 20 * GRANULARITY + MiB
    regions_touched = 21
    ok(qemu_io(engine.uri("vol"), *writes, "flush"))
    assert engine.membership(replica).state(nodes[2].name) == "out"
    nodes[2].restart()
    engine.wait_in_sync(replica, {n.name for n in nodes})
    copied = engine.metric("nbs_replica_resync_bytes_total", member=nodes[2].name, volume="vol")
    assert copied is not None
    logged = re.findall(
        rf"resync of {nodes[2].name} started \((\d+) bytes to copy\)", engine.logs()
    )
    assert logged, engine.logs()
    print(f"written while away {written}, resync copied {copied:.0f}, region bytes {logged}")
    assert written <= copied <= 1.1 * written + GRANULARITY * regions_touched
    data = assert_identical(nodes, replica)
    assert data[40 * MiB : 41 * MiB] == b"\x7e" * MiB
    for i in range(20):
        at = i * 3 * MiB // 2
        assert data[at : at + GRANULARITY] == bytes([0x40 + i]) * GRANULARITY
        assert data[at + GRANULARITY : at + 2 * GRANULARITY] == (
            b"\x11" * GRANULARITY if at + GRANULARITY < 32 * MiB else bytes(GRANULARITY)
        )


# ---------------------------------------------------------------------------------- 3


def test_link_blackholed_reset_and_slowed_then_healed(rig: Rig) -> None:
    engine, nodes, links = rig.engine, rig.nodes, rig.links
    replica = create_replicated(engine, "vol", nodes, FAST)
    ok(qemu_io(engine.uri("vol"), "write -P 0x21 0 4M", "flush"))
    everyone = {n.name for n in nodes}

    # Blackhole: the write waits for child_timeout, then completes without the member.
    links[0].blackhole()
    started = time.monotonic()
    ok(qemu_io(engine.uri("vol"), "write -P 0x22 1M 64k", "flush"))
    took = time.monotonic() - started
    print(f"write over a blackholed link took {took:.2f} s (timeout {TIMEOUT} s)")
    assert TIMEOUT * 0.9 <= took <= TIMEOUT + 8, took  # detected by the timeout, bounded
    assert states(engine, "vol")[nodes[0].name] == "out"
    links[0].heal()
    engine.wait_in_sync(replica, everyone)

    # Reset under a stream of writes: no client error; the member drops out or reconnects.
    failures = engine.membership(replica).generation
    writes = [f"write -P 0x{0x30 + i:x} {i * 64}k 64k" for i in range(32)]
    with QemuIoSession(engine.uri("vol")) as session:
        session.send(*writes[:16])
        wait_for(lambda: links[1].active > 0, 30, "the engine's link to the member")
        links[1].reset()
        output = session.finish(*writes[16:], "flush", timeout=60)
    assert session.returncode == 0, output
    assert "error" not in output.lower(), output
    assert output.count("wrote 65536/65536 bytes") == 32, output
    assert links[1].counters().resets >= 1
    engine.wait_in_sync(replica, everyone)
    print(f"reset: generation {failures} -> {engine.membership(replica).generation}")

    # Slow link: each answer takes longer than child_timeout, so the member is failed.
    links[2].delay(TIMEOUT)  # each way: a round trip of 2 x timeout
    ok(qemu_io(engine.uri("vol"), "write -P 0x23 3M 64k", "flush"))
    assert states(engine, "vol")[nodes[2].name] == "out"
    links[2].heal()
    engine.wait_in_sync(replica, everyone)

    data = assert_identical(nodes, replica)
    expected = bytearray(b"\x21" * (4 * MiB) + bytes(12 * MiB))
    expected[MiB : MiB + 65536] = b"\x22" * 65536
    for i in range(32):  # over the blackhole's write at 1M
        expected[i * 65536 : (i + 1) * 65536] = bytes([0x30 + i]) * 65536
    expected[3 * MiB : 3 * MiB + 65536] = b"\x23" * 65536
    assert data == bytes(expected)


def test_fio_verify_through_a_blackholed_link(rig: Rig, tmp_path: Path) -> None:
    """fio's nbd engine (4k random writes at QD16, crc32c in every block, then reads all
    back) while one member's link goes silent: the requests in flight to it wait for
    child_timeout, the member is failed, fio sees no error and every block verifies; after
    heal the member is resynced and the replicas are identical."""
    engine, nodes, links = rig.engine, rig.nodes, rig.links
    replica = create_replicated(engine, "vol", nodes, FAST)
    reports: list[dict[str, Any]] = []  # fio's JSON reports
    options = ("--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16m")
    thread = threading.Thread(
        target=lambda: reports.append(fio(engine.uri("vol"), tmp_path, *options))
    )
    before = links[0].counters().bytes_to_server
    thread.start()
    try:
        wait_for(
            lambda: links[0].counters().bytes_to_server > before + 2 * MiB or not thread.is_alive(),
            60,
            "fio's writes",
        )
        assert thread.is_alive(), "fio ended before the link could be broken under it"
        links[0].blackhole()
    finally:
        thread.join(180)
    assert not thread.is_alive()
    [job] = reports[0]["jobs"]
    assert job["error"] == 0
    assert job.get("total_err", 0) == 0
    assert job["write"]["io_bytes"] == job["read"]["io_bytes"] == 16 * MiB
    assert links[0].counters().bytes_swallowed > 0
    assert states(engine, "vol")[nodes[0].name] == "out"
    links[0].heal()
    engine.wait_in_sync(replica, {n.name for n in nodes})
    assert_identical(nodes, replica)


# ---------------------------------------------------------------------------------- 4


def test_two_of_three_lost_with_below_min_fail(rig: Rig) -> None:
    engine, nodes = rig.engine, rig.nodes
    replica = create_replicated(engine, "vol", nodes, FAST, ",min_insync=2,below_min=fail")
    ok(qemu_io(engine.uri("vol"), "write -P 0x31 0 2M", "flush"))
    nodes[1].kill()
    nodes[2].kill()
    failed = qemu_io(engine.uri("vol"), "write -P 0x32 0 64k")
    assert "Input/output error" in failed.stdout + failed.stderr, failed
    # Reads go on from the member left.
    ok(qemu_io(engine.uri("vol"), "read -P 0x31 64k 1M"))
    nodes[1].restart()
    nodes[2].restart()
    engine.wait_in_sync(replica, {n.name for n in nodes})
    data = assert_identical(nodes, replica)
    # Everything acknowledged is there; the failed write may or may not have landed.
    assert data[65536 : 2 * MiB] == b"\x31" * (2 * MiB - 65536)
    assert data[:65536] in (b"\x31" * 65536, b"\x32" * 65536)
    ok(qemu_io(engine.uri("vol"), "write -P 0x33 0 64k", "flush"))
    assert assert_identical(nodes, replica)[:65536] == b"\x33" * 65536


def test_two_of_three_lost_with_below_min_wait(rig: Rig) -> None:
    engine, nodes = rig.engine, rig.nodes
    replica = create_replicated(engine, "vol", nodes, FAST, ",min_insync=2,below_min=wait,wait=30")
    ok(qemu_io(engine.uri("vol"), "write -P 0x41 0 2M", "flush"))
    nodes[1].kill()
    nodes[2].kill()
    with QemuIoSession(engine.uri("vol")) as session:
        session.send("write -P 0x42 0 64k", "flush")
        time.sleep(TIMEOUT + 2)  # long enough to fail both members if it were to fail
        assert session.alive(), "the write did not wait below min_insync"
        # Reads go on meanwhile (a read-only client: the waiting one holds the volume).
        ok(qemu_io(engine.uri("vol"), "read -P 0x41 64k 1M", read_only=True))
        nodes[1].restart()
        output = session.finish(timeout=40)
    assert session.returncode == 0, output
    assert "error" not in output.lower(), output
    nodes[2].restart()
    engine.wait_in_sync(replica, {n.name for n in nodes})
    data = assert_identical(nodes, replica)
    assert data[:65536] == b"\x42" * 65536
    assert data[65536 : 2 * MiB] == b"\x41" * (2 * MiB - 65536)


# ---------------------------------------------------------------------------------- 5


def test_kill_9_of_the_engine_mid_write_reconciles_before_serving(rig: Rig) -> None:
    engine, nodes = rig.engine, rig.nodes
    replica = create_replicated(engine, "vol", nodes, FAST)
    # A long stream of unflushed writes (no flush: every region stays in doubt).
    commands = [f"write -P 0x{0x50 + i % 64:x} {i * 64}k 64k" for i in range(256)]
    before = rig.links[0].counters().bytes_to_server
    with QemuIoSession(engine.uri("vol")) as session:
        session.send(*commands)
        wait_for(
            lambda: rig.links[0].counters().bytes_to_server > before + 2 * MiB,
            60,
            "writes through the engine",
        )
        engine.kill()
        session.finish(timeout=30)
    engine.start()
    ok(qemu_io(engine.uri("vol"), "read 0 64k"))  # the first open reconciles, then serves
    reconciled = re.findall(r"reconciled (\d+) bytes in doubt", engine.log.read_text())
    print(f"reconciled after the engine's kill -9: {reconciled}")
    assert reconciled, engine.log.read_text()
    assert int(reconciled[0]) > 0
    # Before serving: the line comes before the session's first "serving export".
    log = engine.log.read_text()
    assert log.index("reconciled") < log.index("serving export 'vol'"), log
    data = assert_identical(nodes, replica)
    # Every 64k written is either wholly the new pattern or still zero (never torn by
    # replicas disagreeing: they are identical).
    for i in range(256):
        piece = data[i * 65536 : (i + 1) * 65536]
        assert piece in (bytes([0x50 + i % 64]) * 65536, bytes(65536)), i


# ---------------------------------------------------------------------------------- 6


def test_a_frozen_engine_fenced_by_a_second_one_lands_no_write(rig: Rig) -> None:
    """The failover case: the first engine hangs (SIGSTOP) and a second one takes the volume
    over from a copy of its data directory (catalogue and region map) taken while it hangs.
    On one hypervisor the same data directory cannot be used: ``nbs serve`` refuses a data
    directory another ``nbs serve`` serves, and the hung one still holds it; a copy is also
    what a failover to another hypervisor would start from.  The copy names the same replicas
    and the same epoch, so the second engine takes epoch + 1 on every replica.  When the
    first wakes, the writes it had queued and the ones it is sent after waking reach no
    replica: only the epoch on the replicas stops them (its own catalogue copy still says
    it owns the volume)."""
    first, nodes = rig.engine, rig.nodes
    # below_min=fail: the fenced engine's requests fail at once instead of waiting ``wait``.
    replica = create_replicated(first, "vol", nodes, FAST, ",below_min=fail")
    session = QemuIoSession(first.uri("vol"))
    second: Engine | None = None
    try:
        session.send("write -P 0x61 0 1M", "flush")
        wait_for(lambda: first.membership(replica).epoch >= 1, 30, "the first engine's open")
        wait_for(
            lambda: all(n.volume_bytes(replica)[:MiB] == b"\x61" * MiB for n in nodes), 30, "1M"
        )
        first.freeze()
        session.send("write -P 0xe1 4M 1M", "flush")  # queued while it is frozen
        # Files only: the API socket and the serve lock belong to the first process.
        shutil.copytree(
            first.data_dir, rig.workdir / "second", ignore=shutil.ignore_patterns("*.sock")
        )
        second = Engine(rig.workdir, nodes, name="second")
        second.start()
        ok(qemu_io(second.uri("vol"), "write -P 0x62 0 2M", "flush"))
        first.cont()
        output = session.finish("write -P 0xe2 6M 1M", "flush", timeout=60)  # after it woke
        print(f"the fenced engine's client saw: {output.strip().splitlines()[-4:]}")
        assert "wrote 1048576/1048576 bytes at offset 0" in output
        assert output.count("write failed: Input/output error") == 2, output
        for fenced in (4 * MiB, 6 * MiB):  # never acknowledged: the replicas refused them
            assert f"wrote 1048576/1048576 bytes at offset {fenced}" not in output, output
        expected = b"\x62" * (2 * MiB) + bytes(14 * MiB)
        for node, data in zip(nodes, replica_bytes(nodes, replica), strict=True):
            assert data == expected, f"{node.name}: a fenced-out write landed"
        # Stopped by the replicas (EPERM: fenced out), not by anything the first engine knew.
        assert "(Operation not permitted)" in first.log.read_text()
        ok(qemu_io(second.uri("vol"), "read -P 0x62 0 2M", "read -P 0 2M 14M", read_only=True))
    finally:
        session.close()
        first.cont()
        if second is not None:
            second.stop()
