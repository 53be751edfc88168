"""The server over real loopback sockets, in process, with a raw-socket client."""

from __future__ import annotations

import dataclasses
import errno
import gc
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import pytest

from backend.nbd import constants as c
from backend.nbd.constants import Cmd, Error
from backend.server.exports import Export, ExportTable
from backend.server.server import Server, TCPAddress
from backend.storage import Capabilities, MemoryStorage, StorageError
from tests.unit.nbd.helpers import request
from tests.unit.server.clients import (
    Client,
    FailingStorage,
    GatedStorage,
    in_process_servers,
    port_of,
)

SIZE = 1 << 20


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    with in_process_servers() as start:
        yield start


def test_replies_leave_out_of_order_when_storage_completes_out_of_order(
    serve: Callable[..., Server],
) -> None:
    storage = GatedStorage(SIZE)
    storage.write(4096, b"second")
    server = serve(Export("disk", storage))
    client = Client(port_of(server), "disk")
    client.send(request(Cmd.READ, 1, 0, 512) + request(Cmd.READ, 2, 4096, 6))
    assert client.reply() == (2, 0, b"second")
    assert client.reply() == (1, 0, bytes(512))
    client.close()


@pytest.mark.parametrize(
    ("code", "wire"),
    [
        (errno.ENOSPC, Error.ENOSPC),
        (errno.EDQUOT, Error.ENOSPC),
        (errno.EFBIG, Error.ENOSPC),
        (errno.EIO, Error.EIO),
        (errno.EPERM, Error.EPERM),
        (errno.EROFS, Error.EPERM),
        (errno.ENOTSUP, Error.ENOTSUP),
        (errno.ESTALE, Error.EIO),  # anything the spec has no code for
    ],
)
def test_storage_errors_reach_the_client_as_nbd_errors(
    serve: Callable[..., Server], code: int, wire: int
) -> None:
    server = serve(Export("disk", FailingStorage(SIZE)))
    client = Client(port_of(server), "disk")
    client.send(request(Cmd.WRITE, 7, 0, 1) + bytes([code]))
    assert client.reply() == (7, wire, b"")
    client.send(request(Cmd.READ, 8, 0, 4))  # and the connection keeps serving
    assert client.reply() == (8, 0, bytes(4))
    client.close()


def test_shutdown_answers_parsed_requests_and_flushes(serve: Callable[..., Server]) -> None:
    flushed = threading.Event()

    class Recording(MemoryStorage):
        def flush(self) -> None:
            flushed.set()

    server = serve(Export("disk", Recording(SIZE)))
    client = Client(port_of(server), "disk")
    client.send(request(Cmd.WRITE, 1, 0, 5) + b"hello")
    assert client.reply() == (1, 0, b"")
    assert server.shutdown(grace=5)
    assert flushed.is_set()
    assert client.sock.recv(1) == b""  # the server closed its end
    client.close()


def test_connections_are_counted_per_export(serve: Callable[..., Server]) -> None:
    server = serve(Export("a", MemoryStorage(SIZE)), Export("b", MemoryStorage(SIZE)))
    clients = [Client(port_of(server), "a"), Client(port_of(server), "a")]
    clients.append(Client(port_of(server), "b"))
    assert server.holders.counts() == {"a": 2, "b": 1}
    for client in clients:
        client.send(request(Cmd.DISC))
        client.close()


def test_finished_session_is_freed_without_the_cycle_collector(
    serve: Callable[..., Server],
) -> None:
    # A session holds payload buffers (MiBs); a reference cycle would keep them until the
    # cycle collector runs, which under load is how RSS grew by hundreds of MiB.
    server = serve(Export("disk", MemoryStorage(8 << 20)))
    gc.collect()
    gc.disable()
    try:
        client = Client(port_of(server), "disk")
        for cookie in range(3):  # large writes: pooled, their buffers recycled
            client.send(request(Cmd.WRITE, cookie, 0, 1 << 20) + bytes(1 << 20))
            assert client.reply() == (cookie, 0, b"")
        client.send(request(Cmd.WRITE, 3, 0, 6 << 20) + bytes(6 << 20))  # in pieces
        assert client.reply() == (3, 0, b"")
        with server._lock:
            session = weakref.ref(next(iter(server._sessions)))
        client.close()
        deadline = time.monotonic() + 10
        while server.session_count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not server.session_count
        time.sleep(0.1)  # the session thread returns from run()
        assert session() is None, gc.get_referrers(session())
    finally:
        gc.enable()


class LateFailingStorage(MemoryStorage):
    """Reads fail from 4 MiB on; no cheap extents, so every byte is read."""

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(super().capabilities, cheap_extents=False)

    def read(self, offset: int, length: int) -> bytes:
        if offset + length > 4 << 20:
            raise StorageError(errno.EIO, "injected failure")
        return super().read(offset, length)


def test_long_read_failing_midway_ends_with_an_error_chunk(serve: Callable[..., Server]) -> None:
    server = serve(Export("disk", LateFailingStorage(16 << 20)))
    client = Client(port_of(server), "disk")
    client.send(request(Cmd.READ, 9, 0, 8 << 20))
    flags, kind, cookie, body = client.chunk()
    assert (flags, kind, cookie, len(body)) == (0, c.ReplyType.OFFSET_DATA, 9, 8 + (4 << 20))
    flags, kind, cookie, body = client.chunk()
    assert (flags, kind, cookie) == (c.ReplyFlag.DONE, c.ReplyType.ERROR, 9)
    assert struct.unpack_from(">I", body)[0] == Error.EIO
    client.send(request(Cmd.READ, 10, 0, 4))  # and the connection keeps serving
    assert client.reply() == (10, 0, bytes(4))
    client.close()


def test_long_simple_read_failing_midway_cuts_the_connection(serve: Callable[..., Server]) -> None:
    server = serve(Export("disk", LateFailingStorage(16 << 20)))
    client = Client(port_of(server), "disk", structured=False)
    client.send(request(Cmd.READ, 9, 0, 8 << 20))
    assert client.reply() == (9, 0, b"")  # the header went out with the first piece
    assert client._recv_exact(4 << 20) == bytes(4 << 20)
    assert client.sock.recv(1) == b""  # no way to report the error: the server hangs up
    client.close()


class _CountingTable(ExportTable):
    """The real table, recording each name looked up."""

    def __init__(self, exports: list[Export]) -> None:
        super().__init__(exports)
        self.looked_up: list[str] = []

    def get(self, name: str) -> Export | None:
        self.looked_up.append(name)
        return super().get(name)


def test_go_looks_the_export_up_once_and_serves_what_holders_admitted() -> None:
    # Issue 11 item 3: the session answers the core's ExportRequested from one lookup and
    # keeps that export (and its holder slot) for transmission.
    table = _CountingTable([Export("disk", MemoryStorage(SIZE), exclusive=True)])
    server = Server(table, tcp=[TCPAddress("127.0.0.1", 0)])
    server.bind()
    server.start()
    try:
        first = Client(port_of(server), "disk")
        second = Client(port_of(server), "disk")  # the one-writer rule serves it read-only
        assert table.looked_up == ["disk", "disk"]
        first.send(request(Cmd.WRITE, 1, 0, 4) + b"data")
        assert first.reply() == (1, 0, b"")
        second.send(request(Cmd.WRITE, 2, 0, 4) + b"data")
        assert second.reply() == (2, Error.EPERM, b"")
        assert server.holders.counts() == {"disk": 2}
        for client in (first, second):
            client.send(request(Cmd.DISC))
            client.close()
    finally:
        server.shutdown(grace=5)
