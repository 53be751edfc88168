"""Owner leases of volumes being created: who may still finish a ``creating`` row.

A volume is recorded ``creating`` before its storage is made and stays so until it is ready:
for an import, the whole copy (minutes).  gc must tell a row left by a crash from one whose
creator is still at work, so the creator holds a lease on it for the whole operation: an
exclusive flock(2) on ``DATA/creating/NAME``.  The kernel drops the lock when the process dies
(kill -9 included), and a lock, unlike a recorded PID, cannot be mistaken for a new process
that reused the PID.

flock locks belong to an open file description, so a second open of the same file in the same
process does not share the lock: :meth:`Leases.held` answers the same for this process's own
leases as for another's.  Taking, releasing and testing leases happen under the service's
mutate lock, so a lease file is never unlinked while another process is about to lock it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


def locked(path: Path) -> bool:
    """True while some open file description holds a flock on ``path`` (False if there is no
    such file).  Never creates the file, and releases at once a lock it gets."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class LeaseHeldError(Exception):
    """Another process holds the lease."""


class Leases:
    """The leases in ``directory`` (made on the first :meth:`take`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fds: dict[str, int] = {}

    def take(self, name: str) -> None:
        """Hold the lease of ``name`` until :meth:`release` (or this process ends); raises
        LeaseHeldError if another holder has it."""
        self.directory.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.directory / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LeaseHeldError(name) from None
        self._fds[name] = fd

    def release(self, name: str) -> None:
        """Give up the lease of ``name`` (nothing if this process does not hold it)."""
        fd = self._fds.pop(name, None)
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / name).unlink()
            os.close(fd)

    def held(self, name: str) -> bool:
        """True while some live process (this one included) holds the lease of ``name``."""
        return name in self._fds or locked(self.directory / name)

    def remove_stale(self) -> None:
        """Remove lease files no live process holds (their holders died)."""
        with contextlib.suppress(FileNotFoundError):
            for path in self.directory.iterdir():
                if not self.held(path.name):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()

    def close(self) -> None:
        """Release every lease this process holds."""
        for name in list(self._fds):
            self.release(name)
