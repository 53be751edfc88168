"""Who holds a replicated volume, and which of them are current: the membership record.

``Membership`` {volume_id, epoch, generation, members, in_sync, resyncing} is committed to a
``MembershipStore`` with compare-and-swap on the generation; the engine commits a member's
failure *before* it acknowledges the write that member missed (docs/replication.md).

* ``epoch`` grows by one with every attachment (``take_epoch``); replicas refuse requests of
  an older epoch, which fences an engine that lost the volume.
* ``generation`` grows by one with every committed change, epochs included.
* A member is in sync (has every acknowledged write), resyncing (receives new writes while
  the rest is copied to it), or out (failed, stale or new: neither).

Transitions are pure functions from one membership to the next; each checks that it applies
and returns a record whose invariants hold (``Membership.__post_init__``).  One invariant is a
safety rule rather than bookkeeping: at least one member stays in sync, because the last
in-sync member holds the only copy of the acknowledged writes (Longhorn's salvage once threw
the good replicas away, longhorn#7425).  A write that would need the last in-sync member
removed fails instead.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable
from typing import Protocol

Change = Callable[["Membership"], "Membership"]


class MembershipError(Exception):
    """Base of this module's errors."""


class InvalidMembershipError(MembershipError, ValueError):
    """A membership record that breaks an invariant."""


class TransitionError(MembershipError):
    """A transition that does not apply to the current membership."""


class UnknownVolumeError(MembershipError, KeyError):
    """No membership is stored for this volume."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConflictError(MembershipError):
    """A compare-and-swap lost: the stored generation is not the expected one."""

    def __init__(self, volume_id: str, expected: int | None, current: int | None) -> None:
        super().__init__(
            f"membership of {volume_id} changed: expected generation {expected}, found {current}"
        )
        self.volume_id = volume_id
        self.expected = expected
        self.current = current


class FencedError(MembershipError):
    """A newer epoch was taken: this engine no longer owns the volume."""


@dataclasses.dataclass(frozen=True, slots=True)
class Membership:
    volume_id: str
    epoch: int
    generation: int
    members: tuple[str, ...]  # ordered: the order replicas were configured in
    in_sync: frozenset[str]
    resyncing: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        problems = []
        if not self.volume_id:
            problems.append("the volume id is empty")
        if self.epoch < 0 or self.generation < 0:
            problems.append("epoch and generation are not negative")
        if not self.members:
            problems.append("there is at least one member")
        if any(not m for m in self.members) or len(set(self.members)) != len(self.members):
            problems.append(f"member ids are non-empty and distinct: {self.members}")
        if not self.in_sync <= set(self.members):
            problems.append(f"in-sync members {sorted(self.in_sync)} are members")
        if not self.resyncing <= set(self.members):
            problems.append(f"resyncing members {sorted(self.resyncing)} are members")
        if self.in_sync & self.resyncing:
            problems.append(f"no member is both in sync and resyncing: {self.in_sync}")
        if self.members and not self.in_sync:
            problems.append("at least one member is in sync (it holds the only current copy)")
        if problems:
            raise InvalidMembershipError(
                f"membership of {self.volume_id!r}: " + "; ".join(problems)
            )

    @classmethod
    def new(cls, volume_id: str, members: Iterable[str]) -> Membership:
        """A new volume's membership: every member in sync (new replicas are all zeroes),
        epoch 0 (no attachment yet), generation 1."""
        ordered = tuple(members)
        return cls(volume_id, 0, 1, ordered, frozenset(ordered))

    @property
    def out(self) -> frozenset[str]:
        """Members neither in sync nor resyncing (failed, stale, or new)."""
        return frozenset(self.members) - self.in_sync - self.resyncing

    def state(self, member: str) -> str:
        """``in_sync``, ``resyncing`` or ``out``."""
        if member not in self.members:
            raise TransitionError(f"{member!r} is not a member of {self.volume_id}")
        if member in self.in_sync:
            return "in_sync"
        return "resyncing" if member in self.resyncing else "out"

    def _next(self, **changes: object) -> Membership:
        return dataclasses.replace(self, generation=self.generation + 1, **changes)  # type: ignore[arg-type]


def member_failed(m: Membership, member: str) -> Membership:
    """An in-sync or resyncing member errored or timed out: it is out."""
    if m.state(member) == "out":
        raise TransitionError(f"{member!r} of {m.volume_id} is already out")
    if m.in_sync == {member}:
        raise TransitionError(
            f"{member!r} is the last in-sync member of {m.volume_id}: it cannot be failed"
        )
    return m._next(in_sync=m.in_sync - {member}, resyncing=m.resyncing - {member})


def resync_started(m: Membership, member: str) -> Membership:
    """An out member starts receiving new writes while the regions it missed are copied."""
    if m.state(member) != "out":
        raise TransitionError(f"{member!r} of {m.volume_id} is {m.state(member)}, not out")
    return m._next(resyncing=m.resyncing | {member})


def resync_done(m: Membership, member: str) -> Membership:
    """A resyncing member has every region: it is in sync."""
    if m.state(member) != "resyncing":
        raise TransitionError(f"{member!r} of {m.volume_id} is {m.state(member)}, not resyncing")
    return m._next(in_sync=m.in_sync | {member}, resyncing=m.resyncing - {member})


def member_added(m: Membership, member: str) -> Membership:
    """A new member, out until a resync brings it in."""
    if member in m.members:
        raise TransitionError(f"{member!r} is already a member of {m.volume_id}")
    return m._next(members=(*m.members, member))


def member_removed(m: Membership, member: str) -> Membership:
    """A member leaves the volume (its replica is to be deleted)."""
    if m.state(member) == "in_sync" and m.in_sync == {member}:
        raise TransitionError(
            f"{member!r} is the last in-sync member of {m.volume_id}: it cannot be removed"
        )
    return m._next(
        members=tuple(x for x in m.members if x != member),
        in_sync=m.in_sync - {member},
        resyncing=m.resyncing - {member},
    )


def member_replaced(m: Membership, old: str, new: str) -> Membership:
    """``new`` takes ``old``'s place in the order, out until a resync brings it in."""
    if new in m.members:
        raise TransitionError(f"{new!r} is already a member of {m.volume_id}")
    removed = member_removed(m, old)
    return dataclasses.replace(removed, members=tuple(new if x == old else x for x in m.members))


def check_min_insync(old: Membership, new: Membership, leaving: str, min_insync: int) -> None:
    """Refuse (TransitionError) a change of members that makes ``leaving`` leave ``old`` and
    leaves fewer than ``min_insync`` members, or, if ``leaving`` was in sync, fewer than
    ``min_insync`` in sync: an operator's change must not take the volume below the
    redundancy writes need (a member that fails may; that is what the policy is for)."""
    if len(new.members) < min_insync:
        raise TransitionError(
            f"{len(new.members)} replica(s) would be left, fewer than min_insync={min_insync}"
        )
    if leaving in old.in_sync and len(new.in_sync) < min_insync:
        raise TransitionError(
            f"{leaving!r} is one of {len(old.in_sync)} in-sync replica(s) and min_insync is"
            f" {min_insync}: wait until the others are in sync (nbs volume info)"
        )


def epoch_taken(m: Membership) -> Membership:
    """The next attachment's epoch."""
    return m._next(epoch=m.epoch + 1)


class MembershipStore(Protocol):
    """Where memberships live: one record per volume, changed only by compare-and-swap.

    Implementations: ``InMemoryMembershipStore`` (tests, the in-process chaos mode); the
    engine's catalogue on one hypervisor and etcd for a fleet are to come.
    """

    def load(self, volume_id: str) -> Membership:
        """The committed membership; raises UnknownVolumeError if there is none."""

    def commit(self, new: Membership, expected_generation: int | None) -> None:
        """Store ``new`` if the stored generation is ``expected_generation`` (``None``: no
        record yet), atomically; raise ConflictError otherwise.

        ``new.generation`` must be ``expected_generation + 1`` (1 for a new record) and its
        epoch must not be lower than the stored one: raises InvalidMembershipError if not.
        """


def check_successor(old: Membership | None, new: Membership, expected: int | None) -> None:
    """The checks every store makes after the compare part of compare-and-swap passed."""
    want = 1 if expected is None else expected + 1
    if new.generation != want:
        raise InvalidMembershipError(
            f"membership of {new.volume_id}: generation {new.generation} follows "
            f"{expected}, expected {want}"
        )
    if old is not None and new.epoch < old.epoch:
        raise InvalidMembershipError(
            f"membership of {new.volume_id}: epoch {new.epoch} is older than {old.epoch}"
        )


class InMemoryMembershipStore:
    """A ``MembershipStore`` in a dict, for tests and the in-process chaos mode."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, Membership] = {}

    def load(self, volume_id: str) -> Membership:
        with self._lock:
            try:
                return self._records[volume_id]
            except KeyError:
                raise UnknownVolumeError(f"no membership for volume {volume_id}") from None

    def commit(self, new: Membership, expected_generation: int | None) -> None:
        with self._lock:
            old = self._records.get(new.volume_id)
            current = None if old is None else old.generation
            if current != expected_generation:
                raise ConflictError(new.volume_id, expected_generation, current)
            check_successor(old, new, expected_generation)
            self._records[new.volume_id] = new


def take_epoch(store: MembershipStore, volume_id: str) -> Membership:
    """Commit the next epoch for a new attachment and return it.

    Not retried on a conflict: another engine changed the volume meanwhile (perhaps took an
    epoch itself), and which of two attaching engines should win is the caller's decision.
    """
    current = store.load(volume_id)
    new = epoch_taken(current)
    store.commit(new, current.generation)
    return new


def commit_change(
    store: MembershipStore, mine: Membership, change: Change, attempts: int = 8
) -> Membership:
    """Apply ``change`` to the stored membership of the epoch ``mine`` holds, and commit it.

    On a lost compare-and-swap the record is loaded again and the change applied to it again
    (a transition is a pure function, so that is safe); a record of a newer epoch means this
    engine was fenced, and raises FencedError.  A transition that no longer applies raises
    its TransitionError.
    """
    current = mine
    for _ in range(attempts):
        current = store.load(mine.volume_id)
        if current.epoch != mine.epoch:
            raise FencedError(
                f"volume {mine.volume_id} is at epoch {current.epoch}; this engine holds "
                f"epoch {mine.epoch}"
            )
        new = change(current)
        try:
            store.commit(new, current.generation)
        except ConflictError:
            continue
        return new
    raise ConflictError(mine.volume_id, current.generation, store.load(mine.volume_id).generation)
