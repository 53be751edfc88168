"""The on-disk format of a region map (backend/replication/tracking.py).

Layout, in 4 KiB pages::

    page 0        header slot A
    page 1        header slot B
    page 2 …      plane slots: slot i holds one plane's bitmap at 8192 + i * stride,
                  stride = the bitmap's bytes rounded up to whole pages

A header names the geometry (volume size, granularity) and which plane lives in which slot.
It is never overwritten in place: a new header goes to the slot the current one is not in,
with the next sequence number, and is synced; on open the valid header (magic, version,
CRC-32) with the highest sequence wins.  So a torn header write leaves the previous header,
which still describes every slot whose bits were durable under it.

Header slot (little-endian): magic (8) "NBSRMAP1", version u32, page size u32,
sequence u64, size u64, granularity u64, plane count u16, then per plane: slot u16,
name length u8, name (UTF-8); CRC-32 of bytes 0 to 4091 in the last 4 bytes.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

from backend.replication.bitmap import PAGE

MAGIC = b"NBSRMAP1"
VERSION = 1
HEADER_SLOTS = 2
DATA_START = HEADER_SLOTS * PAGE
MAX_PLANES = 32
MAX_NAME = 64
_FIXED = struct.Struct("<8sIIQQQH")
_ENTRY = struct.Struct("<HB")
_CRC = struct.Struct("<I")
_CRC_AT = PAGE - _CRC.size


class RegionMapError(Exception):
    """A region map file cannot be created or opened as asked (bad geometry, corrupt, busy)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    sequence: int
    size: int
    granularity: int
    planes: tuple[tuple[str, int], ...]  # (name, slot), in slot order

    @property
    def regions(self) -> int:
        return -(-self.size // self.granularity)

    @property
    def stride(self) -> int:
        return plane_stride(self.regions)

    def slot_offset(self, slot: int) -> int:
        return DATA_START + slot * self.stride

    def encode(self) -> bytes:
        out = bytearray(PAGE)
        _FIXED.pack_into(
            out,
            0,
            MAGIC,
            VERSION,
            PAGE,
            self.sequence,
            self.size,
            self.granularity,
            len(self.planes),
        )
        at = _FIXED.size
        for name, slot in self.planes:
            raw = name.encode()
            _ENTRY.pack_into(out, at, slot, len(raw))
            at += _ENTRY.size
            out[at : at + len(raw)] = raw
            at += len(raw)
        assert at <= _CRC_AT, "plane table overflows the header"
        _CRC.pack_into(out, _CRC_AT, zlib.crc32(out[:_CRC_AT]))
        return bytes(out)


def plane_stride(regions: int) -> int:
    return -(-regions // (8 * PAGE)) * PAGE


def decode(raw: bytes) -> Header | None:
    """The header in one slot, or None when the slot holds none (never written, torn)."""
    if len(raw) < PAGE or raw[: len(MAGIC)] != MAGIC:
        return None
    if _CRC.unpack_from(raw, _CRC_AT)[0] != zlib.crc32(raw[:_CRC_AT]):
        return None
    _, version, page, sequence, size, granularity, count = _FIXED.unpack_from(raw, 0)
    if version != VERSION or page != PAGE:
        raise RegionMapError(f"unsupported region map version {version} (page {page})")
    planes = []
    at = _FIXED.size
    for _ in range(count):
        slot, length = _ENTRY.unpack_from(raw, at)
        at += _ENTRY.size
        planes.append((raw[at : at + length].decode(), slot))
        at += length
    return Header(sequence, size, granularity, tuple(planes))


def newest(slots: list[bytes]) -> Header:
    """The header to trust among the raw header slots."""
    headers = [h for h in map(decode, slots) if h is not None]
    if not headers:
        raise RegionMapError("not a region map, or both of its headers are damaged")
    return max(headers, key=lambda h: h.sequence)
