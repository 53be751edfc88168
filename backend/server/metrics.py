"""Metrics, the counting side: per-session counters on the hot path, summed when scraped.

Counting must cost far less than a request (a 4 KiB read from the page cache takes ~8 µs of
server CPU), so nothing on the request path touches a lock or a prometheus_client object:

* Each session counts into plain lists of ints (:class:`SessionStats`): per command a block
  of latency bucket counts followed by the sum of latencies in ns, and the bytes it moved.
  The request count of a command is the sum of its buckets.  Two ``perf_counter_ns`` calls,
  one ``bisect`` over :data:`LATENCY_BOUNDS_NS` and three list updates: ~0.2 µs a request.
* A list has one writer: ``latency`` and ``bytes`` belong to the session's own thread,
  ``pool_latency`` to the worker threads, which update it under the session's lock they take
  anyway.  Errors are rare and counted under a lock.
* At scrape time the collector (backend/server/metrics_endpoint.py) asks the server for a
  :class:`Snapshot`: the stats of live sessions plus the totals folded in from closed ones
  (:class:`ServerStats`), per export.  Reading a list another thread updates is safe under
  the GIL; a scrape may miss the request in flight, never count one twice.

This module does not import prometheus_client (4 MiB and 30 ms at start): sessions always
count, the endpoint and its library are loaded only when metrics are turned on.  Metric names
and labels are listed in docs/operations.md.
"""

from __future__ import annotations

import dataclasses
import threading
from bisect import bisect_left
from collections.abc import Iterable

from backend.nbd.constants import Cmd

# Commands with their own label value (the others cannot reach a storage).
COMMANDS: dict[int, str] = {
    Cmd.READ: "read",
    Cmd.WRITE: "write",
    Cmd.FLUSH: "flush",
    Cmd.TRIM: "trim",
    Cmd.WRITE_ZEROES: "write_zeroes",
    Cmd.CACHE: "cache",
    Cmd.BLOCK_STATUS: "block_status",
}
# Latency histograms are per operation kind: reads, writes, everything else.
KINDS: dict[int, str] = {Cmd.READ: "read", Cmd.WRITE: "write"}
OTHER = "other"

LATENCY_BUCKETS = (
    5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
"""Upper bounds (seconds) of the latency buckets; the last bucket is +Inf."""
LATENCY_BOUNDS_NS = tuple(round(b * 1e9) for b in LATENCY_BUCKETS)

_COMMAND_SLOTS = max(Cmd) + 1  # lists are indexed by the command's wire number
SLOTS = len(LATENCY_BOUNDS_NS) + 2  # per command: bucket counts (with +Inf), then sum in ns
BLOCK = tuple(command * SLOTS for command in range(_COMMAND_SLOTS))
"""``BLOCK[command] + bisect_left(LATENCY_BOUNDS_NS, ns)``: the bucket to count into."""
SUM = tuple(start + SLOTS - 1 for start in BLOCK)
"""``SUM[command]``: where the command's latencies add up (ns)."""


def record(latency: list[int], command: int, elapsed_ns: int) -> None:
    """Count one request of ``command`` that took ``elapsed_ns`` into a latency list.

    The session's hot loop does the same inline (a call costs as much as the counting).
    """
    latency[BLOCK[command] + bisect_left(LATENCY_BOUNDS_NS, elapsed_ns)] += 1
    latency[SUM[command]] += elapsed_ns


class SessionStats:
    """What one session counted; see the module docstring for who writes what."""

    __slots__ = ("_lock", "bytes", "errors", "latency", "pool_latency", "rejected")

    def __init__(self) -> None:
        self.bytes = [0] * _COMMAND_SLOTS  # bytes requested, by command
        self.latency = [0] * (_COMMAND_SLOTS * SLOTS)
        self.pool_latency = [0] * (_COMMAND_SLOTS * SLOTS)
        self.errors: dict[tuple[int, int], int] = {}  # (command, NBD error) -> count
        self.rejected: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()

    def error(self, command: int, code: int) -> None:
        """A request failed in the storage and was answered with NBD error ``code``."""
        with self._lock:
            self.errors[command, code] = self.errors.get((command, code), 0) + 1

    def reject(self, command: int, code: int) -> None:
        """A request failed validation (never reached the storage)."""
        with self._lock:
            self.rejected[command, code] = self.rejected.get((command, code), 0) + 1

    def add(self, other: SessionStats) -> None:
        """Add ``other``'s counts to these (for totals; not for a live session's own stats)."""
        _add_into(self.bytes, other.bytes)
        _add_into(self.latency, other.latency)
        _add_into(self.latency, other.pool_latency)
        with other._lock:
            errors, rejected = dict(other.errors), dict(other.rejected)
        for key, count in errors.items():
            self.errors[key] = self.errors.get(key, 0) + count
        for key, count in rejected.items():
            self.rejected[key] = self.rejected.get(key, 0) + count

    def requests(self, command: int) -> int:
        start = BLOCK[command]
        return sum(self.latency[start : start + SLOTS - 1])


def _add_into(total: list[int], counts: list[int]) -> None:
    for i, count in enumerate(counts[:]):  # a copy: the owner may be counting meanwhile
        total[i] += count


@dataclasses.dataclass
class ExportTotals:
    stats: SessionStats = dataclasses.field(default_factory=SessionStats)
    connections: int = 0  # that ever selected the export
    open: int = 0  # in transmission now


@dataclasses.dataclass(frozen=True)
class ReplicaSample:
    """One replica of an open replicated volume, as the serving layer reports it (the server
    knows no replication: the composition layer fills these in)."""

    volume: str
    member: str
    in_sync: bool
    resync_bytes: int  # bytes copied to it by resyncs (this engine's lifetime)


@dataclasses.dataclass(frozen=True)
class VolumeReplication:
    """An open replicated volume's replicas and failure count."""

    volume: str
    failures: int  # members failed by the engine (this engine's lifetime)
    replicas: tuple[ReplicaSample, ...]
    # The last finished scrub (this engine's): when (Unix time), and the mismatches it left.
    scrubbed_at: float | None = None
    scrub_unresolved: int = 0


@dataclasses.dataclass
class Snapshot:
    connections_total: int
    connections_open: int
    exports: dict[str, ExportTotals]
    connections_refused: int = 0  # closed at once: over a connection limit
    replication: tuple[VolumeReplication, ...] = ()


class ServerStats:
    """Counts that outlive sessions.  The server calls every method with its lock held."""

    def __init__(self) -> None:
        self.accepted = 0
        self.refused = 0  # over max_connections or max_connections_per_client
        self._retired: dict[str, ExportTotals] = {}

    def retire(self, export: str, stats: SessionStats) -> None:
        """Fold the final counts of a closed session into its export's totals."""
        totals = self._retired.setdefault(export, ExportTotals())
        totals.stats.add(stats)
        totals.connections += 1

    def snapshot(self, sessions: Iterable[tuple[str | None, SessionStats]]) -> Snapshot:
        """Totals per export: closed sessions plus ``sessions`` (export name, stats) alive."""
        exports: dict[str, ExportTotals] = {}
        for name, retired in self._retired.items():
            exports[name] = totals = ExportTotals(connections=retired.connections)
            totals.stats.add(retired.stats)
        live = 0
        for export, stats in sessions:
            live += 1
            if export is None:  # still negotiating
                continue
            totals = exports.setdefault(export, ExportTotals())
            totals.stats.add(stats)
            totals.connections += 1
            totals.open += 1
        return Snapshot(self.accepted, live, exports, self.refused)
