"""The knobs of a replicated volume's engine (docs/replication.md, "Engine")."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicationPolicy:
    """How the engine behaves when members fail.

    ``min_insync``: writes need at least this many in-sync members; with ``majority`` the
    number follows the membership instead: a majority of the members at that moment (the
    replicated kind's default), so adding or removing replicas moves it.  Below it,
    ``below_min="wait"`` waits up to ``below_min_wait`` seconds for a member to come back
    (resync) and then fails with EIO; ``"fail"`` fails with EIO at once.  Reads go on.
    ``child_timeout``: seconds a member has to answer one request before it is failed.
    ``resync_rate``: bytes per second a resync copies at most (0: unlimited).
    """

    min_insync: int = 1
    majority: bool = False
    below_min: Literal["wait", "fail"] = "wait"
    below_min_wait: float = 30.0
    child_timeout: float = 30.0
    resync_rate: int = 0

    def __post_init__(self) -> None:
        if self.min_insync < 1:
            raise ValueError(f"min_insync {self.min_insync}: at least 1")
        if self.below_min not in ("wait", "fail"):
            raise ValueError(f"below_min {self.below_min!r}: 'wait' or 'fail'")
        if self.below_min_wait < 0 or self.child_timeout <= 0 or self.resync_rate < 0:
            raise ValueError(
                "below_min_wait and resync_rate are not negative, child_timeout is positive"
            )

    def required(self, members: int) -> int:
        """The in-sync members a write needs when the volume has ``members`` members."""
        return majority(members) if self.majority else self.min_insync


def majority(members: int) -> int:
    """More than half of ``members``."""
    return members // 2 + 1
