"""One session's replies on their way to its socket, without ever blocking a shared worker.

A client that sends requests but does not read the replies fills its socket buffer; whoever
then calls ``sendmsg`` blocks until the client reads.  Pool workers serve every session, so
they must never be that caller (docs/decisions/0021-replies-never-block-workers.md):

* The connection thread sends with :meth:`Outbox.send` and may block: it is the session's own
  thread, and a blocked connection thread reads no new requests, which is the backpressure a
  slow reader deserves.
* A worker hands its reply to :meth:`Outbox.post`, which sends only what the socket takes at
  once (``MSG_DONTWAIT``) and queues the rest for the session's writer thread, started when
  first needed.  On TLS sockets everything posted goes to the writer thread.
* :meth:`Outbox.reserve` bounds the bytes a session has in flight on the pool or queued here:
  the connection thread waits before handing out more, so memory per session stays bounded
  however many requests a client pipelines.

Exactly one thread at a time holds the turn to write to the socket, so replies never
interleave; the lock guards the queue only and is never held across a socket call.

:meth:`Outbox.close` of a session the server stopped reading (shutdown) also waits (briefly)
until the kernel has delivered what was sent.  Such a session is closed with the client's
unread requests still in its socket; Linux then resets the connection and drops whatever its
send queue still holds, so without the wait the last replies (requests that were executed)
could never reach the client.
"""

from __future__ import annotations

import array
import collections
import contextlib
import fcntl
import logging
import socket
import ssl
import termios
import threading
from collections.abc import Callable, Iterable, Sequence
from time import monotonic, sleep

log = logging.getLogger(__name__)

Buffers = Sequence[bytes | bytearray | memoryview]
MAX_IOV = 512  # buffers per sendmsg, well under every kernel's IOV_MAX (1024 on Linux)
# Seconds close() waits for the kernel to deliver the replies already sent (see above).
DELIVERY_TIMEOUT = 2.0


class Outbox:
    """Writes replies to ``sock``; ``budget``: bytes in flight before :meth:`reserve` waits."""

    def __init__(self, sock: socket.socket, budget: int, peer: str = "") -> None:
        self._sock = sock
        self._budget = budget
        self._peer = peer
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[tuple[Buffers, int]] = collections.deque()
        self._busy = False  # someone holds the turn to write to the socket
        self._owed = 0  # bytes reserved and not yet handed to the socket
        self._error: OSError | None = None
        self._closing = False
        self._writer: threading.Thread | None = None
        self._waiting = 0  # threads in _wait (the writer thread waits apart)

    # ------------------------------------------------------------------ connection thread

    def reserve(self, cost: int) -> None:
        """Wait until ``cost`` more bytes fit in the budget, then count them; release them by
        passing ``cost`` to :meth:`post`.  A request larger than the budget waits for an
        empty session instead.  Raises the socket's error once sending failed."""
        with self._cond:
            self._wait(
                lambda: (
                    self._error is not None or self._owed == 0 or self._owed + cost <= self._budget
                )
            )
            if self._error is not None:
                raise self._error
            self._owed += cost

    def send(self, buffers: Buffers) -> None:
        """Send ``buffers`` as one reply; see :meth:`stream`."""
        with self._cond:
            idle = not self._busy and not self._queue and self._error is None
            if idle:
                self._busy = True
        if not idle:
            self.stream((buffers,))
            return
        # The common case, on the hot path of small requests (decisions/0001): nothing
        # queued and nobody writing, so one sendmsg and no waiting.
        try:
            self._write(buffers)
        except OSError as err:
            self._fail(err)
            raise
        self._release()

    def stream(self, pieces: Iterable[Buffers]) -> None:
        """Send one reply made of ``pieces``, produced lazily (a long READ reads its next
        piece only once the previous one is on the wire), after whatever was queued; blocks
        until the socket took it all and keeps every other reply out meanwhile.  Raises
        OSError when the link is gone."""
        with self._cond:
            self._wait(lambda: not self._busy or self._error is not None)
            if self._error is not None:
                raise self._error
            self._busy = True
        try:
            while True:
                with self._cond:
                    queued = self._queue.popleft() if self._queue else None
                if queued is None:
                    break
                self._write(queued[0])
                self._settle(queued[1])
            for buffers in pieces:
                self._write(buffers)
        except OSError as err:
            self._fail(err)
            raise
        finally:
            self._release()

    def close(self, timeout: float | None = None, *, deliver: bool = False) -> None:
        """Wait until everything queued was sent (or sending failed), then stop the writer;
        with ``deliver`` (the server stopped reading: input may be left unread), then wait up
        to :data:`DELIVERY_TIMEOUT` for the kernel to deliver it.

        A client that stopped reading would hold the session (its threads and queued
        replies) forever: after ``timeout`` seconds the link is cut instead."""
        with self._cond:
            self._waiting += 1
            try:
                drained = self._cond.wait_for(
                    lambda: (not self._queue and not self._busy) or self._error is not None,
                    timeout,
                )
            finally:
                self._waiting -= 1
        if not drained:
            log.info("%s: client reads no replies; closing", self._peer)
            self._fail(TimeoutError("client read no replies"))
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            writer = self._writer
        if writer is not None:
            writer.join()
        if deliver and self._error is None:
            _await_delivery(self._sock, DELIVERY_TIMEOUT)

    # ------------------------------------------------------------------ workers

    def post(self, buffers: Buffers, cost: int = 0) -> None:
        """Send a reply from a worker without ever blocking on the socket; ``cost`` releases
        what :meth:`reserve` counted once the reply is on the wire.  Dropped silently when
        the link already failed (the session is ending)."""
        with self._cond:
            if self._error is not None:
                return  # the budget no longer matters: every waiter sees the error
            if self._busy or self._queue or self._tls:
                self._queue.append((buffers, cost))
                self._wake_writer()
                return
            self._busy = True
        try:
            sent = self._sock.sendmsg(buffers[:MAX_IOV], (), socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError as err:
            self._fail(err)
            return
        rest = _after(buffers, sent)
        with self._cond:
            if rest:
                self._queue.appendleft((rest, cost))  # the rest of a started reply goes first
            else:
                self._owed -= cost
        self._release()

    # ------------------------------------------------------------------ internals

    def _release(self) -> None:
        with self._cond:
            self._busy = False
            if self._queue:
                self._wake_writer()
            else:
                self._notify()  # a connection thread may wait for the turn

    def _wait(self, predicate: Callable[[], bool]) -> None:
        """(Lock held) Wait for ``predicate``, counted so that :meth:`_notify` can skip
        waking nobody (notify_all costs microseconds on the hot path)."""
        self._waiting += 1
        try:
            self._cond.wait_for(predicate)
        finally:
            self._waiting -= 1

    def _notify(self) -> None:
        """(Lock held) Wake the connection thread if it waits for the turn or the budget."""
        if self._waiting:
            self._cond.notify_all()

    def _settle(self, cost: int) -> None:
        with self._cond:
            self._owed -= cost
            self._notify()

    def _fail(self, err: OSError) -> None:
        with self._cond:
            if self._error is None:
                self._error = err
            self._queue.clear()
            self._owed = 0
            self._busy = False
            self._cond.notify_all()
        # The connection thread may sit in recv(): make it see the end too.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _wake_writer(self) -> None:
        """(Lock held) Make sure the writer thread runs; it finds the queue itself."""
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write_queued, name=f"nbs-send {self._peer}", daemon=True
            )
            self._writer.start()
        self._cond.notify_all()

    def _write_queued(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: (
                        self._closing
                        or self._error is not None
                        or (bool(self._queue) and not self._busy)
                    )
                )
                if self._error is not None or (self._closing and not self._queue):
                    return
                if self._busy:
                    continue
                buffers, cost = self._queue.popleft()
                self._busy = True
            try:
                self._write(buffers)
            except OSError as err:
                log.info("%s: connection lost while sending: %s", self._peer, err)
                self._fail(err)
                return
            with self._cond:
                self._owed -= cost
                self._busy = False
                self._notify()

    def _write(self, buffers: Buffers) -> None:
        """Blocking write of every byte of ``buffers``."""
        if self._tls:
            self._sock.sendall(b"".join(buffers))
            return
        if len(buffers) <= MAX_IOV:
            sent = self._sock.sendmsg(buffers)
            if sent == sum(map(len, buffers)):
                return
            rest = _after(buffers, sent)
        else:
            rest = list(buffers)
        while rest:
            batch = rest[:MAX_IOV]
            rest = _after(batch, self._sock.sendmsg(batch)) + rest[MAX_IOV:]


def _after(buffers: Buffers, sent: int) -> list[bytes | bytearray | memoryview]:
    """What is left of ``buffers`` once their first ``sent`` bytes went out."""
    rest: list[bytes | bytearray | memoryview] = []
    for buf in buffers:
        size = len(buf)
        if sent >= size:
            sent -= size
            continue
        rest.append(memoryview(buf)[sent:] if sent else buf)
        sent = 0
    return rest


def _await_delivery(sock: socket.socket, timeout: float) -> None:
    """Wait until ``sock``'s send queue is empty (TCP: acknowledged by the peer), at most
    ``timeout`` seconds; a socket that is closed or has no such count returns at once."""
    deadline = monotonic() + timeout
    unsent = array.array("i", [0])
    while True:
        try:
            fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, unsent)
        except (OSError, ValueError):
            return
        if unsent[0] == 0 or monotonic() >= deadline:
            return
        sleep(0.005)
