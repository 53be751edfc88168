"""ReplicatedStorage: one volume fanned out to N member storages (the engine, in-process).

Rules (docs/replication.md, "Engine"; REPLICATION.md for the why):

* Opening takes a new epoch and opens every current member with it; then, before serving,
  regions left in doubt by a crash are copied from one in-sync member to the others.
* A write, zero or trim holds a lock on its byte range (an overlapping later request waits,
  so every member applies overlapping requests in one order), marks its regions IN_DOUBT
  and in the missed plane of every out member (durably), then goes in parallel to every
  in-sync and resyncing member.  It is acknowledged when every in-sync member has it.
* A member that errors or does not answer within ``child_timeout`` is failed *before* the
  request is acknowledged: its missed plane (a copy of IN_DOUBT plus the request's regions)
  is durable and ``member_failed`` is committed.  The last in-sync member is never failed:
  that request fails with EIO.  Below ``min_insync`` the policy waits or fails.
* A flush goes to every in-sync and resyncing member; once they all have it, IN_DOUBT is
  checkpointed for the writes that completed before it started.
* A lost compare-and-swap to a newer epoch means another engine owns the volume: from then
  on every request fails with EIO.
* Reads go to the least busy in-sync member; an error reads another and writes the good
  data back (read repair); a member whose repair fails is failed.
* Resync copies a returning member's missed regions under the range lock, holes skipped,
  rate limited; the plane is the cursor, so a crash resumes where it stopped.
* Members are added, removed and replaced while serving (``add_member``, ``remove_member``,
  ``replace_member``; docs/decisions/0120): a joining member's missed plane marks the whole
  volume durably before it is committed (out), so a write of the old membership that does
  not reach it is covered; a leaving member is committed out of the membership first, then
  the writes of the old membership are drained, its connection closed and its requests
  waited for, so nothing of ours reaches its replica once this returns.

Lock order: range lock, then ``_changes`` (plane and membership changes), then ``_cond``
(children, counters, writes in flight).  The region map's own lock is taken last.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from functools import partial
from typing import TypeVar

from backend.replication.copying import COPY_PIECE, CopyError, TokenBucket, copy_range
from backend.replication.membership import (
    Change,
    ConflictError,
    FencedError,
    Membership,
    MembershipStore,
    TransitionError,
    check_min_insync,
    commit_change,
    epoch_taken,
    member_added,
    member_failed,
    member_removed,
    member_replaced,
    resync_done,
    resync_started,
    take_epoch,
)
from backend.replication.policy import ReplicationPolicy
from backend.replication.scrub import STEP as SCRUB_STEP
from backend.replication.scrub import Difference, Mismatch, ScrubReport, differences
from backend.replication.status import EngineStatus, MemberStatus, ResyncProgress
from backend.replication.tracking import (
    IN_DOUBT,
    RegionMap,
    RegionMapError,
    check_geometry,
    missed,
)
from backend.storage.base import (
    Capabilities,
    Extent,
    MustNotWait,
    Request,
    RequestLostError,
    Storage,
    StorageError,
    may_wait,
)
from backend.storage.ranges import RangeLock

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())

T = TypeVar("T")
# Seconds a caller that must not wait (a session's own thread, decisions/0131) waits for a
# member's reply before the rest of the request goes to a thread that may: a round trip is
# well under a millisecond, so a member this late is slow or gone.
PATIENCE = 0.01
ChildFactory = Callable[[str, int], Storage]
# Resizes a member's replica to a size in bytes, from outside its NBD connection (NBD has no
# resize command): the volume service asks the member's storage node.
ChildResizer = Callable[[str, int], None]

__all__ = ["ChildFactory", "ChildResizer", "ReplicatedStorage"]


@dataclasses.dataclass(slots=True)
class _Child:
    storage: Storage | None = None
    in_flight: int = 0
    errors: int = 0
    last_error: str | None = None
    resync: ResyncProgress | None = None
    resync_running: bool = False  # a resync() of it is under way (a removal waits for it)


def _lacks(have: Capabilities, need: Capabilities) -> list[str]:
    """What a member with ``have`` cannot do of what the engine offers (``need``): a member
    joining a volume that is served already must do all of it, or the first such request
    would fail it."""
    lacks = [
        name
        for name in ("can_flush", "can_fua", "can_trim", "can_zero", "can_extents", "can_cache")
        if getattr(need, name) and not getattr(have, name)
    ]
    if have.min_block > need.min_block:
        lacks.append(f"min_block {have.min_block} > {need.min_block}")
    if have.max_block < need.max_block:
        lacks.append(f"max_block {have.max_block} < {need.max_block}")
    return lacks


def _intersect(caps: list[Capabilities]) -> Capabilities:
    """What every member can do.  Fast zero is never offered: a member refusing it after
    others zeroed would leave them different (it is only an optimisation for the client)."""
    return Capabilities(
        read_only=False,
        can_flush=all(c.can_flush for c in caps),
        can_fua=all(c.can_fua for c in caps),
        can_trim=all(c.can_trim for c in caps),
        can_zero=all(c.can_zero for c in caps),
        can_fast_zero=False,
        can_extents=all(c.can_extents for c in caps),
        cheap_extents=all(c.cheap_extents for c in caps),
        can_cache=all(c.can_cache for c in caps),
        can_resize=False,
        can_multi_conn=all(c.can_multi_conn for c in caps),
        thread_safe=True,
        inline=False,  # a request waits for the slowest in-sync member
        inline_when_idle=True,
        rotational=any(c.rotational for c in caps),
        min_block=max(c.min_block for c in caps),
        preferred_block=max(c.preferred_block for c in caps),
        max_block=min(c.max_block for c in caps),
    )


class ReplicatedStorage(Storage):
    """A volume of ``size`` bytes whose members are opened by ``open_child(member, epoch)``.

    ``regions`` is opened (and closed) by the caller; ``store`` holds the membership, which
    must exist.  Construction takes a new epoch, opens the members and reconciles; it raises
    StorageError if no in-sync member can be opened, and MembershipError from the store.
    """

    def __init__(
        self,
        volume_id: str,
        size: int,
        store: MembershipStore,
        regions: RegionMap,
        open_child: ChildFactory,
        *,
        policy: ReplicationPolicy | None = None,
        resize_child: ChildResizer | None = None,
    ) -> None:
        if regions.size != size:
            raise ValueError(f"region map of {regions.size} bytes for a volume of {size}")
        self._volume_id = volume_id
        self._size = size
        self._store = store
        self._regions = regions
        self._open_child = open_child
        self._resize_child = resize_child
        self._policy = policy or ReplicationPolicy()
        self._cond = threading.Condition(threading.Lock())
        self._changes = threading.RLock()
        self._ranges = RangeLock()
        self._bucket = TokenBucket(self._policy.resync_rate)
        self._writes: dict[int, tuple[int, int]] = {}  # in flight: token → (offset, length)
        self._next_token = 0
        self._fenced = False
        self._closed = False
        self._reconciled = self._reads = self._repairs = self._failed = self._written = 0
        self._last_scrub: ScrubReport | None = None  # the last scrub that finished
        self._membership = take_epoch(store, volume_id)
        self._children = {m: _Child() for m in self._membership.members}
        workers = 16 * len(self._membership.members) + 8
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, f"replicas-{volume_id}")
        try:
            self._open_members()
            self._settle_planes()
            self._caps = _intersect(
                [
                    s.capabilities
                    for m in self._membership.in_sync
                    if (s := self._children[m].storage) is not None
                ]
            )
            if resize_child is not None:
                self._caps = dataclasses.replace(self._caps, can_resize=True)
            self._reconcile()
        except BaseException:
            self.close()
            raise

    # -- opening -------------------------------------------------------------------------

    def _open_members(self) -> None:
        m = self._membership
        for member in m.resyncing:  # its resync died with the last engine; resumable
            self._fail_member(member, None, "resync interrupted by an engine restart")
        for member in m.members:
            if self._membership.state(member) == "out":
                continue
            try:
                self._children[member].storage = self._open_child(member, m.epoch)
            except StorageError as err:
                self._fail_member(member, None, f"cannot open: {err}")

    def _settle_planes(self) -> None:
        """Every out member has a missed plane; no other member has one.  An out member also
        missed whatever was in doubt when the last engine stopped: a write in flight then
        may have reached the others (reconcile makes them agree) and not it, and the failure
        that would have added its region to the member's plane may never have run."""
        with self._changes:
            planes = set(self._regions.planes)
            doubt = list(self._regions.regions(IN_DOUBT))
            for member in self._membership.members:
                name = missed(member)
                if self._membership.state(member) == "out" and name not in planes:
                    # Out with no record of what it missed (new, or a crash between): all.
                    self._regions.add_plane(name)
                    self._regions.mark([name], 0, self._size)
                elif self._membership.state(member) == "out":
                    for offset, length in doubt:
                        self._regions.mark([name], offset, length)
                elif self._membership.state(member) == "in_sync" and name in planes:
                    self._regions.remove_plane(name)
            # A member removed by an engine that stopped before it dropped the plane.
            current = {missed(x) for x in self._membership.members}
            for name in planes:
                if name.startswith(missed("")) and name not in current:
                    self._regions.remove_plane(name)

    def _reconcile(self) -> None:
        """Make the in-sync members equal where IN_DOUBT says they may differ."""
        runs = list(self._regions.regions(IN_DOUBT))
        if not runs:
            return
        with self._regions.checkpoint([IN_DOUBT]):
            for offset, length in self._pieces(runs):
                while True:
                    members = self._open_in_sync()
                    source = members[0]
                    try:
                        for target in members[1:]:
                            self._copy(source, target, offset, length, fail_target=True)
                    except CopyError as err:  # the source failed: try the next one
                        self._fail_member(source, None, f"reconcile read: {err.error}")
                        continue
                    break
                self._reconciled += length
            self._fan_out_flush()
        log.info("volume %s: reconciled %d bytes in doubt", self._volume_id, self._reconciled)

    def _pieces(self, runs: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
        step = max(COPY_PIECE, self._regions.granularity)
        for offset, length in runs:
            for at in range(offset, offset + length, step):
                yield at, min(step, offset + length - at)

    # -- Storage -------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    @property
    def membership(self) -> Membership:
        return self._membership

    def inline_ready(self) -> bool:
        """Every member in sync and open, this engine not fenced: a request is expected to
        take one round trip.  A degraded volume's requests always go to a worker, so that a
        write waiting for ``min_insync`` never holds back the reads behind it."""
        m = self._membership
        return (
            not self._fenced
            and not self._closed
            and len(m.in_sync) == len(m.members)
            and all((c := self._children.get(x)) and c.storage is not None for x in m.members)
        )

    def read(self, offset: int, length: int) -> bytes:
        self._check_usable()
        self._reads += 1
        bad: list[str] = []
        while True:
            member = self._least_busy(exclude=bad)
            try:
                data = self._inline(member, lambda s: s.read(offset, length))
            except StorageError:
                bad.append(member)
                continue
            break
        if bad:
            # The guest has its data either way; a repair that cannot finish leaves the
            # members as they were, or fails them (which the next request then sees).
            with contextlib.suppress(StorageError):
                self._repair(member, bad, offset, length)
        return data

    def _repair(self, good: str, bad: list[str], offset: int, length: int) -> None:
        """Write ``good``'s data over the members whose read failed; fail those it cannot
        repair.  Under the range lock, so no guest write to the range is overwritten."""
        with self._ranges.hold(offset, offset + length):
            data = self._call(good, lambda s: s.read(offset, length))
            for member in bad:
                if member not in self._membership.in_sync:  # out, or removed meanwhile
                    continue
                try:
                    self._call(member, lambda s: s.write(offset, data))
                    self._repairs += 1
                except StorageError as err:
                    self._fail_member(member, (offset, length), f"read repair: {err}")

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        payload = bytes(data)
        self._mutate(Request("write", offset, len(payload), payload, fua))

    def write_zeroes(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> None:
        if fast:
            raise StorageError(errno.ENOTSUP, "a replicated volume has no fast zero")
        self._mutate(Request("zero", offset, length, fua=fua, may_trim=may_trim))

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        # Sent to every member: a trim applied to some members only would let the others'
        # old data come back through a read (nbd-rs trimmed replica 0 only).
        self._mutate(Request("trim", offset, length, fua=fua))

    def flush(self) -> None:
        self._drive(self._flushing())

    def _flushing(self) -> Generator[None, None, None]:
        """The flush; yields once if a member is late for a caller that must not wait."""
        self._check_usable()
        with self._cond:
            in_flight = list(self._writes.values())
            # Entered with the writes' table locked: a write registered later marks after
            # the checkpoint began, so the checkpoint keeps its bits.
            checkpoint = self._regions.checkpoint([IN_DOUBT], in_flight=in_flight)
            checkpoint.__enter__()
        try:
            yield from self._flushing_members()
        except BaseException as err:
            checkpoint.__exit__(type(err), err, err.__traceback__)
            raise
        checkpoint.__exit__(None, None, None)
        yield from self._awaiting_min_insync()

    def cache(self, offset: int, length: int) -> None:
        self._check_usable()
        member = self._least_busy()
        with contextlib.suppress(StorageError):  # advisory
            self._inline(member, lambda s: s.cache(offset, length))

    def extents(self, offset: int, length: int) -> list[Extent]:
        self._check_usable()
        tried: list[str] = []
        while True:
            member = self._least_busy(exclude=tried)
            try:
                return self._inline(member, lambda s: s.extents(offset, length))
            except StorageError:
                tried.append(member)

    def resize(self, new_size: int, *, allow_shrink: bool = False) -> None:
        """Grow the volume to ``new_size`` bytes (a replicated volume never shrinks).

        At one point of the write stream (``quiesced``), with every member in sync: each
        member's replica is resized (``resize_child``) and reconnected to learn its new size,
        the region map grows with the new range in doubt (a crash from here on reconciles
        it), the new range is zeroed on every member as a write (a replica that an earlier,
        failed attempt left larger may hold other bytes there), and only then does the
        engine serve the new size: no client can write the new range before its zeroing.
        A failure before the map grows leaves the volume as it was (replicas already resized
        are only larger; the next attempt fixes them); after it, the next attempt must ask
        for the same size, and finishes the job."""
        if self._resize_child is None:
            super().resize(new_size, allow_shrink=allow_shrink)  # ENOTSUP
            return
        self._check_usable()
        old_size = self._size
        if new_size == old_size:
            return
        if new_size < old_size:
            raise StorageError(errno.EOPNOTSUPP, "a replicated volume grows but never shrinks")
        try:
            check_geometry(new_size, self._regions.granularity)
        except RegionMapError as err:
            raise StorageError(errno.EINVAL, str(err)) from None
        with self.quiesced(), self._changes:
            self._check_usable()
            grown = self._regions.size  # past old_size if an earlier attempt failed late
            if grown not in (old_size, new_size):
                raise StorageError(
                    errno.EINVAL,
                    f"an earlier resize to {grown} bytes did not finish; resize to {grown} first",
                )
            m = self._membership
            behind = sorted(set(m.members) - m.in_sync)
            if behind:
                raise StorageError(
                    errno.EBUSY,
                    f"resizing needs every replica in sync; {', '.join(behind)} is not (wait"
                    " for its resync, or replace it: see nbs volume info)",
                )
            for member in m.members:
                self._resize_child(member, new_size)
            fresh: dict[str, Storage] = {}
            try:
                for member in m.members:
                    fresh[member] = storage = self._open_child(member, m.epoch)
                    if storage.size != new_size:
                        raise StorageError(
                            errno.EIO,
                            f"member {member} serves {storage.size} bytes after its resize"
                            f" to {new_size}",
                        )
                if grown == old_size:
                    self._regions.grow(new_size, [IN_DOUBT])
            except BaseException:
                for storage in fresh.values():
                    _close_quietly(storage)
                raise
            with self._cond:
                replaced = []
                for member, storage in fresh.items():
                    child = self._children[member]
                    if child.storage is not None:
                        replaced.append(child.storage)
                    child.storage = storage
            for storage in replaced:
                # Reads sent before the swap finish on it (each within the member's request
                # timeout); nothing new is sent to it.
                closer = threading.Timer(self._policy.child_timeout, _close_quietly, (storage,))
                closer.daemon = True
                closer.start()
            # Outside the range the quiesce holds, inside the map; no client sees it yet.
            self._mutate(Request("zero", old_size, new_size - old_size, may_trim=True))
            with self._cond:
                self._size = new_size
        log.info("volume %s: grown from %d to %d bytes", self._volume_id, old_size, new_size)
        self.flush()  # the new range leaves IN_DOUBT

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            storages = [c.storage for c in self._children.values() if c.storage is not None]
            for child in self._children.values():
                child.storage = None
            self._cond.notify_all()
        # A hung member keeps its worker; nobody waits for it.
        self._pool.shutdown(wait=False, cancel_futures=True)
        for storage in storages:
            with contextlib.suppress(StorageError):
                storage.close()

    def __repr__(self) -> str:
        return f"ReplicatedStorage({self._volume_id!r}, members={self._membership.members})"

    # -- the write path ------------------------------------------------------------------

    def _mutate(self, request: Request) -> None:
        self._drive(self._mutating(request))

    def _drive(self, steps: Generator[None, None, None]) -> None:
        """Run a request's ``steps`` to the end; on a caller that must not wait
        (``without_waiting``), only until a member is late: the rest (waiting for its
        replies, failing members, the ack) is then the caller's to run on a thread that
        may wait (``MustNotWait.finish``).  Nothing is done twice."""
        if may_wait():
            _run_out(steps)
            return
        for _ in steps:
            raise MustNotWait(finish=partial(_run_out, steps))

    def _mutating(self, request: Request) -> Generator[None, None, None]:
        """The write path; yields once if a member is late for a caller that must not wait
        (``_fanning_out``), and goes on when resumed (on a thread that may)."""
        offset, length = request.offset, request.length
        self._check_usable()
        yield from self._awaiting_min_insync()
        with self._ranges.hold(offset, offset + length):
            with self._cond:
                token = self._next_token
                self._next_token += 1
                self._writes[token] = (offset, length)
                m = self._membership
            try:
                planes = [IN_DOUBT, *(missed(x) for x in m.members if x in m.out)]
                self._regions.mark(planes, offset, length)
                targets = [x for x in m.members if x not in m.out]
                failures = yield from self._fanning_out(targets, request)
                for member, reason in failures:
                    self._fail_member(member, (offset, length), reason)
            finally:
                with self._cond:
                    del self._writes[token]
                    self._written += 1
                    self._cond.notify_all()
        yield from self._awaiting_min_insync()

    def _fanning_out(
        self, members: list[str], request: Request
    ) -> Generator[None, None, list[tuple[str, str]]]:
        """Do ``request`` on every member in parallel; return the failures (member, why).

        A member that can submit (NbdStorage) is sent the request from this thread, and the
        replies are collected here: no thread hand-off per member.  Others, and a request
        whose connection dropped (it is done again, reconnecting), go through the pool.
        Every request counts in flight from before it is sent until nobody will touch it
        again, the same as the pool's (``_wait_idle``).

        On a caller that must not wait (``without_waiting``), a member that has not answered
        within ``PATIENCE`` makes it yield once: whoever resumes it waits for the rest, up
        to ``child_timeout`` as always (decisions/0131).  It must be run to the end."""
        timeout = self._policy.child_timeout
        deadline = time.monotonic() + timeout
        failures: list[tuple[str, str]] = []
        targets: list[tuple[str, _Child, Storage]] = []
        with self._cond:
            for member in members:
                child = self._children[member]
                if child.storage is None:
                    failures.append((member, "not open"))
                    continue
                child.in_flight += 1
                targets.append((member, child, child.storage))
        impatient = not may_wait()
        sent: list[tuple[str, _Child, Storage, object]] = []
        pooled: list[tuple[str, Storage]] = []
        ended: list[_Child] = []
        for member, child, storage in targets:
            handle = None
            if storage.capabilities.can_submit:
                try:
                    handle = storage.submit(request)
                except StorageError as err:
                    self._request_failed(member, child, storage, err)
                    failures.append((member, str(err)))
                    ended.append(child)
                    continue
            if handle is None:
                pooled.append((member, storage))
            else:
                sent.append((member, child, storage, handle))
        for member, child, storage, handle in sent:
            try:
                answered = False
                if impatient:
                    answered = storage.wait(handle, PATIENCE, keep=True)
                    if not answered:
                        yield  # late: resumed where waiting is fine
                        impatient = False
                if not answered and not storage.wait(handle, deadline - time.monotonic()):
                    self._note_error(member, f"no answer within {timeout} s")
                    failures.append((member, f"no answer within {timeout} s"))
            except RequestLostError:
                pooled.append((member, storage))  # still counted: the pool's run ends it
                continue
            except StorageError as err:
                self._request_failed(member, child, storage, err)
                failures.append((member, str(err)))
            ended.append(child)
        if ended:
            with self._cond:
                for child in ended:
                    child.in_flight -= 1
                self._cond.notify_all()
        if pooled:
            failures += yield from self._pool_fan_out(pooled, request, deadline)
        return failures

    def _pool_fan_out(
        self, members: list[tuple[str, Storage]], request: Request, deadline: float
    ) -> Generator[None, None, list[tuple[str, str]]]:
        """``request`` on each member in a pool thread, already counted in flight (yields
        once if they are late for a caller that must not wait, as ``_fanning_out``)."""
        failures: list[tuple[str, str]] = []
        futures: dict[concurrent.futures.Future[None], str] = {}
        for index, (member, storage) in enumerate(members):
            try:
                futures[self._submit(member, storage, request.apply, counted=True)] = member
            except StorageError:  # closed meanwhile: the ones not handed over end here
                with self._cond:
                    for rest, _ in members[index + 1 :]:
                        self._children[rest].in_flight -= 1
                    self._cond.notify_all()
                raise
        timeout = self._policy.child_timeout
        if not may_wait() and concurrent.futures.wait(futures, PATIENCE).not_done:
            yield  # late: resumed where waiting is fine
        done, late = concurrent.futures.wait(futures, max(0.0, deadline - time.monotonic()))
        for future in done:
            if future.cancelled():  # by close()
                self._check_usable()
            if (err := future.exception()) is not None:
                failures.append((futures[future], str(err)))
        for future in late:
            member = futures[future]
            self._note_error(member, f"no answer within {timeout} s")
            failures.append((member, f"no answer within {timeout} s"))
        return failures

    def _fan_out_flush(self) -> None:
        _run_out(self._flushing_members())

    def _flushing_members(self) -> Generator[None, None, None]:
        m = self._membership
        targets = [x for x in m.members if x not in m.out]
        failures = yield from self._fanning_out(targets, Request("flush"))
        for member, reason in failures:
            self._fail_member(member, None, f"flush: {reason}")

    def _run(
        self, member: str, storage: Storage, op: Callable[[Storage], T], counted: bool = False
    ) -> T:
        """``op`` on ``storage`` (a connection to ``member``), counted in flight from before
        it was queued (``counted``) or from now, until it returns: resync waits for none to be
        left (``_wait_idle``)."""
        child = self._children[member]
        if not counted:
            with self._cond:
                child.in_flight += 1
        try:
            return op(storage)
        except StorageError as err:
            self._request_failed(member, child, storage, err)
            raise
        finally:
            with self._cond:
                child.in_flight -= 1
                if not child.in_flight:
                    self._cond.notify_all()

    def _request_failed(
        self, member: str, child: _Child, storage: Storage, err: StorageError
    ) -> None:
        if child.storage is not storage:
            # From a connection already dropped (the member failed meanwhile, e.g. this
            # request was abandoned at child_timeout): the status keeps why it failed.
            return
        self._note_error(member, str(err))
        if err.errno == errno.EPERM:
            # The member's current connection is refused its epoch: a newer engine took the
            # volume.  Not a member failure to record (the catalogue is no longer ours to
            # change).  From a connection already replaced, it is the replica fencing a
            # request of ours that outlived it: nothing more.
            self._fence(f"member {member} refused: {err}")

    def _submit(
        self, member: str, storage: Storage, op: Callable[[Storage], T], counted: bool = False
    ) -> concurrent.futures.Future[T]:
        child = self._children[member]
        if not counted:
            with self._cond:
                child.in_flight += 1  # queued counts: it may still run after a resync began
        try:
            return self._pool.submit(self._run, member, storage, op, True)
        except RuntimeError:  # shut down by close() meanwhile
            with self._cond:
                child.in_flight -= 1
                self._cond.notify_all()
            raise StorageError(errno.EBADF, f"volume {self._volume_id} is closed") from None

    def _call(self, member: str, op: Callable[[Storage], T]) -> T:
        """``op`` on one member, within ``child_timeout``; StorageError if it fails."""
        storage = self._children[member].storage
        if storage is None:
            raise StorageError(errno.EIO, f"member {member} is not open")
        future = self._submit(member, storage, op)
        try:
            return future.result(self._policy.child_timeout)
        except concurrent.futures.TimeoutError:
            self._note_error(member, f"no answer within {self._policy.child_timeout} s")
            raise StorageError(errno.EIO, f"member {member} did not answer") from None
        except concurrent.futures.CancelledError:  # by close()
            raise StorageError(errno.EBADF, f"volume {self._volume_id} is closed") from None

    def _inline(self, member: str, op: Callable[[Storage], T]) -> T:
        """``op`` on one member on the caller's thread: a guest read waits for one member
        anyway, and a hop through the pool costs more than a read from memory.  A member
        that hangs is bounded by its own request timeout (NbdStorage's), not child_timeout;
        the read then goes to another member."""
        storage = self._children[member].storage
        if storage is None:
            raise StorageError(errno.EIO, f"member {member} is not open")
        return self._run(member, storage, op)

    def _note_error(self, member: str, reason: str) -> None:
        with self._cond:
            child = self._children[member]
            child.errors += 1
            child.last_error = reason

    def _least_busy(self, exclude: list[str] | tuple[()] = ()) -> str:
        with self._cond:
            m = self._membership
            candidates = [
                x
                for x in m.members
                if x in m.in_sync and x not in exclude and self._children[x].storage is not None
            ]
            if not candidates:
                raise StorageError(errno.EIO, f"volume {self._volume_id}: no in-sync member left")
            return min(candidates, key=lambda x: self._children[x].in_flight)

    def _open_in_sync(self) -> list[str]:
        m = self._membership
        members = [x for x in m.members if x in m.in_sync and self._children[x].storage]
        if not members:
            raise StorageError(errno.EIO, f"volume {self._volume_id}: no in-sync member left")
        return members

    def _wait_min_insync(self) -> None:
        """Wait (``below_min``) for ``min_insync`` members in sync, or fail with EIO."""
        policy = self._policy
        deadline = time.monotonic() + policy.below_min_wait
        with self._cond:
            while len(self._membership.in_sync) < (needed := self._min_insync()):
                left = deadline - time.monotonic()
                if self._fenced or self._closed or policy.below_min == "fail" or left <= 0:
                    raise StorageError(
                        errno.EIO,
                        f"volume {self._volume_id}: {len(self._membership.in_sync)} member(s) "
                        f"in sync, min_insync is {needed}",
                    )
                self._cond.wait(left)

    def _min_insync(self) -> int:
        """The in-sync members a write needs now (the policy's, or a majority of the
        members: it moves with them)."""
        return self._policy.required(len(self._membership.members))

    def _awaiting_min_insync(self) -> Generator[None, None, None]:
        """``_wait_min_insync``, after a yield if it would wait on a caller that must not
        (``without_waiting``): whoever resumes the request waits."""
        if (
            not may_wait()
            and self._policy.below_min == "wait"
            and len(self._membership.in_sync) < self._min_insync()
        ):
            yield
        self._wait_min_insync()

    def _fence(self, why: str) -> None:
        """Another engine owns the volume: every request fails with EIO from now on."""
        with self._cond:
            if self._fenced:
                return
            self._fenced = True
            self._cond.notify_all()
        log.error("volume %s: fenced, refusing every request: %s", self._volume_id, why)

    def _check_usable(self) -> None:
        if self._closed:
            raise StorageError(errno.EBADF, f"volume {self._volume_id} is closed")
        if self._fenced:
            raise StorageError(
                errno.EIO, f"volume {self._volume_id} is owned by a newer engine (fenced)"
            )

    # -- membership changes ----------------------------------------------------------------

    def _commit(self, change: Change) -> Membership:
        """Commit a transition; a newer epoch or a lost race fences this engine (EIO)."""
        with self._changes:
            if self._fenced:
                self._check_usable()
            try:
                new = commit_change(self._store, self._membership, change)
            except (FencedError, ConflictError) as err:
                self._fence(str(err))
                raise StorageError(errno.EIO, f"volume {self._volume_id}: {err}") from err
            with self._cond:
                self._membership = new
                self._cond.notify_all()
            return new

    def _fail_member(self, member: str, region: tuple[int, int] | None, reason: str) -> None:
        """Make ``member`` out, durably, with a missed plane holding IN_DOUBT and ``region``.
        Raises StorageError(EIO) if it is the last in-sync member or the engine is fenced."""
        with self._changes:
            self._check_usable()  # closed: the map may be closed too; fenced: no changes
            if member not in self._membership.members:
                return  # removed meanwhile: a request of the old membership failed on it
            plane = missed(member)
            if plane in self._regions.planes:
                for offset, length in list(self._regions.regions(IN_DOUBT)):
                    self._regions.mark([plane], offset, length)
            else:
                self._regions.add_plane(plane, copy_from=IN_DOUBT)
            if region is not None:
                self._regions.mark([plane], *region)
            if self._membership.state(member) == "out":
                return
            try:
                self._commit(lambda m: member_failed(m, member))
            except TransitionError as err:
                raise StorageError(errno.EIO, f"{err} ({reason})") from err
            log.warning("volume %s: member %s failed: %s", self._volume_id, member, reason)
            with self._cond:
                self._failed += 1
                storage, self._children[member].storage = self._children[member].storage, None
        if storage is not None:
            # Closed on the side: a hung member may never return from close either.
            threading.Thread(target=_close_quietly, args=(storage,), daemon=True).start()

    # -- members joining and leaving while serving -------------------------------------------

    def add_member(self, member: str) -> Membership:
        """``member`` joins, out: the resync supervisor copies the whole volume to it (holes
        skipped) and makes it in sync.  Its replica must exist and be empty or stale: nothing
        of it is trusted.  Raises TransitionError if it is a member already."""
        return self._change_members(lambda m: member_added(m, member), joining=member)

    def remove_member(self, member: str) -> Membership:
        """``member`` leaves; when this returns, no request of this engine is running on it or
        will be sent to it, so its replica may be deleted.  Raises TransitionError if it is
        not a member, is the last in-sync one, or its leaving would go below
        ``min_insync`` (``check_min_insync``)."""
        return self._change_members(lambda m: member_removed(m, member), leaving=member)

    def replace_member(self, old: str, new: str) -> Membership:
        """``new`` takes ``old``'s place in one commit: ``old`` leaves as in
        ``remove_member``, ``new`` joins as in ``add_member``."""
        return self._change_members(
            lambda m: member_replaced(m, old, new), joining=new, leaving=old
        )

    def _change_members(
        self, change: Change, *, joining: str | None = None, leaving: str | None = None
    ) -> Membership:
        """Commit ``change``, a transition of the members (docs/decisions/0120).

        Joining: the member's missed plane marks the whole volume durably *before* the commit.
        A write that took the membership before the commit neither reaches the member nor
        marks its plane, and needs not: the plane has every region already, and bits are
        cleared only by its resync, which starts after such writes have ended
        (``_drain_writes``).  A write that takes it after goes through ``_mutate``'s marking
        of out members' planes like any other miss.

        Leaving: committed first, so no write registered after the commit sends to it (the
        membership and the writes' table change under ``_cond`` together); then the writes
        that hold the old membership are drained (a failure of theirs on the leaving member
        is no longer a member failure: ``_fail_member`` ignores it), a resync of it is waited
        for, its connection closed and its remaining requests (flushes, reads) waited for,
        each bounded by ``child_timeout``, and its plane dropped."""
        with self._changes:
            self._check_usable()
            current = self._membership
            proposed = change(current)  # TransitionError says what is wrong, in one line
            if leaving is not None:
                # With the default (a majority) the floor is what writes need before the change.
                check_min_insync(
                    current, proposed, leaving, self._policy.required(len(current.members))
                )
            if joining is not None:
                plane = missed(joining)
                if plane not in self._regions.planes:
                    self._regions.add_plane(plane)
                self._regions.mark([plane], 0, self._size)
                with self._cond:
                    self._children[joining] = _Child()
            try:
                committed = self._commit(change)
            except BaseException:
                if joining is not None:
                    with contextlib.suppress(StorageError, ValueError):
                        self._regions.remove_plane(missed(joining))
                raise
        if leaving is not None:
            self._let_go(leaving)
        log.info(
            "volume %s: members changed (%s%s%s): %s",
            self._volume_id,
            f"{leaving} left" if leaving else "",
            ", " if leaving and joining else "",
            f"{joining} joined" if joining else "",
            ", ".join(committed.members),
        )
        return committed

    def _let_go(self, member: str) -> None:
        """A member committed out of the membership: end everything of ours on it."""
        self._drain_writes()
        deadline = time.monotonic() + 2 * self._policy.child_timeout + 1.0
        with self._cond:
            child = self._children[member]
            while child.resync_running and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            storage, child.storage = child.storage, None
        if storage is not None:
            # On the side, bounded: closing a hung member's connection may itself hang.
            closer = threading.Thread(target=_close_quietly, args=(storage,), daemon=True)
            closer.start()
            closer.join(self._policy.child_timeout)
        try:
            self._wait_idle(member)
        except StorageError as err:
            log.warning("volume %s: removed member %s: %s", self._volume_id, member, err)
        with self._changes:
            if member not in self._membership.members and missed(member) in self._regions.planes:
                self._regions.remove_plane(missed(member))

    def _state_of(self, member: str) -> str:
        """``in_sync``, ``resyncing``, ``out``, or ``removed`` (no longer a member)."""
        m = self._membership
        return m.state(member) if member in m.members else "removed"

    # -- resync ----------------------------------------------------------------------------

    def resync(
        self, member: str, progress: Callable[[int, int], None] | None = None
    ) -> ResyncProgress:
        """Bring an out member back: reopen it, make it receive new writes, copy the regions
        it missed, then make it in sync.  Returns the counters; raises StorageError if the
        member or the engine fails meanwhile (the member is out again, its plane keeps
        what is left to copy)."""
        with self._changes:  # a removal commits under it too: it sees the flag, or we it
            self._check_usable()
            if (state := self._state_of(member)) != "out":
                raise TransitionError(f"{member!r} is {state}, not out")
            with self._cond:
                self._children[member].resync_running = True
        try:
            return self._resync(member, progress)
        finally:
            with self._cond:
                self._children[member].resync_running = False
                self._children[member].resync = None
                self._cond.notify_all()

    def _resync(self, member: str, progress: Callable[[int, int], None] | None) -> ResyncProgress:
        # A request of the member's old connection that timed out may still be running, and
        # would land after the copy of its region (a zombie write): wait until none is left,
        # then reconnect under a new epoch, so that the replica drains and refuses whatever
        # its server still holds of the old connection before the copy starts.
        self._wait_idle(member)
        self._commit(epoch_taken)
        storage = self._open_child(member, self._membership.epoch)
        plane = missed(member)
        with self._changes:
            lacks = _lacks(storage.capabilities, self._caps)
            if storage.size < self._size:  # a replica made before the volume grew
                lacks.append(f"its replica is {storage.size} bytes, the volume {self._size}")
            if lacks or self._state_of(member) != "out":  # removed while it reconnected
                _close_quietly(storage)
                why = f"cannot serve this volume: {', '.join(lacks)}" if lacks else "removed"
                raise StorageError(errno.EIO, f"resync of {member}: {why}")
            with self._cond:
                self._children[member].storage = storage
            self._commit(lambda m: resync_started(m, member))
        self._drain_writes()
        start = time.monotonic()
        total = self._regions.marked_bytes(plane)
        done = copied = regions = 0
        g = self._regions.granularity
        try:
            while runs := list(self._regions.regions(plane)):
                for offset, length in self._pieces(runs):
                    self._bucket.take(length)
                    copied += self._resync_piece(member, offset, length)
                    done += length
                    regions += -(-length // g)
                    total = max(total, done + self._regions.marked_bytes(plane))
                    elapsed = time.monotonic() - start
                    counters = ResyncProgress(
                        done, total, copied, regions, elapsed, done / elapsed if elapsed else 0.0
                    )
                    with self._cond:
                        self._children[member].resync = counters
                    if progress is not None:
                        progress(done, total)
            with self._changes:
                if self._regions.marked_bytes(plane):
                    raise StorageError(errno.EIO, f"{member} failed again during its resync")
                self._commit(lambda m: resync_done(m, member))
                self._regions.remove_plane(plane)
        except (StorageError, TransitionError) as err:
            if self._state_of(member) == "resyncing":
                with contextlib.suppress(StorageError):
                    self._fail_member(member, None, f"resync: {err}")
            raise StorageError(errno.EIO, f"resync of {member}: {err}") from err
        elapsed = time.monotonic() - start
        log.info("volume %s: %s resynced, %d bytes copied", self._volume_id, member, copied)
        return ResyncProgress(
            done, total, copied, regions, elapsed, done / elapsed if elapsed else 0.0
        )

    def _resync_piece(self, member: str, offset: int, length: int) -> int:
        """Copy one piece under its range lock and clear it once the member flushed it."""
        with self._ranges.hold(offset, offset + length):
            while True:
                self._check_usable()
                if self._state_of(member) != "resyncing":
                    raise StorageError(errno.EIO, f"{member} failed or left during its resync")
                source = self._least_busy()
                try:
                    with self._regions.checkpoint([missed(member)], offset, length):
                        copied = self._copy(source, member, offset, length, fail_target=False)
                        self._call(member, lambda s: s.flush())
                    return copied
                except CopyError as err:
                    if not err.source:
                        raise err.error from err
                    self._fail_member(source, None, f"resync read: {err.error}")

    def _copy(self, source: str, target: str, offset: int, length: int, fail_target: bool) -> int:
        src, dst = self._children[source].storage, self._children[target].storage
        if src is None:
            raise CopyError(True, StorageError(errno.EIO, f"{source} is not open"))
        if dst is None:
            raise StorageError(errno.EIO, f"{target} is not open")
        try:
            return self._call(target, lambda _: copy_range(src, dst, offset, length))
        except CopyError as err:
            if err.source or not fail_target:
                raise
            self._fail_member(target, (offset, length), f"copy: {err.error}")
        except StorageError as err:  # no answer within child_timeout
            if not fail_target:
                raise
            self._fail_member(target, (offset, length), f"copy: {err}")
        return 0

    def _wait_idle(self, member: str) -> None:
        """Wait until no request to ``member`` is running (timed-out ones included).  Each is
        bounded by the member's own request timeout, or ends when its connection is closed
        (``_fail_member`` closes it); StorageError if one outlives twice ``child_timeout``
        plus a second: the resync is tried again later."""
        deadline = time.monotonic() + 2 * self._policy.child_timeout + 1.0
        child = self._children[member]
        with self._cond:
            while child.in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StorageError(
                        errno.EBUSY, f"{member}: requests of its old connection still running"
                    )
                self._cond.wait(left)

    def _drain_writes(self) -> None:
        """Wait for the writes in flight now (they may hold an older membership)."""
        with self._cond:
            tokens = set(self._writes)
            while tokens & set(self._writes):
                self._cond.wait()

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[Membership]:
        """A point in the write stream: while the block runs, no write, zero or trim is in
        flight or starts (new ones wait), and every one acknowledged before is flushed on
        every member still in sync.  Yields the membership at that point.  For snapshots of
        every replica at once.  Reads go on.  (The range lock is not fair: under a constant
        stream of writes this waits until a gap in it.)"""
        self._check_usable()
        with self._ranges.hold(0, self._size):
            self._fan_out_flush()
            self._check_usable()
            yield self._membership

    # -- scrub -----------------------------------------------------------------------------

    def scrub(
        self,
        *,
        repair: bool = False,
        step: int = SCRUB_STEP,
        progress: Callable[[int, int], None] | None = None,
    ) -> ScrubReport:
        """Compare the in-sync members' bytes over the whole volume (backend/replication/
        scrub.py); with ``repair``, write the majority's bytes over members that differ.

        A ``step`` at a time under the range lock: writes to that step wait (for a few
        reads), reads go on; paced by ``resync_rate`` like a resync.  A member whose read or
        repair fails is failed (out, and resynced by the supervisor).  ``progress(done,
        total)`` after each step.  StorageError(EBUSY) if fewer than two members are in
        sync: there is nothing to compare."""
        self._check_usable()
        started = time.monotonic()
        begun = self._open_in_sync()
        if len(begun) < 2:
            raise StorageError(
                errno.EBUSY,
                f"volume {self._volume_id}: {len(begun)} replica(s) in sync, nothing to compare"
                " (wait for the resync: see nbs volume info)",
            )
        found: list[Mismatch] = []
        failed: list[str] = []
        repaired: set[str] = set()
        offset = compared = 0
        while offset < (size := self._size):
            self._check_usable()
            length = min(step, size - offset)
            with self._ranges.hold(offset, offset + length):
                copies = self._scrub_reads(offset, length, failed)
                if len(copies) >= 2:
                    compared += length
                    if len(set(copies.values())) > 1:
                        for diff in differences(copies):
                            fixed = repair and self._scrub_repair(offset, diff, failed)
                            if fixed:
                                repaired.update(diff.members)
                            found.append(
                                Mismatch(
                                    offset + diff.offset,
                                    diff.length,
                                    diff.members,
                                    majority=diff.majority is not None,
                                    repaired=fixed,
                                )
                            )
            self._bucket.take(length * len(copies))
            offset += length
            if progress is not None:
                progress(offset, size)
        for member in sorted(repaired - set(failed)):
            try:
                self._call(member, lambda s: s.flush())
            except StorageError as err:
                self._fail_member(member, None, f"scrub repair flush: {err}")
                failed.append(member)
        report = ScrubReport(
            self._volume_id,
            repair,
            self._size,
            compared,
            tuple(begun),
            tuple(found),
            tuple(failed),
            time.monotonic() - started,
            time.time(),
        )
        self._last_scrub = report
        log.log(
            logging.WARNING if found or failed else logging.INFO,
            "volume %s: scrub compared %d bytes on %s: %d mismatch(es), %d repaired, %s failed",
            self._volume_id,
            compared,
            ", ".join(begun),
            len(found),
            len(found) - report.unresolved,
            ", ".join(failed) or "none",
        )
        return report

    def _scrub_reads(self, offset: int, length: int, failed: list[str]) -> dict[str, bytes]:
        """``[offset, offset + length)`` of every open in-sync member, read in parallel; a
        member whose read fails is failed (and noted in ``failed``) and left out."""
        with self._cond:
            m = self._membership
            targets = [
                (x, storage)
                for x in m.members
                if x in m.in_sync and (storage := self._children[x].storage) is not None
            ]
        pending = [
            (member, self._submit(member, storage, lambda s: s.read(offset, length)))
            for member, storage in targets
        ]
        copies: dict[str, bytes] = {}
        deadline = time.monotonic() + self._policy.child_timeout
        for member, future in pending:
            try:
                copies[member] = bytes(future.result(max(0.0, deadline - time.monotonic())))
            except (StorageError, concurrent.futures.TimeoutError) as err:
                reason = str(err) or f"no answer within {self._policy.child_timeout} s"
                self._fail_member(member, None, f"scrub read: {reason}")
                failed.append(member)
            except concurrent.futures.CancelledError:  # by close()
                raise StorageError(errno.EBADF, f"volume {self._volume_id} is closed") from None
        return copies

    def _scrub_repair(self, base: int, diff: Difference, failed: list[str]) -> bool:
        """Write ``diff``'s majority bytes over the members that differ (the range lock is
        held); True if every one took them.  One that fails is failed, with the range in its
        missed plane, so its resync copies the right bytes."""
        if diff.majority is None:
            return False
        data = diff.majority
        where = base + diff.offset
        fixed = True
        for member in diff.members:
            if member in failed:
                fixed = False
                continue
            try:
                self._call(member, lambda s: s.write(where, data))
                self._repairs += 1
            except StorageError as err:
                self._fail_member(member, (where, diff.length), f"scrub repair: {err}")
                failed.append(member)
                fixed = False
        return fixed

    # -- status ----------------------------------------------------------------------------

    def status(self) -> EngineStatus:
        planes = set(self._regions.planes)
        with self._cond:
            m = self._membership
            members = tuple(
                MemberStatus(
                    member=x,
                    state=m.state(x),
                    open=c.storage is not None,
                    in_flight=c.in_flight,
                    errors=c.errors,
                    last_error=c.last_error,
                    missed_bytes=self._missed_bytes(x, planes),
                    resync=c.resync,
                )
                for x, c in ((x, self._children[x]) for x in m.members)
            )
            return EngineStatus(
                volume_id=self._volume_id,
                epoch=m.epoch,
                generation=m.generation,
                fenced=self._fenced,
                members=members,
                in_doubt_bytes=self._regions.marked_bytes(IN_DOUBT),
                reconciled_bytes=self._reconciled,
                writes=self._written,
                reads=self._reads,
                read_repairs=self._repairs,
                members_failed=self._failed,
                last_scrub=self._last_scrub,
            )

    def _missed_bytes(self, member: str, planes: set[str]) -> int | None:
        try:
            return self._regions.marked_bytes(missed(member)) if missed(member) in planes else None
        except ValueError:  # removed meanwhile (its resync just ended)
            return None


def _close_quietly(storage: Storage) -> None:
    with contextlib.suppress(Exception):
        storage.close()


def _run_out(steps: Generator[None, None, T]) -> T:
    """Run ``steps`` to its end (a yield only says a member is late) and return its value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
