"""Metrics: what sessions count, how scrapes add it up, and the HTTP endpoint (on loopback)."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from backend.nbd.constants import Cmd, Error
from backend.server.exports import Export
from backend.server.metrics import (
    BLOCK,
    LATENCY_BOUNDS_NS,
    SUM,
    ReplicaSample,
    ServerStats,
    SessionStats,
    Snapshot,
    VolumeReplication,
    record,
)
from backend.server.metrics_endpoint import MetricsEndpoint, MetricsError, NbsCollector
from backend.server.server import Server
from backend.storage import MemoryStorage
from tests.unit.nbd.helpers import request
from tests.unit.server.clients import (
    Client,
    FailingStorage,
    GatedStorage,
    in_process_servers,
    port_of,
)

SIZE = 1 << 20
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(snapshot: Callable[[], Snapshot]) -> Samples:
    registry = CollectorRegistry()
    registry.register(NbsCollector(snapshot))
    return samples(generate_latest(registry).decode())


def value(found: Samples, name: str, **labels: str) -> float:
    return found[name, frozenset(labels.items())]


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    with in_process_servers() as start:
        yield start


def test_record_counts_into_the_first_bucket_whose_bound_is_not_below() -> None:
    stats = SessionStats()
    record(stats.latency, Cmd.READ, 7_000)  # 7 µs: the 10 µs bucket
    record(stats.latency, Cmd.READ, LATENCY_BOUNDS_NS[0])  # exactly 5 µs: the 5 µs bucket
    record(stats.latency, Cmd.READ, 60 * 10**9)  # beyond every bound: +Inf
    assert stats.latency[BLOCK[Cmd.READ] : BLOCK[Cmd.READ] + 2] == [1, 1]
    assert stats.latency[SUM[Cmd.READ] - 1] == 1
    assert stats.latency[SUM[Cmd.READ]] == 7_000 + 5_000 + 60 * 10**9
    assert stats.requests(Cmd.READ) == 3
    assert stats.requests(Cmd.WRITE) == 0


def test_scrape_adds_closed_and_live_sessions_per_export() -> None:
    totals = ServerStats()
    closed = SessionStats()
    record(closed.latency, Cmd.WRITE, 30_000)
    closed.bytes[Cmd.WRITE] += 4096
    closed.error(Cmd.WRITE, Error.ENOSPC)
    totals.retire("a", closed)
    live = SessionStats()
    record(live.latency, Cmd.WRITE, 200_000)
    record(live.pool_latency, Cmd.READ, 2_000_000)
    record(live.latency, Cmd.FLUSH, 1_000)
    record(live.latency, Cmd.TRIM, 1_000)
    live.bytes[Cmd.WRITE] += 512
    live.bytes[Cmd.READ] += 1 << 20
    live.reject(Cmd.READ, Error.EINVAL)
    live.reject(99, Error.EINVAL)  # a command number the spec does not know
    totals.accepted = 3

    found = scrape(lambda: totals.snapshot([("a", live), (None, SessionStats())]))

    assert value(found, "nbs_connections_total") == 3
    assert value(found, "nbs_connections_open") == 2
    assert value(found, "nbs_export_connections_open", export="a") == 1
    assert value(found, "nbs_export_connections_total", export="a") == 2
    assert value(found, "nbs_requests_total", export="a", command="write") == 2
    assert value(found, "nbs_requests_total", export="a", command="read") == 1
    assert value(found, "nbs_requests_total", export="a", command="cache") == 0
    assert value(found, "nbs_written_bytes_total", export="a") == 4096 + 512
    assert value(found, "nbs_read_bytes_total", export="a") == 1 << 20
    errors = "nbs_request_errors_total"
    assert value(found, errors, export="a", command="write", error="ENOSPC") == 1
    rejected = "nbs_requests_rejected_total"
    assert value(found, rejected, export="a", command="read", error="EINVAL") == 1
    assert value(found, rejected, export="a", command="99", error="EINVAL") == 1
    bucket = "nbs_request_duration_seconds_bucket"
    assert value(found, bucket, export="a", op="write", le="2.5e-05") == 0
    assert value(found, bucket, export="a", op="write", le="5e-05") == 1
    assert value(found, bucket, export="a", op="write", le="0.00025") == 2  # cumulative
    assert value(found, bucket, export="a", op="write", le="+Inf") == 2
    assert value(found, "nbs_request_duration_seconds_count", export="a", op="read") == 1
    assert value(found, "nbs_request_duration_seconds_count", export="a", op="other") == 2
    assert value(found, "nbs_request_duration_seconds_sum", export="a", op="write") == 230e-6


def test_sessions_count_requests_bytes_errors_and_rejections(serve: Callable[..., Server]) -> None:
    server = serve(Export("mem", MemoryStorage(SIZE)), Export("bad", FailingStorage(SIZE)))
    client = Client(port_of(server), "mem")
    client.send(request(Cmd.WRITE, 1, 0, 4096) + bytes(4096))
    client.send(request(Cmd.READ, 2, 0, 8192) + request(Cmd.FLUSH, 3))
    client.send(request(Cmd.TRIM, 4, 0, 512))
    client.send(request(Cmd.READ, 5, SIZE, 512))  # beyond the end: rejected with EINVAL
    assert [client.reply()[:2] for _ in range(5)] == [
        (1, 0), (2, 0), (3, 0), (4, 0), (5, Error.EINVAL),
    ]  # fmt: skip
    failing = Client(port_of(server), "bad")
    failing.send(request(Cmd.WRITE, 6, 0, 1) + bytes([Error.ENOSPC]))
    assert failing.reply()[:2] == (6, Error.ENOSPC)

    found = scrape(server.metrics_snapshot)
    assert value(found, "nbs_connections_total") == 2
    assert value(found, "nbs_export_connections_open", export="mem") == 1
    for command in ("write", "read", "flush", "trim"):
        assert value(found, "nbs_requests_total", export="mem", command=command) == 1
    assert value(found, "nbs_read_bytes_total", export="mem") == 8192
    assert value(found, "nbs_written_bytes_total", export="mem") == 4096
    rejected = "nbs_requests_rejected_total"
    assert value(found, rejected, export="mem", command="read", error="EINVAL") == 1
    errors = "nbs_request_errors_total"
    assert value(found, errors, export="bad", command="write", error="ENOSPC") == 1
    assert value(found, "nbs_request_duration_seconds_count", export="mem", op="other") == 2

    for each in (client, failing):  # the counts outlive the connections
        each.send(request(Cmd.DISC))
        assert each.sock.recv(1) == b""
        each.close()
    deadline = time.monotonic() + 10
    while server.session_count and time.monotonic() < deadline:  # closed, not yet reaped
        time.sleep(0.01)
    after = scrape(server.metrics_snapshot)
    assert value(after, "nbs_export_connections_open", export="mem") == 0
    assert value(after, "nbs_export_connections_total", export="mem") == 1
    assert value(after, "nbs_connections_open") == 0
    for key, count in found.items():
        if key[0] not in ("nbs_export_connections_open", "nbs_connections_open"):
            assert after[key] == count, key


def test_requests_run_on_the_worker_pool_are_timed_too(serve: Callable[..., Server]) -> None:
    server = serve(Export("disk", GatedStorage(SIZE)))
    client = Client(port_of(server), "disk")
    client.send(request(Cmd.READ, 1, 0, 512) + request(Cmd.READ, 2, 4096, 6))
    assert {client.reply()[0] for _ in range(2)} == {1, 2}
    client.send(request(Cmd.DISC))
    assert client.sock.recv(1) == b""
    client.close()
    found = scrape(server.metrics_snapshot)
    assert value(found, "nbs_requests_total", export="disk", command="read") == 2
    assert value(found, "nbs_read_bytes_total", export="disk") == 518
    assert value(found, "nbs_request_duration_seconds_sum", export="disk", op="read") > 0


def test_endpoint_serves_metrics_over_http(serve: Callable[..., Server]) -> None:
    server = serve(Export("disk", MemoryStorage(SIZE)))
    Client(port_of(server), "disk").close()
    endpoint = MetricsEndpoint("127.0.0.1", 0, server.metrics_snapshot)
    try:
        with urllib.request.urlopen(endpoint.url, timeout=10) as answer:
            assert answer.headers["Content-Type"].startswith("text/plain")
            found = samples(answer.read().decode())
    finally:
        endpoint.close()
    assert value(found, "nbs_connections_total") == 1
    assert value(found, "process_open_fds") > 0
    assert any(name == "python_info" for name, _ in found)


def test_endpoint_reports_an_address_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsError, match=f"127.0.0.1:{port}"):
            MetricsEndpoint("127.0.0.1", port, lambda: Snapshot(0, 0, {}))


def test_replicated_volumes_metrics() -> None:
    """The serving layer's replica samples become the replica series, and a volume's last
    scrub its two scrub series (none before its first scrub)."""
    replication = (
        VolumeReplication(
            "vol",
            2,
            (ReplicaSample("vol", "a", True, 0), ReplicaSample("vol", "b", False, 4096)),
            scrubbed_at=1700000000.5,
            scrub_unresolved=3,
        ),
        VolumeReplication("fresh", 0, (ReplicaSample("fresh", "a", True, 0),)),
    )
    registry = CollectorRegistry()
    registry.register(NbsCollector(lambda: Snapshot(0, 0, {}, 0, replication)))
    text = generate_latest(registry).decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("nbs_replica_in_sync", frozenset({("volume", "vol"), ("member", "a")}))] == 1
    assert samples[("nbs_replica_in_sync", frozenset({("volume", "vol"), ("member", "b")}))] == 0
    key = ("nbs_replica_resync_bytes_total", frozenset({("volume", "vol"), ("member", "b")}))
    assert samples[key] == 4096
    assert samples[("nbs_replica_failures_total", frozenset({("volume", "vol")}))] == 2
    vol = frozenset({("volume", "vol")})
    assert samples[("nbs_volume_last_scrub_timestamp_seconds", vol)] == 1700000000.5
    assert samples[("nbs_volume_scrub_unresolved_mismatches", vol)] == 3
    fresh = frozenset({("volume", "fresh")})
    assert ("nbs_volume_last_scrub_timestamp_seconds", fresh) not in samples
    assert ("nbs_volume_scrub_unresolved_mismatches", fresh) not in samples
