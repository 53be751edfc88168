"""A fake generic-netlink kernel for ``GenlSocket``: requests in, canned replies and acks out.

It speaks the real byte format (hypervisor.netlink's encoder and parser), so a test sees
exactly the messages code under test would send to the kernel.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
from collections.abc import Callable, Sequence

from hypervisor import netlink
from hypervisor.netlink import Attr, GenlMessage

Handler = Callable[[GenlMessage], Sequence[Sequence[Attr]]]
"""Answers one request with the attributes of each reply message; raise OSError to fail it."""


def _no_replies(_request: GenlMessage) -> Sequence[Sequence[Attr]]:
    """The handler of a command nobody registered: it answers with no message."""
    return []


NBD_FAMILY_ID = 0x1B
NBD_GROUP_ID = 9


@dataclasses.dataclass
class FakeKernel:
    """The peer of a ``GenlSocket``: knows the "nlctrl" controller and the families given."""

    families: dict[str, tuple[int, dict[str, int]]] = dataclasses.field(
        default_factory=lambda: {"nbd": (NBD_FAMILY_ID, {"nbd_mc_group": NBD_GROUP_ID})}
    )
    handlers: dict[int, Handler] = dataclasses.field(default_factory=dict)
    requests: list[GenlMessage] = dataclasses.field(default_factory=list)
    groups: list[int] = dataclasses.field(default_factory=list)
    closed: bool = False
    timeout: float | None = None
    _queue: collections.deque[bytes | OSError] = dataclasses.field(
        default_factory=collections.deque
    )

    # -- what the test drives --

    def notify(self, family: int, cmd: int, attrs: Sequence[Attr]) -> None:
        """Queue a multicast notification (sequence number 0)."""
        self._queue.append(netlink.encode_request(family, cmd, attrs, flags=0, seq=0))

    def overflow(self) -> None:
        """The next recv fails with ENOBUFS, as after a multicast overrun."""
        self._queue.append(OSError(errno.ENOBUFS, "No buffer space available"))

    def commands(self, family: int = NBD_FAMILY_ID) -> list[GenlMessage]:
        return [r for r in self.requests if r.family == family]

    # -- the socket side (hypervisor.netlink.Datagrams) --

    def send(self, data: bytes) -> int:
        (request,) = netlink.parse_messages(data)
        assert isinstance(request, GenlMessage)
        self.requests.append(request)
        replies: Sequence[Sequence[Attr]]
        try:
            if request.family == netlink.GENL_ID_CTRL:
                replies = self._getfamily(request)
            else:
                replies = self.handlers.get(request.cmd, _no_replies)(request)
        except OSError as err:
            self._queue.append(netlink.encode_ack(err.errno or errno.EIO, data, seq=request.seq))
            return len(data)
        for attrs in replies:
            self._queue.append(
                netlink.encode_request(request.family, request.cmd, attrs, flags=0, seq=request.seq)
            )
        self._queue.append(netlink.encode_ack(0, data, seq=request.seq))
        return len(data)

    def recv(self, size: int) -> bytes:
        if not self._queue:
            if self.timeout is None:
                raise AssertionError("recv would block forever")
            raise TimeoutError("timed out")
        item = self._queue.popleft()
        if isinstance(item, OSError):
            raise item
        return item

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout

    def setsockopt(self, level: int, option: int, value: int) -> None:
        assert (level, option) == (netlink.SOL_NETLINK, netlink.NETLINK_ADD_MEMBERSHIP)
        self.groups.append(value)

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        self.closed = True

    def _getfamily(self, request: GenlMessage) -> list[list[Attr]]:
        name_attr = request.attr(netlink.CTRL_ATTR_FAMILY_NAME)
        assert name_attr is not None
        name = name_attr.as_string()
        if name not in self.families:
            raise OSError(errno.ENOENT, "no such family")
        family_id, groups = self.families[name]
        return [
            [
                netlink.u16(netlink.CTRL_ATTR_FAMILY_ID, family_id),
                netlink.string(netlink.CTRL_ATTR_FAMILY_NAME, name),
                netlink.u32(netlink.CTRL_ATTR_VERSION, 1),
                netlink.nested(
                    netlink.CTRL_ATTR_MCAST_GROUPS,
                    [
                        netlink.nested(
                            i + 1,
                            [
                                netlink.u32(netlink.CTRL_ATTR_MCAST_GRP_ID, group_id),
                                netlink.string(netlink.CTRL_ATTR_MCAST_GRP_NAME, group),
                            ],
                        )
                        for i, (group, group_id) in enumerate(groups.items())
                    ],
                ),
            ]
        ]
