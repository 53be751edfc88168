"""Recycled WRITE payload buffers of one session.

A fresh 1 MiB bytearray is zero-filled and page-faulted on every write, which cost 30% of the
CPU of 1 MiB writes; a session therefore keeps a few of each size it used.  The spares are a
separate object, not methods of the session, so the protocol core holding ``allocate`` makes no
reference cycle: a finished session and its buffers are freed at once, not whenever Python's
cycle collector runs (issue 10, item 9).
"""

from __future__ import annotations

SPARE_BUFFERS = 8  # recycled payload buffers kept per size


class PayloadBuffers:
    """Spare buffers of at least ``minimum`` bytes, at most ``SPARE_BUFFERS`` per size."""

    def __init__(self, minimum: int) -> None:
        self._minimum = minimum
        self._spare: dict[int, list[bytearray]] = {}

    def allocate(self, length: int) -> bytearray:
        """A buffer of ``length`` bytes (its content is garbage when it was recycled)."""
        spare = self._spare.get(length)
        return spare.pop() if spare else bytearray(length)

    def recycle(self, payload: bytes | bytearray) -> None:
        """Keep ``payload`` for reuse; safe from any thread (list append/pop are atomic)."""
        if isinstance(payload, bytearray) and len(payload) >= self._minimum:
            spare = self._spare.setdefault(len(payload), [])
            if len(spare) < SPARE_BUFFERS:
                spare.append(payload)

    def clear(self) -> None:
        """Give every spare back (the session ended)."""
        self._spare.clear()
