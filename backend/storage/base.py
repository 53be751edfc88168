"""The Storage interface: what every volume backend and every layer provides.

Contract (checked for every implementation by tests/unit/storage/conformance.py):

* Offsets and lengths handed to a Storage were validated by the NBD core: they lie within
  ``size`` and respect ``Capabilities.min_block``; a storage may assert, never re-validate.
* Failures raise :class:`StorageError` with an ``errno`` (``errno.EIO``, ``errno.ENOSPC``, …);
  the server turns it into the NBD error on the wire.  Nothing else may escape.
* ``write(..., fua=True)`` returns only once the data is durable; ``flush()`` returns only once
  every write that completed before it was called is durable.
* Inside ``without_waiting()`` a storage that would wait (a replicated volume below
  ``min_insync``, or for a late member) raises :class:`MustNotWait` instead; the caller
  finishes the request where it may wait.  It is the one other exception a storage may
  raise.
* A storage is shared by every connection of its export and must be safe to call from several
  threads at once when ``Capabilities.thread_safe`` is true (the server serialises otherwise).
* Whoever creates a storage closes it; ``close()`` is idempotent and flushes nothing implicitly.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import errno as errno_mod
import os
import threading
from collections.abc import Callable, Iterator
from typing import Literal


class StorageError(Exception):
    """A storage operation failed; ``errno`` says how, ``message`` says why."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(f"{message} ({os.strerror(errno)})")
        self.errno = errno
        self.message = message

    @classmethod
    def from_os_error(cls, err: OSError, what: str) -> StorageError:
        code = err.errno if err.errno is not None else errno_mod.EIO
        return cls(code, what)


@dataclasses.dataclass(frozen=True, slots=True)
class Capabilities:
    """What a storage can do, declared up front (never probed per request)."""

    read_only: bool = False
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = False
    can_extents: bool = True
    # extents() answers from local metadata (a bitmap, SEEK_DATA): the server may ask before
    # every large read to send holes as holes.  False where it costs a round trip or a listing
    # of the backing store (object stores, RBD): large reads then just read.
    cheap_extents: bool = True
    can_cache: bool = True
    # resize() changes the size (Storage.resize); layers forward it, and a storage without it
    # refuses with ENOTSUP.  Not an NBD flag: the protocol has no resize (NBD_CMD_RESIZE is an
    # extension nobody implements), only the volume service asks.
    can_resize: bool = False
    # True when every connection sees every other connection's completed writes and a FLUSH
    # on one connection covers writes completed on all of them (NBD_FLAG_CAN_MULTI_CONN).
    can_multi_conn: bool = True
    thread_safe: bool = True
    # submit() sends a write, zero, trim or flush without waiting and wait() collects its
    # reply (Storage.submit): one thread can have a request on several storages at once (the
    # replication engine's fan-out, docs/decisions/0106).  Layers never forward it (a submit
    # passed through would skip the layer), so ForwardingStorage declares it False.
    can_submit: bool = False
    # Requests are cheap and never block for long (page-cache file I/O): the server may run
    # them on the connection's own thread instead of a worker pool.
    inline: bool = True
    # Not ``inline``, but run on the connection's thread while ``inline_ready()`` says the
    # storage is healthy and the client is at queue depth 1 (two requests in a row found
    # nothing else unanswered and nothing more received): there the hand-off to a worker
    # costs more than the request's own work (docs/decisions/0131).
    inline_when_idle: bool = False
    rotational: bool = False
    min_block: int = 1
    preferred_block: int = 4096
    # Not advertised and not a bound on requests: the server advertises its max_request and
    # hands a storage longer requests in pieces of at most 4 MiB (docs/decisions/0020).
    max_block: int = 32 * 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class Extent:
    """A run of bytes that share allocation state.

    ``hole``: reading the run may not touch backing storage (unallocated).
    ``zero``: the run reads as zeroes.
    """

    offset: int
    length: int
    hole: bool = False
    zero: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """A write, zero, trim or flush, as a value: handed to ``Storage.submit`` or done at once
    by ``apply``.  ``data`` is the payload of a write (``length`` is then its length)."""

    kind: Literal["write", "zero", "trim", "flush"]
    offset: int = 0
    length: int = 0
    data: bytes | None = None
    fua: bool = False
    may_trim: bool = True

    def apply(self, storage: Storage) -> None:
        """Do the request on ``storage`` the blocking way."""
        if self.kind == "write":
            assert self.data is not None
            storage.write(self.offset, self.data, self.fua)
        elif self.kind == "zero":
            storage.write_zeroes(self.offset, self.length, self.fua, self.may_trim)
        elif self.kind == "trim":
            storage.trim(self.offset, self.length, self.fua)
        else:
            storage.flush()


class MustNotWait(Exception):  # noqa: N818 (not an error: the request goes on elsewhere)
    """Raised instead of a wait inside ``without_waiting()``: the request is under way and
    must wait (for a late answer, or by policy).  The caller must call ``finish()`` on a
    thread that may wait; it ends the request: returns, or raises its StorageError."""

    def __init__(self, finish: Callable[[], None]) -> None:
        super().__init__()
        self.finish = finish


_caller = threading.local()


@contextlib.contextmanager
def without_waiting() -> Iterator[None]:
    """Requests made on this thread inside the block must not wait by policy: the server
    runs them on a connection's own thread (``Capabilities.inline_when_idle``), where a wait
    would hold back every request the client sends meanwhile."""
    before = getattr(_caller, "impatient", False)
    _caller.impatient = True
    try:
        yield
    finally:
        _caller.impatient = before


def may_wait() -> bool:
    """False inside ``without_waiting()`` on this thread."""
    return not getattr(_caller, "impatient", False)


class RequestLostError(StorageError):
    """The connection a submitted request went out on dropped before its reply: whether it
    was done is unknown, and doing it again is safe (every NBD command is idempotent)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno_mod.ECONNRESET, message)


class Storage(abc.ABC):
    """A fixed-size array of bytes.  Subclasses implement every abstract method."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Size in bytes."""

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What this storage supports; constant for its lifetime."""

    @abc.abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes at ``offset`` (holes read as zeroes)."""

    @abc.abstractmethod
    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        """Write all of ``data`` at ``offset``; durable before returning when ``fua``."""

    @abc.abstractmethod
    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> None:
        """Make the range read as zeroes.

        ``may_trim``: the range may be deallocated (NBD's NO_HOLE flag clears it).
        ``fast``: fail with ``ENOTSUP`` rather than fall back to writing zero bytes.
        """

    @abc.abstractmethod
    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Hint that the range is unused; afterwards it may read as anything (we give zeroes)."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every completed write durable."""

    @abc.abstractmethod
    def cache(self, offset: int, length: int) -> None:
        """Prefetch the range into a faster tier (advisory; may do nothing)."""

    @abc.abstractmethod
    def extents(self, offset: int, length: int) -> list[Extent]:
        """Describe ``[offset, offset+length)`` as contiguous extents, in order.

        The first extent starts at ``offset``; together they cover at least one byte and at
        most the requested range, without gaps.
        """

    def resize(self, new_size: int, *, allow_shrink: bool = False) -> None:
        """Change the size to ``new_size``: growing reads as zeroes, shrinking (only with
        ``allow_shrink``) drops what lies past the new end.

        An optional ability, declared by ``Capabilities.can_resize``; without it this raises
        ``StorageError(ENOTSUP)``, as here.
        """
        raise StorageError(errno_mod.ENOTSUP, f"{self!r} cannot be resized")

    def submit(self, request: Request) -> object | None:
        """Send ``request`` without waiting for it; return a handle for ``wait``, or None
        when it cannot go that way now (the caller then does ``request.apply``).

        An optional ability, declared by ``Capabilities.can_submit``; without it this raises
        ``StorageError(ENOTSUP)``, as here.
        """
        raise StorageError(errno_mod.ENOTSUP, f"{self!r} cannot submit requests")

    def wait(self, handle: object, timeout: float, *, keep: bool = False) -> bool:
        """Wait up to ``timeout`` seconds for the request behind ``handle``: True once it is
        done, False if not (the request is abandoned: nobody will wait for it again; with
        ``keep``, it stays pending and is waited for again).  Raises StorageError for its
        failure, RequestLostError when it must be done again."""
        raise StorageError(errno_mod.ENOTSUP, f"{self!r} cannot submit requests")

    def inline_ready(self) -> bool:
        """For a storage that declares ``inline_when_idle``: whether a request started now
        is expected to finish quickly (no member failing, nobody waited for), so the server
        may run it on the connection's thread.  Asked before each such request: cheap."""
        return self.capabilities.inline_when_idle

    @abc.abstractmethod
    def close(self) -> None:
        """Release resources; idempotent."""
