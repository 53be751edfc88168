"""A remote NBD export as a Storage (TCP, Unix socket, TLS), reconnecting after a drop.

The protocol is the project's own sans-IO client core (``backend.nbd.client``); this module
is its I/O: sockets and the waiting (chosen by measurement over libnbd's binding:
docs/decisions/0090-nbd-client.md).

* Requests from any number of threads are pipelined on a connection: each sends its header
  (and payload) under a send lock and waits for its own reply, matched by cookie in
  whatever order the server answers; the waiting callers take turns reading the socket
  (no reader thread: see ``_Waiter``).
* Capabilities are the export's transmission flags and block sizes; requests longer than
  the server's maximum block size are split.  A command the export lacks is done another
  way when that is exact (WRITE_ZEROES as zero bytes, TRIM as zeroing or nothing, FUA as a
  write then FLUSH) or refused with ENOTSUP (fast zero).
* NBD errors become :class:`StorageError` with the same errno (the spec's values are
  Linux's).  A dropped connection, a protocol error or a reply missing for
  ``request_timeout`` seconds closes the connection: every request in flight on it is sent
  again once a new one is open (every NBD command is idempotent), with a bounded backoff
  between attempts, until ``reconnect_deadline`` seconds after the drop; then it fails with
  ``ECONNRESET`` (``ETIMEDOUT`` when the server stopped answering).  ``reconnect_deadline=0``
  fails at once, for callers with their own failover (the replicated-volume engine);
  :attr:`NbdStorage.connected` says whether a connection is open now.
* A reconnection that finds a different export (another size, or lost flags) is refused:
  retrying there could write to something else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import random
import select
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

from backend.nbd import NEED_DATA, ConnectionClosed, NBDError
from backend.nbd.client import ClientConnection, ExportInfo, Reply, TLSReady
from backend.nbd.constants import Cmd, CmdFlag, Error, StateFlag
from backend.nbd.constants import TransmissionFlag as Flag
from backend.storage.base import (
    Capabilities,
    Extent,
    Request,
    RequestLostError,
    Storage,
    StorageError,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = 10809
RECV_SIZE = 256 * 1024
# The wire's length field is 32 bits: zeroing, trimming and block status ask in pieces.
_LONG_PIECE = 1 << 30
# Small WRITE payloads are joined to their header: one buffer sends faster than sendmsg of
# two (measured at 4 KiB: 47 vs 55 µs p50); larger ones go without the copy.
_JOIN_BELOW = 64 * 1024
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 2.0
_SCHEMES = {
    "nbd": (False, False),
    "nbd+tcp": (False, False),
    "nbds": (True, False),
    "nbds+tcp": (True, False),
    "nbd+unix": (False, True),
    "nbds+unix": (True, True),
}


@dataclasses.dataclass(frozen=True)
class NbdTarget:
    """Where an export is and how to reach it (the NBD URI standard, doc/uri.md)."""

    export: str = ""
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    socket_path: str | None = None  # a Unix socket instead of host and port
    tls: bool = False
    # As libnbd's tls-certificates: a directory with ca-cert.pem and, for client
    # certificates, client-cert.pem and client-key.pem.  None: the system's CAs.
    tls_certificates: str | None = None
    tls_hostname: str | None = None  # the name the certificate must carry (default: host)
    tls_verify: bool = True

    @classmethod
    def from_uri(cls, uri: str) -> NbdTarget:
        """Parse ``nbd[s]://host[:port]/export`` or ``nbd[s]+unix:///export?socket=PATH``
        (query keys: socket, tls-certificates, tls-hostname, tls-verify-peer).  Raises
        ValueError naming what is wrong."""
        parts = urllib.parse.urlsplit(uri)
        if parts.scheme not in _SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(_SCHEMES)}")
        tls, unix = _SCHEMES[parts.scheme]
        query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        unknown = set(query) - {"socket", "tls-certificates", "tls-hostname", "tls-verify-peer"}
        if unknown:
            raise ValueError(f"unknown query key {sorted(unknown)[0]!r}")
        export = urllib.parse.unquote(parts.path.removeprefix("/"))
        verify = query.get("tls-verify-peer", "true").lower()
        if verify not in ("true", "false"):
            raise ValueError("tls-verify-peer must be true or false")
        options = {
            "export": export,
            "tls": tls,
            "tls_certificates": query.get("tls-certificates") or None,
            "tls_hostname": query.get("tls-hostname") or None,
            "tls_verify": verify == "true",
        }
        if unix:
            if parts.netloc or not query.get("socket"):
                raise ValueError("a Unix URI (nbd+unix://) has no host and needs ?socket=PATH")
            return cls(socket_path=query["socket"], **options)  # type: ignore[arg-type]
        if "socket" in query or not parts.hostname:
            raise ValueError("a TCP URI (nbd://) needs a host and takes no socket")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ValueError("port must be a number from 1 to 65535") from None
        return cls(host=parts.hostname, port=port, **options)  # type: ignore[arg-type]

    def __str__(self) -> str:
        scheme = "nbds" if self.tls else "nbd"
        path = urllib.parse.quote(self.export)
        if self.socket_path is not None:
            return f"{scheme}+unix:///{path}?socket={self.socket_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{path}"

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if not self.tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        directory = Path(self.tls_certificates) if self.tls_certificates else None
        if directory is None:
            ctx.load_default_certs()
            return ctx
        if self.tls_verify:
            ctx.load_verify_locations(cafile=str(directory / "ca-cert.pem"))
        cert, key = directory / "client-cert.pem", directory / "client-key.pem"
        if cert.exists():
            ctx.load_cert_chain(str(cert), str(key))
        return ctx


class _LinkDownError(Exception):
    """The connection a request went out on is gone; ``code`` says how."""

    def __init__(self, reason: str, code: int = errno.ECONNRESET) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class _Waiter:
    """One request waiting for its reply.

    Replies are read by the waiting callers themselves, one at a time (leader/follower): a
    caller that finds nobody reading reads the socket and hands every reply to its owner
    until its own has come, then passes the turn to a sleeping waiter.  At QD1 the caller
    reads its own reply, with no thread hand-off (a dedicated reader thread cost ~2x in
    latency and CPU: docs/decisions/0090).  ``_wake`` is held while the owner sleeps and
    released exactly once per ``sleeping`` flag cleared, under the link's mutex.
    """

    __slots__ = ("_wake", "done", "down", "reply", "sleeping")

    def __init__(self) -> None:
        self._wake = threading.Lock()
        self._wake.acquire()
        self.reply: Reply | None = None
        self.down: _LinkDownError | None = None
        self.done = False
        self.sleeping = False

    def wake(self) -> None:
        """Called under the link's mutex."""
        if self.sleeping:
            self.sleeping = False
            self._wake.release()


class _Link:
    """One open connection: the socket and its client core."""

    def __init__(self, target: NbdTarget, connect_timeout: float, request_timeout: float) -> None:
        self.target = target
        self._core = ClientConnection(target.export, tls=target.tls)
        self._sock = _dial(target, connect_timeout)
        try:
            self.info = self._handshake()
        except BaseException:
            self._sock.close()
            raise
        # A socket silent this long while someone waits for a reply is a dead link.  The
        # kernel's receive timeout, not Python's: a Python timeout makes the socket
        # non-blocking, and 1 MiB writes then cost a poll per partial send (measured: -40%).
        self._sock.settimeout(None)
        if request_timeout > 0:
            seconds = int(request_timeout)
            micros = int((request_timeout - seconds) * 1e6)
            self._sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", seconds, micros)
            )
        self._send_lock = threading.Lock()
        self._mutex = threading.Lock()  # _reading, _waiters, _queue, _sending, waiters' flags
        self._reading = False
        self._poll: select.poll | None = None  # made by the first exact wait
        self._waiters: dict[int, _Waiter] = {}
        self._queue: list[bytes] = []  # small requests to send (submit), under _mutex
        self._sending = False  # a caller is sending the queue, under _mutex
        self.down: _LinkDownError | None = None

    def _handshake(self) -> ExportInfo:
        try:
            while True:
                event = self._core.next_event()
                out = self._core.data_to_send()
                if out:
                    self._sock.sendall(out)
                if event is NEED_DATA:
                    self._core.receive_data(self._sock.recv(RECV_SIZE))
                elif isinstance(event, TLSReady):
                    hostname = self.target.tls_hostname or self.target.host
                    self._sock = self.target.ssl_context().wrap_socket(
                        self._sock, server_hostname=hostname
                    )
                    self._core.tls_established()
                elif isinstance(event, ExportInfo):
                    return event
                elif isinstance(event, ConnectionClosed):
                    raise StorageError(errno.ECONNRESET, f"{self.target} closed the handshake")
        except NBDError as err:
            raise StorageError(errno.EIO, f"{self.target}: {err}") from err
        except ssl.SSLError as err:
            raise StorageError(errno.EPROTO, f"{self.target}: TLS failed: {err}") from err
        except TimeoutError as err:
            raise StorageError(errno.ETIMEDOUT, f"{self.target}: handshake timed out") from err
        except OSError as err:
            raise StorageError.from_os_error(err, f"{self.target}: handshake failed") from err

    def submit(
        self, command: Cmd, offset: int, length: int, flags: int, payload: memoryview | None
    ) -> _Waiter:
        """Send one request; raises _LinkDownError if this connection is gone.

        A request up to _JOIN_BELOW bytes is queued, and sent by whichever caller is sending
        now (flat combining): requests of concurrent callers leave in one system call and
        reach the server in one read, and no caller waits for another's send.  A send that
        fails kills the link: every waiter, the queued ones too, learns it from ``wait``.
        A larger request is sent by its caller, in parts.
        """
        waiter = _Waiter()
        small = payload is None or len(payload) <= _JOIN_BELOW
        with self._mutex:
            if self.down is not None:
                raise self.down
            try:
                cookie, header = self._core.request(command, offset, length, flags)
            except NBDError as err:  # the reader saw the end first and is about to kill()
                raise _LinkDownError(f"connection closed: {err}") from err
            self._waiters[cookie] = waiter
            if small:
                self._queue.append(header if payload is None else header + payload)
                if self._sending:
                    return waiter
                self._sending = True
        with self._send_lock:
            if small:
                self._send_queued()
                return waiter
            assert payload is not None
            try:
                if isinstance(self._sock, ssl.SSLSocket):
                    self._sock.sendall(header)
                    self._sock.sendall(payload)
                else:
                    _send_parts(self._sock, header, payload)
            except OSError as err:
                self.kill(_LinkDownError(f"send failed: {err}"))
                raise self.down or _LinkDownError(str(err)) from err
        return waiter

    def _send_queued(self) -> None:
        """As the one sender (``_sending``, ``_send_lock`` held): send what is queued, until
        nothing is left."""
        while True:
            with self._mutex:
                batch, self._queue = self._queue, []
                if not batch:
                    self._sending = False
                    return
            try:
                self._sock.sendall(batch[0] if len(batch) == 1 else b"".join(batch))
            except OSError as err:
                with self._mutex:
                    self._queue.clear()
                    self._sending = False
                self.kill(_LinkDownError(f"send failed: {err}"))
                return

    def wait(self, waiter: _Waiter, timeout: float, exact: bool = False) -> bool:
        """Wait for ``waiter``'s reply (or the link's death); False after ``timeout`` seconds
        (0: no limit) without either.  Not ``exact``: a caller reading the socket notices the
        timeout between replies only (the kernel's receive timeout, ``request_timeout``,
        bounds each read); ``exact``: it polls before each read, one system call more."""
        deadline = time.monotonic() + timeout if timeout > 0 else None
        while True:
            with self._mutex:
                if waiter.done:
                    return True
                leader = not self._reading
                if leader:
                    self._reading = True
                else:
                    waiter.sleeping = True
            if leader:
                try:
                    self._read_until(waiter, deadline, exact)
                finally:
                    with self._mutex:
                        self._reading = False
                        # The next reader: any waiter still asleep.
                        for other in self._waiters.values():
                            if other.sleeping:
                                other.wake()
                                break
                if waiter.done:
                    return True
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                continue
            remaining = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            if waiter._wake.acquire(timeout=remaining):
                continue
            with self._mutex:
                if waiter.sleeping:  # nobody will release it now
                    waiter.sleeping = False
                    return waiter.done
            waiter._wake.acquire()  # released while we took the mutex: consume it
            if waiter.done:
                return True

    def _read_until(self, waiter: _Waiter, deadline: float | None, exact: bool = False) -> None:
        """Read replies, handing each to its waiter, until ``waiter``'s came or the link died
        (or the deadline passed, checked between reads, and before each when ``exact``)."""
        core, sock = self._core, self._sock
        final = False
        try:
            while not waiter.done:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0 and (final or not exact):
                        return
                    # Exact: a reply that arrived before the deadline still counts when the
                    # caller comes late (it waited for another member first): one last
                    # look at what the socket holds now.
                    final = left <= 0
                    if exact and not self._readable(max(left, 0.0)):
                        return
                target = core.payload_buffer()
                if target is not None:
                    count = sock.recv_into(target)
                    if count:
                        core.payload_received(count)
                    else:
                        core.receive_data(b"")
                else:
                    core.receive_data(sock.recv(RECV_SIZE))
                while True:
                    event = core.next_event()
                    if event is NEED_DATA:
                        break
                    if isinstance(event, Reply):
                        with self._mutex:
                            owner = self._waiters.pop(event.cookie, None)
                            if owner is not None:
                                owner.reply = event
                                owner.done = True
                                owner.wake()
                    elif isinstance(event, ConnectionClosed):
                        self.kill(_LinkDownError("the server closed the connection"))
                        return
        except (TimeoutError, BlockingIOError, ssl.SSLWantReadError):
            # SO_RCVTIMEO expired: EAGAIN from a blocking socket.
            self.kill(_LinkDownError("the server stopped answering", errno.ETIMEDOUT))
        except (OSError, NBDError) as err:
            self.kill(_LinkDownError(f"connection failed: {err}"))

    def _readable(self, timeout: float) -> bool:
        """Whether the socket has something to read within ``timeout`` seconds (a hang-up
        or an error counts: the read then says what)."""
        if isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
            return True
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self._sock, select.POLLIN)
        return bool(self._poll.poll(math.ceil(timeout * 1000)))

    def kill(self, down: _LinkDownError) -> None:
        """Close the connection; every request still waiting learns it is down."""
        with self._mutex:
            if self.down is not None:
                return
            self.down = down
            for waiter in self._waiters.values():
                waiter.down = down
                waiter.done = True
                waiter.wake()
            self._waiters.clear()
        if down.code != errno.ESHUTDOWN or down.reason != "closed":
            log.info("NBD connection to %s lost: %s", self.target, down.reason)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def forget(self, waiter: _Waiter) -> None:
        with self._mutex:
            for cookie, candidate in list(self._waiters.items()):
                if candidate is waiter:
                    del self._waiters[cookie]

    def close(self) -> None:
        """Say goodbye (NBD_CMD_DISC) if still up, then close."""
        if self.down is None:
            with self._send_lock, contextlib.suppress(OSError, NBDError):
                self._sock.sendall(self._core.disconnect())
        self.kill(_LinkDownError("closed", errno.ESHUTDOWN))
        self._sock.close()


@dataclasses.dataclass(frozen=True, slots=True)
class _Pending:
    """A submitted request: the connection it went out on and its waiter."""

    link: _Link
    waiter: _Waiter
    command: Cmd


def _dial(target: NbdTarget, timeout: float) -> socket.socket:
    try:
        if target.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(target.socket_path)
            except BaseException:
                sock.close()
                raise
            return sock
        sock = socket.create_connection((target.host, target.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return sock
    except TimeoutError as err:
        raise StorageError(errno.ETIMEDOUT, f"cannot connect to {target}") from err
    except OSError as err:
        raise StorageError.from_os_error(err, f"cannot connect to {target}") from err


def _send_parts(sock: socket.socket, header: bytes, payload: memoryview) -> None:
    parts: list[bytes | memoryview] = [header, payload]
    while parts:
        sent = sock.sendmsg(parts)
        while parts and sent >= len(parts[0]):
            sent -= len(parts[0])
            parts.pop(0)
        if parts and sent:
            parts[0] = memoryview(parts[0])[sent:]


def _capabilities(info: ExportInfo) -> Capabilities:
    flags = info.flags
    minimum = max(1, info.min_block)
    preferred = max(minimum, info.preferred_block)
    return Capabilities(
        read_only=bool(flags & Flag.READ_ONLY),
        can_flush=bool(flags & Flag.SEND_FLUSH),
        can_fua=bool(flags & Flag.SEND_FUA),
        can_trim=bool(flags & (Flag.SEND_TRIM | Flag.SEND_WRITE_ZEROES)),
        can_zero=bool(flags & Flag.SEND_WRITE_ZEROES),
        can_fast_zero=bool(flags & Flag.SEND_FAST_ZERO and flags & Flag.SEND_WRITE_ZEROES),
        can_extents=info.block_status,
        cheap_extents=False,  # a round trip each
        can_cache=bool(flags & Flag.SEND_CACHE),
        can_multi_conn=bool(flags & Flag.CAN_MULTI_CONN),
        thread_safe=True,
        can_submit=True,
        inline=False,  # every request waits for the network
        rotational=bool(flags & Flag.ROTATIONAL),
        min_block=minimum,
        preferred_block=preferred,
        max_block=max(preferred, info.max_block),
    )


class NbdStorage(Storage):
    """The export at ``target``.  Connects at once (raises StorageError if it cannot).

    ``connections``: open this many when the server advertises multi-conn (else one);
    requests go round-robin.  ``request_timeout``: a reply missing this long means the
    connection is dead (0: wait forever).  ``reconnect_deadline``: how long after a drop a
    request keeps trying to go through again before it fails.  ``redial``: where to
    reconnect, asked each time (default: ``target`` for ever).
    """

    def __init__(
        self,
        target: NbdTarget,
        *,
        connections: int = 1,
        request_timeout: float = 30.0,
        reconnect_deadline: float = 60.0,
        connect_timeout: float = 10.0,
        redial: Callable[[], NbdTarget] | None = None,
    ) -> None:
        self.target = target
        # Asked for the target before each reconnection (a storage node whose address a
        # config reload changed); a StorageError from it fails that attempt like a refusal.
        self._redial = redial
        self._request_timeout = request_timeout
        self._reconnect_deadline = reconnect_deadline
        self._connect_timeout = connect_timeout
        first = _Link(target, connect_timeout, request_timeout)
        self._info = first.info
        self._caps = _capabilities(first.info)
        count = connections if self._caps.can_multi_conn else 1
        self._links: list[_Link | None] = [first] + [None] * (count - 1)
        self._next = 0
        self._closed = False
        self._dial_lock = threading.Lock()
        self._backoff = 0.0
        self._retry_at = 0.0
        try:
            for index in range(1, count):
                self._links[index] = _Link(target, connect_timeout, request_timeout)
        except StorageError:
            self.close()
            raise

    @property
    def size(self) -> int:
        return self._info.size

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    @property
    def connected(self) -> bool:
        """Whether every connection is open now (False from a drop until reconnected)."""
        return all(link is not None and link.down is None for link in self._links)

    # ------------------------------------------------------------------ the Storage contract

    def read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        step = self._caps.max_block
        if length <= step:
            data = self._call(Cmd.READ, offset, length).data
            assert data is not None
            return bytes(data)
        out = bytearray()
        for pos in range(offset, offset + length, step):
            piece = self._call(Cmd.READ, pos, min(step, offset + length - pos)).data
            assert piece is not None
            out += piece
        return bytes(out)

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self._writable()
        view = memoryview(data).cast("B")
        native_fua = fua and self._caps.can_fua
        flags = int(CmdFlag.FUA) if native_fua else 0
        step = self._caps.max_block
        for start in range(0, len(view), step):
            piece = view[start : start + step]
            self._call(Cmd.WRITE, offset + start, len(piece), flags, piece)
        if fua and not native_fua:
            self.flush()

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> None:
        self._writable()
        if fast and not self._caps.can_fast_zero:
            raise StorageError(errno.ENOTSUP, f"{self.target} cannot zero fast")
        if not self._caps.can_zero:
            zeroes = bytes(min(length, self._caps.max_block))
            for pos in range(offset, offset + length, len(zeroes)):
                self.write(pos, memoryview(zeroes)[: min(len(zeroes), offset + length - pos)])
            if fua:
                self.flush()
            return
        flags = 0 if may_trim else int(CmdFlag.NO_HOLE)
        if fast:
            flags |= CmdFlag.FAST_ZERO
        self._ranged(Cmd.WRITE_ZEROES, offset, length, fua, flags)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        # TRIM leaves the range undefined on the wire, our contract reads zeroes after it:
        # WRITE_ZEROES without NO_HOLE says both (the server may deallocate).
        self._writable()
        if self._caps.can_zero:
            self._ranged(Cmd.WRITE_ZEROES, offset, length, fua, 0)
            return
        if self._caps.can_trim:
            self._ranged(Cmd.TRIM, offset, length, False, 0)
        self.write_zeroes(offset, length, fua=fua)

    def flush(self) -> None:
        if self._caps.can_flush:
            self._call(Cmd.FLUSH, 0, 0)

    def cache(self, offset: int, length: int) -> None:
        if self._caps.can_cache:
            for pos in range(offset, offset + length, self._caps.max_block):
                self._call(Cmd.CACHE, pos, min(self._caps.max_block, offset + length - pos))

    def extents(self, offset: int, length: int) -> list[Extent]:
        if not self._caps.can_extents:
            return [Extent(offset, length)]
        reply = self._call(Cmd.BLOCK_STATUS, offset, min(length, _LONG_PIECE))
        result: list[Extent] = []
        pos, end = offset, offset + length
        for length_, flags in reply.extents or ():
            count = min(length_, end - pos)
            if count <= 0:
                break
            hole, zero = bool(flags & StateFlag.HOLE), bool(flags & StateFlag.ZERO)
            if result and (result[-1].hole, result[-1].zero) == (hole, zero):
                last = result.pop()
                result.append(Extent(last.offset, last.length + count, hole, zero))
            else:
                result.append(Extent(pos, count, hole=hole, zero=zero))
            pos += count
        return result or [Extent(offset, length)]

    # ------------------------------------------------------------------ submit and wait

    def submit(self, request: Request) -> _Pending | None:
        """Send ``request`` as one NBD command on an open connection, without waiting.  None
        when it is not one command (longer than a request may be, FUA emulated, no FLUSH)
        or no connection is open now: the blocking call splits, emulates and reconnects."""
        caps = self._caps
        if request.kind != "flush" and caps.read_only:
            return None
        if request.fua and not caps.can_fua:
            return None
        flags = int(CmdFlag.FUA) if request.fua else 0
        payload: memoryview | None = None
        if request.kind == "write":
            assert request.data is not None
            if not 0 < len(request.data) <= caps.max_block:
                return None
            command, length, payload = Cmd.WRITE, len(request.data), memoryview(request.data)
        elif request.kind in ("zero", "trim"):
            if not caps.can_zero or not 0 < request.length <= _LONG_PIECE - _LONG_PIECE % (
                caps.min_block
            ):
                return None
            command, length = Cmd.WRITE_ZEROES, request.length
            if request.kind == "zero" and not request.may_trim:
                flags |= CmdFlag.NO_HOLE
        else:
            if not caps.can_flush:
                return None
            command, length = Cmd.FLUSH, 0
        link = self._links[self._next % len(self._links)]
        self._next += 1
        if link is None or link.down is not None:
            return None
        try:
            waiter = link.submit(command, request.offset, length, flags, payload)
        except _LinkDownError:
            return None
        return _Pending(link, waiter, command)

    def wait(self, handle: object, timeout: float, *, keep: bool = False) -> bool:
        assert isinstance(handle, _Pending)
        link, waiter = handle.link, handle.waiter
        if not link.wait(waiter, max(timeout, 1e-6), exact=True):
            if not keep:
                link.forget(waiter)
            return False
        if waiter.down is not None:
            raise RequestLostError(f"{handle.command.name} to {self.target}: {waiter.down.reason}")
        reply = waiter.reply
        assert reply is not None
        if reply.error == Error.ESHUTDOWN:
            link.kill(_LinkDownError("the server is shutting down", errno.ESHUTDOWN))
            raise RequestLostError(f"{handle.command.name} to {self.target}: server shutting down")
        if reply.error:
            what = reply.message or f"{handle.command.name} failed on {self.target}"
            raise StorageError(reply.error, what)
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for link in self._links:
            if link is not None:
                link.close()

    def __repr__(self) -> str:
        return f"NbdStorage({self.target})"

    # ------------------------------------------------------------------ requests

    def _writable(self) -> None:
        if self._caps.read_only:
            raise StorageError(errno.EPERM, f"{self.target} is read-only")

    def _ranged(self, command: Cmd, offset: int, length: int, fua: bool, flags: int) -> None:
        """TRIM or WRITE_ZEROES of any length (the wire's is 32 bits)."""
        native_fua = fua and self._caps.can_fua
        if native_fua:
            flags |= CmdFlag.FUA
        step = _LONG_PIECE - _LONG_PIECE % self._caps.min_block
        for pos in range(offset, offset + length, step):
            self._call(command, pos, min(step, offset + length - pos), flags)
        if fua and not native_fua:
            self.flush()

    def _call(
        self,
        command: Cmd,
        offset: int,
        length: int,
        flags: int = 0,
        payload: memoryview | None = None,
    ) -> Reply:
        """Send one request and wait for its reply, across reconnections; raises
        StorageError for an NBD error, or once the connection stays lost too long."""
        gave_up_at: float | None = None
        while True:
            try:
                link = self._link()
                waiter = link.submit(command, offset, length, flags, payload)
                if not link.wait(waiter, self._request_timeout):
                    link.forget(waiter)
                    link.kill(
                        _LinkDownError(
                            f"no reply within {self._request_timeout:g} s", errno.ETIMEDOUT
                        )
                    )
                    raise link.down or _LinkDownError("no reply", errno.ETIMEDOUT)
                if waiter.down is not None:
                    raise waiter.down
                reply = waiter.reply
                assert reply is not None
                if reply.error == Error.ESHUTDOWN:
                    # The server is going away and asked us to come back (protocol.md).
                    link.kill(_LinkDownError("the server is shutting down", errno.ESHUTDOWN))
                    raise link.down or _LinkDownError("shutting down")
                if reply.error:
                    what = reply.message or f"{command.name} failed on {self.target}"
                    raise StorageError(reply.error, what)
                return reply
            except _LinkDownError as down:
                now = time.monotonic()
                if gave_up_at is None:
                    gave_up_at = now + self._reconnect_deadline
                if self._closed or now >= gave_up_at:
                    code = errno.ESHUTDOWN if self._closed else down.code
                    raise StorageError(
                        code, f"{command.name} to {self.target} failed: {down.reason}"
                    ) from None
                self._pause(gave_up_at)

    def _link(self) -> _Link:
        """An open connection, round-robin; reconnects a dropped one (raises _LinkDownError when
        that fails)."""
        index = self._next % len(self._links)
        self._next += 1
        link = self._links[index]
        if link is not None and link.down is None:
            return link
        with self._dial_lock:
            link = self._links[index]
            if link is not None and link.down is None:
                return link
            if self._closed:
                raise _LinkDownError("closed", errno.ESHUTDOWN)
            if time.monotonic() < self._retry_at:
                raise _LinkDownError(link.down.reason if link and link.down else "not connected")
            try:
                if self._redial is not None:
                    self.target = self._redial()
                fresh = _Link(self.target, self._connect_timeout, self._request_timeout)
            except StorageError as err:
                self._backoff = min(_BACKOFF_MAX, max(_BACKOFF_FIRST, self._backoff * 2))
                self._retry_at = time.monotonic() + self._backoff * random.uniform(0.5, 1)
                raise _LinkDownError(f"reconnecting: {err.message}", errno.ECONNRESET) from None
            if fresh.info.size != self._info.size or not _same_abilities(fresh.info, self._info):
                fresh.close()
                self._retry_at = time.monotonic() + _BACKOFF_MAX
                raise _LinkDownError("the export changed (size or flags) across the reconnection")
            self._backoff = 0.0
            self._links[index] = fresh
            if link is not None:
                link.close()
            log.info("NBD connection to %s open again", self.target)
            return fresh

    def _pause(self, until: float) -> None:
        wait = min(until, max(self._retry_at, time.monotonic() + 0.005)) - time.monotonic()
        if wait > 0:
            time.sleep(wait)


def _same_abilities(new: ExportInfo, old: ExportInfo) -> bool:
    """The reopened export can do everything the storage declared (a lost capability would
    make requests we promise fail)."""
    wanted: Sequence[Flag] = (
        Flag.SEND_FLUSH,
        Flag.SEND_FUA,
        Flag.SEND_TRIM,
        Flag.SEND_WRITE_ZEROES,
        Flag.SEND_FAST_ZERO,
        Flag.SEND_CACHE,
    )
    lost = any(old.flags & flag and not new.flags & flag for flag in wanted)
    gained_ro = bool(new.flags & Flag.READ_ONLY and not old.flags & Flag.READ_ONLY)
    return not lost and not gained_ro and new.block_status >= old.block_status
