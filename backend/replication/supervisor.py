"""The resync supervisor of ``nbs serve``: brings out members of open replicated volumes back.

Every ``interval`` seconds it looks at each open engine; for a volume with an out member and
no resync running, it starts one resync (a thread) of the out member tried least recently
(so a dead node does not keep a new member from its resync): ``resync``
reopens the member (a node still down fails at once, and is tried again next round),
makes it receive new writes, copies what it missed, rate limited, and makes it in sync.
One resync at a time per volume, so two returning members do not compete for the source's
bandwidth; other volumes resync in parallel.

Logs: start (info, once the member answered), progress every 10 %, end (info) or failure
(warning; a member still unreachable only at debug level, not every round).

With ``scrub_interval`` it also scrubs (``ReplicatedStorage.scrub``, backend/replication/
scrub.py) each open volume that long after it was opened or last scrubbed, with ``repair``
as configured: one scrub at a time in the whole server (a scrub reads every replica of a
volume), never while the volume has a member out or resyncing (the resync goes first).  The
engine logs what a scrub found (a warning when a mismatch or a failed replica).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from backend.replication.engine import ReplicatedStorage
from backend.replication.membership import MembershipError
from backend.storage.base import StorageError

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())

Engines = Callable[[], Mapping[str, ReplicatedStorage]]

__all__ = ["ResyncSupervisor"]


class ResyncSupervisor:
    """``engines()``: the open engines by volume name (called from the supervisor thread)."""

    def __init__(
        self,
        engines: Engines,
        interval: float = 2.0,
        *,
        scrub_interval: float = 0.0,
        scrub_repair: bool = False,
    ) -> None:
        self._engines = engines
        self._interval = interval
        self._scrub_interval = scrub_interval  # 0: no scheduled scrubs
        self._scrub_repair = scrub_repair
        self._scrubbing: threading.Thread | None = None  # one at a time, server-wide
        # When each open engine is next due, by (volume, engine id), in monotonic seconds.
        self._due: dict[tuple[str, int], float] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._running: dict[str, threading.Thread] = {}
        # Bytes copied by finished resyncs, per (volume, member) and engine (by id: a
        # reopened volume is a new engine and starts from 0, as its other counters do).
        self._copied: dict[tuple[str, str], tuple[int, int]] = {}
        self._tried: dict[tuple[str, str], float] = {}  # last resync start per (volume, member)
        self._thread = threading.Thread(target=self._run, name="resync-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop probing and wait up to ``timeout`` for running resyncs; a resync still running
        is abandoned when its engine closes (the map keeps what is left: it resumes later)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._lock:
            running = list(self._running.values())
            if self._scrubbing is not None:
                running.append(self._scrubbing)
        for thread in running:
            thread.join(timeout)

    def probe(self) -> None:
        """One round (the thread's body; tests call it directly)."""
        try:
            engines = dict(self._engines())
        except Exception:  # the catalogue changing under us: next round
            log.debug("listing open replicated volumes failed", exc_info=True)
            return
        for volume, engine in engines.items():
            out = [m for m in engine.membership.members if engine.membership.state(m) == "out"]
            if not out:
                continue
            with self._lock:
                if volume in self._running or self._stop.is_set():
                    continue
                member = min(out, key=lambda m: self._tried.get((volume, m), 0.0))
                self._tried[volume, member] = time.monotonic()
                thread = threading.Thread(
                    target=self._resync,
                    args=(volume, engine, member),
                    name=f"resync-{volume}",
                    daemon=True,
                )
                self._running[volume] = thread
            thread.start()
        if self._scrub_interval > 0:
            self._schedule_scrub(engines)

    def _schedule_scrub(self, engines: Mapping[str, ReplicatedStorage]) -> None:
        """Start the scrub of the first volume that is due, unless one is running."""
        now = time.monotonic()
        chosen: threading.Thread | None = None
        with self._lock:
            open_now = {(volume, id(engine)) for volume, engine in engines.items()}
            self._due = {key: due for key, due in self._due.items() if key in open_now}
            for volume, engine in engines.items():
                due = self._due.setdefault((volume, id(engine)), now + self._scrub_interval)
                if chosen is not None or due > now or self._stop.is_set():
                    continue
                if self._scrubbing is not None and self._scrubbing.is_alive():
                    continue
                m = engine.membership
                if volume in self._running or len(m.in_sync) < len(m.members):
                    continue  # a resync first: it may be what makes the replicas the same
                self._due[volume, id(engine)] = now + self._scrub_interval
                chosen = threading.Thread(
                    target=self._scrub, args=(volume, engine), name=f"scrub-{volume}", daemon=True
                )
                self._scrubbing = chosen
        if chosen is not None:
            chosen.start()

    def _scrub(self, volume: str, engine: ReplicatedStorage) -> None:
        log.info("volume %s: scheduled scrub started", volume)
        try:
            engine.scrub(repair=self._scrub_repair)  # logs what it found
        except (StorageError, MembershipError) as err:
            level = logging.DEBUG if self._stop.is_set() else logging.WARNING  # stopping
            log.log(level, "volume %s: scheduled scrub failed (tried again later): %s", volume, err)

    def copied_bytes(self, volume: str, engine: ReplicatedStorage, member: str) -> int:
        """Bytes copied to ``member`` by ``engine``'s finished resyncs (for metrics)."""
        with self._lock:
            owner, copied = self._copied.get((volume, member), (0, 0))
        return copied if owner == id(engine) else 0

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.probe()

    def _resync(self, volume: str, engine: ReplicatedStorage, member: str) -> None:
        shown = [-1]

        def progress(done: int, total: int) -> None:
            if shown[0] < 0:
                log.info(
                    "volume %s: resync of %s started (%d bytes to copy)", volume, member, total
                )
                shown[0] = 0
            tenth = done * 10 // total if total else 10
            if tenth > shown[0]:
                shown[0] = tenth
                log.info(
                    "volume %s: resync of %s %d%% (%d/%d bytes)",
                    volume,
                    member,
                    tenth * 10,
                    done,
                    total,
                )

        try:
            counters = engine.resync(member, progress=progress)
        except (StorageError, MembershipError) as err:
            level = logging.WARNING if shown[0] >= 0 else logging.DEBUG
            log.log(
                level, "volume %s: resync of %s failed (tried again later): %s", volume, member, err
            )
        else:
            with self._lock:
                owner, copied = self._copied.get((volume, member), (0, 0))
                before = copied if owner == id(engine) else 0
                self._copied[volume, member] = (id(engine), before + counters.bytes_copied)
            log.info(
                "volume %s: %s in sync again (%d bytes copied in %.1f s)",
                volume,
                member,
                counters.bytes_copied,
                counters.elapsed,
            )
        finally:
            with self._lock:
                self._running.pop(volume, None)
