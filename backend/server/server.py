"""Listeners (TCP, Unix, inherited fds), accepting, and the server's lifecycle.

Shutdown (SIGTERM) runs in this order: stop accepting; stop reading from every session
(requests already received are answered, then the connection closes); wait up to ``grace``
seconds for sessions to finish, then refuse what still arrives with ESHUTDOWN and cut them;
flush and close every storage.
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
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from backend.server.exports import Export, Exports
from backend.server.session import Session

log = logging.getLogger(__name__)


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
    ) -> None:
        self.table = table
        self._tcp = tcp or []
        self._unix = unix or []
        self._tls = tls
        self._listeners: list[socket.socket] = list(inherited or [])
        self._unix_paths: list[Path] = []
        self.uris: list[str] = []
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="nbs-io")
        self._sessions: dict[Session, threading.Thread] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._acceptor: threading.Thread | None = None
        self._stopping = False
        self._shut_down = False
        self.connections_by_export: dict[str, int] = {}

    # ------------------------------------------------------------------ binding

    def bind(self) -> list[str]:
        """Open every listener; returns the URIs clients can use.  Raises ServeError."""
        try:
            for address in self._tcp:
                self._bind_tcp(address)
            for unix in self._unix:
                self._bind_unix(unix)
        except ServeError:
            self.close_listeners()
            raise
        for sock in self._listeners:
            if sock.family == socket.AF_UNIX and not self._owned_unix(sock):
                self.uris.append(f"nbd+unix:///?socket={sock.getsockname()}")
        return self.uris

    def _owned_unix(self, sock: socket.socket) -> bool:
        return Path(sock.getsockname()) in self._unix_paths

    def _bind_tcp(self, address: TCPAddress) -> None:
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
        self._listeners.append(sock)
        self.uris.append(address.uri(sock.getsockname()[1]))

    def _bind_unix(self, address: UnixAddress) -> None:
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
        self._listeners.append(sock)
        self._unix_paths.append(path)
        self.uris.append(address.uri())

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Accept connections on a background thread."""
        self._acceptor = threading.Thread(target=self._accept_loop, name="nbs-accept")
        self._acceptor.start()

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            for sock in self._listeners:
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        return
                    listener = key.fileobj
                    assert isinstance(listener, socket.socket)
                    try:
                        client, addr = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as err:
                        # EMFILE and friends: log, keep serving the clients we have.
                        log.error("accept failed: %s", err)
                        continue
                    self._spawn(client, addr)

    def _spawn(self, client: socket.socket, addr: object) -> None:
        client.setblocking(True)
        if client.family in (socket.AF_INET, socket.AF_INET6):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = "{}:{}".format(*addr) if isinstance(addr, tuple) else str(addr)
        else:
            peer = "unix"
        session = Session(
            client, peer, self.table, tls=self._tls, pool=self._pool, on_export=self._track
        )
        thread = threading.Thread(target=self._run_session, args=(session,), daemon=True)
        with self._lock:
            if self._stopping:
                client.close()
                return
            self._sessions[session] = thread
        log.debug("%s: connected", peer)
        thread.start()

    def _run_session(self, session: Session) -> None:
        try:
            session.run()
        finally:
            with self._lock:
                self._sessions.pop(session, None)

    def _track(self, session: Session, export: Export | None) -> None:
        with self._lock:
            if export is not None:
                self.connections_by_export[export.name] = (
                    self.connections_by_export.get(export.name, 0) + 1
                )
            elif session.export is not None:
                self.connections_by_export[session.export.name] -= 1

    # ------------------------------------------------------------------ stopping

    def close_listeners(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._acceptor is not None:
            self._acceptor.join()
        for sock in self._listeners:
            with contextlib.suppress(OSError):
                sock.close()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                path.unlink()
        self._listeners.clear()
        self._unix_paths.clear()

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
        self._wake_r.close()
        self._wake_w.close()
        return clean

    @property
    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)


def _socket_alive(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def inherited_sockets(environ: dict[str, str] | None = None) -> list[socket.socket]:
    """Listening sockets passed by systemd socket activation (LISTEN_PID/LISTEN_FDS)."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(env.get("LISTEN_FDS", "0"))
    return [socket.socket(fileno=3 + i) for i in range(count)]
