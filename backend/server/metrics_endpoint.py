"""The metrics endpoint: a prometheus_client collector over the server's counts, served by
prometheus_client's own HTTP server on a background thread.

Imported only when metrics are turned on (see backend/server/metrics.py for the counting).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from backend.nbd.constants import Cmd, Error
from backend.server.metrics import (
    BLOCK,
    COMMANDS,
    KINDS,
    LATENCY_BUCKETS,
    OTHER,
    SLOTS,
    Snapshot,
)

_LE = (*(str(b) for b in LATENCY_BUCKETS), "+Inf")  # the buckets' ``le`` labels


class NbsCollector:
    """A prometheus_client collector that turns a :class:`Snapshot` into metric families."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield CounterMetricFamily(
            "nbs_connections_total", "Connections accepted", value=snap.connections_total
        )
        yield CounterMetricFamily(
            "nbs_connections_refused_total",
            "Connections closed at once because a connection limit was reached",
            value=snap.connections_refused,
        )
        yield GaugeMetricFamily(
            "nbs_connections_open",
            "Connections open, negotiating or in transmission",
            value=snap.connections_open,
        )
        per_export = ["export"]
        per_command = ["export", "command"]
        per_error = ["export", "command", "error"]
        export_open = GaugeMetricFamily(
            "nbs_export_connections_open",
            "Connections in transmission on the export",
            labels=per_export,
        )
        export_total = CounterMetricFamily(
            "nbs_export_connections_total",
            "Connections that selected the export",
            labels=per_export,
        )
        requests = CounterMetricFamily(
            "nbs_requests_total", "Requests executed (including failed ones)", labels=per_command
        )
        read = CounterMetricFamily("nbs_read_bytes_total", "Bytes read", labels=per_export)
        written = CounterMetricFamily("nbs_written_bytes_total", "Bytes written", labels=per_export)
        errors = CounterMetricFamily(
            "nbs_request_errors_total", "Requests the storage failed", labels=per_error
        )
        rejected = CounterMetricFamily(
            "nbs_requests_rejected_total", "Requests refused before execution", labels=per_error
        )
        latency = HistogramMetricFamily(
            "nbs_request_duration_seconds",
            "Time from receiving a request to its reply being ready",
            labels=["export", "op"],
        )
        for name in sorted(snap.exports):
            totals = snap.exports[name]
            stats = totals.stats
            export_open.add_metric([name], totals.open)
            export_total.add_metric([name], totals.connections)
            for command, label in COMMANDS.items():
                requests.add_metric([name, label], stats.requests(command))
            read.add_metric([name], stats.bytes[Cmd.READ])
            written.add_metric([name], stats.bytes[Cmd.WRITE])
            for (command, code), count in sorted(stats.errors.items()):
                errors.add_metric([name, _command(command), _error(code)], count)
            for (command, code), count in sorted(stats.rejected.items()):
                rejected.add_metric([name, _command(command), _error(code)], count)
            for kind, buckets, total_ns in _histograms(stats.latency):
                latency.add_metric([name, kind], buckets, total_ns / 1e9)
        yield from (export_open, export_total, requests, read, written, errors, rejected, latency)
        yield from _replication(snap)


def _replication(snap: Snapshot) -> Iterator[Metric]:
    in_sync = GaugeMetricFamily(
        "nbs_replica_in_sync",
        "1 if the replica of an open replicated volume is in sync, else 0",
        labels=["volume", "member"],
    )
    resync = CounterMetricFamily(
        "nbs_replica_resync_bytes",
        "Bytes copied to the replica by resyncs since the engine opened the volume",
        labels=["volume", "member"],
    )
    failures = CounterMetricFamily(
        "nbs_replica_failures",
        "Replicas the engine failed (removed from the in-sync set) since it opened the volume",
        labels=["volume"],
    )
    scrubbed = GaugeMetricFamily(
        "nbs_volume_last_scrub_timestamp_seconds",
        "When the last scrub of an open replicated volume finished (Unix time)",
        labels=["volume"],
    )
    unresolved = GaugeMetricFamily(
        "nbs_volume_scrub_unresolved_mismatches",
        "Mismatches between replicas the last scrub found and did not repair",
        labels=["volume"],
    )
    for volume in snap.replication:
        failures.add_metric([volume.volume], volume.failures)
        for replica in volume.replicas:
            in_sync.add_metric([volume.volume, replica.member], int(replica.in_sync))
            resync.add_metric([volume.volume, replica.member], replica.resync_bytes)
        if volume.scrubbed_at is not None:
            scrubbed.add_metric([volume.volume], volume.scrubbed_at)
            unresolved.add_metric([volume.volume], volume.scrub_unresolved)
    yield from (in_sync, resync, failures, scrubbed, unresolved)


def _histograms(latency: list[int]) -> Iterator[tuple[str, list[tuple[str, float]], int]]:
    """Per kind (read, write, other): cumulative buckets as Prometheus wants them, sum in ns."""
    merged: dict[str, list[int]] = {}
    for command in COMMANDS:
        kind = KINDS.get(command, OTHER)
        block = latency[BLOCK[command] : BLOCK[command] + SLOTS]
        into = merged.setdefault(kind, [0] * SLOTS)
        for i, count in enumerate(block):
            into[i] += count
    for kind in (*KINDS.values(), OTHER):
        counts = merged[kind]
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for le, count in zip(_LE, counts[:-1], strict=True):
            cumulative += count
            buckets.append((le, cumulative))
        yield kind, buckets, counts[-1]


def _command(command: int) -> str:
    try:
        return COMMANDS.get(command) or Cmd(command).name.lower()
    except ValueError:  # a number the spec does not define (the request was rejected)
        return str(command)


def _error(code: int) -> str:
    try:
        return Error(code).name
    except ValueError:
        return str(code)


class MetricsError(Exception):
    """The metrics endpoint cannot listen where it is asked to."""


class MetricsEndpoint:
    """prometheus_client's HTTP server on a background thread, serving /metrics."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], Snapshot]) -> None:
        """Listen on ``host``:``port`` now (port 0 picks one; host "": every IPv4 address).

        Raises MetricsError.
        """
        self.registry = CollectorRegistry()
        self.registry.register(NbsCollector(snapshot))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        try:
            self._httpd: WSGIServer
            self._httpd, self._thread = start_http_server(
                port, addr=host or "0.0.0.0", registry=self.registry
            )
        except OSError as err:
            raise MetricsError(f"cannot serve metrics on {host}:{port}: {err.strerror}") from err
        self._thread.name = "nbs-metrics"
        bound_host, bound_port = self._httpd.socket.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
