"""NbdStorage over loopback against this project's server (in process, MemoryStorage behind
it): the storage conformance suite and the model test, errors from the remote, pipelining
from many threads, reconnection.  Against nbdkit, TLS, Unix sockets and kill -9:
tests/integration/test_nbd_storage.py."""

from __future__ import annotations

import dataclasses
import errno
import threading
from collections.abc import Callable, Iterator
from typing import cast

import pytest

from backend.server.exports import Export
from backend.server.server import Server
from backend.storage import MemoryStorage, StorageError
from backend.storage.base import Capabilities, Request, RequestLostError
from backend.storage.nbd import NbdStorage, NbdTarget, _Link, _LinkDownError
from tests.unit.server.clients import FailingStorage, GatedStorage, in_process_servers, port_of
from tests.unit.storage.conformance import *  # noqa: F403
from tests.unit.storage.conformance import StorageFactory, pattern
from tests.unit.storage.model import make_model_test

Serve = Callable[..., Server]


@pytest.fixture
def serve() -> Iterator[Serve]:
    with in_process_servers() as start:
        yield start


def target(server: Server, name: str = "vol") -> NbdTarget:
    return NbdTarget.from_uri(f"nbd://127.0.0.1:{port_of(server)}/{name}")


@pytest.fixture
def storage_factory(serve: Serve) -> StorageFactory:
    def factory(size: int) -> NbdStorage:
        server = serve(Export("vol", MemoryStorage(size)))
        return NbdStorage(target(server), connections=2)

    return factory


@pytest.fixture
def read_only_storage_factory(serve: Serve) -> StorageFactory:
    def factory(size: int) -> NbdStorage:
        server = serve(Export("vol", MemoryStorage(size), read_only=True))
        return NbdStorage(target(server))

    return factory


# The model test is a unittest class, built before any fixture runs: its factory finds the
# server starter through this holder, filled by the fixture the class uses.
_model_serve: list[Serve] = []


@pytest.fixture
def model_serve(serve: Serve) -> Iterator[None]:
    _model_serve.append(serve)
    yield
    _model_serve.clear()


def _model_storage(size: int) -> NbdStorage:
    server = _model_serve[0](Export("vol", MemoryStorage(size)))
    return NbdStorage(target(server), connections=2)


TestNbdModel = pytest.mark.usefixtures("model_serve")(
    make_model_test(_model_storage, max_examples=30)
)


def test_capabilities_follow_the_export(serve: Serve) -> None:
    server = serve(Export("vol", MemoryStorage(1 << 20), min_block=512))
    storage = NbdStorage(target(server))
    try:
        caps = storage.capabilities
        assert (caps.min_block, caps.preferred_block) == (512, 4096)
        assert (caps.can_flush, caps.can_fua, caps.can_zero, caps.can_extents) == (True,) * 4
        assert (caps.can_multi_conn, caps.thread_safe, caps.inline) == (True, True, False)
        assert not caps.read_only
    finally:
        storage.close()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EPERM, errno.EINVAL])
def test_remote_errors_keep_their_errno(serve: Serve, code: int) -> None:
    server = serve(Export("vol", FailingStorage(1 << 20)))
    storage = NbdStorage(target(server))
    try:
        with pytest.raises(StorageError) as excinfo:
            storage.write(0, bytes([code]) + b"rest")
        assert excinfo.value.errno == code
        assert storage.read(0, 4) == bytes(4)  # the connection is still good
    finally:
        storage.close()


def test_unknown_export_fails_at_open(serve: Serve) -> None:
    server = serve(Export("vol", MemoryStorage(4096)))
    with pytest.raises(StorageError, match="GO refused"):
        NbdStorage(target(server, "missing"))


def test_nobody_listening_fails_at_open(serve: Serve) -> None:
    server = serve(Export("vol", MemoryStorage(4096)))
    address = target(server)
    server.shutdown(grace=1)
    with pytest.raises(StorageError) as excinfo:
        NbdStorage(address)
    assert excinfo.value.errno == errno.ECONNREFUSED


def test_replies_out_of_order_reach_their_callers(serve: Serve) -> None:
    remote = GatedStorage(1 << 20)  # a read at 0 waits until a read elsewhere is done
    remote.write(0, b"first")
    remote.write(8192, b"second")
    server = serve(Export("vol", remote))
    storage = NbdStorage(target(server))
    try:
        got: dict[int, bytes] = {}
        slow = threading.Thread(target=lambda: got.__setitem__(0, storage.read(0, 5)))
        slow.start()
        got[8192] = storage.read(8192, 6)
        slow.join(10)
        assert got == {0: b"first", 8192: b"second"}
    finally:
        storage.close()


def test_sixteen_threads_pipeline_on_one_connection(serve: Serve) -> None:
    server = serve(Export("vol", MemoryStorage(16 << 20)))
    storage = NbdStorage(target(server))
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for round_ in range(40):
                offset = (index * 40 + round_) * 16384
                data = pattern(index * 1000 + round_, 16384)
                storage.write(offset, data)
                assert storage.read(offset, 16384) == data
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    storage.close()
    assert not errors, errors[0]


def test_requests_longer_than_the_max_block_are_split(serve: Serve) -> None:
    server_max = 4 << 20  # the smallest the server allows (its payload piece)
    server = serve(Export("vol", MemoryStorage(16 << 20)), max_request=server_max)
    storage = NbdStorage(target(server))
    try:
        assert storage.capabilities.max_block == server_max
        data = pattern(3, 3 * server_max + 5)
        storage.write(7, data)
        assert storage.read(7, len(data)) == data
    finally:
        storage.close()


def test_reconnects_after_the_server_restarts(serve: Serve) -> None:
    first = serve(Export("vol", MemoryStorage(1 << 20)))
    port = port_of(first)
    storage = NbdStorage(target(first), reconnect_deadline=30)
    second = MemoryStorage(1 << 20)  # the restarted server's (a shut-down server closes its own)
    try:
        storage.write(0, b"before")
        first.shutdown(grace=1)
        timer = threading.Timer(0.5, lambda: serve(Export("vol", second), port=port))
        timer.start()
        storage.write(4096, b"after")  # waits for the restart, then goes through
        timer.join()
        assert storage.connected
        assert second.read(4096, 5) == b"after"
        assert storage.read(4096, 5) == b"after"
    finally:
        storage.close()


def test_without_a_deadline_a_drop_fails_at_once(serve: Serve) -> None:
    server = serve(Export("vol", MemoryStorage(1 << 20)))
    storage = NbdStorage(target(server), reconnect_deadline=0)
    try:
        server.shutdown(grace=1)
        with pytest.raises(StorageError) as excinfo:
            storage.read(0, 1)
        assert excinfo.value.errno in (errno.ECONNRESET, errno.ESHUTDOWN)
        assert not storage.connected
    finally:
        storage.close()


def test_uri_parsing() -> None:
    parse = NbdTarget.from_uri
    assert parse("nbd://h:123/v") == NbdTarget(export="v", host="h", port=123)
    assert parse("nbd://h") == NbdTarget(host="h")
    assert parse("nbds://h/v?tls-certificates=/pki&tls-hostname=x") == NbdTarget(
        export="v", host="h", tls=True, tls_certificates="/pki", tls_hostname="x"
    )
    unix = parse("nbd+unix:///v?socket=/run/s.sock")
    assert unix == NbdTarget(export="v", socket_path="/run/s.sock")
    assert str(unix) == "nbd+unix:///v?socket=/run/s.sock"
    assert str(parse("nbd://h/a%20b")) == "nbd://h:10809/a%20b"
    for bad in (
        "http://h/v",
        "nbd+unix:///v",
        "nbd:///v",
        "nbd://h/v?socket=/x",
        "nbd://h:99999/v",
        "nbd://h/v?colour=red",
        "nbds://h/v?tls-verify-peer=maybe",
    ):
        with pytest.raises(ValueError, match=r"scheme|URI|port|query|tls"):
            parse(bad)


def test_a_reply_missing_past_the_request_timeout_kills_the_connection(serve: Serve) -> None:
    remote = GatedStorage(1 << 20)  # a read at 0 waits for the gate
    server = serve(Export("vol", remote))
    storage = NbdStorage(target(server), request_timeout=0.3, reconnect_deadline=0)
    try:
        with pytest.raises(StorageError) as excinfo:
            storage.read(0, 1)
        assert excinfo.value.errno == errno.ETIMEDOUT
        assert "stopped answering" in excinfo.value.message
        assert not storage.connected
    finally:
        remote.gate.set()
        storage.close()


class _HeldWrites(MemoryStorage):
    """Memory storage (on the worker pool) whose writes wait until ``release`` is set."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.release = threading.Event()

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(super().capabilities, inline=False)

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        assert self.release.wait(10), "never released"
        super().write(offset, data, fua)


def test_submit_sends_one_command_and_declines_what_is_not_one(serve: Serve) -> None:
    server = serve(Export("vol", MemoryStorage(16 << 20)), max_request=4 << 20)
    storage = NbdStorage(target(server))
    try:
        assert storage.capabilities.can_submit
        long = pattern(1, storage.capabilities.max_block + 1)
        assert storage.submit(Request("write", 0, len(long), long)) is None  # split by write()
        handles = [
            storage.submit(Request("write", i * 4096, 4096, b"%d" % i * 4096)) for i in (0, 1)
        ]
        assert all(handle is not None and storage.wait(handle, 10) for handle in handles)
        assert storage.read(0, 8192) == b"0" * 4096 + b"1" * 4096
        cast(_Link, storage._links[0]).kill(_LinkDownError("test"))
        assert storage.submit(Request("flush")) is None  # no connection: write() reconnects
    finally:
        storage.close()


def test_wait_gives_up_after_its_timeout_and_the_connection_goes_on(serve: Serve) -> None:
    remote = _HeldWrites(1 << 20)
    server = serve(Export("vol", remote))
    storage = NbdStorage(target(server))
    try:
        handle = storage.submit(Request("write", 0, 5, b"hello"))
        assert handle is not None
        assert storage.wait(handle, 0.2) is False
        remote.release.set()
        storage.write(4096, b"world")
        assert storage.read(0, 5) == b"hello"  # it was done, after the caller gave up
        assert storage.connected
    finally:
        remote.release.set()
        storage.close()


def test_wait_raises_the_remote_errno(serve: Serve) -> None:
    server = serve(Export("vol", FailingStorage(1 << 20)))
    storage = NbdStorage(target(server))
    try:
        handle = storage.submit(Request("write", 0, 1, bytes([errno.ENOSPC])))
        assert handle is not None
        with pytest.raises(StorageError) as excinfo:
            storage.wait(handle, 10)
        assert excinfo.value.errno == errno.ENOSPC
    finally:
        storage.close()


def test_a_request_whose_connection_drops_is_lost_and_can_be_done_again(serve: Serve) -> None:
    remote = _HeldWrites(1 << 20)
    server = serve(Export("vol", remote))
    storage = NbdStorage(target(server), reconnect_deadline=10)
    try:
        request = Request("write", 0, 5, b"again")
        handle = storage.submit(request)
        assert handle is not None
        cast(_Link, storage._links[0]).kill(_LinkDownError("test"))
        with pytest.raises(RequestLostError):
            storage.wait(handle, 10)
        remote.release.set()
        request.apply(storage)  # the blocking call reconnects
        assert storage.read(0, 5) == b"again"
    finally:
        remote.release.set()
        storage.close()


def test_a_reconnection_goes_where_redial_says(serve: Serve) -> None:
    """A storage node whose address a config reload changed: each reconnection asks
    ``redial`` where to go; one that raises fails that attempt like a refused dial."""
    first = serve(Export("vol", MemoryStorage(1 << 20)))
    moved = MemoryStorage(1 << 20)
    second = serve(Export("vol", moved))
    now: list[NbdTarget | None] = [target(first)]
    refused: list[int] = []

    def redial() -> NbdTarget:
        where = now[0]
        if where is None:
            refused.append(1)
            raise StorageError(errno.ENXIO, "no storage node 'n' is configured")
        return where

    storage = NbdStorage(target(first), reconnect_deadline=30, redial=redial)
    try:
        storage.write(0, b"before")
        first.shutdown(grace=1)
        now[0] = None  # the node is not configured for a while, then at its new address
        timer = threading.Timer(0.5, lambda: now.__setitem__(0, target(second)))
        timer.start()
        storage.write(4096, b"after")  # retried until redial names the new address
        timer.join()
        assert refused
        assert moved.read(4096, 5) == b"after"
        assert storage.target == target(second)
    finally:
        storage.close()
