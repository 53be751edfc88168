"""Epoch fences (issue 12): the Fence alone, then real sessions over loopback racing a take."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from backend.nbd import ExportDescription, ExportForbiddenError, ExportUnavailableError
from backend.nbd.constants import Cmd, Error
from backend.server import session
from backend.server.exports import Export
from backend.server.fencing import Fence, Pass
from backend.server.server import Server, TCPAddress
from backend.storage import Capabilities, MemoryStorage
from tests.unit.nbd.helpers import request
from tests.unit.server.clients import Client, port_of

SIZE = 1 << 20


class Promises:
    """An in-memory ``promise`` callback that records what the fence showed when called."""

    def __init__(self) -> None:
        self.fence: Fence | None = None
        self.seen: list[tuple[int, int]] = []  # (epoch promised, fence.epoch at the time)
        self.fail = False

    def __call__(self, epoch: int) -> bool:
        assert self.fence is not None
        self.seen.append((epoch, self.fence.epoch))
        return not self.fail


def fence(epoch: int = 0) -> tuple[Fence, Promises]:
    promises = Promises()
    made = Fence("v", epoch, promises)
    promises.fence = made
    return made, promises


def test_a_higher_epoch_is_persisted_before_it_is_published() -> None:
    f, promises = fence()
    f.take(3, lambda: None)
    assert promises.seen == [(3, 0)]  # persisted while sessions still saw epoch 0
    assert f.epoch == 3
    f.take(3, lambda: None)  # the same epoch: admitted, nothing to persist
    assert promises.seen == [(3, 0)]


def test_an_older_epoch_is_refused_naming_both() -> None:
    f, _ = fence(5)
    with pytest.raises(ExportForbiddenError, match="promised epoch 5: epoch 4 is fenced out"):
        f.take(4, lambda: None)
    with pytest.raises(ExportForbiddenError):
        f.check(1)
    f.check(5)


def test_an_epoch_that_cannot_be_persisted_is_not_taken() -> None:
    f, promises = fence(1)
    promises.fail = True
    with pytest.raises(ExportUnavailableError, match="could not promise epoch 2"):
        f.take(2, lambda: None)
    assert f.epoch == 1


def test_a_take_drains_older_passes_then_revokes_them() -> None:
    f, _ = fence()
    revoked: list[str] = []
    old = f.take(1, lambda: revoked.append("old"))
    same = f.take(1, lambda: revoked.append("same"))
    old.inflight.append(None)  # a request of the old pass, past its epoch check, running
    taken: list[Pass] = []
    taker = threading.Thread(target=lambda: taken.append(f.take(2, lambda: None)))
    taker.start()
    time.sleep(0.2)
    assert taker.is_alive()
    assert revoked == []
    assert f.epoch == 2  # but already published: no new request of epoch 1 starts
    assert not old.current()
    assert not same.current()
    old.inflight.pop()
    taker.join(10)
    assert sorted(revoked) == ["old", "same"]
    assert taken[0].current()


def test_plain_writers_hold_epoch_zero_and_lose_it_to_the_first_engine() -> None:
    f, _ = fence()
    revoked: list[bool] = []
    plain = f.plain(lambda: revoked.append(True))
    assert plain is not None
    assert plain.current()
    f.take(1, lambda: None)
    assert revoked == [True]
    assert not plain.current()
    assert f.plain(lambda: None) is None  # from now on plain clients read only


# --- the race, through real sessions ------------------------------------------------------


class LoggedStorage(MemoryStorage):
    """Records every write it executes, in one log with the fence's take marker."""

    def __init__(self, log: list[object], inline: bool, size: int = SIZE) -> None:
        super().__init__(size)
        self.log = log
        self._inline = inline

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(super().capabilities, inline=self._inline)

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        time.sleep(0.0002)  # keep requests in flight while the epoch moves
        self.log.append(bytes(data[:1]))
        super().write(offset, data, fua)


class MarkingFence(Fence):
    """A fence that writes "taken N" into the storage's log when a take returns."""

    def __init__(self, log: list[object]) -> None:
        super().__init__("disk", 0, lambda epoch: True)
        self.log = log

    def take(self, epoch: int, on_revoked: Callable[[], None]) -> Pass:
        admitted = super().take(epoch, on_revoked)
        self.log.append(f"taken {epoch}")
        return admitted


class FencedTable:
    """``disk;epoch=N`` → the one export at epoch N (what VolumeExports does for volumes)."""

    def __init__(self, storage: MemoryStorage, fence: Fence) -> None:
        self.export = Export("disk", storage, fence=fence)

    def get(self, name: str) -> Export | None:
        match = re.fullmatch(r"disk;epoch=(\d+)", name)
        return dataclasses.replace(self.export, epoch=int(match[1])) if match else None

    def exports(self) -> list[ExportDescription]:
        return []

    def close(self) -> bool:
        return True


StartServer = Callable[..., Server]
"""``start(inline, size=SIZE)``: a server of one fenced export over a LoggedStorage."""


@pytest.fixture
def fenced_server() -> Iterator[tuple[StartServer, list[object]]]:
    log: list[object] = []
    servers: list[Server] = []

    def start(inline: bool, size: int = SIZE) -> Server:
        table = FencedTable(LoggedStorage(log, inline, size), MarkingFence(log))
        server = Server(table, tcp=[TCPAddress("127.0.0.1", 0)])
        server.bind()
        server.start()
        servers.append(server)
        return server

    yield start, log
    for server in servers:
        server.shutdown(grace=5)


def _hammer(port: int, marker: bytes, replies: list[int], ready: threading.Event) -> None:
    """Write ``marker`` blocks at epoch 1, 8 in flight at a time, until refused or cut."""
    client = Client(port, "disk;epoch=1")
    ready.set()
    cookie = 0
    try:
        while True:
            batch = b"".join(
                request(Cmd.WRITE, cookie + i, 4096 * ((cookie + i) % 64), 512) + marker * 512
                for i in range(8)
            )
            client.send(batch)
            cookie += 8
            for _ in range(8):
                replies.append(client.reply()[1])
            if replies[-1] == Error.EPERM:
                return
    except (EOFError, OSError):
        return
    finally:
        client.close()


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "pool"])
def test_no_request_of_the_old_epoch_runs_after_the_take_returned(
    fenced_server: tuple[StartServer, list[object]], inline: bool
) -> None:
    start, log = fenced_server
    server = start(inline)
    port = port_of(server)
    replies: list[list[int]] = [[] for _ in range(4)]
    ready = [threading.Event() for _ in range(4)]
    writers = [
        threading.Thread(target=_hammer, args=(port, bytes([0x10 + n]), replies[n], ready[n]))
        for n in range(4)
    ]
    for writer in writers:
        writer.start()
    for event in ready:
        assert event.wait(10)
    time.sleep(0.2)  # all four are writing
    engine = Client(port, "disk;epoch=2")  # returns once the take has returned
    engine.send(request(Cmd.WRITE, 1, 0, 512) + b"\x22" * 512)
    assert engine.reply() == (1, 0, b"")
    assert server.holders.of("disk")[-1].epoch == 2
    for writer in writers:
        writer.join(30)
        assert not writer.is_alive()
    engine.close()

    taken = log.index("taken 2")
    assert all(entry != b"\x22" for entry in log[:taken])
    late = [entry for entry in log[taken + 1 :] if entry != b"\x22"]
    assert late == []  # nothing of epoch 1 ran once the take returned
    for got in replies:
        assert got.count(0) >= 1  # each wrote before the take


def _replies_until_closed(client: Client) -> None:
    while True:
        client.reply()


def test_a_fenced_out_session_answers_eperm_then_closes(
    fenced_server: tuple[StartServer, list[object]],
) -> None:
    start, _ = fenced_server
    server = start(True)
    old = Client(port_of(server), "disk;epoch=1")
    old.send(request(Cmd.WRITE, 1, 0, 4) + b"old1")
    assert old.reply() == (1, 0, b"")
    new = Client(port_of(server), "disk;epoch=2")
    old.send(request(Cmd.WRITE, 2, 0, 4) + b"old2" + request(Cmd.READ, 3, 0, 4))
    assert old.reply() == (2, Error.EPERM, b"")
    with pytest.raises(EOFError):  # the session ends after answering what it had
        _replies_until_closed(old)
    new.send(request(Cmd.READ, 4, 0, 4))
    assert new.reply() == (4, 0, b"old1")
    old.close()
    new.close()


def test_long_requests_of_a_fenced_out_session_never_touch_the_storage(
    fenced_server: tuple[StartServer, list[object]],
) -> None:
    # Requests over PAYLOAD_PIECE stream through the connection thread piece by piece.
    start, log = fenced_server
    server = start(True, 16 << 20)
    with contextlib.ExitStack() as stack:
        old = Client(port_of(server), "disk;epoch=1")
        stack.callback(old.close)
        new = Client(port_of(server), "disk;epoch=2")
        stack.callback(new.close)
        written = len(log)
        # A small send buffer keeps the client sending while the server meets the fence:
        # the session must read the rest of the payload, not close on it (a reset would
        # fail this send and drop the reply).
        old.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        old.send(request(Cmd.WRITE, 1, 0, 6 << 20) + b"\x11" * (6 << 20))
        assert old.reply() == (1, Error.EPERM, b"")
        with pytest.raises(EOFError):  # then the session ends
            old.reply()
        assert len(log) == written  # not one piece was written
        new.send(request(Cmd.READ, 2, 0, 4))
        assert new.reply() == (2, 0, bytes(4))


def test_a_silent_fenced_out_session_is_closed_after_the_grace(
    fenced_server: tuple[StartServer, list[object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session, "REVOKED_GRACE", 0.2)
    start, _ = fenced_server
    server = start(True)
    old = Client(port_of(server), "disk;epoch=1")
    new = Client(port_of(server), "disk;epoch=2")
    old.sock.settimeout(10)
    with pytest.raises(EOFError):  # closed without the client sending anything
        old.reply()
    new.close()
    old.close()
