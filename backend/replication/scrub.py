"""Scrub: comparing the in-sync replicas' bytes, and what a comparison found.

Replicas acknowledged as identical can still drift apart: a disk that returns other bytes
than it was given (bit rot, a firmware bug, a misdirected write), or a replica changed
behind the engine's back.  Reads are served by one member, so nothing else notices.  The
engine's ``scrub`` (backend/replication/engine.py) reads each step of the volume from every
in-sync member under the range lock and hands the bytes to :func:`differences`, which finds
the blocks that differ and, where a majority of the members agree, the bytes they agree on.
With repair, those bytes are written over the members that differ; without a majority
(two replicas that disagree, or three that all do) nothing can say which is right, and
the mismatch is reported for the operator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from backend.replication.policy import majority

BLOCK = 4096  # the unit differences are found and reported in
STEP = 1 << 20  # bytes compared under the range lock at once


@dataclasses.dataclass(frozen=True)
class Difference:
    """Bytes ``[offset, offset + length)`` (relative to what was compared) that are not the
    same on every member: ``members`` hold other bytes than the majority, whose bytes are
    ``majority``; with no majority, ``members`` is every member compared and ``majority``
    None."""

    offset: int
    length: int
    members: tuple[str, ...]
    majority: bytes | None


def differences(copies: Mapping[str, bytes], block: int = BLOCK) -> list[Difference]:
    """Where the equally long ``copies`` (by member) differ, block by block, adjacent blocks
    with the same outcome merged into one range."""
    lengths = {len(data) for data in copies.values()}
    if len(lengths) != 1:
        raise ValueError(f"copies of different lengths: {sorted(lengths)}")
    (length,) = lengths
    needed = majority(len(copies))
    found: list[Difference] = []
    for start in range(0, length, block):
        end = min(start + block, length)
        groups: dict[bytes, list[str]] = {}
        for member, data in copies.items():
            groups.setdefault(data[start:end], []).append(member)
        if len(groups) == 1:
            continue
        content, holders = max(groups.items(), key=lambda group: len(group[1]))
        if len(holders) >= needed:
            members = tuple(m for m in copies if m not in holders)
            agreed: bytes | None = content
        else:
            members, agreed = tuple(copies), None
        last = found[-1] if found else None
        if (
            last is not None
            and last.offset + last.length == start
            and last.members == members
            and (last.majority is None) == (agreed is None)
        ):
            joined = None if agreed is None or last.majority is None else last.majority + agreed
            found[-1] = Difference(last.offset, last.length + end - start, members, joined)
        else:
            found.append(Difference(start, end - start, members, agreed))
    return found


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """A range of the volume whose replicas differ: ``members`` hold other bytes than the
    majority (every member compared, if there is none); ``repaired``: the majority's bytes
    were written over them."""

    offset: int
    length: int
    members: tuple[str, ...]
    majority: bool
    repaired: bool


@dataclasses.dataclass(frozen=True)
class ScrubReport:
    """What one scrub of a volume compared and found.  ``failed``: members whose read or
    repair failed; they are out, and the resync supervisor copies them back."""

    volume_id: str
    repair: bool  # asked to repair what a majority agrees on
    size: int
    compared: int  # bytes of the volume compared on at least two members
    members: tuple[str, ...]  # in sync when it began
    mismatches: tuple[Mismatch, ...]
    failed: tuple[str, ...]
    seconds: float
    finished: float  # Unix time

    @property
    def unresolved(self) -> int:
        """Mismatches still there: found without repair, or with no majority to repair to."""
        return sum(not m.repaired for m in self.mismatches)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "unresolved": self.unresolved}
