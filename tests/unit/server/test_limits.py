"""Connection limits: counting admissions, and the bounds every limit is checked against."""

from __future__ import annotations

import logging

import pytest

from backend.server.limits import (
    Admission,
    ConnectionLimits,
    connection_count,
    handshake_seconds,
)
from backend.server.throttled_log import ThrottledLog


def test_total_limit_counts_every_client_and_unix_sockets() -> None:
    admission = Admission(ConnectionLimits(max_connections=2, max_connections_per_client=5))
    assert admission.admit("192.0.2.1") is None
    assert admission.admit(None) is None
    assert admission.admit("192.0.2.2") == "2 connections open (max_connections)"
    admission.release(None)
    assert admission.admit("192.0.2.2") is None


def test_per_client_limit_is_per_address_and_released_on_close() -> None:
    admission = Admission(ConnectionLimits(max_connections=10, max_connections_per_client=2))
    assert admission.admit("192.0.2.1") is None
    assert admission.admit("192.0.2.1") is None
    refused = admission.admit("192.0.2.1")
    assert refused == "2 connections open from 192.0.2.1 (max_connections_per_client)"
    assert admission.total == 2  # a refusal counts nothing
    assert admission.admit("2001:db8::1") is None
    for _ in range(3):  # Unix socket clients have no address: only the total applies
        assert admission.admit(None) is None
    admission.release("192.0.2.1")
    assert admission.admit("192.0.2.1") is None


def test_lowered_limits_apply_to_new_connections_only() -> None:
    admission = Admission(ConnectionLimits(max_connections=4))
    for _ in range(3):
        assert admission.admit("192.0.2.1") is None
    admission.limits = ConnectionLimits(max_connections=2)
    assert admission.admit("192.0.2.9") is not None
    for _ in range(2):
        admission.release("192.0.2.1")
    assert admission.admit("192.0.2.9") is None


@pytest.mark.parametrize(("value", "expected"), [(1, 1), ("64", 64), (1_000_000, 1_000_000)])
def test_connection_counts(value: object, expected: int) -> None:
    assert connection_count(value) == expected


@pytest.mark.parametrize("value", [0, -1, "0", True, 1.5, "1e3", "9" * 5000, 1_000_001, None])
def test_bad_connection_counts(value: object) -> None:
    with pytest.raises(ValueError, match="expected an integer from 1 to 1000000"):
        connection_count(value)


@pytest.mark.parametrize(("value", "expected"), [(2, 2.0), ("0.5", 0.5), (3600, 3600.0)])
def test_handshake_timeouts(value: object, expected: float) -> None:
    assert handshake_seconds(value) == expected


@pytest.mark.parametrize(
    "value", [0, -1, "nan", float("nan"), "inf", 3601, True, "1" * 40, "soon", None]
)
def test_bad_handshake_timeouts(value: object) -> None:
    with pytest.raises(ValueError, match="a number of seconds above 0, at most 3600"):
        handshake_seconds(value)


def test_throttled_log_logs_once_per_interval_with_what_it_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    throttled = ThrottledLog(logging.getLogger("t"), logging.ERROR, 10, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR, "t"):
        assert throttled("accept failed: %s", "EMFILE")
        for _ in range(1000):
            now[0] += 0.001
            assert not throttled("accept failed: %s", "EMFILE")
        now[0] = 110.0
        assert throttled("accept failed: %s", "EMFILE")
        now[0] = 200.0
        assert throttled("accept failed: %s", "EMFILE")
    assert [r.getMessage() for r in caplog.records] == [
        "accept failed: EMFILE",
        "accept failed: EMFILE (1000 more since the last such message)",
        "accept failed: EMFILE",
    ]
