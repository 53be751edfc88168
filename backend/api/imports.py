"""Importing an image into a new volume for the API: checked at once, copied on a thread;
and the other long operations a client streams the progress of (:class:`Job`: a scrub).

:class:`Import` does everything that can be refused (a bad name or size, an existing volume,
an unreadable source) before it returns, so the API answers those with their own status; then
it copies on a thread of its own and reports events.  The copy does not depend on anyone
reading the events: a client that goes away does not cancel it.  The volume is hidden
(``creating``) until the copy completed, and removed if it fails.

Sources are the server's own files (absolute paths of regular files or block devices) or NBD
URIs.  Everything else qemu-img would accept (``json:{…}``, ``http://…``, relative paths) is
refused: a token holder must not make the server open arbitrary qemu block drivers.
"""

from __future__ import annotations

import logging
import queue
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from backend.volumes import transfer
from backend.volumes.model import (
    ImportRequest,
    InvalidRequestError,
    StorageFailureError,
    VolumeError,
    check_name,
)
from backend.volumes.service import VolumeService

log = logging.getLogger(__name__)

NBD_SCHEMES = ("nbd", "nbd+tcp", "nbd+unix")
_END = object()


def check_source(source: str) -> str:
    """``source`` if it is an NBD URI or the absolute path of an existing file or block device
    on this machine; else InvalidRequestError."""
    scheme = urlsplit(source).scheme if "://" in source else ""
    if scheme:
        if scheme not in NBD_SCHEMES:
            raise InvalidRequestError(
                f"unsupported source {source!r}: use a path on the server or an"
                f" {'/'.join(NBD_SCHEMES)} URI"
            )
        return source
    path = Path(source)
    if not path.is_absolute():
        raise InvalidRequestError(f"source {source!r} must be an absolute path on the server")
    try:
        mode = path.stat().st_mode
    except OSError as err:
        raise InvalidRequestError(f"cannot use source {source}: {err.strerror}") from err
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise InvalidRequestError(f"source {source} is not a regular file or block device")
    return source


class Job:
    """Work on a thread of its own whose events one client streams: ``{"done": n, "total":
    t}`` while it runs, then exactly one of ``{KEY: {…}}`` (its result) and ``{"error":
    {"code": …, "message": …}}``.  The work does not depend on anyone reading the events: a
    client that goes away does not cancel it.

    ``work(progress)`` returns ``(KEY, result)``; ``what`` names it in errors and the log."""

    def __init__(
        self,
        name: str,
        what: str,
        work: Callable[[Callable[[int, int], None]], tuple[str, dict[str, Any]]],
    ) -> None:
        self.what = what
        self._work = work
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            key, result = self._work(self._progress)
        except BaseException as err:
            if not isinstance(err, VolumeError):
                log.exception("%s failed", self.what)
                err = StorageFailureError(f"{self.what} failed: {err}")
            self._events.put({"error": {"code": err.code, "message": err.message}})
        else:
            self._events.put({key: result})
        finally:
            self._events.put(_END)

    def _progress(self, done: int, total: int) -> None:
        self._events.put({"done": done, "total": total})

    def next_event(self) -> dict[str, Any] | None:
        """The next event, blocking until there is one; None after the last.  For one
        reader."""
        event = self._events.get()
        return None if event is _END else event


class Import(Job):
    """One image being copied into a new, hidden volume.

    The constructor checks the request, creates the volume (``creating``) and starts the copy;
    it raises the VolumeError of a refused request, and then nothing is left behind.  Its
    result event is ``{"volume": {…}}``.
    """

    def __init__(self, service: VolumeService, request: ImportRequest) -> None:
        self.service = service
        self.request = request
        self.name = check_name(request.volume.name)
        self.source = check_source(request.source)
        transfer.begin_import(service, request)
        super().__init__(f"nbs-import-{self.name}", f"import of {self.source}", self._copy)

    def _copy(self, progress: Callable[[int, int], None]) -> tuple[str, dict[str, Any]]:
        info = transfer.finish_import(self.service, self.request, progress)
        log.info("imported %s into volume %s", self.source, self.name)
        return "volume", info.to_json()


def scrub(service: VolumeService, name: str, repair: bool) -> Job:
    """A started scrub of volume ``name`` (what cannot be scrubbed at all is refused first,
    with its own status); its result event is ``{"scrub": {…}}``."""
    service.check_scrub(name)
    return Job(
        f"nbs-scrub-{name}",
        f"scrub of {name}",
        lambda progress: (
            "scrub",
            service.scrub(name, repair=repair, progress=progress).to_json(),
        ),
    )


class Imports:
    """The imports and scrubs of one API instance, so that stopping can wait for the running
    ones."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[Job] = set()

    def start(self, service: VolumeService, request: ImportRequest) -> Import:
        """A started :class:`Import` (raises what its constructor raises)."""
        job = Import(service, request)
        self.add(job)
        return job

    def add(self, job: Job) -> None:
        """Count a started job among those stopping waits for."""
        with self._lock:
            self._running = {j for j in self._running if j.thread.is_alive()} | {job}

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the running imports; True if none is left."""
        with self._lock:
            running = list(self._running)
        deadline = time.monotonic() + timeout
        for job in running:
            job.thread.join(max(deadline - time.monotonic(), 0))
        return not any(job.thread.is_alive() for job in running)
