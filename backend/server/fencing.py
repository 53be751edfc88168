"""Epoch fencing: a volume serves only the newest of the writers that took it.

A replication engine takes a volume by naming an *epoch* in its export name (the catalogue
parses it: backend/volumes/exports.py); each attachment uses a new, higher one.  The volume's
:class:`Fence` keeps the highest epoch promised, persisted by its ``promise`` callback before
anyone sees it, and every session of the volume holds a :class:`Pass` stamped with the epoch
it was admitted at.  A request runs only while its pass is current (``pass.epoch >=
fence.epoch``), checked on the thread that executes it, just before it touches the storage.

Taking a higher epoch: persist it (committed), publish it (``fence.epoch``), then wait until
every older pass has no request in flight, then revoke those passes (the session answers
what it still receives with EPERM and closes).  It is race-free because a request enters its
pass's in-flight count *before* it reads ``fence.epoch``: a request that read the old epoch
is already counted when the taker, after publishing, waits for the count to drain, and one
that enters later reads the new epoch and is refused.  The hot path is a deque append and pop
(atomic in CPython, no lock) and two attribute reads.

Plain (unfenced) writable sessions of a volume at epoch 0 hold a pass of epoch 0, so the
first engine's epoch drains and closes them too; once a volume promised an epoch, a plain
client is served read-only (backend/server/holders.py), so only the engine writes a replica.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from backend.nbd import ExportForbiddenError, ExportUnavailableError

log = logging.getLogger(__name__)

# How often a taker looks whether an older pass's requests in flight have finished: a take is
# rare and its wait short (requests already running), so polling beats a lock per request.
_DRAIN_POLL = 0.001


class Pass:
    """One session's admission to a fenced volume at ``epoch``; made by :class:`Fence`."""

    __slots__ = ("_on_revoked", "epoch", "fence", "inflight")

    def __init__(self, fence: Fence, epoch: int, on_revoked: Callable[[], None]) -> None:
        self.fence = fence
        self.epoch = epoch
        # One entry per request of this session between its epoch check and its end.
        self.inflight: deque[None] = deque()
        self._on_revoked = on_revoked

    def current(self) -> bool:
        """Whether requests may run now; call between ``inflight.append`` and ``.pop``."""
        return self.epoch >= self.fence.epoch

    def _drain(self) -> None:
        while self.inflight:
            time.sleep(_DRAIN_POLL)

    def release(self) -> None:
        """The session ended: forget this pass."""
        self.fence._forget(self)


class Fence:
    """The epoch one volume promised, shared by all the sessions of it in this process.

    ``promise(epoch)`` persists a higher epoch durably and returns False if it could not (the
    volume is gone, or another process promised as high); it is called with no lock but the
    take lock held, so takes of one volume are serialised and never block its requests.
    """

    def __init__(self, volume: str, epoch: int, promise: Callable[[int], bool]) -> None:
        self.volume = volume
        self.epoch = epoch  # published; read by every request of the volume's sessions
        self._promise = promise
        self._taking = threading.Lock()  # one take at a time: persist, publish, drain
        self._state = threading.Lock()  # guards _passes and the publication of epoch
        self._passes: list[Pass] = []

    def check(self, epoch: int) -> None:
        """Raise :class:`ExportForbiddenError` if ``epoch`` is older than the one promised."""
        promised = self.epoch
        if epoch < promised:
            raise ExportForbiddenError(
                f"volume {self.volume} promised epoch {promised}: epoch {epoch} is fenced out"
            )

    def take(self, epoch: int, on_revoked: Callable[[], None]) -> Pass:
        """Admit a session at ``epoch``: raise it if higher (persisted, then published, then
        older sessions drained and revoked), refuse it if lower.  ``on_revoked`` is called,
        on the taker's thread, when a later take revokes the pass returned."""
        with self._taking:
            self.check(epoch)
            if epoch > self.epoch:
                if not self._promise(epoch):
                    raise ExportUnavailableError(
                        f"volume {self.volume} could not promise epoch {epoch}"
                    )
                with self._state:
                    self.epoch = epoch
                    older = [p for p in self._passes if p.epoch < epoch]
                    self._passes = [p for p in self._passes if p.epoch >= epoch]
                for stale in older:
                    stale._drain()
                    stale._on_revoked()
                log.info(
                    "volume %s: epoch %d taken; %d older session(s) drained and revoked",
                    self.volume,
                    epoch,
                    len(older),
                )
            admitted = Pass(self, epoch, on_revoked)
            with self._state:
                self._passes.append(admitted)
            return admitted

    def plain(self, on_revoked: Callable[[], None]) -> Pass | None:
        """A pass for a plain writable session, or None when the volume promised an epoch
        (then the session must be served read-only)."""
        with self._state:
            if self.epoch > 0:
                return None
            admitted = Pass(self, 0, on_revoked)
            self._passes.append(admitted)
            return admitted

    def _forget(self, done: Pass) -> None:
        with self._state:
            if done in self._passes:
                self._passes.remove(done)
