"""The replication test rig itself: FaultProxy in front of a real ``nbs serve``, seen by libnbd,
and a storage node that survives kill -9 (tests/integration/faultproxy.py, storage_nodes.py).

Timing checks are lower bounds only (a fault must cost at least what it adds); nothing here
asserts that anything is fast.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.integration.conftest import NbsServer, require_module
from tests.integration.faultproxy import FaultProxy, Target
from tests.integration.storage_nodes import StorageNode

if TYPE_CHECKING:
    import nbd as libnbd  # for annotations: at run time require_module gives nbd

nbd = require_module("nbd")  # python3-libnbd, a Debian package

MiB = 1 << 20
EXPORT = "default"  # the volume nbs serve creates in an empty data directory

ProxyFactory = Callable[[Target], FaultProxy]


@pytest.fixture
def server(nbs_server: Callable[..., NbsServer], tmp_path: Path) -> NbsServer:
    """``nbs serve`` of a fresh data directory, on loopback TCP and a Unix socket."""
    sock = tmp_path / "nbd.sock"
    return nbs_server(
        "--listen", "127.0.0.1:0", "--socket", str(sock), "--data-dir", str(tmp_path / "data")
    )


def tcp_target(server: NbsServer) -> Target:
    return ("127.0.0.1", server.port)


def unix_target(server: NbsServer) -> Target:
    return next(u for u in server.uris if u.startswith("nbd+unix")).split("socket=", 1)[1]


def connect(uri: str) -> libnbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def pending_after(h: libnbd.NBD, cookie: int, seconds: float) -> bool:
    """Poll libnbd for ``seconds``: True if the command is still not completed (the client
    gives up there, as a client-side timeout would)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        h.poll(50)
        if h.aio_command_completed(cookie):
            return False
    return True


def complete(h: libnbd.NBD, cookies: list[int]) -> None:
    """Wait for every command; raises the first one's error."""
    while h.aio_in_flight():
        h.poll(-1)
    for cookie in cookies:
        assert h.aio_command_completed(cookie)


@pytest.mark.parametrize("target", [tcp_target, unix_target], ids=["tcp", "unix"])
def test_bytes_pass_both_ways(
    server: NbsServer, fault_proxy: ProxyFactory, target: Callable[[NbsServer], Target]
) -> None:
    proxy = fault_proxy(target(server))
    data = random.Random(1).randbytes(MiB)
    h = connect(proxy.uri(EXPORT))
    h.pwrite(data, 3 * MiB)
    h.flush()
    assert h.pread(MiB, 3 * MiB) == data
    h.shutdown()
    direct = connect(server.uri(EXPORT))
    assert direct.pread(MiB, 3 * MiB) == data  # it reached the server, not just the proxy
    direct.shutdown()
    wait_until(lambda: proxy.active == 0)
    counters = proxy.counters()
    assert counters.connections == 1
    assert counters.bytes_to_server > MiB
    assert counters.bytes_to_client > MiB


def test_delay_adds_latency_each_way(server: NbsServer, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(tcp_target(server))
    h = connect(proxy.uri(EXPORT))
    proxy.delay(0.1)
    started = time.monotonic()
    h.pread(4096, 0)
    assert time.monotonic() - started >= 0.2  # request and reply are each held 0.1 s
    proxy.heal()
    h.shutdown()


def test_throttle_limits_the_rate(server: NbsServer, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(tcp_target(server))
    h = connect(proxy.uri(EXPORT))
    proxy.throttle(MiB)
    started = time.monotonic()
    h.pwrite(bytes(MiB // 2), 0)
    # 512 KiB at 1 MiB/s: at least 0.5 s less the first slice sent at once (20 ms of rate).
    assert time.monotonic() - started >= 0.45
    proxy.heal()
    h.shutdown()


def test_blackhole_is_silence_until_the_client_gives_up(
    server: NbsServer, fault_proxy: ProxyFactory
) -> None:
    proxy = fault_proxy(tcp_target(server))
    h = connect(proxy.uri(EXPORT))
    h.pread(4096, 0)
    proxy.blackhole()
    before = proxy.counters()
    cookie = h.aio_pread(nbd.Buffer(4096), 0)
    assert pending_after(h, cookie, 1.0)  # no answer, and no error: silence, not a close
    after = proxy.counters()
    assert after.bytes_to_server == before.bytes_to_server  # the server saw nothing
    assert after.bytes_swallowed > 0
    assert proxy.active == 1  # the sockets stay open
    del h  # the client gives up

    proxy.heal()
    h = connect(proxy.uri(EXPORT))  # a new connection passes again
    assert h.pread(4096, 0) == bytes(4096)
    h.shutdown()


def test_a_blackholed_connection_stays_dead_after_heal(
    server: NbsServer, fault_proxy: ProxyFactory
) -> None:
    proxy = fault_proxy(tcp_target(server))
    h = connect(proxy.uri(EXPORT))
    proxy.blackhole()
    proxy.heal()
    cookie = h.aio_pread(nbd.Buffer(4096), 0)
    assert pending_after(h, cookie, 0.5)


def test_reset_aborts_current_connections_only(
    server: NbsServer, fault_proxy: ProxyFactory
) -> None:
    proxy = fault_proxy(tcp_target(server))
    h = connect(proxy.uri(EXPORT))
    h.pread(4096, 0)
    raw = socket.create_connection(("127.0.0.1", proxy.port))
    greeting = raw.recv(18, socket.MSG_WAITALL)  # newstyle: NBDMAGIC IHAVEOPT flags
    assert greeting.startswith(b"NBDMAGIC")  # connected through to the server
    proxy.reset()
    with pytest.raises(nbd.Error):
        h.pread(4096, 0)
    with raw, pytest.raises(ConnectionResetError):  # an RST, not an orderly close (b"")
        raw.recv(4096)
    assert proxy.counters().resets == 2
    again = connect(proxy.uri(EXPORT))
    assert again.pread(4096, 0) == bytes(4096)
    again.shutdown()


def test_refuse_closes_new_connections(server: NbsServer, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(tcp_target(server))
    proxy.refuse()
    with pytest.raises(nbd.Error) as error:
        connect(proxy.uri(EXPORT))
    assert error.value.errno == "ECONNRESET"
    assert proxy.counters().refused == 1
    proxy.heal()
    h = connect(proxy.uri(EXPORT))
    h.pread(4096, 0)
    h.shutdown()


def test_only_loopback_targets() -> None:
    with pytest.raises(AssertionError, match="loopback"):
        FaultProxy(("192.0.2.1", 10809))


def test_faults_keep_bytes_in_order(server: NbsServer, fault_proxy: ProxyFactory) -> None:
    """Pipelined requests under delay and throttle: every byte arrives, in order."""
    proxy = fault_proxy(tcp_target(server))
    h = connect(proxy.uri(EXPORT))
    proxy.delay(0.005)
    proxy.throttle(8 * MiB)
    data = random.Random(3).randbytes(2 * MiB)
    step = 64 << 10
    writes = [h.aio_pwrite(data[off : off + step], off) for off in range(0, len(data), step)]
    complete(h, writes)  # NBD may reorder requests in flight: read only once all are written
    buffers = [nbd.Buffer(step) for _ in range(0, len(data), step)]
    complete(h, [h.aio_pread(b, i * step) for i, b in enumerate(buffers)])
    assert b"".join(b.to_bytearray() for b in buffers) == data
    proxy.heal()
    h.shutdown()


def test_a_killed_node_keeps_its_bytes_and_ports(
    storage_nodes: Callable[[int], list[StorageNode]], fault_proxy: ProxyFactory
) -> None:
    (node,) = storage_nodes(1)
    link = fault_proxy(("127.0.0.1", node.nbd_port))
    node.create_volume("vol", 8 * MiB)
    data = random.Random(2).randbytes(2 * MiB)
    h = connect(node.uri("vol"))
    h.pwrite(data, MiB)
    h.flush()
    h.shutdown()
    expected = bytes(MiB) + data + bytes(5 * MiB)
    ports = (node.nbd_port, node.api_port)

    node.kill()
    with pytest.raises(nbd.Error):
        connect(link.uri("vol"))  # nothing listens behind the proxy: the client is reset
    assert node.volume_bytes("vol") == expected  # from the data directory
    node.restart()
    assert (node.nbd_port, node.api_port) == ports
    assert node.volume_bytes("vol") == expected  # through NBD, at the same address
    h = connect(link.uri("vol"))  # the same proxy reaches it again
    assert h.pread(2 * MiB, MiB) == data
    h.shutdown()
    with node.api() as api:
        assert api.info("vol").size == 8 * MiB


def test_a_stopped_node_answers_after_cont(
    storage_nodes: Callable[[int], list[StorageNode]],
) -> None:
    (node,) = storage_nodes(1)
    node.create_volume("vol", MiB)
    h = connect(node.uri("vol"))
    node.stop()
    cookie = h.aio_pread(nbd.Buffer(4096), 0)
    assert pending_after(h, cookie, 0.5)  # frozen: connected, silent
    node.cont()
    while not h.aio_command_completed(cookie):
        h.poll(-1)
    h.shutdown()


def test_a_node_whose_port_was_taken_starts_on_new_ports(tmp_path: Path) -> None:
    node = StorageNode("node", tmp_path / "node")
    with socket.create_server(("127.0.0.1", node.nbd_port)) as taken:
        try:
            node.start()
            assert node.alive()
            assert node.nbd_port != taken.getsockname()[1]
        finally:
            node.terminate()
