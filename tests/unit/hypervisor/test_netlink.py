"""Generic netlink encoding and decoding, byte by byte, and GenlSocket against a fake kernel."""

from __future__ import annotations

import errno
import struct

import pytest

from hypervisor import netlink
from hypervisor.netlink import Ack, Attr, Done, GenlMessage, GenlSocket
from tests.unit.hypervisor.fake_netlink import NBD_FAMILY_ID, NBD_GROUP_ID, FakeKernel


@pytest.mark.parametrize(("length", "aligned"), [(0, 0), (1, 4), (4, 4), (5, 8), (7, 8), (8, 8)])
def test_align_rounds_up_to_four(length: int, aligned: int) -> None:
    assert netlink.align(length) == aligned


def test_u32_attribute_bytes() -> None:
    assert netlink.u32(3, 0x01020304).encode() == b"\x08\x00\x03\x00\x04\x03\x02\x01"


def test_u64_attribute_bytes() -> None:
    encoded = netlink.u64(2, 1 << 40).encode()
    assert encoded == struct.pack("=HHQ", 12, 2, 1 << 40)


def test_u8_and_u16_attributes_are_padded_to_four_bytes() -> None:
    assert netlink.u8(1, 7).encode() == b"\x05\x00\x01\x00\x07\x00\x00\x00"
    assert netlink.u16(1, 0x0102).encode() == b"\x06\x00\x01\x00\x02\x01\x00\x00"


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        ("", b"\x05\x00\x0a\x00\x00\x00\x00\x00"),
        ("abc", b"\x08\x00\x0a\x00abc\x00"),
        ("abcd", b"\x09\x00\x0a\x00abcd\x00\x00\x00\x00"),
    ],
)
def test_string_attribute_is_nul_terminated_and_padded(text: str, encoded: bytes) -> None:
    assert netlink.string(10, text).encode() == encoded


def test_nested_attribute_sets_the_nested_flag_and_holds_its_children() -> None:
    attr = netlink.nested(7, [netlink.nested(1, [netlink.u32(1, 5)])])
    encoded = attr.encode()
    assert encoded == (
        struct.pack("=HH", 16, 7 | netlink.NLA_F_NESTED)
        + struct.pack("=HH", 12, 1 | netlink.NLA_F_NESTED)
        + struct.pack("=HHI", 8, 1, 5)
    )
    (parsed,) = netlink.parse_attrs(encoded)
    assert parsed.type == 7
    assert parsed.nested
    (item,) = parsed.as_attrs()
    assert item.as_attrs()[0].as_u32() == 5


def test_attributes_round_trip_with_mixed_sizes() -> None:
    attrs = [
        netlink.u8(1, 1),
        netlink.string(2, "nbs:nbd://h:1/vol"),
        netlink.u64(3, 2**64 - 1),
        netlink.u16(4, 65535),
        netlink.nested(5, [netlink.string(1, "x"), netlink.u32(2, 9)]),
    ]
    parsed = netlink.parse_attrs(netlink.encode_attrs(attrs))
    assert parsed == attrs
    assert parsed[1].as_string() == "nbs:nbd://h:1/vol"
    assert parsed[2].as_u64() == 2**64 - 1
    assert [a.type for a in parsed[4].as_attrs()] == [1, 2]


def test_nested_without_the_flag_still_parses() -> None:
    # The kernel builds STATUS's device list with nla_nest_start_noflag().
    inner = netlink.u32(1, 3).encode()
    data = struct.pack("=HH", 4 + len(inner), 9) + inner
    (attr,) = netlink.parse_attrs(data)
    assert not attr.nested
    assert attr.as_attrs()[0].as_u32() == 3


def test_last_attribute_may_lack_its_padding() -> None:
    data = netlink.u32(1, 1).encode() + netlink.string(2, "ab").encode()[:7]
    assert [a.type for a in netlink.parse_attrs(data)] == [1, 2]


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("=HH", 3, 1),  # shorter than its own header
        struct.pack("=HH", 12, 1) + b"\0\0\0\0",  # longer than the data
    ],
)
def test_malformed_attribute_lengths_are_rejected(data: bytes) -> None:
    with pytest.raises(netlink.MalformedMessageError):
        netlink.parse_attrs(data)


def test_short_payload_for_the_asked_type_is_rejected() -> None:
    with pytest.raises(netlink.MalformedMessageError):
        netlink.u32(1, 1).as_u64()


def test_request_header_bytes() -> None:
    data = netlink.encode_request(0x1B, 5, [netlink.u32(1, 2)], version=1, seq=7, pid=0)
    assert data == (
        struct.pack("=IHHII", 28, 0x1B, netlink.NLM_F_REQUEST | netlink.NLM_F_ACK, 7, 0)
        + struct.pack("=BBH", 5, 1, 0)
        + struct.pack("=HHI", 8, 1, 2)
    )


def test_several_messages_in_one_datagram() -> None:
    first = netlink.encode_request(0x1B, 1, [netlink.string(1, "a")], flags=0, seq=4)
    second = netlink.encode_request(0x1B, 2, [], flags=netlink.NLM_F_MULTI, seq=4)
    done = struct.pack("=IHHII", 20, netlink.NLMSG_DONE, 0, 4, 0) + b"\0\0\0\0"
    messages = netlink.parse_messages(first + second + done)
    assert messages == [
        GenlMessage(0x1B, 1, (netlink.string(1, "a"),), 1, 0, 4, 0),
        GenlMessage(0x1B, 2, (), 1, netlink.NLM_F_MULTI, 4, 0),
        Done(4),
    ]


def test_message_round_trip() -> None:
    message = GenlMessage(0x20, 3, (netlink.u32(1, 1), netlink.u64(2, 3)), 1, 0, 9, 42)
    assert netlink.parse_messages(netlink.encode_message(message)) == [message]


def test_truncated_message_is_rejected() -> None:
    data = netlink.encode_request(0x1B, 1, [netlink.u32(1, 1)])
    with pytest.raises(netlink.MalformedMessageError):
        netlink.parse_messages(data[:-2])


def test_ack_is_an_error_message_with_errno_zero() -> None:
    request = netlink.encode_request(0x1B, 1, [], seq=3)
    assert netlink.parse_messages(netlink.encode_ack(0, request, seq=3)) == [Ack(0, 3)]


def test_error_ack_carries_errno_and_the_extended_message() -> None:
    request = netlink.encode_request(0x1B, 1, [netlink.u32(1, 1)], seq=3)
    (ack,) = netlink.parse_messages(netlink.encode_ack(errno.EPERM, request, seq=3, message="no"))
    assert ack == Ack(errno.EPERM, 3, "no")
    assert isinstance(ack, Ack)
    err = ack.exception("connect")
    assert isinstance(err, OSError)
    assert err.errno == errno.EPERM
    assert "Operation not permitted" in str(err)
    assert "(no)" in str(err)


def test_uncapped_error_ack_skips_the_echoed_request() -> None:
    # Without NETLINK_CAP_ACK the kernel echoes the whole request before the TLVs.
    request = netlink.encode_request(0x1B, 1, [netlink.string(10, "abcde")], seq=8)
    body = (
        struct.pack("=i", -errno.EINVAL)
        + request
        + netlink.string(netlink.NLMSGERR_ATTR_MSG, "bad attribute").encode()
    )
    header = struct.pack(
        "=IHHII", 16 + len(body), netlink.NLMSG_ERROR, netlink.NLM_F_ACK_TLVS, 8, 0
    )
    assert netlink.parse_messages(header + body) == [Ack(errno.EINVAL, 8, "bad attribute")]


def test_parse_family_reads_id_version_and_groups() -> None:
    kernel = FakeKernel()
    with GenlSocket(kernel) as sock:
        family = sock.family("nbd")
    assert family == netlink.Family("nbd", NBD_FAMILY_ID, 1, {"nbd_mc_group": NBD_GROUP_ID})
    (request,) = kernel.requests
    assert request.family == netlink.GENL_ID_CTRL
    assert request.cmd == netlink.CTRL_CMD_GETFAMILY
    assert kernel.closed


def test_missing_family_raises_family_not_found() -> None:
    sock = GenlSocket(FakeKernel(families={}))
    with pytest.raises(netlink.FamilyNotFoundError) as info:
        sock.family("nbd")
    assert info.value.errno == errno.ENOENT


def test_request_returns_replies_before_the_ack() -> None:
    kernel = FakeKernel(handlers={5: lambda r: [[netlink.u32(1, 1)], [netlink.u32(1, 2)]]})
    sock = GenlSocket(kernel)
    replies = sock.request(NBD_FAMILY_ID, 5, [netlink.u32(1, 0)])
    assert [r.attrs[0].as_u32() for r in replies] == [1, 2]
    assert kernel.requests[0].flags == netlink.NLM_F_REQUEST | netlink.NLM_F_ACK
    assert kernel.timeout is None  # restored after the request


def test_request_error_raises_netlink_error_with_errno() -> None:
    def refuse(_request: GenlMessage) -> list[list[Attr]]:
        raise OSError(errno.EBUSY, "busy")

    sock = GenlSocket(FakeKernel(handlers={1: refuse}))
    with pytest.raises(netlink.NetlinkError) as info:
        sock.request(NBD_FAMILY_ID, 1)
    assert info.value.errno == errno.EBUSY


def test_sequence_numbers_increase_and_stale_answers_are_skipped() -> None:
    kernel = FakeKernel()
    sock = GenlSocket(kernel)
    stale = netlink.encode_request(NBD_FAMILY_ID, 5, [netlink.u32(1, 99)], flags=0, seq=77)
    kernel._queue.append(stale)
    assert sock.request(NBD_FAMILY_ID, 5) == []
    sock.request(NBD_FAMILY_ID, 5)
    assert [r.seq for r in kernel.requests] == [1, 2]


def test_notifications_during_a_request_are_kept_for_receive() -> None:
    kernel = FakeKernel()
    sock = GenlSocket(kernel)
    sock.subscribe(NBD_GROUP_ID)
    assert kernel.groups == [NBD_GROUP_ID]
    kernel.notify(NBD_FAMILY_ID, 4, [netlink.u32(1, 3)])
    sock.request(NBD_FAMILY_ID, 5)
    (note,) = sock.receive(timeout=0)
    assert (note.cmd, note.seq, note.attrs[0].as_u32()) == (4, 0, 3)
    assert sock.receive(timeout=0) == []


def test_receive_times_out_with_nothing() -> None:
    assert GenlSocket(FakeKernel()).receive(timeout=0.01) == []


def test_overrun_is_reported_as_lost_notifications() -> None:
    kernel = FakeKernel()
    sock = GenlSocket(kernel)
    kernel.overflow()
    with pytest.raises(netlink.NotificationsLostError):
        sock.receive(timeout=0)


def test_overrun_during_a_request_is_reported_by_the_next_receive() -> None:
    kernel = FakeKernel()
    sock = GenlSocket(kernel)
    kernel.overflow()
    sock.request(NBD_FAMILY_ID, 5)
    with pytest.raises(netlink.NotificationsLostError):
        sock.receive(timeout=0)
    assert sock.receive(timeout=0) == []


def test_attr_accessors_know_no_schema() -> None:
    attr = Attr(1, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    assert (attr.as_u8(), attr.as_u16(), attr.as_u32(), attr.as_u64()) == (1, 1, 1, 1)
    assert netlink.find([attr], 2) is None
    assert list(netlink.iter_nested(None, 1)) == []
