"""In-process replicas for engine tests: MemoryStorage disks behind a switchable fault.

A ``Replicas`` set keeps one disk per member for the whole test, across engine restarts;
``open_child`` is the engine's child factory and hands out a ``FaultyStorage`` over the
member's disk.  Faults are per member and shared by every child opened on it:

* ``error``: requests of the chosen kinds fail with the errno;
* ``hang``: they block until ``release`` (or the fault is cleared, or the connection is
  closed);
* ``slow``: they sleep ``delay`` seconds first (a random part of it when ``jitter``, which
  reorders concurrent requests);
* ``unreachable``: opening the member fails (a dead node).

With ``serve`` (tests/unit/server/clients.py ``in_process_servers``) each child is an
NbdStorage talking to this project's server in process, which serves the FaultyStorage: the
engine then takes its submit path (docs/decisions/0106), with errors crossing the wire, and
each member's server fences older epochs as a replica's does (backend/server/fencing.py:
a connection under a newer epoch waits for the older connections' requests to end).

Replicas also enforce epochs the way replica servers do: a child opened with an epoch lower
than the highest one promised (by any ``open_child`` or ``promise``) refuses every request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import random
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from backend.replication.engine import ReplicatedStorage
from backend.replication.membership import InMemoryMembershipStore, Membership
from backend.replication.policy import ReplicationPolicy
from backend.replication.tracking import RegionMap
from backend.server.exports import Export
from backend.server.fencing import Fence
from backend.server.server import Server
from backend.storage import MemoryStorage, Storage, StorageError
from backend.storage.base import Capabilities, Extent
from backend.storage.layers.forwarding import ForwardingStorage
from backend.storage.nbd import NbdStorage, NbdTarget
from tests.unit.server.clients import port_of

ALL = frozenset({"read", "write", "flush", "extents"})

KIB = 1024
MIB = 1024 * KIB
SIZE = 8 * MIB  # the engine tests' volume
G = 64 * KIB  # and its tracking granularity
# Short enough for tests that wait out a timeout, long enough for a loaded 2-core machine.
QUICK = ReplicationPolicy(child_timeout=2.0, below_min_wait=0.5)


@dataclasses.dataclass
class Fault:
    mode: str | None = None  # error, hang, slow
    kinds: Collection[str] = ALL
    errno: int = errno.EIO
    delay: float = 0.0
    jitter: bool = False
    unreachable: bool = False
    released: threading.Event = dataclasses.field(default_factory=threading.Event)

    def set(self, mode: str | None, kinds: Collection[str] = ALL, **kw: object) -> None:
        self.released.set()  # whatever hung under the previous fault goes on
        self.released = threading.Event()
        self.kinds = kinds
        for key, value in kw.items():
            setattr(self, key, value)
        self.mode = mode

    def clear(self) -> None:
        self.set(None)

    def release(self) -> None:
        self.released.set()


class FaultyStorage(ForwardingStorage):
    """A member's disk as the engine sees it through one connection."""

    def __init__(
        self, member: str, disk: Storage, fault: Fault, epoch: int, replicas: Replicas
    ) -> None:
        super().__init__(disk, owns_inner=False)
        self._member = member
        self._fault = fault
        self._epoch = epoch
        self._replicas = replicas
        self.closed = False

    @property
    def capabilities(self) -> Capabilities:
        # Served over NBD, requests run on the server's workers, so a hang holds only itself.
        return dataclasses.replace(super().capabilities, inline=False)

    @contextlib.contextmanager
    def _admitted(self, kind: str) -> Iterator[None]:
        """Count the request in flight before its epoch is checked and until it is done, as
        a replica server does: a newer epoch waits for it (Replicas.open_child)."""
        replicas, key = self._replicas, (self._member, self._epoch)
        with replicas.cond:
            replicas.in_flight[key] = replicas.in_flight.get(key, 0) + 1
        try:
            self._gate(kind)
            yield
        finally:
            with replicas.cond:
                replicas.in_flight[key] -= 1
                replicas.cond.notify_all()

    def _gate(self, kind: str) -> None:
        if self.closed:
            raise StorageError(errno.EBADF, "connection closed")
        if self._epoch < self._replicas.promised[self._member]:
            raise StorageError(errno.EPERM, f"epoch {self._epoch} is fenced")
        fault = self._fault
        if fault.mode is None or kind not in fault.kinds:
            return
        if fault.mode == "error":
            raise StorageError(fault.errno, f"injected {kind} error")
        if fault.mode == "hang":
            # Closing the connection fails what waits on it, as closing an NbdStorage does.
            while not fault.released.wait(0.005):
                if self.closed:
                    raise StorageError(errno.EBADF, "connection closed while hung")
            raise StorageError(errno.ETIMEDOUT, "released from a hang")
        if fault.mode == "slow":
            time.sleep(fault.delay * (random.random() if fault.jitter else 1.0))

    def read(self, offset: int, length: int) -> bytes:
        with self._admitted("read"):
            return super().read(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        with self._admitted("write"):
            super().write(offset, data, fua)

    def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True, fast: bool = False
    ) -> None:
        with self._admitted("write"):
            super().write_zeroes(offset, length, fua, may_trim, fast)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        with self._admitted("write"):
            super().trim(offset, length, fua)

    def flush(self) -> None:
        with self._admitted("flush"):
            super().flush()

    def extents(self, offset: int, length: int) -> list[Extent]:
        with self._admitted("extents"):
            return super().extents(offset, length)

    def close(self) -> None:
        self.closed = True


class _NbdChild(NbdStorage):
    """A member over NBD; closing it drops what its connection still has running on the
    server, as a replica server does when the connection goes."""

    def __init__(self, served: FaultyStorage, target: NbdTarget) -> None:
        super().__init__(target, reconnect_deadline=0)
        self._served = served

    def close(self) -> None:
        self._served.closed = True
        super().close()


class RecordingStore(InMemoryMembershipStore):
    """Calls ``on_commit(new)`` before each commit, to observe what was durable then."""

    def __init__(self, on_commit: Callable[[Membership], None]) -> None:
        super().__init__()
        self.on_commit = on_commit

    def commit(self, new: Membership, expected_generation: int | None) -> None:
        self.on_commit(new)
        super().commit(new, expected_generation)


class Replicas:
    """Member disks, their faults, and the epoch each promised (per member, as each replica
    server keeps its own: an engine reconnecting one member under a newer epoch fences only
    that member's older connections)."""

    def __init__(
        self,
        members: Collection[str],
        size: int,
        serve: Callable[..., Server] | None = None,
    ) -> None:
        self.size = size
        self.serve = serve
        self.fences = {m: Fence(m, 0, lambda epoch: True) for m in members}
        self.disks = {m: MemoryStorage(size) for m in members}
        self.faults = {m: Fault() for m in members}
        self.promised = dict.fromkeys(members, 0)
        # Requests in flight per (member, epoch of their connection); guarded by ``cond``.
        self.in_flight: dict[tuple[str, int], int] = {}
        self.cond = threading.Condition()
        self.opened: list[tuple[str, int]] = []

    def add(self, member: str) -> None:
        """A new member's disk (a storage node's new, empty replica), for a member joining
        the volume; it stays, as a deleted replica's disk would for a while, for checks."""
        self.fences[member] = Fence(member, 0, lambda epoch: True)
        self.disks[member] = MemoryStorage(self.size)
        self.faults[member] = Fault()
        self.promised[member] = 0

    def requests_running(self, member: str) -> int:
        """Requests of any connection of ``member`` admitted and not yet done."""
        with self.cond:
            return sum(n for (m, _), n in self.in_flight.items() if m == member)

    def open_child(self, member: str, epoch: int) -> Storage:
        if self.faults[member].unreachable:
            raise StorageError(errno.ECONNREFUSED, f"{member} is unreachable")
        self._promise(member, epoch)
        self.opened.append((member, epoch))
        child = FaultyStorage(member, self.disks[member], self.faults[member], epoch, self)
        if self.serve is None:
            return child
        server = self.serve(Export("disk", child, fence=self.fences[member], epoch=epoch))
        target = NbdTarget.from_uri(f"nbd://127.0.0.1:{port_of(server)}/disk")
        return _NbdChild(child, target)

    def resize_child(self, member: str, size: int) -> None:
        """Resize ``member``'s disk, as its storage node resizes the replica (through its
        API, not the engine's connections, which keep the size of their handshake)."""
        if self.faults[member].unreachable:
            raise StorageError(errno.ECONNREFUSED, f"{member} is unreachable")
        self.disks[member].resize(size, allow_shrink=True)

    def promise(self, epoch: int) -> None:
        """Every member promises ``epoch`` (another engine attached)."""
        for member in self.promised:
            self._promise(member, epoch)

    def _promise(self, member: str, epoch: int) -> None:
        """Promise ``epoch``, then wait for the requests of older connections still running
        (a replica server drains them before the newer epoch is served: requests of a crashed
        or fenced engine that were already admitted never land after this returns)."""
        with self.cond:
            if epoch <= self.promised[member]:
                return
            self.promised[member] = epoch

            def drained() -> bool:
                return not any(
                    n for (m, e), n in self.in_flight.items() if m == member and e < epoch
                )

            if not self.cond.wait_for(drained, timeout=10):
                raise StorageError(errno.ETIMEDOUT, f"{member}: older requests still running")

    def heal(self) -> None:
        for fault in self.faults.values():
            fault.clear()
            fault.unreachable = False

    def image(self, member: str) -> bytes:
        disk = self.disks[member]
        return disk.read(0, disk.size)

    def identical(self, among: Collection[str] | None = None) -> bool:
        images = {self.image(m) for m in (self.disks if among is None else among)}
        return len(images) == 1


@dataclasses.dataclass
class Volume:
    """Everything an engine over ``Replicas`` needs, kept across engine restarts."""

    replicas: Replicas
    store: InMemoryMembershipStore
    map_path: Path
    granularity: int
    volume_id: str = "vol"

    @classmethod
    def create(
        cls,
        directory: Path,
        members: Collection[str],
        size: int,
        granularity: int = 4096,
        serve: Callable[..., Server] | None = None,
    ) -> Volume:
        store = InMemoryMembershipStore()
        store.commit(Membership.new("vol", members), None)
        path = directory / "vol.map"
        RegionMap.create(path, size, granularity, syncer=_no_sync).close()
        return cls(Replicas(members, size, serve), store, path, granularity)

    def open_recording(
        self,
        on_commit: Callable[[Engine, Membership], None],
        policy: ReplicationPolicy | None = None,
    ) -> Engine:
        """Open an engine whose membership commits each call ``on_commit(engine, new)`` first
        (from the first commit after the open on), to observe what was durable then."""
        opened: list[Engine] = []
        store = RecordingStore(lambda new: on_commit(opened[0], new) if opened else None)
        store.commit(self.store.load(self.volume_id), None)
        self.store = store
        engine = self.open(policy)
        opened.append(engine)
        return engine

    def open(self, policy: ReplicationPolicy | None = None) -> Engine:
        regions = RegionMap.open(self.map_path, syncer=_no_sync)
        try:
            return Engine(
                self.volume_id,
                regions.size,  # what the engine grew it to, if it did
                self.store,
                regions,
                self.replicas.open_child,
                policy=policy,
                resize_child=self.replicas.resize_child,
            )
        except BaseException:
            regions.close()
            raise


class Engine(ReplicatedStorage):
    """A ReplicatedStorage that owns its region map (closes it on close or crash)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.regions: RegionMap = args[3]
        super().__init__(*args, **kwargs)

    def close(self) -> None:
        super().close()
        self.regions.close()

    def crash(self) -> None:
        """Stop as a killed engine would: nothing flushed, connections dropped.  The map is
        closed only to release its lock; its durable bits are what a crash leaves."""
        with self._cond:
            self._closed = True
            children = [c.storage for c in self._children.values() if c.storage is not None]
        self._pool.shutdown(wait=False, cancel_futures=True)
        for child in children:
            child.close()
        self.regions.close()


def _no_sync(fd: int) -> None:
    """Tests run in one process: the page cache is as durable as the disk here."""


def members(n: int) -> Iterator[str]:
    return (f"r{i}" for i in range(n))
