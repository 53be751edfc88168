"""ConfiguredNodes: the config's storage nodes, swapped whole by a reload (SIGHUP) while API
threads and engines read them; and the replicas a removed node still holds.  The API token
test runs a real management API on loopback.  (The reload itself, through ``nbs serve``:
tests/integration/test_replicated_volumes.py.)"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.api.app import create_app
from backend.api.server import ApiServer
from backend.config import NodeConfig
from backend.node_clients import ConfiguredNodes, NodesChange, volumes_on_nodes
from backend.replication.membership import Membership, member_added
from backend.storage.base import StorageError
from backend.volumes.catalogue import Catalogue, ReplicaRow, VolumeRow
from backend.volumes.model import CreateRequest, InvalidRequestError
from backend.volumes.service import VolumeService
from backend.volumes.storages import FILE, parse_storage


def node(port: int, token: str = "t", api: str = "http://127.0.0.1:1") -> NodeConfig:
    return NodeConfig(api=api, nbd=f"nbd://127.0.0.1:{port}", token=token)


def test_replace_applies_and_reports_what_changed() -> None:
    nodes = ConfiguredNodes({"a": node(1), "b": node(2), "c": node(3)})
    change = nodes.replace({"a": node(1), "b": node(20), "d": node(4)})
    assert change == NodesChange(added=("d",), changed=("b",), removed=("c",))
    assert nodes.names() == ("a", "b", "d")
    assert nodes.target("b", "r-x;epoch=2").port == 20  # a changed address, used at once
    assert nodes.target("d", "r-x").port == 4
    assert nodes.replace({"a": node(1), "b": node(20), "d": node(4)}) == NodesChange()


def test_a_removed_node_is_refused_for_new_replicas_and_its_members_do_not_open() -> None:
    nodes = ConfiguredNodes({"a": node(1), "b": node(2)})
    nodes.replace({"a": node(1)})
    with pytest.raises(InvalidRequestError, match="no storage node 'b' is configured"):
        nodes.volumes("b").__enter__()
    # A StorageError, which the engine takes as a member it cannot open (out), not as a
    # failure of the whole volume.
    with pytest.raises(StorageError, match="no storage node 'b' is configured"):
        nodes.target("b", "r-x;epoch=1")


def test_readers_see_the_old_or_the_new_nodes_never_a_mix() -> None:
    """Engines and API threads look nodes up while a reload swaps them: node ``a`` is in
    both sets (only its port changes), so no lookup of it may fail, and ``names()`` is one
    whole set.  (An in-place update of one dict fails this.)"""
    first = {"a": node(1), "b": node(2)}
    second = {"a": node(10), "c": node(3)}
    nodes = ConfiguredNodes(first)
    stop = threading.Event()
    seen: list[object] = []

    def read() -> None:
        while not stop.is_set():
            try:
                port = nodes.target("a", "x").port
                names = nodes.names()
            except Exception as err:  # any failure is the finding
                seen.append(err)
                return
            if port not in (1, 10) or names not in (("a", "b"), ("a", "c")):
                seen.append((port, names))
                return

    readers = [threading.Thread(target=read) for _ in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often, so a torn update would be seen
    for reader in readers:
        reader.start()
    try:
        for i in range(20000):
            nodes.replace(second if i % 2 == 0 else first)
    finally:
        stop.set()
        for reader in readers:
            reader.join()
        sys.setswitchinterval(interval)
    assert seen == []


@pytest.fixture
def api_url(tmp_path: Path) -> Iterator[str]:
    """A storage node's management API on loopback (token ``right``)."""
    service = VolumeService(tmp_path / "node")
    service.start_serving()
    server = ApiServer(create_app(service, token="right"), listen=[("127.0.0.1", 0)])
    try:
        yield server.start()[0]
    finally:
        server.stop()
        service.close()


def test_a_changed_token_is_used_from_the_next_operation(api_url: str) -> None:
    nodes = ConfiguredNodes({"a": node(1, token="wrong", api=api_url)})
    with (
        pytest.raises(InvalidRequestError, match=r"nodes\.a in the config"),
        nodes.volumes("a") as api,
    ):
        api.create(CreateRequest("v1", 4096))
    nodes.replace({"a": node(1, token="right", api=api_url)})
    with nodes.volumes("a") as api:
        assert api.create(CreateRequest("v1", 4096)).name == "v1"
        # An operation under way keeps the client it started with.
        nodes.replace({"a": node(1, token="wrong", api=api_url)})
        api.delete("v1")


def test_probe_says_whether_a_node_answers_and_why_not(api_url: str) -> None:
    nodes = ConfiguredNodes(
        {
            "up": node(1, token="right", api=api_url),
            "wrong-token": node(2, token="wrong", api=api_url),
            "down": node(3),  # nothing listens on port 1
        }
    )
    up = nodes.probe("up")
    assert (up.reachable, up.error, up.api, up.nbd) == (True, None, api_url, "nbd://127.0.0.1:1")
    assert up.version
    refused = nodes.probe("wrong-token")
    assert not refused.reachable
    assert refused.error is not None
    assert "nodes.wrong-token in the config" in refused.error
    down = nodes.probe("down")
    assert not down.reachable
    assert down.error is not None
    assert down.error.startswith("cannot reach the NBS API at http://127.0.0.1:1")
    with pytest.raises(InvalidRequestError, match="no storage node 'zz' is configured"):
        nodes.probe("zz")


def test_volumes_on_nodes_names_the_volumes_whose_members_live_on_the_nodes(
    tmp_path: Path,
) -> None:
    catalogue = Catalogue(tmp_path / "catalogue.sqlite3")
    try:
        spec = parse_storage("replicated:nodes=n1/n2")
        with catalogue.transaction() as changes:
            for name, top, storage in [
                ("vol-a", "la", spec),
                ("vol-b", "lb", spec),
                ("making", "lm", spec),  # no membership yet: being created
                ("plain", "lf", FILE),
            ]:
                changes.add_layer(top, None, storage)
                changes.add_volume(
                    VolumeRow(name, 4096, "", {}, False, top, None, "ready", 1.0, storage)
                )
            changes.put_membership(Membership.new("la", ["n1", "n2"]))
            # vol-b: n1's replica left (a leftover row, no longer a member), n3 joined.
            changes.put_membership(member_added(Membership.new("lb", ["n2"]), "n3"))
            changes.add_replica(ReplicaRow("lb", "n1", "r-lb", "u"))
        assert volumes_on_nodes(catalogue, ["n1", "n2", "n3", "n4"]) == {
            "n1": ["vol-a"],
            "n2": ["vol-a", "vol-b"],
            "n3": ["vol-b"],
        }
    finally:
        catalogue.close()
