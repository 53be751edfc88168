"""A TCP proxy on loopback that injects network faults between a client and a server.

The replicated-volume tests put one :class:`FaultProxy` in front of each storage node and
switch faults on and off while I/O runs::

    with FaultProxy(("127.0.0.1", node.nbd_port)) as link:
        uri = link.uri("vol")         # the client connects here
        link.delay(0.05)              # 50 ms added to every chunk, each direction
        link.blackhole()              # silence both ways: no bytes, no FIN, no RST
        link.heal()                   # new connections pass again

Faults are per proxy and apply at once to every connection, current and new:

- ``delay(s)``: each chunk is held ``s`` seconds from when it was read before it is sent on;
  order is kept per direction.
- ``throttle(bps)``: each direction sends at most ``bps`` bytes per second.
- ``blackhole()``: every current and new connection stops forwarding both ways; what the
  peers send is read and swallowed, so they see silence, not a close.  A blackholed
  connection stays dead after ``heal()``: the bytes it swallowed are gone, so the TCP stream
  cannot be resumed and the client must reconnect (as after a real partition that outlived
  its timeouts).  It is closed by ``reset()`` or ``close()``.
- ``reset()``: every current connection is aborted with RST on both sides (SO_LINGER 0);
  new ones are still accepted.  Returns when the RSTs are sent.
- ``refuse()``: new connections are aborted with RST as soon as they are accepted (the
  kernel completes the handshake, so clients see a reset rather than ECONNREFUSED).
- ``heal()``: delay, throttle, blackhole and refuse are lifted for new data and connections.

Design: one thread accepts, one thread per connection relays both directions with
non-blocking sockets and select(), so a stuck peer never blocks another connection and the
proxy never needs to interrupt a blocking call.  Every thread is joined by ``close()``.
Only loopback targets are accepted: the rig must never send test traffic off the machine.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import ipaddress
import select
import socket
import struct
import threading
import time
from typing import Any

# A direction stops reading once this much is queued (delayed or throttled) for its peer,
# so a slow link pushes back on the sender as a real one does.
_QUEUE_LIMIT = 4 << 20
_CHUNK = 256 << 10
# Throttled sends are cut into slices of about this duration so the rate is smooth.
_THROTTLE_SLICE = 0.02

Target = tuple[str, int] | str


@dataclasses.dataclass(frozen=True)
class Faults:
    """The faults in force; one immutable value, swapped whole, read by every relay."""

    delay: float = 0.0
    rate: int | None = None  # bytes per second per direction; None: unlimited
    blackhole: bool = False
    refuse: bool = False


@dataclasses.dataclass
class Counters:
    """What the proxy has done since it started."""

    connections: int = 0  # accepted, refused ones included
    refused: int = 0
    resets: int = 0  # connections aborted by reset()
    bytes_to_server: int = 0  # forwarded client -> target
    bytes_to_client: int = 0  # forwarded target -> client
    bytes_swallowed: int = 0  # read from either side of a blackholed connection


def _abort(sock: socket.socket) -> None:
    """Close ``sock`` with RST instead of FIN (SO_LINGER on, timeout 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Direction:
    """Bytes read from ``src``, waiting to be written to ``dst``."""

    def __init__(self, src: socket.socket, dst: socket.socket, counter: str) -> None:
        self.src, self.dst, self.counter = src, dst, counter
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.eof = False  # src sent FIN
        self.shut = False  # ... and it was passed on to dst
        self.send_at = 0.0  # throttle: earliest time of the next send


class _Relay:
    """One accepted connection and its upstream one, relayed by one thread."""

    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server: socket.socket | None = None
        self.dead = False  # blackholed: swallow everything until aborted
        self.abort_requested = False
        self._wake_r, self._wake_w = socket.socketpair()
        self.thread = threading.Thread(target=self._run, name="faultproxy-relay", daemon=True)

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def abort(self) -> None:
        self.abort_requested = True
        self.wake()

    def _run(self) -> None:
        clean = False
        try:
            clean = self._relay()
        finally:
            for sock in (self.client, self.server):
                if sock is None:
                    continue
                if clean:
                    sock.close()  # both FINs passed: a plain close lets queued bytes drain
                else:
                    _abort(sock)  # aborted, blackholed or broken: RST both ways
            self._wake_r.close()
            self._wake_w.close()
            self.proxy._forget(self)

    def _relay(self) -> bool:
        """Relay until the end; True if both sides closed cleanly."""
        if self.proxy.faults.blackhole:
            self.dead = True
        else:
            try:
                self.server = self.proxy._connect_target()
            except OSError:
                return False  # the client sees an abort, as with a refused upstream
        self.client.setblocking(False)
        for sock in (self.client, self.server):
            if sock is not None and sock.family != socket.AF_UNIX:
                # Without it Nagle holds small replies back, adding latency nobody asked for.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.server is None:
            directions: list[_Direction] = []
            silent = [self.client]
        else:
            self.server.setblocking(False)
            directions = [
                _Direction(self.client, self.server, "bytes_to_server"),
                _Direction(self.server, self.client, "bytes_to_client"),
            ]
            silent = []
        while not self.abort_requested:
            faults = self.proxy.faults
            if self.dead and directions:
                # What was read but not yet sent is lost with the rest.
                self.proxy._count("bytes_swallowed", sum(d.queued for d in directions))
                silent = [d.src for d in directions]
                directions = []
            now = time.monotonic()
            for d in directions:
                self._send(d, faults, now)
            if directions and all(d.shut for d in directions):
                return True  # both sides closed cleanly and everything was delivered
            readers = [self._wake_r, *silent]
            readers += [d.src for d in directions if not d.eof and d.queued < _QUEUE_LIMIT]
            # A chunk still ready after _send met a full socket buffer: wait until it drains.
            writers = [d.dst for d in directions if self._ready(d, now)]
            timeout = self._next_deadline(directions, now)
            readable, _, _ = select.select(readers, writers, [], timeout)
            if self._wake_r in readable:
                self._wake_r.recv(4096)
            silent = [s for s in silent if s not in readable or self._swallow(s)]
            if self.dead and not silent and not directions:
                return False  # both sides of a blackholed connection gave up
            for d in directions:
                if d.src in readable and not self._receive(d):
                    return False  # a reset from one side: pass it on
        return False  # reset() or close()

    def _swallow(self, sock: socket.socket) -> bool:
        """Read and drop; False once that side has closed (it is then no longer watched)."""
        try:
            data = sock.recv(_CHUNK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        self.proxy._count("bytes_swallowed", len(data))
        return bool(data)

    def _receive(self, d: _Direction) -> bool:
        try:
            data = d.src.recv(_CHUNK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            d.eof = True
        else:
            # The faults now, not those before select(): a delay set while we waited applies.
            d.queue.append((time.monotonic() + self.proxy.faults.delay, data))
            d.queued += len(data)
        return True

    @staticmethod
    def _ready(d: _Direction, now: float) -> bool:
        return bool(d.queue) and d.queue[0][0] <= now and d.send_at <= now

    def _send(self, d: _Direction, faults: Faults, now: float) -> None:
        if faults.rate is None:
            d.send_at = 0.0  # healed: no pause left over from a throttle
        while self._ready(d, now):
            due, data = d.queue[0]
            limit = len(data)
            if faults.rate is not None:
                limit = min(limit, max(1, int(faults.rate * _THROTTLE_SLICE)))
            try:
                sent = d.dst.send(data[:limit])
            except BlockingIOError:
                return
            except OSError:
                self.abort_requested = True
                return
            self.proxy._count(d.counter, sent)
            d.queued -= sent
            if sent == len(data):
                d.queue.popleft()
            else:
                d.queue[0] = (due, data[sent:])
            if faults.rate is not None:
                d.send_at = max(d.send_at, now) + sent / faults.rate
        if d.eof and not d.queue and not d.shut:
            with contextlib.suppress(OSError):
                d.dst.shutdown(socket.SHUT_WR)
            d.shut = True

    @staticmethod
    def _next_deadline(directions: list[_Direction], now: float) -> float | None:
        """Seconds until a queued chunk may go (None: wait for a socket or a wake-up)."""
        # A chunk due already waits for its socket to drain (select's writers), not a timer.
        times = [max(d.queue[0][0], d.send_at) for d in directions if d.queue]
        future = [t for t in times if t > now]
        return min(future) - now if future else None


class FaultProxy:
    """A TCP proxy from ``127.0.0.1:<port>`` to ``target`` (a loopback ``(host, port)`` or a
    Unix socket path), with faults that can be switched at any time (see the module doc).

    Owns its listening socket and threads: use it as a context manager or call ``close()``,
    which aborts every connection and joins every thread.
    """

    def __init__(self, target: Target) -> None:
        if not isinstance(target, str):
            host = target[0]
            assert ipaddress.ip_address(host).is_loopback, f"not a loopback target: {host}"
        self.target = target
        self.faults = Faults()
        self._counters = Counters()
        self._lock = threading.Lock()
        self._relays: set[_Relay] = set()
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._wake_r, self._wake_w = socket.socketpair()
        self._acceptor = threading.Thread(target=self._accept, name="faultproxy", daemon=True)
        self._acceptor.start()

    @property
    def port(self) -> int:
        return self.address[1]

    def uri(self, export: str) -> str:
        """The NBD URI of ``export`` through this proxy."""
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def counters(self) -> Counters:
        """A copy of the counters now."""
        with self._lock:
            return dataclasses.replace(self._counters)

    @property
    def active(self) -> int:
        """Connections open now (blackholed ones included)."""
        with self._lock:
            return len(self._relays)

    # ------------------------------------------------------------------ faults

    def delay(self, seconds: float) -> None:
        assert seconds >= 0
        self._set(delay=seconds)

    def throttle(self, bytes_per_second: int) -> None:
        assert bytes_per_second > 0
        self._set(rate=bytes_per_second)

    def blackhole(self) -> None:
        # New relays see the fault; current ones are marked here, not left to notice it, so
        # that a blackhole() at once followed by heal() still kills every open connection.
        self.faults = dataclasses.replace(self.faults, blackhole=True)
        with self._lock:
            for relay in self._relays:
                relay.dead = True
        self._set()  # wake them

    def refuse(self) -> None:
        self._set(refuse=True)

    def heal(self) -> None:
        """Lift every fault.  Connections blackholed before stay dead (see the module doc)."""
        self._set(delay=0.0, rate=None, blackhole=False, refuse=False)

    def reset(self) -> None:
        """Abort every current connection with RST; return once they are all closed."""
        with self._lock:
            relays = list(self._relays)
            self._counters.resets += len(relays)
        for relay in relays:
            relay.abort()
        for relay in relays:
            relay.thread.join()

    def _set(self, **changes: Any) -> None:
        self.faults = dataclasses.replace(self.faults, **changes)
        with self._lock:
            relays = list(self._relays)
        for relay in relays:
            relay.wake()  # so a relay waiting on a delayed chunk re-reads the faults

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stop accepting, abort every connection, join every thread.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._wake_w.send(b"x")
        self._acceptor.join()
        self._listener.close()
        self.reset()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ threads' side

    def _accept(self) -> None:
        while True:
            readable, _, _ = select.select([self._listener, self._wake_r], [], [])
            if self._wake_r in readable:
                return
            client, _ = self._listener.accept()
            with self._lock:
                self._counters.connections += 1
                if self.faults.refuse:
                    self._counters.refused += 1
            if self.faults.refuse:
                _abort(client)
                continue
            relay = _Relay(self, client)
            with self._lock:
                self._relays.add(relay)
            relay.thread.start()

    def _connect_target(self) -> socket.socket:
        if isinstance(self.target, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.target)
            except OSError:
                sock.close()
                raise
            return sock
        return socket.create_connection(self.target, timeout=10)

    def _forget(self, relay: _Relay) -> None:
        with self._lock:
            self._relays.discard(relay)

    def _count(self, name: str, n: int) -> None:
        with self._lock:
            setattr(self._counters, name, getattr(self._counters, name) + n)
