"""What a copy-on-write chain shows, shared by the storages that keep volumes as chains of
layers (:class:`~backend.storage.cow.CowStorage` on local files and
:class:`~backend.storage.chunked.ChunkedStorage` in an object store).

A chain is listed bottom (oldest) first; the top takes the writes.  A chunk reads from the
topmost layer that holds it within that layer's limit, and as zeroes if none does.  How a layer
records holding a chunk (a bitmap, an object) and how it hides the layers below (a set bit, a
whiteout) are each storage's own.
"""

from __future__ import annotations

from collections.abc import Sequence

# Larger than any volume: no limit.
UNLIMITED = 1 << 64


def visible_limits(ends: Sequence[int], cuts: Sequence[int]) -> list[int]:
    """How far each layer of a bottom-first chain may answer reads: a layer shows nothing at or
    past its own end (``ends[i]``), nor at or past the cut of any layer above it (``cuts[j]``,
    ``j > i``: a layer shrunk while it was the top cuts everything it covered, so growing it
    again reads zeroes, not old data).  ``UNLIMITED`` where there is no end or cut."""
    limits = []
    cut = UNLIMITED
    for end, own_cut in zip(reversed(ends), reversed(cuts), strict=True):
        limits.append(min(end, cut))
        cut = min(cut, own_cut)
    limits.reverse()
    return limits


def zeroing_drops(may_trim: bool, held_below: bool) -> bool:
    """Whether zeroing a whole chunk drops it from the top, leaving a real hole: only when
    deallocating is allowed (no NBD NO_HOLE) and no layer below holds the chunk.  Otherwise the
    top keeps the chunk as zeroes, which also hides what the layers below hold."""
    return may_trim and not held_below
