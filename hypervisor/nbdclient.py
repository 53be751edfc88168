"""The client side of the NBD handshake, blocking, for two jobs:

* probing an export before asking QEMU to open it (QEMU's own errors are vague, and a dead
  server would block its monitor for ``open-timeout`` seconds);
* handing the kernel a socket already in the transmission phase (the kernel nbd driver does
  no negotiation itself and understands only simple replies).
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import struct

from backend.nbd import constants as c
from backend.nbd import wire
from hypervisor.errors import HypervisorError
from hypervisor.target import NbdTarget

CONNECT_TIMEOUT = 5.0


class NbdClientError(HypervisorError):
    """The export cannot be used; the message says why in operator terms."""


class ServerUnreachableError(NbdClientError):
    """Nothing answers at the server's address."""


class ExportMissingError(NbdClientError):
    """The server answered but has no such export (or refuses it to us)."""


class ExportReadOnlyError(NbdClientError):
    """A writable attach of an export the server offers us read-only."""


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    size: int
    flags: int
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 * 1024 * 1024

    @property
    def read_only(self) -> bool:
        return bool(self.flags & c.TransmissionFlag.READ_ONLY)

    @property
    def multi_conn(self) -> bool:
        return bool(self.flags & c.TransmissionFlag.CAN_MULTI_CONN)


def dial(target: NbdTarget, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """A connected stream socket to the target's server."""
    try:
        if target.socket is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(str(target.socket))
            except OSError:
                sock.close()
                raise
        else:
            sock = socket.create_connection((target.host, target.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as err:
        raise ServerUnreachableError(
            f"NBD server for {target.uri()} is unreachable: {err.strerror or err}"
        ) from err
    return sock


class _Handshake:
    def __init__(self, sock: socket.socket, target: NbdTarget) -> None:
        self.sock: socket.socket = sock
        self.target = target

    def recv_exact(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise NbdClientError(f"{self.target.uri()}: server closed the connection")
            data += chunk
        return bytes(data)

    def option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(wire.OPTION_HEADER.pack(c.IHAVEOPT, opt, len(data)) + data)

    def reply(self, opt: int) -> tuple[int, bytes]:
        magic, got, kind, length = wire.OPTION_REPLY.unpack(self.recv_exact(wire.OPTION_REPLY.size))
        if magic != c.REPLY_MAGIC or got != opt:
            raise NbdClientError(f"{self.target.uri()}: malformed option reply")
        return kind, self.recv_exact(length)

    def start(self) -> None:
        magic, opt_magic, flags = wire.GREETING.unpack(self.recv_exact(wire.GREETING.size))
        if magic != c.NBDMAGIC or opt_magic != c.IHAVEOPT:
            raise NbdClientError(f"{self.target.uri()}: not a newstyle NBD server")
        if not flags & c.HandshakeFlag.FIXED_NEWSTYLE:
            raise NbdClientError(f"{self.target.uri()}: server lacks fixed newstyle")
        client = c.ClientFlag.C_FIXED_NEWSTYLE
        if flags & c.HandshakeFlag.NO_ZEROES:
            client |= c.ClientFlag.C_NO_ZEROES
        self.sock.sendall(wire.CLIENT_FLAGS.pack(client))
        if self.target.tls:
            self.starttls()

    def starttls(self) -> None:
        self.option(c.Opt.STARTTLS)
        kind, message = self.reply(c.Opt.STARTTLS)
        if kind != c.Rep.ACK:
            raise NbdClientError(f"{self.target.uri()}: server refused TLS: {message.decode()}")
        ctx = ssl.create_default_context(
            cafile=str(self.target.tls_dir / "ca-cert.pem") if self.target.tls_dir else None
        )
        if self.target.tls_dir is not None and (self.target.tls_dir / "client-cert.pem").exists():
            ctx.load_cert_chain(
                self.target.tls_dir / "client-cert.pem", self.target.tls_dir / "client-key.pem"
            )
        hostname = self.target.tls_hostname or self.target.host or "localhost"
        self.sock = ctx.wrap_socket(self.sock, server_hostname=hostname)

    def go(self, opt: int) -> ExportInfo:
        """INFO or GO for the target's export, asking for block sizes."""
        name = self.target.export.encode()
        payload = wire.U32.pack(len(name)) + name + struct.pack(">HH", 1, c.Info.BLOCK_SIZE)
        self.option(opt, payload)
        size = flags = None
        sizes = (1, 4096, 32 * 1024 * 1024)
        while True:
            kind, data = self.reply(opt)
            if kind == c.Rep.ACK:
                break
            if kind == c.Rep.INFO:
                (info,) = wire.U16.unpack_from(data)
                if info == c.Info.EXPORT:
                    _, size, flags = wire.INFO_EXPORT.unpack(data)
                elif info == c.Info.BLOCK_SIZE:
                    sizes = wire.INFO_BLOCK_SIZE.unpack(data)[1:]
                continue
            message = data.decode(errors="replace")
            if kind in (c.Rep.ERR_UNKNOWN, c.Rep.ERR_POLICY):
                raise ExportMissingError(f"{self.target.uri()}: no export {self.target.export!r}")
            if kind == c.Rep.ERR_TLS_REQD:
                raise NbdClientError(f"{self.target.uri()}: export requires TLS (use nbds://)")
            raise NbdClientError(f"{self.target.uri()}: server refused the export: {message}")
        if size is None or flags is None:
            raise NbdClientError(f"{self.target.uri()}: server sent no export information")
        return ExportInfo(size, flags, *sizes)


def probe(
    target: NbdTarget, timeout: float = CONNECT_TIMEOUT, *, read_only: bool = True
) -> ExportInfo:
    """Check that the export exists and is usable; returns what the server says of it.

    ``read_only=False``: the caller will write, so an export the server offers read-only is
    refused (ExportReadOnlyError) instead of being attached read-only without a word.
    """
    hs = _Handshake(dial(target, timeout), target)
    try:
        hs.start()
        info = hs.go(c.Opt.INFO)
        hs.option(c.Opt.ABORT)
    except (OSError, struct.error) as err:
        raise NbdClientError(f"{target.uri()}: handshake failed: {err}") from err
    finally:
        hs.sock.close()
    require_access(target, info, read_only=read_only)
    return info


def require_access(target: NbdTarget, info: ExportInfo, *, read_only: bool) -> None:
    """ExportReadOnlyError if the caller means to write (``read_only=False``) and the server
    offers the export read-only: attaching it read-only without a word would surprise."""
    if info.read_only and not read_only:
        raise ExportReadOnlyError(
            f"volume {target.volume!r} is read-only to this client: a read-only volume, or"
            f" another client holds it writable (`nbs volume info {target.volume}` shows who);"
            " attach it with --read-only to share it read-only"
        )


def connect_transmission(
    target: NbdTarget, timeout: float = CONNECT_TIMEOUT
) -> tuple[socket.socket, ExportInfo]:
    """A plaintext socket in the transmission phase with simple replies (for the kernel)."""
    if target.tls:
        raise NbdClientError("the kernel nbd driver cannot speak TLS; use a plaintext export")
    sock = dial(target, timeout)
    try:
        hs = _Handshake(sock, target)
        hs.start()
        info = hs.go(c.Opt.GO)
    except BaseException as err:
        sock.close()
        if isinstance(err, OSError | struct.error):
            raise NbdClientError(f"{target.uri()}: handshake failed: {err}") from err
        raise
    sock.settimeout(None)
    return sock, info
