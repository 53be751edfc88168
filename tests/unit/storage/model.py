"""Model-based test: a storage against a bytearray, over random sequences of requests.

Plug a storage in from its test module::

    from tests.unit.storage.model import make_model_test

    TestMyStorageModel = make_model_test(lambda size: MyStorage(..., size))

The factory returns a fresh, writable, zero-filled storage of exactly ``size`` bytes and may
be called many times (once per generated example); the model closes each storage it gets, so
anything the storage owns on disk must be released by ``close`` or be disposable (an unlinked
temporary file, for instance).
"""

from __future__ import annotations

import errno
import random
import unittest
from collections.abc import Callable

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from backend.storage.base import Storage, StorageError
from tests.unit.storage.conformance import assert_extents_consistent, collect_extents

# Three 64 KiB pages and a partial one: small enough to compare whole, large enough to cross
# page, block and chunk boundaries in one request.
MODEL_SIZE = 3 * 65536 + 5003
MAX_REQUEST = 100_000


def spans(size: int) -> st.SearchStrategy[tuple[int, int]]:
    """``(offset, length)`` within ``size``, biased to start and end near block boundaries."""
    boundaries = sorted(
        {b for step in (512, 4096, 65536) for b in range(0, size + 1, step)} | {size}
    )
    near_boundary = st.builds(
        lambda base, delta: min(max(base + delta, 0), size - 1),
        st.sampled_from(boundaries),
        st.integers(-3, 3),
    )
    offsets = st.one_of(near_boundary, st.integers(0, size - 1))

    @st.composite
    def ranges(draw: st.DrawFn) -> tuple[int, int]:
        offset = draw(offsets)
        room = min(size - offset, MAX_REQUEST)
        end = draw(
            st.one_of(
                st.integers(offset + 1, offset + room),
                st.builds(
                    lambda b: min(max(b, offset + 1), offset + room),
                    st.sampled_from(boundaries),
                ),
            )
        )
        return offset, end - offset

    return ranges()


def make_model_test(
    factory: Callable[[int], Storage],
    size: int = MODEL_SIZE,
    max_examples: int = 60,
    step_count: int = 30,
) -> type[unittest.TestCase]:
    """A TestCase class running the storage from ``factory`` against the model."""
    ranges = spans(size)

    class StorageModel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.storage = factory(size)
            assert self.storage.size == size
            self.model = bytearray(size)

        def teardown(self) -> None:
            try:
                assert self.storage.read(0, size) == self.model
            finally:
                self.storage.close()

        @rule(span=ranges, seed=st.integers(0, 2**32), fua=st.booleans())
        def write(self, span: tuple[int, int], seed: int, fua: bool) -> None:
            offset, length = span
            data = random.Random(seed).randbytes(length)
            self.storage.write(offset, data, fua=fua)
            self.model[offset : offset + length] = data

        @rule(span=ranges)
        def read(self, span: tuple[int, int]) -> None:
            offset, length = span
            assert self.storage.read(offset, length) == self.model[offset : offset + length]

        @rule(span=ranges, fua=st.booleans(), may_trim=st.booleans(), fast=st.booleans())
        def write_zeroes(
            self, span: tuple[int, int], fua: bool, may_trim: bool, fast: bool
        ) -> None:
            offset, length = span
            try:
                self.storage.write_zeroes(offset, length, fua=fua, may_trim=may_trim, fast=fast)
            except StorageError as err:
                # Only a fast zero may refuse, and only if it was not promised.
                if not fast or err.errno != errno.ENOTSUP:
                    raise
                assert not self.storage.capabilities.can_fast_zero
                return
            self.model[offset : offset + length] = bytes(length)

        @precondition(lambda self: self.storage.capabilities.can_trim)
        @rule(span=ranges, fua=st.booleans())
        def trim(self, span: tuple[int, int], fua: bool) -> None:
            offset, length = span
            self.storage.trim(offset, length, fua=fua)
            self.model[offset : offset + length] = bytes(length)

        @rule()
        def flush(self) -> None:
            self.storage.flush()

        @rule(span=ranges)
        def cache(self, span: tuple[int, int]) -> None:
            self.storage.cache(*span)

        @rule(span=ranges)
        def extents(self, span: tuple[int, int]) -> None:
            offset, length = span
            answer = self.storage.extents(offset, length)
            assert answer
            assert answer[0].offset == offset
            assert sum(extent.length for extent in answer) <= length
            assert_extents_consistent(self.storage, answer)
            for extent in collect_extents(self.storage, offset, length):
                if extent.zero or extent.hole:
                    run = self.model[extent.offset : extent.offset + extent.length]
                    assert run == bytes(extent.length), f"{extent} holds data in the model"

    StorageModel.TestCase.settings = settings(
        max_examples=max_examples,
        stateful_step_count=step_count,
        deadline=None,
        # No example database: replaying examples saved by another state machine's run
        # once tripped an internal Hypothesis error here.
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
        # The explain phase multiplies the time to report a failing sequence (a minute rather
        # than seconds) and adds little to a shrunk list of requests.
        phases=[phase for phase in Phase if phase is not Phase.explain],
    )
    return StorageModel.TestCase
