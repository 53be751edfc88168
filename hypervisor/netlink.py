"""A small generic-netlink client: enough to drive the kernel nbd driver.

Two layers, kept apart so the bytes can be tested without a kernel:

* pure encoding and decoding (``Attr``, ``encode_request``, ``parse_messages``) of
  nlmsghdr + genlmsghdr + attributes, as laid out in include/uapi/linux/netlink.h and
  genetlink.h: every header and attribute starts on a 4-byte boundary, integers are in host
  byte order, strings are NUL-terminated;
* ``GenlSocket``, a blocking NETLINK_GENERIC socket that resolves families
  (CTRL_CMD_GETFAMILY), sends a request and collects its replies up to the kernel's ack, and
  receives multicast notifications.

A failed request raises ``NetlinkError``, an ``OSError`` carrying the kernel's errno (and its
extended-ack message when it sent one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from hypervisor.errors import HypervisorError

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_DROP_MEMBERSHIP = 2
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

# nlmsghdr.nlmsg_flags
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_DUMP = 0x300
# ...on NLMSG_ERROR messages: the request was cut to its header / TLVs follow the error.
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200

# nlmsghdr.nlmsg_type values below NLMSG_MIN_TYPE are the netlink layer's own.
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLMSG_MIN_TYPE = 0x10

NLMSGERR_ATTR_MSG = 1

NLA_F_NESTED = 1 << 15
NLA_F_NET_BYTEORDER = 1 << 14
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

# The generic netlink controller (family "nlctrl").
GENL_ID_CTRL = NLMSG_MIN_TYPE
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_VERSION = 3
CTRL_ATTR_MCAST_GROUPS = 7
CTRL_ATTR_MCAST_GRP_NAME = 1
CTRL_ATTR_MCAST_GRP_ID = 2

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
GENLMSGHDR = struct.Struct("=BBH")  # cmd, version, reserved
NLATTR = struct.Struct("=HH")  # len, type
NLMSGERR = struct.Struct("=i")  # -errno, followed by the offending request's header

RECV_BUFFER = 1 << 16
REQUEST_TIMEOUT = 60.0


def align(length: int) -> int:
    """Netlink's NLMSG_ALIGN / NLA_ALIGN: round up to a multiple of 4."""
    return (length + 3) & ~3


class NetlinkError(HypervisorError, OSError):
    """The kernel answered a request with an error (``errno`` is set)."""


class FamilyNotFoundError(NetlinkError):
    """No generic netlink family of that name (its module is not loaded, or it is too old)."""


class NotificationsLostError(NetlinkError):
    """The socket's buffer overflowed (ENOBUFS): some multicast notifications were dropped."""


class MalformedMessageError(HypervisorError, ValueError):
    """Bytes that are not a well-formed netlink message."""


@dataclasses.dataclass(frozen=True)
class Attr:
    """One netlink attribute: a type and its payload, nested or not.

    Build them with ``u8`` / ``u16`` / ``u32`` / ``u64`` / ``string`` / ``nested``; read them
    with the ``as_*`` accessors, which know nothing of the schema: the caller says what type
    it expects, as the kernel's nla_get_*() do.
    """

    type: int
    payload: bytes
    nested: bool = False

    def encode(self) -> bytes:
        length = NLATTR.size + len(self.payload)
        kind = self.type | (NLA_F_NESTED if self.nested else 0)
        return NLATTR.pack(length, kind) + self.payload + bytes(align(length) - length)

    def _number(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        if len(self.payload) < size:
            raise MalformedMessageError(f"attribute {self.type}: {len(self.payload)} bytes")
        (value,) = struct.unpack_from(fmt, self.payload)
        return int(value)

    def as_u8(self) -> int:
        return self._number("=B")

    def as_u16(self) -> int:
        return self._number("=H")

    def as_u32(self) -> int:
        return self._number("=I")

    def as_u64(self) -> int:
        return self._number("=Q")

    def as_string(self) -> str:
        return self.payload.split(b"\0", 1)[0].decode()

    def as_attrs(self) -> list[Attr]:
        return parse_attrs(self.payload)


def u8(kind: int, value: int) -> Attr:
    return Attr(kind, struct.pack("=B", value))


def u16(kind: int, value: int) -> Attr:
    return Attr(kind, struct.pack("=H", value))


def u32(kind: int, value: int) -> Attr:
    return Attr(kind, struct.pack("=I", value))


def u64(kind: int, value: int) -> Attr:
    return Attr(kind, struct.pack("=Q", value))


def string(kind: int, value: str) -> Attr:
    return Attr(kind, value.encode() + b"\0")


def nested(kind: int, attrs: Iterable[Attr]) -> Attr:
    return Attr(kind, encode_attrs(attrs), nested=True)


def encode_attrs(attrs: Iterable[Attr]) -> bytes:
    return b"".join(a.encode() for a in attrs)


def parse_attrs(data: bytes) -> list[Attr]:
    """The attributes packed in ``data`` (each padded to 4 bytes; the last pad may be cut)."""
    attrs = []
    offset = 0
    while offset + NLATTR.size <= len(data):
        length, kind = NLATTR.unpack_from(data, offset)
        if length < NLATTR.size or offset + length > len(data):
            raise MalformedMessageError(f"attribute length {length} at offset {offset}")
        payload = data[offset + NLATTR.size : offset + length]
        attrs.append(Attr(kind & NLA_TYPE_MASK, payload, nested=bool(kind & NLA_F_NESTED)))
        offset += align(length)
    return attrs


def find(attrs: Iterable[Attr], kind: int) -> Attr | None:
    """The first attribute of that type, if any."""
    return next((a for a in attrs if a.type == kind), None)


@dataclasses.dataclass(frozen=True)
class GenlMessage:
    """A generic netlink message: a request we send, or a reply or notification we receive."""

    family: int  # nlmsg_type: the family id
    cmd: int
    attrs: tuple[Attr, ...] = ()
    version: int = 1
    flags: int = 0
    seq: int = 0
    pid: int = 0

    def attr(self, kind: int) -> Attr | None:
        return find(self.attrs, kind)


@dataclasses.dataclass(frozen=True)
class Ack:
    """NLMSG_ERROR: ``error`` is 0 for an ack, else a positive errno."""

    error: int
    seq: int
    message: str = ""  # the kernel's extended ack text (NLMSGERR_ATTR_MSG), if any

    def exception(self, what: str) -> NetlinkError:
        text = f"{what}: {os.strerror(self.error)}"
        if self.message:
            text += f" ({self.message})"
        return NetlinkError(self.error, text)


@dataclasses.dataclass(frozen=True)
class Done:
    """NLMSG_DONE: the end of a multipart (dump) reply."""

    seq: int


Message = GenlMessage | Ack | Done


def encode_request(
    family: int,
    cmd: int,
    attrs: Iterable[Attr] = (),
    *,
    version: int = 1,
    flags: int = NLM_F_REQUEST | NLM_F_ACK,
    seq: int = 0,
    pid: int = 0,
) -> bytes:
    """One nlmsghdr + genlmsghdr + attributes."""
    body = GENLMSGHDR.pack(cmd, version, 0) + encode_attrs(attrs)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), family, flags, seq, pid) + body


def encode_message(message: GenlMessage) -> bytes:
    return encode_request(
        message.family,
        message.cmd,
        message.attrs,
        version=message.version,
        flags=message.flags,
        seq=message.seq,
        pid=message.pid,
    )


def encode_ack(error: int, request: bytes, *, seq: int, message: str = "") -> bytes:
    """An NLMSG_ERROR as the kernel writes it (for tests and fakes): ``error`` >= 0."""
    flags = NLM_F_CAPPED
    tlvs = b""
    if message:
        flags |= NLM_F_ACK_TLVS
        tlvs = string(NLMSGERR_ATTR_MSG, message).encode()
    body = NLMSGERR.pack(-error) + request[: NLMSGHDR.size] + tlvs
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), NLMSG_ERROR, flags, seq, 0) + body


def parse_messages(data: bytes) -> list[Message]:
    """Every message in one datagram from the kernel (it may pack several)."""
    messages: list[Message] = []
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, flags, seq, pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            raise MalformedMessageError(f"message length {length} at offset {offset}")
        body = data[offset + NLMSGHDR.size : offset + length]
        offset += align(length)
        if kind == NLMSG_ERROR:
            messages.append(_parse_error(body, flags, seq))
        elif kind == NLMSG_DONE:
            messages.append(Done(seq))
        elif kind in (NLMSG_NOOP, NLMSG_OVERRUN):
            continue
        else:
            if len(body) < GENLMSGHDR.size:
                raise MalformedMessageError(f"generic netlink message of {len(body)} bytes")
            cmd, version, _ = GENLMSGHDR.unpack_from(body)
            attrs = tuple(parse_attrs(body[GENLMSGHDR.size :]))
            messages.append(GenlMessage(kind, cmd, attrs, version, flags, seq, pid))
    return messages


def _parse_error(body: bytes, flags: int, seq: int) -> Ack:
    if len(body) < NLMSGERR.size + NLMSGHDR.size:
        raise MalformedMessageError(f"NLMSG_ERROR of {len(body)} bytes")
    (error,) = NLMSGERR.unpack_from(body)
    message = ""
    if flags & NLM_F_ACK_TLVS:
        request_length = NLMSGHDR.size
        if not flags & NLM_F_CAPPED:
            (request_length,) = struct.unpack_from("=I", body, NLMSGERR.size)
        tlvs = body[NLMSGERR.size + align(request_length) :]
        text = find(parse_attrs(tlvs), NLMSGERR_ATTR_MSG)
        message = text.as_string() if text is not None else ""
    return Ack(-error, seq, message)


@dataclasses.dataclass(frozen=True)
class Family:
    """A generic netlink family as the controller describes it."""

    name: str
    id: int
    version: int
    groups: dict[str, int]  # multicast group name -> id


def parse_family(message: GenlMessage) -> Family:
    """The controller's answer to CTRL_CMD_GETFAMILY."""
    family_id = message.attr(CTRL_ATTR_FAMILY_ID)
    name = message.attr(CTRL_ATTR_FAMILY_NAME)
    if family_id is None or name is None:
        raise MalformedMessageError("CTRL_CMD_GETFAMILY reply without id or name")
    version = message.attr(CTRL_ATTR_VERSION)
    groups: dict[str, int] = {}
    mcast = message.attr(CTRL_ATTR_MCAST_GROUPS)
    for group in mcast.as_attrs() if mcast is not None else ():
        fields = group.as_attrs()
        group_name = find(fields, CTRL_ATTR_MCAST_GRP_NAME)
        group_id = find(fields, CTRL_ATTR_MCAST_GRP_ID)
        if group_name is not None and group_id is not None:
            groups[group_name.as_string()] = group_id.as_u32()
    return Family(
        name.as_string(),
        family_id.as_u16(),
        version.as_u32() if version is not None else 1,
        groups,
    )


class Datagrams(Protocol):
    """What ``GenlSocket`` needs of its socket (a real netlink socket, or a test's fake)."""

    def send(self, data: bytes, /) -> int: ...

    def recv(self, size: int, /) -> bytes: ...

    def settimeout(self, timeout: float | None, /) -> None: ...

    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


class GenlSocket:
    """A blocking NETLINK_GENERIC socket.

    ``request`` sends one message with NLM_F_ACK and returns the replies that came before the
    kernel's ack. Notifications (sequence number 0) that arrive meanwhile are kept for
    ``receive``. The socket is owned: ``close`` (or leaving the ``with`` block) closes it.
    """

    def __init__(self, sock: Datagrams | None = None) -> None:
        if sock is None:
            real = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
            try:
                real.bind((0, 0))
                for option in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):
                    # Older kernels lack these; plain acks are fine.
                    with contextlib.suppress(OSError):
                        real.setsockopt(SOL_NETLINK, option, 1)
            except BaseException:
                real.close()
                raise
            sock = real
        self.sock: Datagrams = sock
        self._seq = 0
        self._pending: list[GenlMessage] = []
        self._lost = False

    @classmethod
    def from_fd(cls, fd: int) -> GenlSocket:
        """Adopt an inherited netlink socket (with its subscriptions)."""
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> GenlSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def family(self, name: str) -> Family:
        """Resolve a family by name; ``FamilyNotFoundError`` if the kernel has none."""
        try:
            replies = self.request(
                GENL_ID_CTRL, CTRL_CMD_GETFAMILY, [string(CTRL_ATTR_FAMILY_NAME, name)]
            )
        except NetlinkError as err:
            if err.errno == errno.ENOENT:
                raise FamilyNotFoundError(
                    errno.ENOENT, f"no generic netlink family {name!r}"
                ) from err
            raise
        if not replies:
            raise MalformedMessageError(f"no answer about family {name!r}")
        return parse_family(replies[0])

    def subscribe(self, group: int) -> None:
        """Receive the multicast group's notifications from now on."""
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)

    def request(
        self,
        family: int,
        cmd: int,
        attrs: Sequence[Attr] = (),
        *,
        version: int = 1,
        timeout: float | None = REQUEST_TIMEOUT,
    ) -> list[GenlMessage]:
        """Send a request; return the replies before the ack, or raise ``NetlinkError``.

        ``TimeoutError`` if the kernel has not acked within ``timeout`` seconds.
        """
        self._seq = self._seq % 0xFFFFFFFF + 1
        seq = self._seq
        data = encode_request(family, cmd, attrs, version=version, seq=seq)
        self.sock.settimeout(timeout)
        try:
            self.sock.send(data)
            return self._collect(seq, f"netlink command {cmd} (family {family})")
        finally:
            self.sock.settimeout(None)

    def _collect(self, seq: int, what: str) -> list[GenlMessage]:
        replies: list[GenlMessage] = []
        while True:
            try:
                messages = self._recv()
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
                self._lost = True  # told to the next receive(); our answer is still coming
                continue
            for message in messages:
                if isinstance(message, GenlMessage) and message.seq == 0:
                    self._pending.append(message)
                elif message.seq != seq:
                    continue  # a late answer to an earlier, abandoned request
                elif isinstance(message, Ack):
                    if message.error:
                        raise message.exception(what)
                    return replies
                elif isinstance(message, GenlMessage):
                    replies.append(message)

    def receive(self, timeout: float | None = None) -> list[GenlMessage]:
        """Notifications: those already waiting, or the next datagram's, or [] on timeout.

        ``NotificationsLostError`` if the kernel dropped some since the last call.
        """
        if self._lost:
            self._lost = False
            raise NotificationsLostError(errno.ENOBUFS, "netlink notifications were lost")
        if self._pending:
            pending, self._pending = self._pending, []
            return pending
        self.sock.settimeout(timeout)
        try:
            messages = self._recv()
        except TimeoutError:
            return []
        except OSError as err:
            if err.errno == errno.ENOBUFS:
                raise NotificationsLostError(err.errno, "netlink notifications were lost") from err
            raise
        finally:
            self.sock.settimeout(None)
        return [m for m in messages if isinstance(m, GenlMessage)]

    def _recv(self) -> list[Message]:
        return parse_messages(self.sock.recv(RECV_BUFFER))


def iter_nested(attr: Attr | None, kind: int) -> Iterator[list[Attr]]:
    """The fields of each ``kind`` item nested in ``attr`` (e.g. a device list)."""
    if attr is None:
        return
    for item in attr.as_attrs():
        if item.type == kind:
            yield item.as_attrs()
