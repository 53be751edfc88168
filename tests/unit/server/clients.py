"""Storages and a raw client shared by the in-process server tests (test_session.py,
test_metrics.py): just enough NBD to reach the transmission phase over loopback."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

from backend.nbd import constants as c
from backend.server.exports import Export, ExportTable
from backend.server.server import Server, TCPAddress
from backend.storage import Capabilities, MemoryStorage, StorageError
from tests.unit.nbd.helpers import info_payload, option


class GatedStorage(MemoryStorage):
    """Memory storage that runs on the worker pool and whose reads at offset 0 wait until
    a read elsewhere has completed, so replies must leave out of order."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = threading.Event()

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(super().capabilities, inline=False)

    def read(self, offset: int, length: int) -> bytes:
        if offset == 0:
            assert self.gate.wait(10), "the second read never ran"
        data = super().read(offset, length)
        if offset != 0:
            self.gate.set()
        return data


class FailingStorage(MemoryStorage):
    """Memory storage whose writes fail with the errno written in the first payload byte."""

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        raise StorageError(data[0], "injected failure")


class Client:
    """Just enough of an NBD client: GO with structured replies, then raw requests."""

    def __init__(self, port: int, export: str, *, structured: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._recv_exact(18)  # greeting
        flags = c.ClientFlag.C_FIXED_NEWSTYLE | c.ClientFlag.C_NO_ZEROES
        self.sock.sendall(
            struct.pack(">I", flags)
            + (option(c.Opt.STRUCTURED_REPLY) if structured else b"")
            + option(c.Opt.GO, info_payload(export))
        )
        acks = 2 if structured else 1
        while acks:
            _, _, kind, length = struct.unpack(">QIII", self._recv_exact(20))
            self._recv_exact(length)
            if kind == c.Rep.ACK:
                acks -= 1

    def _recv_exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def chunk(self) -> tuple[int, int, int, bytes]:
        """(flags, type, cookie, body) of the next structured reply chunk."""
        magic, flags, kind, cookie, length = struct.unpack(">IHHQI", self._recv_exact(20))
        assert magic == c.STRUCTURED_REPLY_MAGIC
        return flags, kind, cookie, self._recv_exact(length)

    def reply(self) -> tuple[int, int, bytes]:
        """(cookie, error, data) of the next reply, structured or simple."""
        magic = struct.unpack(">I", self._recv_exact(4))[0]
        if magic == c.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self._recv_exact(12))
            return cookie, error, b""
        assert magic == c.STRUCTURED_REPLY_MAGIC
        flags, kind, cookie, length = struct.unpack(">HHQI", self._recv_exact(16))
        body = self._recv_exact(length)
        assert flags & c.ReplyFlag.DONE
        if kind == c.ReplyType.OFFSET_DATA:
            return cookie, 0, body[8:]
        if kind == c.ReplyType.ERROR:
            return cookie, struct.unpack_from(">I", body)[0], b""
        return cookie, 0, body

    def close(self) -> None:
        self.sock.close()


def port_of(server: Server) -> int:
    return int(server.uris[0].rsplit(":", 1)[1])


@contextlib.contextmanager
def in_process_servers() -> Iterator[Callable[..., Server]]:
    """``start(*exports, port=0, **server_options)`` runs a Server on 127.0.0.1 in this
    process; every server started is shut down on leaving."""
    servers: list[Server] = []

    def start(*exports: Export, port: int = 0, **options: Any) -> Server:
        address = [TCPAddress("127.0.0.1", port)]
        server = Server(ExportTable(list(exports)), tcp=address, **options)
        server.bind()
        server.start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.shutdown(grace=5)
