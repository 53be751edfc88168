"""How many connections the server takes, and how long a client may take to pick an export.

A leaf module (stdlib only), so that the YAML config (backend/config.py) and the
command line validate with the same bounds the server applies: one definition per limit.
docs/decisions/0030-connection-limits.md says why the defaults are what they are.
"""

from __future__ import annotations

import dataclasses
import math

DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 512
DEFAULT_HANDSHAKE_TIMEOUT = 60.0
MAX_COUNT = 1_000_000
MAX_HANDSHAKE_TIMEOUT = 3600.0


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    """``max_connections``: open connections in all; ``max_connections_per_client``: from
    one client IP address (Unix socket clients count only towards the total);
    ``handshake_timeout``: seconds from accept until the client has picked an export."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT


def connection_count(value: object) -> int:
    """A connection limit from YAML or the command line; raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected an integer from 1 to {MAX_COUNT}, got {value!r}")
    text = str(value).strip()
    if not text.isdigit() or len(text) > 7 or not 1 <= int(text) <= MAX_COUNT:
        raise ValueError(f"expected an integer from 1 to {MAX_COUNT}, got {value!r}")
    return int(text)


def handshake_seconds(value: object) -> float:
    """A handshake timeout from YAML or the command line; raises ValueError."""
    expected = f"a number of seconds above 0, at most {MAX_HANDSHAKE_TIMEOUT:g}"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected {expected}, got {value!r}")
    try:
        if len(str(value)) > 32:  # float() of a huge string is slow; no sane timeout is that long
            raise ValueError
        seconds = float(str(value))
    except ValueError:
        raise ValueError(f"expected {expected}, got {value!r}") from None
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_HANDSHAKE_TIMEOUT:
        raise ValueError(f"expected {expected}, got {value!r}")
    return seconds


class Admission:
    """Counts open connections, in all and per client address; the server's lock guards it."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.total = 0
        self._by_client: dict[str, int] = {}

    def admit(self, client: str | None) -> str | None:
        """Count a new connection from ``client`` (an IP address; None for a Unix socket).

        Returns None if it may stay, else why not (and counts nothing).
        """
        if self.total >= self.limits.max_connections:
            return f"{self.limits.max_connections} connections open (max_connections)"
        if client is not None:
            count = self._by_client.get(client, 0)
            if count >= self.limits.max_connections_per_client:
                return f"{count} connections open from {client} (max_connections_per_client)"
            self._by_client[client] = count + 1
        self.total += 1
        return None

    def release(self, client: str | None) -> None:
        """A connection admitted for ``client`` has closed."""
        self.total -= 1
        if client is not None:
            left = self._by_client[client] - 1
            if left:
                self._by_client[client] = left
            else:
                del self._by_client[client]
