"""The engine catalogue as a ``MembershipStore``: membership records in SQLite.

Compare-and-swap is one immediate (write-locked) transaction: read the stored generation,
compare, check the successor, write.  Two engines, or two threads, racing on one catalogue
file are serialised by SQLite's write lock, so exactly one of them wins; the loser sees
ConflictError.  The commit is durable when ``commit`` returns (WAL with synchronous=FULL),
which is what "failure committed before the write is acknowledged" needs.
"""

from __future__ import annotations

from backend.replication.membership import (
    ConflictError,
    Membership,
    UnknownVolumeError,
    check_successor,
)
from backend.volumes.catalogue import Catalogue

__all__ = ["CatalogueMembershipStore"]


class CatalogueMembershipStore:
    """A ``MembershipStore`` over a catalogue the caller opened (and closes)."""

    def __init__(self, catalogue: Catalogue) -> None:
        self._catalogue = catalogue

    def load(self, volume_id: str) -> Membership:
        found = self._catalogue.membership(volume_id)
        if found is None:
            raise UnknownVolumeError(f"no membership for volume {volume_id}")
        return found

    def commit(self, new: Membership, expected_generation: int | None) -> None:
        # An exception inside the transaction rolls it back: a lost swap writes nothing.
        with self._catalogue.transaction() as changes:
            old = changes.membership(new.volume_id)
            current = None if old is None else old.generation
            if current != expected_generation:
                raise ConflictError(new.volume_id, expected_generation, current)
            check_successor(old, new, expected_generation)
            changes.put_membership(new)

    def remove(self, volume_id: str) -> None:
        """Forget a deleted volume's record (not part of the Protocol: deletion is the
        catalogue owner's business, not the engine's)."""
        with self._catalogue.transaction() as changes:
            changes.remove_membership(volume_id)
