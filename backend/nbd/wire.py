"""Byte layouts of NBD messages (all integers big-endian, as the spec requires).

Encoders return ``bytes``; the few decoders used by the core are ``struct.Struct`` objects so
the hot path unpacks without a function call of ours in between.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from backend.nbd import constants as c

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
HOLE = struct.Struct(">QI")
ERROR_CHUNK = struct.Struct(">IH")
DESCRIPTOR = struct.Struct(">II")

_DONE = int(c.ReplyFlag.DONE)


def greeting() -> bytes:
    flags = c.HandshakeFlag.FIXED_NEWSTYLE | c.HandshakeFlag.NO_ZEROES
    return GREETING.pack(c.NBDMAGIC, c.IHAVEOPT, flags)


def option_reply(option: int, reply: c.Rep, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(c.REPLY_MAGIC, option, reply, len(data)) + data


def option_error(option: int, reply: c.Rep, message: str) -> bytes:
    # Error replies may carry a human-readable string (spec: "Option reply types").
    return option_reply(option, reply, message.encode()[: c.MAX_STRING])


def info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT.pack(c.Info.EXPORT, size, flags)


def info_string(kind: c.Info, text: str) -> bytes:
    return U16.pack(kind) + text.encode()


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE.pack(c.Info.BLOCK_SIZE, minimum, preferred, maximum)


def server_entry(name: str, description: str = "") -> bytes:
    """An NBD_REP_SERVER payload: the name, then (spec: implementation-specific) the
    description, which nbdinfo --list shows."""
    raw = name.encode()
    return U32.pack(len(raw)) + raw + description.encode()[: c.MAX_STRING]


def meta_context(context_id: int, name: str) -> bytes:
    return U32.pack(context_id) + name.encode()


def request(
    command: int,
    cookie: int,
    offset: int,
    length: int,
    *,
    flags: int = 0,
    magic: int = c.REQUEST_MAGIC,
) -> bytes:
    """A request header as a client sends it (used by tests and tools)."""
    return REQUEST.pack(magic, flags, command, cookie, offset, length)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(cookie: int, kind: c.ReplyType, length: int, done: bool) -> bytes:
    return STRUCTURED_REPLY.pack(
        c.STRUCTURED_REPLY_MAGIC, _DONE if done else 0, kind, cookie, length
    )


def offset_data_header(cookie: int, offset: int, length: int, done: bool) -> bytes:
    """Header of an OFFSET_DATA chunk carrying ``length`` data bytes (the data follows)."""
    return chunk_header(cookie, c.ReplyType.OFFSET_DATA, 8 + length, done) + U64.pack(offset)


def offset_hole(cookie: int, offset: int, length: int, done: bool) -> bytes:
    return chunk_header(cookie, c.ReplyType.OFFSET_HOLE, 12, done) + HOLE.pack(offset, length)


def error_chunk(cookie: int, error: int, message: str, offset: int | None = None) -> bytes:
    text = message.encode()[: c.MAX_STRING]
    body = ERROR_CHUNK.pack(error, len(text)) + text
    if offset is None:
        return chunk_header(cookie, c.ReplyType.ERROR, len(body), True) + body
    body += U64.pack(offset)
    return chunk_header(cookie, c.ReplyType.ERROR_OFFSET, len(body), True) + body


def block_status(cookie: int, context_id: int, descriptors: Iterable[tuple[int, int]]) -> bytes:
    body = bytearray(U32.pack(context_id))
    for length, flags in descriptors:
        body += DESCRIPTOR.pack(length, flags)
    return chunk_header(cookie, c.ReplyType.BLOCK_STATUS, len(body), True) + bytes(body)
