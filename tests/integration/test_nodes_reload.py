"""SIGHUP applies the engine's ``nodes:`` (docs/replication.md, "Storage nodes and SIGHUP"):
real storage nodes and an engine (``nbs serve``) on loopback, no VM; the engine's config file
is rewritten and the engine signalled, as an operator would."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.integration.replication_rig import (
    Engine,
    MiB,
    create_replicated,
    qemu_io,
    replicas_on,
)
from tests.integration.storage_nodes import StorageNode

Nodes = Callable[[int], list[StorageNode]]


def refused(engine: Engine, *args: str) -> str:
    """``nbs volume ARGS`` fails with one line on stderr, which is returned."""
    done = engine.volume(*args, check=False)
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr


def test_a_node_added_by_sighup_takes_a_replica_that_resyncs(
    tmp_path: Path, storage_nodes: Nodes
) -> None:
    """The operator's way of replacing a dead node without restarting the engine: put the
    new node in the config (and the dead one out), reload, replace.  A reload whose
    ``nodes:`` is invalid changes nothing."""
    nodes = storage_nodes(3)
    engine = Engine(tmp_path, nodes[:2])
    engine.start()
    try:
        name = create_replicated(engine, "vol", nodes[:2], ",min_insync=1")
        done = qemu_io(engine.uri("vol"), "write -P 0x5a 1M 3M", "flush")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "no storage node 'node2' is configured" in refused(
            engine, "replica", "replace", "vol", nodes[0].name, nodes[2].name
        )

        engine.write_config(nodes)
        with engine.config.open("a") as config:
            config.write("  node3: {api: 'http://127.0.0.1:1', token: t}\n")  # no nbd
        engine.reload("reload failed")
        assert "nodes.node3.nbd: required" in engine.log.read_text()
        assert "no storage node 'node2' is configured" in refused(
            engine, "replica", "replace", "vol", nodes[0].name, nodes[2].name
        )

        # node0 is dead, say: the operator takes it out and puts node2 in, in one edit.
        engine.write_config(nodes[1:])
        engine.reload()
        engine.volume("replica", "replace", "vol", nodes[0].name, nodes[2].name)
        log = engine.log.read_text()
        assert "reload: storage nodes added: node2" in log
        assert "reload: storage nodes removed: node0" in log
        assert replicas_on(nodes[2]) == [name]
        # Not contacted any more: its replica stays, shown as leftover.
        assert replicas_on(nodes[0]) == [name]
        shown = engine.info("vol")["replication"]["replicas"]
        assert [(r["node"], r["state"]) for r in shown][-1] == ("node0", "leftover")
        # `nbs node list`: the configured nodes, then node0, no longer configured, holding
        # the leftover.
        listed = json.loads(engine.nbs("node", "list", "--json").stdout)
        assert [(n["name"], n["configured"]) for n in listed] == [
            ("node1", True),
            ("node2", True),
            ("node0", False),
        ]
        assert listed[2]["replicas"] == [{"volume": "vol", "replica": name, "state": "leftover"}]
        assert "not in the config's nodes:" in listed[2]["error"]
        engine.wait_in_sync(name, {nodes[1].name, nodes[2].name})
        data = nodes[2].volume_bytes(name)
        assert data == nodes[1].volume_bytes(name)
        assert data[MiB : 4 * MiB] == b"\x5a" * (3 * MiB)
    finally:
        engine.stop()


def test_a_node_removed_by_sighup_is_refused_and_its_volumes_are_named(
    tmp_path: Path, storage_nodes: Nodes
) -> None:
    nodes = storage_nodes(3)
    engine = Engine(tmp_path, nodes)
    engine.start()
    try:
        create_replicated(engine, "vol", nodes)
        done = qemu_io(engine.uri("vol"), "write -P 0xc3 0 2M", "flush")
        assert done.returncode == 0, done.stdout + done.stderr

        engine.write_config(nodes[:2])
        engine.reload()
        assert "'node2' is not in the config's nodes" in refused(
            engine, "create", "other", "--size", "4MiB", "--storage", "replicated:nodes=node0/node2"
        )
        log = engine.log.read_text()
        assert "reload: storage nodes removed: node2" in log
        warnings = [line for line in log.splitlines() if "WARNING" in line and "node2" in line]
        assert len(warnings) == 1, log
        assert "holds replicas of vol" in warnings[0]
        assert "nbs volume replica replace VOLUME node2 NEW" in warnings[0]

        create_replicated(engine, "two", nodes[:2], size=4 * MiB)
        assert "no storage node 'node2' is configured" in refused(
            engine, "replica", "add", "two", nodes[2].name
        )
        assert len(replicas_on(nodes[2])) == 1  # vol's only
        # The volume goes on: its open connection to node2 keeps its address.
        done = qemu_io(engine.uri("vol"), "read -P 0xc3 0 2M")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "read 2097152/2097152 bytes" in done.stdout

        # Restarted with node2 gone, the volume (created naming node2) still opens, on the
        # two others: node2's replica is out until replaced.
        engine.stop()
        engine.start()
        done = qemu_io(engine.uri("vol"), "read -P 0xc3 0 2M")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "read 2097152/2097152 bytes" in done.stdout
        shown = {r["node"]: r["state"] for r in engine.info("vol")["replication"]["replicas"]}
        assert shown == {"node0": "in_sync", "node1": "in_sync", "node2": "out"}
        assert "member node2 failed: cannot open: no storage node 'node2'" in engine.logs()
        assert "Traceback" not in engine.logs()

        # A changed token (node0's, now wrong) is what the next operation uses.
        engine.write_config(nodes[:2], bad_token=nodes[0].name)
        engine.reload()
        assert "reload: storage nodes changed: node0" in engine.log.read_text()
        assert "nodes.node0 in the config" in refused(
            engine, "create", "three", "--size", "4MiB", "--storage", "replicated:nodes=node0/node1"
        )
    finally:
        engine.stop()
