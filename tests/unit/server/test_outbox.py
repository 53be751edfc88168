"""The outbox: a worker's reply never waits for the client to read (issue 10, item 10)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from backend.server.outbox import Outbox

MiB = 1 << 20


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "closed early"
        data += chunk
    return bytes(data)


def in_thread(target: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_post_returns_while_the_peer_reads_nothing(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    outbox = Outbox(server, budget=64 * MiB)
    first = bytes([1]) * (8 * MiB)  # far more than a socket buffer holds
    second = bytes([2]) * MiB

    def post_both() -> None:
        outbox.post([first], 8 * MiB)
        outbox.post([second], MiB)

    poster = in_thread(post_both)
    poster.join(10)
    assert not poster.is_alive(), "a worker blocked on a client that does not read"
    assert recv_exact(client, 9 * MiB) == first + second  # whole replies, in order
    outbox.close()


def test_connection_thread_sends_after_what_workers_queued(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    outbox = Outbox(server, budget=64 * MiB)
    outbox.post([b"a" * (4 * MiB)], 0)
    sender = in_thread(lambda: outbox.send([b"b" * 100, b"c" * 100]))
    assert recv_exact(client, 4 * MiB + 200) == b"a" * (4 * MiB) + b"b" * 100 + b"c" * 100
    sender.join(10)
    outbox.close()


def test_reserve_waits_while_the_budget_is_spent(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    outbox = Outbox(server, budget=2 * MiB)
    outbox.reserve(2 * MiB)
    reserved = threading.Event()

    def reserve_then_say_so() -> None:
        outbox.reserve(MiB)
        reserved.set()

    waiter = in_thread(reserve_then_say_so)
    assert not reserved.wait(0.2)  # over budget: the connection thread reads no more
    outbox.post([b"x" * (2 * MiB)], 2 * MiB)
    recv_exact(client, 2 * MiB)  # once the reply is on the wire, the budget is free again
    assert reserved.wait(10)
    waiter.join(10)
    outbox.close()


def test_a_failed_link_releases_waiters_and_drops_replies(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    outbox = Outbox(server, budget=MiB)
    outbox.reserve(MiB)
    outbox.post([b"y" * (16 * MiB)], MiB)
    client.close()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        outbox.reserve(MiB)  # the writer failed: no waiting forever
    outbox.post([b"z"], 0)  # dropped, no error in a worker
    outbox.close()


def test_close_cuts_a_client_that_never_reads(pair: tuple[socket.socket, socket.socket]) -> None:
    server, _client = pair
    outbox = Outbox(server, budget=64 * MiB)
    outbox.post([b"w" * (16 * MiB)], 0)  # far more than the socket buffers hold
    closer = in_thread(lambda: outbox.close(timeout=0.5))
    closer.join(10)
    assert not closer.is_alive(), "close() waited forever for a client that does not read"
    with pytest.raises(TimeoutError):
        outbox.send([b"late"])


def test_close_waits_until_the_client_took_the_last_replies() -> None:
    """A session stopped by the server closes with requests it never read in its socket:
    Linux then resets the connection and drops the unsent rest of its send queue.  close()
    waits until the client's kernel acknowledged every reply, so none is lost."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    with client, server:
        client.sendall(b"a request the server never reads")
        reply = bytes(range(256)) * 1024  # 256 KiB: more than the client's window holds
        outbox = Outbox(server, budget=64 * MiB)
        outbox.post([reply], 0)
        closer = in_thread(lambda: outbox.close(deliver=True))
        # The client reads only after close() was called (and, before the wait existed,
        # had returned: the socket's close below then reset the connection).
        closer.join(0.3)
        received = bytearray()
        reader = in_thread(lambda: received.extend(_read_until_end(client)))
        closer.join(10)
        assert not closer.is_alive()
        server.close()  # unread input: Linux answers with a reset
        reader.join(10)
        assert bytes(received) == reply


def _read_until_end(sock: socket.socket) -> bytes:
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk
