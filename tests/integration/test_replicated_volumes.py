"""Replicated volumes end to end, real processes on loopback: three storage nodes (``nbs
serve`` with their management API, tests/integration/storage_nodes.py) and one engine (``nbs
serve`` whose config names them); qemu-io writes through the engine, and each replica is read
through its own node with libnbd."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import require_module, require_tool
from tests.integration.helpers import fio
from tests.integration.replication_rig import (
    Engine,
    MiB,
    QemuIoSession,
    create_replicated,
    qemu_io,
    replicas_on,
)
from tests.integration.storage_nodes import StorageNode

SIZE = 16 * MiB
Nodes = Callable[[int], list[StorageNode]]


@pytest.fixture
def cluster(tmp_path: Path, storage_nodes: Nodes) -> Iterator[tuple[Engine, list[StorageNode]]]:
    nodes = storage_nodes(3)
    engine = Engine(tmp_path, nodes)
    engine.start()
    yield engine, nodes
    engine.stop()


def test_writes_through_the_engine_land_on_every_replica_and_delete_removes_them(
    cluster: tuple[Engine, list[StorageNode]],
) -> None:
    require_module("nbd")
    engine, nodes = cluster
    create_replicated(engine, "vol", nodes)
    names = [replicas_on(node) for node in nodes]
    assert all(len(n) == 1 for n in names), names
    assert len({n[0] for n in names}) == 1  # one name, r-LAYER, on every node
    done = qemu_io(
        engine.uri("vol"),
        "write -P 0xab 0 1M",
        "write -P 0xcd 5M 64k",
        "write -z 8M 1M",
        "flush",
    )
    assert done.returncode == 0, done.stderr
    assert "error" not in (done.stdout + done.stderr).lower()
    expected = bytearray(SIZE)
    expected[0:MiB] = b"\xab" * MiB
    expected[5 * MiB : 5 * MiB + 65536] = b"\xcd" * 65536
    for node in nodes:
        assert node.volume_bytes(names[0][0]) == bytes(expected), node.name
    info = engine.info("vol")
    assert info["storage"].startswith("replicated:")
    assert info["replication"]["min_insync"] == 2  # a majority of 3 by default
    assert [r["state"] for r in info["replication"]["replicas"]] == ["in_sync"] * 3
    engine.volume("delete", "vol")
    assert [replicas_on(node) for node in nodes] == [[], [], []]


def test_a_node_refusing_the_token_is_one_line_and_leaves_nothing(
    tmp_path: Path, storage_nodes: Nodes
) -> None:
    nodes = storage_nodes(3)
    engine = Engine(tmp_path, nodes, bad_token=nodes[2].name)
    engine.start()
    try:
        spec = "replicated:nodes=" + "/".join(n.name for n in nodes)
        failed = engine.volume("create", "vol", "--size", "16MiB", "--storage", spec, check=False)
        assert failed.returncode == 2, failed
        assert failed.stderr.count("\n") == 1, failed.stderr
        assert "node2" in failed.stderr
        assert "Traceback" not in failed.stderr
        assert [replicas_on(node) for node in nodes] == [[], [], []]
        listed = json.loads(engine.volume("list", "--json").stdout)
        assert "vol" not in [v["name"] for v in listed]
    finally:
        engine.stop()


def test_an_unknown_node_is_refused_in_one_line(
    cluster: tuple[Engine, list[StorageNode]],
) -> None:
    engine, _ = cluster
    failed = engine.volume(
        "create", "x", "--size", "1MiB", "--storage", "replicated:nodes=node0/zz", check=False
    )
    assert failed.returncode == 2
    assert "storage node 'zz' is not in the config's nodes" in failed.stderr
    assert failed.stderr.count("\n") == 1


def test_resize_grows_every_replica_while_attached_and_never_shrinks(
    cluster: tuple[Engine, list[StorageNode]],
) -> None:
    """`nbs volume resize` of a replicated volume that a client holds open: every replica
    grows on its node, the data stays, a client connecting after it sees the new size and
    writes at the new end, and the replicas stay byte-identical."""
    require_module("nbd")
    engine, nodes = cluster
    create_replicated(engine, "vol", nodes)
    name = replicas_on(nodes[0])[0]
    with QemuIoSession(engine.uri("vol")) as session:
        session.send("write -P 0x5a 15M 1M", "flush")
        grown = engine.volume("resize", "vol", "40MiB")
        assert grown.returncode == 0, grown
        output = session.finish("write -P 0x6b 0 64k", "flush")  # the old handshake's size
    assert session.returncode == 0, output
    assert "error" not in output.lower(), output
    assert engine.info("vol")["size"] == 40 * MiB
    done = qemu_io(engine.uri("vol"), "write -P 0x7c 39M 1M", "flush")
    assert done.returncode == 0, done
    assert "error" not in (done.stdout + done.stderr).lower(), done
    expected = bytearray(40 * MiB)
    expected[0 : 64 << 10] = b"\x6b" * (64 << 10)
    expected[15 * MiB : 16 * MiB] = b"\x5a" * MiB
    expected[39 * MiB :] = b"\x7c" * MiB
    for node in nodes:
        assert node.volume_bytes(name) == bytes(expected), node.name
    assert [r["state"] for r in engine.info("vol")["replication"]["replicas"]] == ["in_sync"] * 3
    refused = engine.volume("resize", "vol", "8MiB", "--allow-shrink", check=False)
    assert refused.returncode == 2, refused
    assert "grows but never shrinks" in refused.stderr
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert engine.info("vol")["size"] == 40 * MiB


def test_kill_9_of_one_node_under_writes_gives_no_client_error(
    cluster: tuple[Engine, list[StorageNode]],
) -> None:
    """One qemu-io session spans the kill: the engine fails the dead member (committed to
    its catalogue before the write is acknowledged) and goes on with the other two."""
    require_module("nbd")
    engine, nodes = cluster
    create_replicated(engine, "vol", nodes, ",timeout=5,reconnect=1")
    name = replicas_on(nodes[0])[0]
    writes = [f"write -P {i % 250 + 1} {i * 256}k 256k" for i in range(48)]
    with QemuIoSession(engine.uri("vol")) as session:
        session.send(*writes[:24], "flush")
        nodes[1].kill()
        output = session.finish(*writes[24:], "flush")
    assert session.returncode == 0, output
    assert "error" not in output.lower(), output
    assert output.count("wrote 262144/262144 bytes") == 48, output
    expected = b"".join(bytes([i % 250 + 1]) * (256 << 10) for i in range(48))
    for node in (nodes[0], nodes[2]):
        assert node.volume_bytes(name)[: len(expected)] == expected, node.name
    membership = engine.membership(name)
    assert membership.state(nodes[1].name) == "out"
    assert membership.in_sync == {nodes[0].name, nodes[2].name}
    shown = engine.info("vol")["replication"]
    assert shown["live"] is True
    assert [(r["node"], r["volume"], r["state"]) for r in shown["replicas"]] == [
        (nodes[0].name, name, "in_sync"),
        (nodes[1].name, name, "out"),
        (nodes[2].name, name, "in_sync"),
    ]
    assert shown["min_insync"] == 2
    refused = engine.nbs("snapshot", "create", "vol", "s", check=False)
    assert refused.returncode == 2, refused
    assert "a snapshot needs every replica in sync; node1 is not" in refused.stderr
    assert refused.stderr.count("\n") == 1
    # Back: the supervisor resyncs it (what it missed only) and it is in sync again.
    nodes[1].restart()
    deadline = time.monotonic() + 60
    while engine.membership(name).in_sync != {n.name for n in nodes}:
        assert time.monotonic() < deadline, engine.log.read_text()
        time.sleep(0.1)
    shown = engine.info("vol")["replication"]
    assert [r["state"] for r in shown["replicas"]] == ["in_sync"] * 3
    assert shown["generation"] > membership.generation
    metrics = engine.metrics()
    for node in nodes:
        assert f'nbs_replica_in_sync{{member="{node.name}",volume="vol"}} 1.0' in metrics
    copied = re.search(
        rf'nbs_replica_resync_bytes_total{{member="{nodes[1].name}",volume="vol"}} (\S+)', metrics
    )
    assert copied is not None, metrics
    assert float(copied.group(1)) > 0
    assert 'nbs_replica_failures_total{volume="vol"} 1.0' in metrics
    text = engine.volume("info", "vol").stdout
    assert f"replica:     {nodes[1].name} {name} in-sync, 0 in flight" in text, text
    assert f"{nodes[1].name} in sync again" in engine.log.read_text()
    first = nodes[0].volume_bytes(name)
    assert first[: len(expected)] == expected
    assert nodes[1].volume_bytes(name) == first
    assert nodes[2].volume_bytes(name) == first


def test_snapshot_and_clone_of_a_replicated_volume(
    cluster: tuple[Engine, list[StorageNode]],
) -> None:
    """The snapshot is taken on every replica at one point; the clone's replicas are clones
    of those snapshots on the same nodes; deleting everything leaves no replica behind."""
    require_module("nbd")
    engine, nodes = cluster
    create_replicated(engine, "vol", nodes)
    done = qemu_io(engine.uri("vol"), "write -P 0x11 0 2M")
    assert done.returncode == 0, done.stderr
    engine.nbs("snapshot", "create", "vol", "s1")
    done = qemu_io(engine.uri("vol"), "write -P 0x22 1M 2M")
    assert done.returncode == 0, done.stderr
    engine.volume("clone", "vol@s1", "copy")
    info = engine.info("copy")
    assert info["storage"].startswith("replicated:")
    copies = {r["volume"] for r in info["replication"]["replicas"]}
    assert len(copies) == 1
    [copy] = copies
    expected = b"\x11" * (2 * MiB) + bytes(SIZE - 2 * MiB)
    for node in nodes:
        assert node.volume_bytes(copy) == expected, node.name
    done = qemu_io(engine.uri("copy"), "write -P 0x33 0 4k", "flush")
    assert done.returncode == 0, done.stderr
    for node in nodes:
        assert node.volume_bytes(copy)[:8192] == b"\x33" * 4096 + b"\x11" * 4096
    volume = engine.info("vol")["replication"]["replicas"][0]["volume"]
    for node in nodes:  # the source went on; its snapshot did not
        assert node.volume_bytes(volume)[: 3 * MiB] == b"\x11" * MiB + b"\x22" * (2 * MiB)
    engine.volume("delete", "copy")
    engine.nbs("snapshot", "delete", "vol@s1")
    engine.volume("delete", "vol")
    engine.volume("gc")
    for node in nodes:
        with node.api() as api:
            assert [v.name for v in api.list() if v.name.startswith("r-")] == []
            assert [s for s in api.snapshots() if s.volume.startswith("r-")] == []


def test_replica_add_and_remove(cluster: tuple[Engine, list[StorageNode]]) -> None:
    """add: made on the node, out, then resynced by the supervisor to the same bytes;
    remove: deleted from its node; never below min_insync."""
    require_module("nbd")
    engine, nodes = cluster
    create_replicated(engine, "vol", nodes[:2])
    done = qemu_io(engine.uri("vol"), "write -P 0x5a 1M 3M", "flush")
    assert done.returncode == 0, done.stderr
    name = replicas_on(nodes[0])[0]
    added = json.loads(engine.volume("replica", "add", "vol", nodes[2].name, "--json").stdout)
    assert [r["node"] for r in added["replication"]["replicas"]] == [n.name for n in nodes]
    assert replicas_on(nodes[2]) == [name]
    deadline = time.monotonic() + 60
    while engine.membership(name).in_sync != {n.name for n in nodes}:
        assert time.monotonic() < deadline, engine.log.read_text()
        time.sleep(0.1)
    assert nodes[2].volume_bytes(name) == nodes[0].volume_bytes(name)
    assert nodes[2].volume_bytes(name)[MiB : 4 * MiB] == b"\x5a" * (3 * MiB)
    engine.volume("replica", "remove", "vol", nodes[0].name)
    assert replicas_on(nodes[0]) == []
    shown = engine.info("vol")["replication"]
    assert [r["node"] for r in shown["replicas"]] == [nodes[1].name, nodes[2].name]
    refused = engine.volume("replica", "remove", "vol", nodes[1].name, check=False)
    assert refused.returncode == 2, refused
    assert "fewer than min_insync=2" in refused.stderr
    assert refused.stderr.count("\n") == 1
    done = qemu_io(engine.uri("vol"), "read -P 0x5a 1M 3M")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "read 3145728/3145728 bytes" in done.stdout
    assert "fail" not in (done.stdout + done.stderr).lower()


def written_bytes(engine: Engine, export: str) -> float:
    found = re.search(rf'nbs_written_bytes_total{{export="{export}"}} (\S+)', engine.metrics())
    return float(found.group(1)) if found else 0.0


def test_fio_verify_through_a_kill_9_of_one_node(
    cluster: tuple[Engine, list[StorageNode]], tmp_path: Path
) -> None:
    """fio's nbd engine writes 4k at QD16 with crc32c headers and reads everything back; a
    node is killed part way through the writes: zero errors, every block verifies."""
    engine, nodes = cluster
    create_replicated(engine, "vol", nodes, ",timeout=5,reconnect=1")
    reports: list[dict[str, Any]] = []  # fio's JSON reports
    options = ("--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16m")
    thread = threading.Thread(
        target=lambda: reports.append(fio(engine.uri("vol"), tmp_path, *options))
    )
    thread.start()
    deadline = time.monotonic() + 60
    while written_bytes(engine, "vol") < 2 * MiB:
        assert thread.is_alive(), "fio ended before a node could be killed under it"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert thread.is_alive()
    nodes[1].kill()
    thread.join(180)
    assert not thread.is_alive()
    [job] = reports[0]["jobs"]
    assert job["error"] == 0
    assert job.get("total_err", 0) == 0
    assert job["write"]["io_bytes"] == job["read"]["io_bytes"] == SIZE
    name = replicas_on(nodes[0])[0]
    assert engine.membership(name).state(nodes[1].name) == "out"
    assert nodes[0].volume_bytes(name) == nodes[2].volume_bytes(name)


def _writes(pattern: int, start: int, count: int, size: int = 256 << 10) -> list[str]:
    """qemu-io commands writing ``count`` blocks of ``size`` from block ``start`` on, each
    filled with a pattern byte derived from ``pattern`` and the block."""
    return [
        f"write -P {(pattern + i) % 250 + 1} {i * size} {size}" for i in range(start, start + count)
    ]


def _expected(*batches: tuple[int, int, int], size: int = 256 << 10) -> bytes:
    """The image after ``_writes(pattern, start, count)`` of each batch, in order."""
    image = bytearray(SIZE)
    for pattern, start, count in batches:
        for i in range(start, start + count):
            image[i * size : (i + 1) * size] = bytes([(pattern + i) % 250 + 1]) * size
    return bytes(image)


def _quiet(output: str) -> None:
    """Nothing a client would call an error in qemu-io's output."""
    lowered = output.lower()
    assert "error" not in lowered, output
    assert "fail" not in lowered, output


def test_replica_replace_of_a_killed_node_while_attached(
    tmp_path: Path, storage_nodes: Nodes
) -> None:
    """The operator's case: a node dies under a writing client; its replica is replaced by
    one on a fourth node while the client stays attached and writes; the resync (rate
    limited, so its progress shows in ``nbs volume info``) makes the new replica
    byte-identical to the others; the dead node's replica is left for ``nbs volume gc``,
    which deletes it once the node is back."""
    require_module("nbd")
    nodes = storage_nodes(4)
    engine = Engine(tmp_path, nodes)
    engine.start()
    try:
        name = create_replicated(
            engine, "vol", nodes[:3], ",timeout=5,reconnect=1,resync_rate=4MiB"
        )
        dead, new = nodes[1], nodes[3]
        with QemuIoSession(engine.uri("vol")) as session:
            session.send(*_writes(1, 0, 24), "flush")
            dead.kill()
            session.send(*_writes(2, 24, 16), "flush")
            replaced = engine.volume("replica", "replace", "vol", dead.name, new.name, "--json")
            shown = json.loads(replaced.stdout)["replication"]["replicas"]
            assert [(r["node"], r["state"]) for r in shown] == [
                (nodes[0].name, "in_sync"),
                (new.name, shown[1]["state"]),  # out, or resyncing already
                (nodes[2].name, "in_sync"),
                (dead.name, "leftover"),  # its node is dead: not deleted yet
            ]
            assert shown[1]["state"] in ("out", "resyncing")
            session.send(*_writes(3, 40, 24), "flush")
            progress = ""
            deadline = time.monotonic() + 60
            while engine.membership(name).in_sync != {nodes[0].name, new.name, nodes[2].name}:
                assert time.monotonic() < deadline, engine.logs()
                text = engine.volume("info", "vol").stdout
                shown_now = re.findall(r"resyncing \d+% \(\d+/\d+ bytes\)", text)
                progress = progress or "".join(shown_now)
                time.sleep(0.1)
            output = session.finish(*_writes(4, 0, 8), "flush")
        assert session.returncode == 0, output
        _quiet(output)
        assert output.count("wrote 262144/262144 bytes") == 72, output
        assert progress, "the resync's progress was never shown by nbs volume info"
        expected = _expected((1, 0, 24), (2, 24, 16), (3, 40, 24), (4, 0, 8))
        for node in (nodes[0], new, nodes[2]):
            assert node.volume_bytes(name) == expected, node.name
        assert replicas_on(new) == [name]
        text = engine.volume("info", "vol").stdout
        assert f"{dead.name} {name} leftover (left the volume" in text, text
        dead.restart()
        engine.volume("gc")
        assert replicas_on(dead) == []
        assert "leftover" not in engine.volume("info", "vol").stdout
    finally:
        engine.stop()


def test_replica_add_and_remove_while_attached(
    cluster: tuple[Engine, list[StorageNode]],
) -> None:
    """A client stays attached and writes while a replica is added (resynced in) and
    another removed (deleted from its node); user errors are one line, exit 2."""
    require_module("nbd")
    engine, nodes = cluster
    name = create_replicated(engine, "vol", nodes[:2])
    with QemuIoSession(engine.uri("vol")) as session:
        session.send(*_writes(1, 0, 32), "flush")
        engine.volume("replica", "add", "vol", nodes[2].name)
        session.send(*_writes(2, 16, 32), "flush")
        engine.wait_in_sync(name, {n.name for n in nodes})
        engine.volume("replica", "remove", "vol", nodes[0].name)
        assert replicas_on(nodes[0]) == []
        session.send(*_writes(3, 40, 24), "flush")
        for args, message in (
            (("remove", "vol", nodes[1].name), "fewer than min_insync=2"),
            (("replace", "vol", nodes[1].name, nodes[2].name), "already holds a replica"),
            (("replace", "vol", nodes[0].name, nodes[0].name), "holds no replica"),
            (("add", "vol", "zz"), "no storage node 'zz' is configured"),
        ):
            refused = engine.volume("replica", *args, check=False)
            assert refused.returncode == 2, refused
            assert message in refused.stderr, refused.stderr
            assert refused.stderr.count("\n") == 1, refused.stderr
        output = session.finish()
    assert session.returncode == 0, output
    _quiet(output)
    assert output.count("wrote 262144/262144 bytes") == 88, output
    expected = _expected((1, 0, 32), (2, 16, 32), (3, 40, 24))
    for node in nodes[1:]:
        assert node.volume_bytes(name) == expected, node.name
    shown = engine.info("vol")["replication"]["replicas"]
    assert [(r["node"], r["state"]) for r in shown] == [
        (nodes[1].name, "in_sync"),
        (nodes[2].name, "in_sync"),
    ]


def test_replica_replace_of_a_volume_no_engine_has_open(
    cluster: tuple[Engine, list[StorageNode]],
) -> None:
    """Never opened yet: the change goes to the catalogue; the engine, when it opens the
    volume, copies everything to the new replica."""
    require_module("nbd")
    engine, nodes = cluster
    name = create_replicated(engine, "cold", nodes[:2], ",min_insync=1")
    engine.volume("replica", "replace", "cold", nodes[0].name, nodes[2].name)
    assert replicas_on(nodes[0]) == []
    shown = engine.info("cold")["replication"]
    assert shown["live"] is False
    assert [(r["node"], r["state"]) for r in shown["replicas"]] == [
        (nodes[2].name, "out"),
        (nodes[1].name, "in_sync"),
    ]
    done = qemu_io(engine.uri("cold"), *_writes(5, 0, 8), "flush")
    assert done.returncode == 0, done.stdout + done.stderr
    engine.wait_in_sync(name, {nodes[1].name, nodes[2].name})
    expected = _expected((5, 0, 8))
    assert nodes[2].volume_bytes(name) == nodes[1].volume_bytes(name) == expected


def _export(
    engine: Engine, name: str, dest: Path, *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`nbs volume export` in its own process beside the engine (as an operator runs it):
    --config gives it the storage nodes."""
    return engine.volume("export", name, str(dest), "--config", str(engine.config), check=check)


def test_export_of_a_snapshot_reads_a_replica_and_fails_over(
    cluster: tuple[Engine, list[StorageNode]], tmp_path: Path
) -> None:
    """A backup of a replicated volume's snapshot: the snapshot's bytes, not the volume's
    since; with a node killed the export reads another replica; with every node down it is
    one line on stderr.  No export takes an epoch: the engine serves on."""
    require_tool("qemu-img")
    engine, nodes = cluster
    create_replicated(engine, "vol", nodes)
    done = qemu_io(engine.uri("vol"), "write -P 0x41 0 2M", "write -P 0x42 3M 1M", "flush")
    assert done.returncode == 0, done.stderr
    engine.nbs("snapshot", "create", "vol", "s1")
    done = qemu_io(engine.uri("vol"), "write -P 0x43 1M 3M", "flush")
    assert done.returncode == 0, done.stderr
    snapshot = b"\x41" * (2 * MiB) + bytes(MiB) + b"\x42" * MiB + bytes(SIZE - 4 * MiB)
    epoch = engine.info("vol")["replication"]["epoch"]
    # No --config: the nodes as the running engine lists them.
    engine.volume("export", "vol@s1", str(tmp_path / "beside.raw"))
    assert (tmp_path / "beside.raw").read_bytes() == snapshot
    _export(engine, "vol@s1", tmp_path / "s1.raw")
    assert (tmp_path / "s1.raw").read_bytes() == snapshot
    nodes[0].kill()
    _export(engine, "vol@s1", tmp_path / "s1-again.raw")
    assert (tmp_path / "s1-again.raw").read_bytes() == snapshot
    assert engine.info("vol")["replication"]["epoch"] == epoch
    done = qemu_io(engine.uri("vol"), "write -P 0x44 0 64k", "flush")  # not fenced
    assert done.returncode == 0, done.stderr
    nodes[1].kill()
    nodes[2].kill()
    failed = _export(engine, "vol@s1", tmp_path / "none.raw", check=False)
    assert failed.returncode == 1, failed
    assert failed.stderr.count("\n") == 1, failed.stderr
    assert "Traceback" not in failed.stderr
    assert failed.stderr.startswith("nbs: error: cannot open 'vol': no copy of vol@s1 answered (")
    for node in nodes:
        assert f"{node.name}: " in failed.stderr, failed.stderr
    assert not (tmp_path / "none.raw").exists()


def test_export_of_the_live_volume_leaves_its_engine_serving(
    cluster: tuple[Engine, list[StorageNode]], tmp_path: Path
) -> None:
    """`nbs volume export VOL` while the engine has VOL open: the current bytes, read from an
    in-sync replica over a plain (read-only, unfenced) connection, failing over past a dead
    node; the engine keeps its epoch and its writes still land on every live replica."""
    require_tool("qemu-img")
    engine, nodes = cluster
    name = create_replicated(engine, "vol", nodes)
    done = qemu_io(engine.uri("vol"), "write -P 0x51 0 3M", "flush")
    assert done.returncode == 0, done.stderr
    shown = engine.info("vol")["replication"]
    assert shown["live"] is True  # the engine keeps the volume open
    expected = b"\x51" * (3 * MiB) + bytes(SIZE - 3 * MiB)
    _export(engine, "vol", tmp_path / "live.raw")
    assert (tmp_path / "live.raw").read_bytes() == expected
    nodes[0].kill()  # the catalogue still has it in sync: the export fails over
    _export(engine, "vol", tmp_path / "live-again.raw")
    assert (tmp_path / "live-again.raw").read_bytes() == expected
    assert engine.info("vol")["replication"]["epoch"] == shown["epoch"]
    done = qemu_io(engine.uri("vol"), "write -P 0x52 0 64k", "flush")
    assert done.returncode == 0, done.stderr
    assert "error" not in (done.stdout + done.stderr).lower()
    written = b"\x52" * (64 << 10) + b"\x51" * (64 << 10)
    for node in nodes[1:]:
        assert node.volume_bytes(name)[: 128 << 10] == written, node.name


def test_node_list_shows_each_node_and_the_replicas_it_holds(
    cluster: tuple[Engine, list[StorageNode]], tmp_path: Path
) -> None:
    """`nbs node list|info`: through the engine's API, then (engine stopped) from the data
    directory with --config; each node up, or down with one line why, with the replicas it
    holds and their states."""
    engine, nodes = cluster
    name = create_replicated(engine, "vol", nodes)
    nodes[2].kill()
    done = qemu_io(engine.uri("vol"), "write -P 0x61 0 64k", "flush")  # node2's replica: out
    assert done.returncode == 0, done.stderr
    listed = json.loads(engine.nbs("node", "list", "--json").stdout)
    assert [n["name"] for n in listed] == [n.name for n in nodes]
    up, down = listed[0], listed[2]
    assert (up["configured"], up["reachable"], up["error"]) == (True, True, None)
    assert up["version"]
    assert up["api"] == nodes[0].api_url
    assert up["nbd"] == f"nbd://127.0.0.1:{nodes[0].nbd_port}"
    assert up["replicas"] == [{"volume": "vol", "replica": name, "state": "in_sync"}]
    assert (down["configured"], down["reachable"]) == (True, False)
    assert "cannot reach the NBS API" in down["error"]
    assert down["replicas"] == [{"volume": "vol", "replica": name, "state": "out"}]

    table = engine.nbs("node", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "STATE", "REPLICAS", "IN-SYNC", "VERSION", "API", "NBD"]
    assert [row.split()[:4] for row in table[1:4]] == [
        [nodes[0].name, "up", "1", "1"],
        [nodes[1].name, "up", "1", "1"],
        [nodes[2].name, "down", "1", "0"],
    ]
    assert table[4].startswith(f"{nodes[2].name}: cannot reach the NBS API")
    assert len(table) == 5
    shown = engine.nbs("node", "info", nodes[2].name).stdout
    assert re.search(r"^state:\s+down$", shown, re.M), shown
    assert re.search(rf"^vol\s+{name}\s+out$", shown, re.M), shown
    missing = engine.nbs("node", "info", "zz", check=False)
    assert missing.returncode == 1, missing
    assert missing.stderr == "nbs: error: no storage node 'zz' is configured\n"

    engine.stop()  # the data directory's own view, nodes from --config
    local = json.loads(engine.nbs("node", "list", "--json", "--config", str(engine.config)).stdout)
    assert [(n["name"], n["reachable"]) for n in local] == [
        (nodes[0].name, True),
        (nodes[1].name, True),
        (nodes[2].name, False),
    ]
    assert local[2]["replicas"] == [{"volume": "vol", "replica": name, "state": "out"}]
    # No server and no --config: which nodes?  One line.
    unknown = engine.volume("export", "vol", str(tmp_path / "none.raw"), check=False)
    assert unknown.returncode == 1, unknown
    assert unknown.stderr.count("\n") == 1, unknown.stderr
    assert "no storage node 'node0' is configured (--config names the nodes)" in unknown.stderr


def test_scrub_finds_a_replica_changed_on_disk_and_repairs_it(
    cluster: tuple[Engine, list[StorageNode]],
) -> None:
    """Bit rot on one node's disk (bytes changed in its replica's data file, under the node's
    nbs serve): `nbs volume scrub` through the engine finds the block and names the replica
    (exit 1), `--repair` writes the majority's bytes over it (exit 0), and a volume that is
    not replicated is refused in one line."""
    require_module("nbd")
    engine, nodes = cluster
    name = create_replicated(engine, "vol", nodes)
    done = qemu_io(engine.uri("vol"), "write -P 0x71 0 4M", "flush")
    assert done.returncode == 0, done.stderr
    # The replica's data file: the node's one layer holding data.
    [data] = [p for p in (nodes[1].data_dir / "layers").glob("*.data") if p.stat().st_blocks]
    with data.open("r+b") as disk:
        disk.seek(MiB + 4096 + 17)
        disk.write(b"\x00rot" * 256)

    found = engine.volume("scrub", "vol", "--json", check=False)
    assert found.returncode == 1, found
    report = json.loads(found.stdout)
    assert [
        (m["offset"], m["length"], m["replicas"], m["majority"], m["repaired"])
        for m in report["mismatches"]
    ] == [(MiB + 4096, 4096, [nodes[1].name], True, False)]
    assert (report["compared"], report["unresolved"], report["failed"]) == (SIZE, 1, [])
    assert "scrubbing vol" in found.stderr  # progress
    assert nodes[1].volume_bytes(name) != nodes[0].volume_bytes(name)  # found, not touched
    assert engine.metric("nbs_volume_scrub_unresolved_mismatches", volume="vol") == 1

    fixed = engine.volume("scrub", "vol", "--repair")
    assert "1 mismatch(es), 1 repaired" in fixed.stdout, fixed.stdout
    assert re.search(rf"^{MiB + 4096}\s+4096\s+{nodes[1].name}\s+repaired$", fixed.stdout, re.M)
    assert nodes[1].volume_bytes(name) == nodes[0].volume_bytes(name)
    assert nodes[1].volume_bytes(name)[: 4 * MiB] == b"\x71" * (4 * MiB)
    again = engine.volume("scrub", "vol")
    assert "0 mismatch(es)" in again.stdout
    assert engine.metric("nbs_volume_scrub_unresolved_mismatches", volume="vol") == 0
    shown = engine.volume("info", "vol").stdout  # the serving engine's last scrub
    assert re.search(r"^last scrub:\s+\S+ \S+, \S+ MiB compared, 0 mismatch\(es\)$", shown, re.M)
    done = qemu_io(engine.uri("vol"), "read -P 0x71 0 4M")  # the engine served on throughout
    assert done.returncode == 0, done.stdout + done.stderr
    assert "read 4194304/4194304 bytes" in done.stdout

    engine.volume("create", "plain", "--size", "1MiB")
    refused = engine.volume("scrub", "plain", check=False)
    assert refused.returncode == 2, refused
    assert refused.stderr == (
        "nbs: error: volume 'plain' is not replicated: scrub compares a replicated volume's"
        " replicas\n"
    )

    engine.stop()  # no server: the command opens the volume itself, nodes from --config
    local = engine.volume("scrub", "vol", "--config", str(engine.config))
    assert "0 mismatch(es)" in local.stdout, local.stdout
