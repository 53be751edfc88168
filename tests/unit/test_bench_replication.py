"""bench/replication.py's own logic: reading the engine's metrics and log, and judging the
issue's goals from the measured numbers (the benchmark itself is run by hand)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.replication import (
    GOALS,
    RESYNC_GOAL_MB_S,
    Goal,
    goals,
    in_sync_again,
    parse_args,
    parse_metrics,
    replica_sample,
)

METRICS = """\
# HELP nbs_replica_in_sync 1 if the replica is in sync
# TYPE nbs_replica_in_sync gauge
nbs_replica_in_sync{member="node0",volume="r3"} 1.0
nbs_replica_in_sync{member="node2",volume="r3"} 0.0
nbs_replica_resync_bytes_total{member="node2",volume="r3"} 1.073741824e+09
nbs_replica_failures_total{volume="r3"} 1.0
nbs_connections 3
"""


def test_metrics_are_found_by_name_volume_and_member() -> None:
    samples = parse_metrics(METRICS)
    assert replica_sample(samples, "nbs_replica_in_sync", "r3", "node0") == 1.0
    assert replica_sample(samples, "nbs_replica_in_sync", "r3", "node2") == 0.0
    assert replica_sample(samples, "nbs_replica_resync_bytes_total", "r3", "node2") == 1 << 30
    assert replica_sample(samples, "nbs_replica_in_sync", "r3", "node1") is None
    assert replica_sample(samples, "nbs_replica_in_sync", "r1", "node0") is None
    assert samples["nbs_connections", frozenset()] == 3


def test_the_last_resync_of_that_member_of_that_volume_counts() -> None:
    log = "\n".join(
        [
            "nbs: INFO backend.replication.supervisor: volume r3: node2 in sync again"
            " (100 bytes copied in 0.5 s)",
            "nbs: INFO backend.replication.supervisor: volume r1: node2 in sync again"
            " (7 bytes copied in 9.0 s)",
            "nbs: INFO backend.replication.supervisor: volume r3: node1 in sync again"
            " (8 bytes copied in 8.0 s)",
            "nbs: INFO backend.replication.supervisor: volume r3: node2 in sync again"
            " (1073741824 bytes copied in 4.2 s)",
        ]
    )
    assert in_sync_again(log, "r3", "node2") == (1073741824, 4.2)
    assert in_sync_again(log, "r3", "node0") is None


def _result(workload: str, volume: str, **numbers: float) -> dict[str, Any]:
    return {"workload": workload, "server": volume, **numbers}


def test_goals_at_most_and_at_least_are_judged_on_the_right_side() -> None:
    latency = Goal("p50", "w", "p50_lat_us", "r3", "r1", 1.3, at_most=True)
    iops = Goal("iops", "w", "iops", "r3", "r1", 0.7, at_most=False)
    results = [
        _result("w", "r3", p50_lat_us=130.0, iops=69.0),
        _result("w", "r1", p50_lat_us=100.0, iops=100.0),
    ]
    assert latency.ratio(results) == pytest.approx(1.3)
    assert latency.met(1.3)
    assert not latency.met(1.31)
    assert iops.ratio(results) == pytest.approx(0.69)
    assert not iops.met(iops.ratio(results))
    assert iops.met(0.7)


def test_every_goal_of_the_issue_gets_a_verdict() -> None:
    volumes = {"r3": 2.0, "r1": 1.0, "plain": 1.0}  # r3 twice r1 and plain in everything
    results = [
        _result(goal.workload, volume, iops=f * 1000, mb_s=f * 100, p50_lat_us=f * 100)
        for goal in GOALS
        for volume, f in volumes.items()
    ]
    verdicts = goals(results, {"mb_s": RESYNC_GOAL_MB_S})
    assert [v["goal"] for v in verdicts] == [*(g.label for g in GOALS), "resync MB/s"]
    by_goal = {v["goal"]: v for v in verdicts}
    # Twice the latency: over 1.3x of 1 replica, within 2x of unreplicated; twice the IOPS
    # and MB/s meets every throughput goal; the resync rate is exactly the goal.
    assert not by_goal["QD1 write p50, 3 vs 1 replica"]["met"]
    assert by_goal["QD1 write p50, 3 replicas vs unreplicated"]["met"]
    assert by_goal["QD16 write IOPS, 3 vs 1 replica"]["met"]
    assert by_goal["1M read MB/s, 3 vs 1 replica"]["met"]
    assert by_goal["resync MB/s"]["met"]
    assert by_goal["QD1 write p50, 3 vs 1 replica"]["measured"] == "2.00x"
    assert not goals(results, {"mb_s": None})[-1]["met"]


def test_resync_size_over_the_volume_size_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--size", "64M", "--resync-size", "1G"])
    assert stopped.value.code == 2
    assert "--resync-size must not be more than --size" in capsys.readouterr().err
    assert parse_args(["--size", "64M"]).resync_size == 64 << 20
