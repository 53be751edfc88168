"""The engine behind this project's NBD server: which thread runs a request
(docs/decisions/0131).  A client at queue depth 1 of a healthy volume (two requests in a
row that found nothing else in flight) is served on its session's thread; a degraded
volume's requests, and a pipelined client's, go to the server's workers, so a write waiting
for ``min_insync`` never holds back the reads sent after it on the same connection."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from backend.nbd import constants as c
from backend.replication.policy import ReplicationPolicy
from backend.server.exports import Export
from backend.storage import Storage
from backend.storage.layers.forwarding import ForwardingStorage
from tests.unit.nbd.helpers import request
from tests.unit.replication.replicas import KIB, Engine, Volume
from tests.unit.server.clients import Client, in_process_servers, port_of


class _Threads(ForwardingStorage):
    """The engine, noting the thread each write and read runs on."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner, owns_inner=False)
        self.threads: list[str] = []

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self.threads.append(threading.current_thread().name)
        super().write(offset, data, fua)

    def read(self, offset: int, length: int) -> bytes:
        self.threads.append(threading.current_thread().name)
        return super().read(offset, length)


def _write(cookie: int, offset: int, byte: int) -> bytes:
    return request(c.Cmd.WRITE, cookie, offset, 4 * KIB) + bytes([byte]) * (4 * KIB)


def test_queue_depth_one_runs_on_the_session_thread_of_a_healthy_volume(
    open_engine: Callable[..., Engine],
) -> None:
    engine = open_engine()
    served = _Threads(engine)
    with in_process_servers() as serve:
        client = Client(port_of(serve(Export("vol", served))), "vol")
        try:
            for cookie in range(1, 6):
                client.send(_write(cookie, cookie * 4 * KIB, cookie))
                assert client.reply() == (cookie, 0, b"")
            client.send(request(c.Cmd.READ, 9, 8 * KIB, 4 * KIB))
            assert client.reply() == (9, 0, bytes([2]) * (4 * KIB))
        finally:
            client.close()
    # The first found nothing in flight once: a worker's.  From the second on, two in a row.
    assert len(served.threads) == 6
    assert served.threads[0].startswith("nbs-io")
    assert not any(t.startswith("nbs-io") for t in served.threads[1:])


def test_pipelined_requests_go_to_the_workers(open_engine: Callable[..., Engine]) -> None:
    engine = open_engine()
    served = _Threads(engine)
    with in_process_servers() as serve:
        client = Client(port_of(serve(Export("vol", served))), "vol")
        try:
            client.send(b"".join(_write(cookie, cookie * 4 * KIB, cookie) for cookie in range(8)))
            assert sorted(client.reply() for _ in range(8)) == [(n, 0, b"") for n in range(8)]
        finally:
            client.close()
    # The first may run on the session's thread (nothing was in flight yet); not the rest.
    assert sum(t.startswith("nbs-io") for t in served.threads) >= 7


def test_a_write_waiting_below_min_insync_holds_back_no_read_on_its_connection(
    volume: Volume, open_engine: Callable[..., Engine]
) -> None:
    engine = open_engine(ReplicationPolicy(min_insync=2, child_timeout=2.0, below_min_wait=30))
    served = _Threads(engine)
    with in_process_servers() as serve:
        client = Client(port_of(serve(Export("vol", served))), "vol")
        try:
            client.send(_write(5, 8 * KIB, 5))  # the next one is the second in a row: inline
            assert client.reply() == (5, 0, b"")
            for member in ("r1", "r2"):
                volume.replicas.faults[member].set("error", kinds={"write"})
            # Fails r1 and r2 (one in sync left, below min_insync 2), then waits for one back.
            client.send(_write(1, 0, 0x41))
            client.sock.settimeout(0.5)
            try:
                early = client.reply()
            except TimeoutError:
                early = None
            assert early is None, "the write did not wait below min_insync"
            client.sock.settimeout(10)
            # Degraded now: this read, on the same connection, is answered at once.
            client.send(request(c.Cmd.READ, 2, 64 * KIB, 4 * KIB))
            assert client.reply() == (2, 0, bytes(4 * KIB))
            # r1 back and resynced: the waiting write completes.
            volume.replicas.faults["r1"].clear()
            engine.resync("r1")
            assert client.reply() == (1, 0, b"")
        finally:
            client.close()
    assert not served.threads[1].startswith("nbs-io")  # the waiting write started inline
    assert volume.replicas.image("r0")[: 4 * KIB] == b"\x41" * (4 * KIB)
    assert volume.replicas.image("r1")[: 4 * KIB] == b"\x41" * (4 * KIB)


@pytest.mark.parametrize("kind", ["write", "flush"])
def test_a_request_late_on_a_member_holds_back_no_read_on_its_connection(
    volume: Volume, open_engine: Callable[..., Engine], kind: str
) -> None:
    engine = open_engine()  # child_timeout 2 s
    served = _Threads(engine)
    with in_process_servers() as serve:
        client = Client(port_of(serve(Export("vol", served))), "vol")
        try:
            for cookie in (1, 2):  # queue depth 1: the second runs on the session's thread
                client.send(_write(cookie, cookie * 4 * KIB, cookie))
                assert client.reply() == (cookie, 0, b"")
            volume.replicas.faults["r2"].set("hang", kinds={kind})
            # Starts on the session's thread; r2 never answers.
            client.send(_write(3, 0, 0x43) if kind == "write" else request(c.Cmd.FLUSH, 3))
            client.send(request(c.Cmd.READ, 4, 8 * KIB, 4 * KIB))
            # The request went on on a worker: the read behind it is answered first.
            assert client.reply() == (4, 0, bytes([2]) * (4 * KIB))
            assert client.reply() == (3, 0, b"")  # after child_timeout, without r2
        finally:
            client.close()
    assert engine.membership.state("r2") == "out"
    if kind == "write":
        assert not served.threads[2].startswith("nbs-io")
        for member in ("r0", "r1"):
            assert volume.replicas.image(member)[: 4 * KIB] == b"\x43" * (4 * KIB)
