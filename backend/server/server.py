"""Listeners (TCP, Unix, inherited fds), accepting, and the server's lifecycle.

Shutdown (SIGTERM) runs in this order: stop accepting; stop reading from every session
(requests already received are answered, then the connection closes); wait up to ``grace``
seconds for sessions to finish, then refuse what still arrives with ESHUTDOWN and cut them;
flush and close every storage.

A config reload (SIGHUP) changes what new connections get and never touches an open one:
``set_tls``, ``set_listeners`` and ``replace_exports``.  A removed export's storage stays open
until no session that could still be using it is left (see ``_unused_retired``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import selectors
import socket
import ssl
import stat
import struct
import threading
from collections.abc import Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from time import monotonic

from backend.nbd.constants import MAX_PAYLOAD, PAYLOAD_PIECE
from backend.server.exports import Export, Exports, close_storages
from backend.server.holders import Holders
from backend.server.limits import Admission, ConnectionLimits
from backend.server.memory import release_large_buffers
from backend.server.metrics import ServerStats, Snapshot, VolumeReplication
from backend.server.session import Session
from backend.server.throttled_log import ThrottledLog

log = logging.getLogger(__name__)

# Pauses of the accept loop after a failed accept (out of fds): doubled per failure in a row.
ACCEPT_BACKOFF_MIN = 0.05
ACCEPT_BACKOFF_MAX = 1.0


class ServeError(Exception):
    """The server cannot start as configured (address in use, bad socket path, …)."""


@dataclasses.dataclass(frozen=True)
class TCPAddress:
    host: str
    port: int

    def uri(self, port: int | None = None) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port if port is None else port}"


@dataclasses.dataclass(frozen=True)
class UnixAddress:
    path: Path

    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.path}"


Address = TCPAddress | UnixAddress


class Server:
    """Serves a set of exports (a fixed ExportTable or the volume catalogue) on listeners."""

    def __init__(
        self,
        table: Exports,
        *,
        tcp: list[TCPAddress] | None = None,
        unix: list[UnixAddress] | None = None,
        inherited: list[socket.socket] | None = None,
        tls: ssl.SSLContext | None = None,
        io_threads: int = 16,
        limits: ConnectionLimits | None = None,
        max_request: int = MAX_PAYLOAD,
    ) -> None:
        self.table = table
        self._tcp = tcp or []
        self._unix = unix or []
        self._tls = tls
        self._max_request = max_request
        # Payload pieces freed by finished sessions must not stay in malloc's heaps.
        release_large_buffers(PAYLOAD_PIECE)
        self._inherited: list[socket.socket] = list(inherited or [])
        # Listeners this server opened, by address; guarded by _lock once accepting.
        self._bound: dict[Address, tuple[socket.socket, str]] = {}
        self._closing: list[tuple[socket.socket, Address | None]] = []  # for the acceptor
        self._synced = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="nbs-io")
        self._sessions: dict[Session, threading.Thread] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._acceptor: threading.Thread | None = None
        self._stopping = False
        self._shut_down = False
        self.holders = Holders()  # who uses each export (the one-writer rule lives there)
        self.stats = ServerStats()
        # Replicated volumes' samples for the metrics endpoint: the serving layer, which
        # knows the engines, sets this (the server knows no replication).
        self.replication_metrics: Callable[[], tuple[VolumeReplication, ...]] = tuple
        # Exports removed by a reload, with the generation that removed them; a session
        # remembers the generation it was accepted in.
        self._generation = 0
        self._born: dict[Session, int] = {}
        self._retired: list[tuple[Export, int]] = []
        self._admission = Admission(limits or ConnectionLimits())
        self._accept_failed = ThrottledLog(log, logging.ERROR)
        self._refused = ThrottledLog(log, logging.WARNING)

    # ------------------------------------------------------------------ binding

    def bind(self) -> list[str]:
        """Open every listener; returns the URIs clients can use.  Raises ServeError."""
        try:
            self._bound = self._open([*self._tcp, *self._unix])
        except ServeError:
            self.close_listeners()
            raise
        return self.uris

    @property
    def uris(self) -> list[str]:
        """Where clients reach this server: inherited listeners first, then bound ones."""
        with self._lock:
            bound = [uri for _, uri in self._bound.values()]
        return [_uri_of(sock) for sock in self._inherited] + bound

    def _open(self, addresses: list[Address]) -> dict[Address, tuple[socket.socket, str]]:
        """Listen on each address; all or nothing (raises ServeError)."""
        opened: dict[Address, tuple[socket.socket, str]] = {}
        try:
            for address in addresses:
                if address not in opened:
                    if isinstance(address, TCPAddress):
                        opened[address] = self._bind_tcp(address)
                    else:
                        opened[address] = self._bind_unix(address)
        except ServeError:
            for address, (sock, _) in opened.items():
                _close_listener(sock, address)
            raise
        return opened

    def _bind_tcp(self, address: TCPAddress) -> tuple[socket.socket, str]:
        try:
            infos = socket.getaddrinfo(
                address.host or None,
                address.port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE,
            )
        except socket.gaierror as err:
            raise ServeError(f"cannot resolve {address.host!r}: {err.strerror}") from err
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
            sock.listen(128)
        except OSError as err:
            sock.close()
            what = "address already in use" if err.errno == errno.EADDRINUSE else err.strerror
            raise ServeError(f"cannot listen on {address.host}:{address.port}: {what}") from err
        return sock, address.uri(sock.getsockname()[1])

    def _bind_unix(self, address: UnixAddress) -> tuple[socket.socket, str]:
        path = address.path
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ServeError(f"cannot listen on {path}: exists and is not a socket")
            if _socket_alive(path):
                raise ServeError(f"cannot listen on {path}: another server is listening there")
            path.unlink()  # stale socket of a process that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            sock.listen(128)
        except OSError as err:
            sock.close()
            raise ServeError(f"cannot listen on {path}: {err.strerror}") from err
        return sock, address.uri()

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Accept connections on a background thread."""
        self._acceptor = threading.Thread(target=self._accept_loop, name="nbs-accept")
        self._acceptor.start()

    def _accept_loop(self) -> None:
        backoff = ACCEPT_BACKOFF_MIN
        paused_until: float | None = None  # out of fds: listeners unwatched until then
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            self._sync_listeners(sel)
            while not self._stopping:
                timeout = None if paused_until is None else max(paused_until - monotonic(), 0)
                events = sel.select(timeout)
                if paused_until is not None and monotonic() >= paused_until:
                    paused_until = None
                    self._sync_listeners(sel)
                for key, _ in events:
                    if key.fileobj is self._wake_r:
                        # Stopping, or set_listeners changed the listeners.
                        self._wake_r.recv(4096)
                        self._sync_listeners(sel, watch=paused_until is None)
                        break
                    listener = key.fileobj
                    assert isinstance(listener, socket.socket)
                    try:
                        client, addr = listener.accept()
                    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                        continue
                    except OSError as err:
                        # EMFILE and friends: the connection stays queued and the listener
                        # readable, so retrying at once spins.  Stop watching the listeners
                        # for a growing pause; the clients we have keep being served.
                        self._accept_failed(
                            "accept failed: %s; pausing accepts for %.2f s", err, backoff
                        )
                        paused_until = monotonic() + backoff
                        backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX)
                        self._unwatch_listeners(sel)
                        break
                    backoff = ACCEPT_BACKOFF_MIN
                    self._spawn(client, addr)

    def _unwatch_listeners(self, sel: selectors.BaseSelector) -> None:
        for key in list(sel.get_map().values()):
            if key.fileobj is not self._wake_r:
                sel.unregister(key.fileobj)

    def _sync_listeners(self, sel: selectors.BaseSelector, *, watch: bool = True) -> None:
        """(Acceptor thread) Watch exactly the current listeners (none unless ``watch``: accepts
        are paused); close the removed ones."""
        with self._lock:
            wanted = self._inherited + [sock for sock, _ in self._bound.values()]
            closing, self._closing = self._closing, []
        for key in list(sel.get_map().values()):
            if key.fileobj is not self._wake_r and key.fileobj not in wanted:
                sel.unregister(key.fileobj)
        for sock, path in closing:
            _close_listener(sock, path)
        watched = sel.get_map()
        for sock in wanted if watch else []:
            if sock not in watched:
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ)
        self._synced.set()

    def _spawn(self, client: socket.socket, addr: object) -> None:
        host: str | None = None  # the per-client limit's key; Unix clients count in total only
        if client.family in (socket.AF_INET, socket.AF_INET6):
            assert isinstance(addr, tuple)
            host = str(addr[0])
            peer = f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
        else:
            peer = _unix_peer(client)
        client.setblocking(True)
        if host is not None:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _keepalive(client)
        session = Session(
            client,
            peer,
            self.table,
            tls=self._tls,
            pool=self._pool,
            holders=self.holders,
            handshake_timeout=self._admission.limits.handshake_timeout,
            max_request=self._max_request,
        )
        thread = threading.Thread(target=self._run_session, args=(session, host), daemon=True)
        with self._lock:
            if self._stopping:
                client.close()
                return
            refused = self._admission.admit(host)
            if refused is None:
                self._sessions[session] = thread
                self._born[session] = self._generation
                self.stats.accepted += 1
            else:
                self.stats.refused += 1
        if refused is not None:
            # Before the greeting the protocol has no way to say why: like nbd-server at its
            # max_connections, close (docs/decisions/0030-connection-limits.md).
            self._refused("%s: connection refused: %s", peer, refused)
            client.close()
            return
        log.debug("%s: connected", peer)
        thread.start()

    def _run_session(self, session: Session, host: str | None) -> None:
        try:
            session.run()
        finally:
            with self._lock:
                self._admission.release(host)
                self._sessions.pop(session, None)
                self._born.pop(session, None)
                if session.export is not None:
                    self.stats.retire(session.export.name, session.stats)
                unused = self._unused_retired() if self._retired else []
            close_storages(unused)

    def metrics_snapshot(self) -> Snapshot:
        """Request and connection counts per export, for the metrics endpoint."""
        with self._lock:
            live = [(s.export.name if s.export else None, s.stats) for s in self._sessions]
            snapshot = self.stats.snapshot(live)
        # Outside the lock: engines take their own locks to report.
        return dataclasses.replace(snapshot, replication=self.replication_metrics())

    # ------------------------------------------------------------------ reloading

    def set_tls(self, tls: ssl.SSLContext | None) -> None:
        """Connections accepted from now on negotiate TLS with ``tls``."""
        self._tls = tls

    def set_limits(self, limits: ConnectionLimits) -> None:
        """Apply ``limits`` to connections accepted from now on (open ones stay)."""
        with self._lock:
            self._admission.limits = limits

    def set_listeners(self, tcp: list[TCPAddress], unix: list[UnixAddress]) -> list[str]:
        """Listen on exactly these addresses (plus inherited sockets) from now on.

        Opens the new ones first: if one fails (ServeError), nothing changed.  Connections
        accepted on a removed listener stay open.  Returns the URIs of the added listeners.
        """
        wanted: list[Address] = [*tcp, *unix]
        with self._lock:
            current = set(self._bound)
        added = self._open([a for a in wanted if a not in current])
        with self._lock:
            for address in [a for a in self._bound if a not in wanted]:
                sock, uri = self._bound.pop(address)
                self._closing.append((sock, address))
                log.info("stopped listening on %s", uri)
            self._bound.update(added)
        if self._acceptor is not None and self._acceptor.is_alive():
            self._synced.clear()
            self._wake_w.send(b"r")
            self._synced.wait(10)
        return [uri for _, uri in added.values()]

    def replace_exports(self, table: Exports, retired: list[Export]) -> None:
        """Serve ``table`` to new connections; ``retired`` are the exports it dropped.

        Sessions already using a retired export keep it; its storage is flushed and closed
        once they are gone.
        """
        with self._lock:
            self.table = table
            self._generation += 1
            self._retired += [(export, self._generation) for export in retired]
            unused = self._unused_retired()
        close_storages(unused)

    def _unused_retired(self) -> list[Export]:
        """(Lock held) Take the retired exports no session can use any more.

        A session accepted before the export was retired may still be negotiating with the
        old table: until it has picked an export, it could pick this one.
        """
        # By storage, not by export: a session may serve a copy of the export (holders.py
        # hands later clients a read-only one) that shares the retired export's storage.
        busy = {id(s.export.storage) for s in self._sessions if s.export is not None}
        negotiating = [self._born[s] for s in self._sessions if s.export is None]
        oldest = min(negotiating, default=self._generation)
        unused, kept = [], []
        for export, generation in self._retired:
            if id(export.storage) in busy or oldest < generation:
                kept.append((export, generation))
            else:
                unused.append(export)
        self._retired = kept
        return unused

    # ------------------------------------------------------------------ stopping

    def close_listeners(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._acceptor is not None:
            self._acceptor.join()
        with self._lock:
            closing: list[tuple[socket.socket, Address | None]] = [
                (sock, None) for sock in self._inherited
            ]
            closing += self._closing + [(sock, a) for a, (sock, _) in self._bound.items()]
            self._inherited, self._closing, self._bound = [], [], {}
        for sock, path in closing:
            _close_listener(sock, path)

    def shutdown(self, grace: float = 10.0) -> bool:
        """Stop as described in the module docstring; True if everything was flushed.

        Idempotent: later calls return False without doing anything.
        """
        if self._shut_down:
            return False
        self._shut_down = True
        self.close_listeners()
        with self._lock:
            sessions = dict(self._sessions)
        # Stop reading at once and answer what was received.  Clients that reconnect (QEMU
        # with reconnect-delay, the kernel supervisor) re-send the rest to the next server,
        # so a restart costs them no error; the spec's soft disconnect (ESHUTDOWN to new
        # requests) would fail those requests in QEMU, which does not retry them.
        for session in sessions:
            session.stop_reading()
        for session, thread in sessions.items():
            thread.join(grace)
            if thread.is_alive():
                log.warning("%s: did not finish within %.0fs, disconnecting", session.peer, grace)
                session.stop()  # whatever still arrives must not touch a closing storage
                session.abort()
                thread.join(5)
        self._pool.shutdown(wait=True)
        clean = self.table.close()
        clean = close_storages([export for export, _ in self._retired]) and clean
        self._wake_r.close()
        self._wake_w.close()
        return clean

    @property
    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)


def _close_listener(sock: socket.socket, address: Address | None) -> None:
    """Close a listening socket (and remove the socket file of a Unix one)."""
    with contextlib.suppress(OSError):
        sock.close()
    if isinstance(address, UnixAddress):
        with contextlib.suppress(OSError):
            address.path.unlink()


def _uri_of(sock: socket.socket) -> str:
    """The URI of a listener this server did not bind itself (socket activation)."""
    if sock.family == socket.AF_UNIX:
        return f"nbd+unix:///?socket={sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return TCPAddress(host, port).uri()


def _socket_alive(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): passed sockets are fds 3, 4, ...


def inherited_sockets(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """Listening sockets passed by systemd socket activation (sd_listen_fds(3)).

    Uses them only if $LISTEN_PID is this process, then removes LISTEN_PID, LISTEN_FDS and
    LISTEN_FDNAMES from the environment and marks the fds close-on-exec, so that no child
    process takes them for its own.  Raises ServeError if an fd is not a listening stream
    socket (a socket unit with Accept=yes passes connections, which nbs does not take).
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return []
    count_text = env.get("LISTEN_FDS", "0")
    names = env.get("LISTEN_FDNAMES", "")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    try:
        count = int(count_text)
    except ValueError:
        raise ServeError(f"LISTEN_FDS is not a number: {count_text!r}") from None
    sockets: list[socket.socket] = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as err:
            raise ServeError(f"fd {fd} from socket activation: {err.strerror}") from err
        sockets.append(sock)
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            raise ServeError(
                f"fd {fd} from socket activation is not a listening stream socket"
                " (use ListenStream= and Accept=no)"
            )
    if sockets:
        log.info(
            "using %d socket(s) from socket activation%s",
            len(sockets),
            f" ({names.replace(':', ', ')})" if names else "",
        )
    return sockets


# A client that vanished without a FIN (power loss, a cut link) would hold its volume, and a
# writer slot, forever; keepalive probes find it dead within about two minutes.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_PROBES = 6


def _keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


def _unix_peer(sock: socket.socket) -> str:
    """``unix pid N``: which process holds a volume is what an operator needs to know."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return "unix"
    pid = struct.unpack("3i", creds)[0]
    return f"unix pid {pid}" if pid > 0 else "unix"
