"""A log message that a client or the system can trigger in a loop, logged once per interval.

Out of file descriptors, a failed accept repeats as fast as the loop runs (614,779 lines in 5 s
before the accept loop backed off); a client hammering a full server is refused as fast as it
connects.  Each such message is logged at most once per ``interval`` and says how many were
left out since the last one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class ThrottledLog:
    """Logs ``message`` at most once per ``interval`` seconds; thread-safe."""

    def __init__(
        self,
        logger: logging.Logger,
        level: int,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._level = level
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._next = float("-inf")
        self._left_out = 0

    def __call__(self, message: str, *args: object) -> bool:
        """Log ``message % args`` unless one was logged less than ``interval`` ago.

        Returns whether it was logged.
        """
        with self._lock:
            now = self._clock()
            if now < self._next:
                self._left_out += 1
                return False
            left_out, self._left_out = self._left_out, 0
            self._next = now + self._interval
        if left_out:
            message += f" ({left_out} more since the last such message)"
        self._logger.log(self._level, message, *args)
        return True
