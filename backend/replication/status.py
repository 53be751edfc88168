"""What an engine reports about a replicated volume: plain frozen records, easy to print
(``dataclasses.asdict`` gives JSON-ready dicts for ``nbs volume info --json`` and metrics)."""

from __future__ import annotations

import dataclasses

from backend.replication.scrub import ScrubReport


@dataclasses.dataclass(frozen=True, slots=True)
class ResyncProgress:
    """A resync's counters: ``bytes_done`` of ``bytes_total`` region bytes handled, of which
    ``bytes_copied`` were data (holes are zeroed, not copied)."""

    bytes_done: int
    bytes_total: int
    bytes_copied: int
    regions: int  # tracking regions handled
    elapsed: float  # seconds
    rate: float  # region bytes handled per second

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class MemberStatus:
    member: str
    state: str  # in_sync, resyncing or out
    open: bool  # the engine holds a connection to it
    in_flight: int
    errors: int
    last_error: str | None
    missed_bytes: int | None  # bytes of its missed plane; None when it has none
    resync: ResyncProgress | None  # while resyncing


@dataclasses.dataclass(frozen=True, slots=True)
class EngineStatus:
    volume_id: str
    epoch: int
    generation: int
    fenced: bool
    members: tuple[MemberStatus, ...]
    in_doubt_bytes: int
    reconciled_bytes: int
    writes: int
    reads: int
    read_repairs: int
    members_failed: int
    last_scrub: ScrubReport | None = None  # the last scrub that finished (this engine's)
