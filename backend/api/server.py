"""ApiServer: the management API served by uvicorn on a background thread of ``nbs serve``.

One thread runs one asyncio loop with up to two uvicorn servers: one for the TCP listeners
(HTTPS when TLS is configured) and one for the Unix socket (plain HTTP: the socket's mode
keeps other users out, and it never leaves the machine).  Listeners are bound by start()
itself, so an address in use is a ServeError there and then, and port 0 reports the port the
kernel chose.  uvicorn installs no signal handlers off the main thread: ``nbs serve`` keeps
its own and calls stop().
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from backend.api.imports import Imports
from backend.api.local import accepts_connections, is_loopback, load_or_create_token
from backend.server.server import ServeError
from backend.server.tls import TLSConfigError, TLSFiles, server_context

__all__ = ["ApiServer", "load_or_create_token"]

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0


class ApiServer:
    """Serves ``app`` on TCP ``listen`` addresses (port 0: any free port) and/or the Unix
    socket ``unix`` (created mode 0600, removed by stop()).

    ``tls``: certificate and key (and optionally a CA that client certificates must chain to)
    for the TCP listeners.  Without it the token crosses the network in clear text, which is
    logged as a warning for every listener that is not on a loopback address.
    """

    def __init__(
        self,
        app: FastAPI,
        *,
        listen: Sequence[tuple[str, int]] = (),
        unix: Path | None = None,
        tls: TLSFiles | None = None,
    ) -> None:
        if not listen and unix is None:
            raise ValueError("ApiServer needs a TCP address or a Unix socket to listen on")
        self.app = app
        self._listen = list(listen)
        self._unix = unix
        self._tls = tls
        self._servers: list[tuple[uvicorn.Server, list[socket.socket]]] = []
        self._bound: list[socket.socket] = []
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._stopped = False
        self._unix_bound = False
        self.urls: list[str] = []

    # ------------------------------------------------------------------ starting

    def start(self) -> list[str]:
        """Bind, start serving, and return once every listener accepts: the API's URLs
        (``http[s]://HOST:PORT``, ``unix:PATH``).

        Raises ServeError (an address in use, a bad socket path, unusable TLS files, or the
        server failing to start); nothing is left listening then.
        """
        if self._thread is not None:
            raise RuntimeError("ApiServer.start() may be called once")
        try:
            self._bind()
        except BaseException:
            self._close_sockets()
            raise
        self._thread = threading.Thread(target=self._run, name="nbs-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not all(server.started for server, _ in self._servers):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop(grace=0)
                raise ServeError(f"the management API did not start: {self._failure or 'timeout'}")
            time.sleep(0.01)
        for url in self.urls:
            log.info("management API at %s", url)
        return list(self.urls)

    def _bind(self) -> None:
        # TLS first: unusable files must fail before anything listens.
        tls = _tls_context(self._tls) if self._tls is not None and self._listen else None
        tcp: list[socket.socket] = []
        for host, port in self._listen:
            sock = _bind_tcp(host, port)
            self._bound.append(sock)
            tcp.append(sock)
            bound = sock.getsockname()[1]
            self.urls.append(f"{'https' if tls else 'http'}://{_host(host)}:{bound}")
            if tls is None and not is_loopback(host):
                log.warning(
                    "the management API on %s:%d is plain HTTP: its token crosses the network"
                    " in clear text (configure TLS)",
                    host,
                    bound,
                )
        if tcp:
            factory = _constant(tls) if tls is not None else None
            self._servers.append((self._uvicorn(ssl_context_factory=factory), tcp))
        if self._unix is not None:
            unix = _bind_unix(self._unix)
            self._bound.append(unix)
            self._unix_bound = True
            self._servers.append((self._uvicorn(), [unix]))
            self.urls.append(f"unix:{self._unix}")

    def _uvicorn(
        self,
        ssl_context_factory: Callable[..., ssl.SSLContext] | None = None,
    ) -> uvicorn.Server:
        config = uvicorn.Config(
            self.app,
            http="h11",
            loop="asyncio",
            lifespan="off",
            log_config=None,  # logging belongs to the nbs command, not to uvicorn
            proxy_headers=False,  # clients connect directly; never trust X-Forwarded-For
            server_header=False,
            timeout_graceful_shutdown=None,
            ssl_context_factory=ssl_context_factory,
        )
        config.load()  # here, so that a bad configuration fails in start(), not in the thread
        return uvicorn.Server(config)

    def _run(self) -> None:
        async def serve_all() -> None:
            await asyncio.gather(*(server.serve(sockets) for server, sockets in self._servers))

        try:
            asyncio.run(serve_all())
        except BaseException as err:  # SystemExit too: uvicorn exits when startup fails
            self._failure = err
            log.error("the management API stopped: %s", err)

    # ------------------------------------------------------------------ stopping

    def stop(self, grace: float = 5.0) -> bool:
        """Stop accepting, let requests finish for up to ``grace`` seconds and cut the rest,
        then wait (within the same bound) for imports still copying.  Returns True if
        everything finished in time; an import cut short is rolled back at the next start.
        Idempotent; later calls return True.
        """
        if self._stopped:
            return True
        self._stopped = True
        deadline = time.monotonic() + grace
        for server, _ in self._servers:
            server.config.timeout_graceful_shutdown = math.ceil(grace)
            server.should_exit = True
        clean = True
        if self._thread is not None:
            self._thread.join(grace + 1)
            if self._thread.is_alive():
                clean = False
                for server, _ in self._servers:
                    server.force_exit = True
                self._thread.join(2)
        self._close_sockets()
        imports = getattr(self.app.state, "imports", None)
        if isinstance(imports, Imports) and not imports.wait(max(deadline - time.monotonic(), 0)):
            log.warning("imports still running after %.0fs are abandoned", grace)
            clean = False
        return clean and self._failure is None

    def _close_sockets(self) -> None:
        for sock in self._bound:
            sock.close()
        if self._unix is not None and self._unix_bound:
            self._unix_bound = False
            with contextlib.suppress(OSError):
                self._unix.unlink()


def _constant(context: ssl.SSLContext) -> Callable[..., ssl.SSLContext]:
    def factory(*_: object) -> ssl.SSLContext:
        return context

    return factory


def _tls_context(files: TLSFiles) -> ssl.SSLContext:
    try:
        return server_context(files)
    except TLSConfigError as err:
        raise ServeError(f"management API: {err}") from err


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _bind_tcp(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as err:
        raise ServeError(f"management API: cannot resolve {host!r}: {err.strerror}") from err
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        what = "address already in use" if err.errno == errno.EADDRINUSE else err.strerror
        raise ServeError(f"management API: cannot listen on {host}:{port}: {what}") from err
    return sock


def _bind_unix(path: Path) -> socket.socket:
    if path.is_symlink() or path.exists():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ServeError(f"management API: {path} exists and is not a socket")
        if accepts_connections(path):
            raise ServeError(f"management API: another server is listening on {path}")
        path.unlink()  # left by a server that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
    except OSError as err:
        sock.close()
        raise ServeError(f"management API: cannot listen on {path}: {err.strerror}") from err
    try:
        # Before listen(): nobody can connect yet, so no one gets in under the umask's mode.
        os.chmod(path, 0o600)
        sock.listen(128)
    except OSError as err:
        sock.close()
        path.unlink()
        raise ServeError(f"management API: cannot listen on {path}: {err.strerror}") from err
    return sock
