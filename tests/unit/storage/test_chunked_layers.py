"""Layered chunked volumes (snapshots, clones, resize, flatten in an object store): the
conformance suite over a two-layer chain, then a hypothesis state machine that checks every
snapshot and the live top against a bytearray model after random writes, zeroes, trims,
resizes, snapshots and flattens, on a store without offset writes and one with them."""

from __future__ import annotations

import errno
import uuid

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from backend.storage import StorageError
from backend.storage.chunked import (
    ChunkedStorage,
    create_layer,
    layer_keys,
    open_chain,
    read_layer,
    remove_layer,
)
from backend.storage.objects import ObjectStore
from tests.unit.storage.conformance import *  # noqa: F403
from tests.unit.storage.conformance import StorageFactory, pattern
from tests.unit.storage.stores import MemoryObjectStore

KIB = 1024
CHUNK = 64 * KIB


class NoOffsetStore(MemoryObjectStore):
    supports_offset_writes = False


def _two_layer(size: int) -> ChunkedStorage:
    """A fresh top over a frozen layer holding only zeroes, so that the suite's expectations
    (zero-filled) hold while every read and write goes through the layered paths."""
    store = MemoryObjectStore()
    create_layer(store, "base/", size, CHUNK)
    base = open_chain(store, ["base/"])
    base.write(0, bytes(CHUNK))  # a chunk below (zeroes) to copy up from
    base.snapshot("top/")
    base.close()
    return open_chain(store, ["base/", "top/"], workers=4, owns_store=True)


@pytest.fixture
def storage_factory() -> StorageFactory:
    return _two_layer


def test_snapshot_keeps_old_data_and_clone_diverges() -> None:
    store = MemoryObjectStore()
    create_layer(store, "a/", 4 * CHUNK, CHUNK)
    vol = open_chain(store, ["a/"])
    vol.write(0, pattern(1, 3 * CHUNK))
    frozen = vol.snapshot("b/")
    assert frozen == "a/"
    vol.write(100, b"new")
    vol.trim(CHUNK, CHUNK)
    view = open_chain(store, ["a/"], read_only=True)
    assert view.read(0, 3 * CHUNK) == pattern(1, 3 * CHUNK)
    live = vol.read(0, 3 * CHUNK)
    assert live[100:103] == b"new"
    assert live[CHUNK : 2 * CHUNK] == bytes(CHUNK)
    # A clone of the snapshot: a new top over "a/".
    create_layer(store, "c/", 4 * CHUNK, CHUNK)
    clone = open_chain(store, ["a/", "c/"])
    assert clone.read(0, 3 * CHUNK) == pattern(1, 3 * CHUNK)
    clone.write(5, b"clone")
    assert view.read(5, 5) == pattern(1, 3 * CHUNK)[5:10]
    assert vol.read(5, 5) == pattern(1, 3 * CHUNK)[5:10]
    for storage in (vol, view, clone):
        storage.close()


def test_extents_see_lower_layers_and_whiteouts_hide_them() -> None:
    store = MemoryObjectStore()
    create_layer(store, "a/", 4 * CHUNK, CHUNK)
    vol = open_chain(store, ["a/"])
    vol.write(CHUNK, pattern(2, CHUNK))
    vol.snapshot("b/")
    extents = vol.extents(0, 4 * CHUNK)
    assert [(e.offset, e.length, e.hole) for e in extents] == [
        (0, CHUNK, True),
        (CHUNK, CHUNK, False),
        (2 * CHUNK, 2 * CHUNK, True),
    ]
    vol.trim(CHUNK, CHUNK)
    assert vol.read(CHUNK, CHUNK) == bytes(CHUNK)
    assert store.get("b/0000000000000001") == b""  # the whiteout
    vol.close()


def test_shrink_then_grow_reads_zeroes_not_old_data() -> None:
    store = MemoryObjectStore()
    create_layer(store, "a/", 4 * CHUNK, CHUNK)
    vol = open_chain(store, ["a/"])
    vol.write(0, pattern(3, 4 * CHUNK))
    vol.snapshot("b/")
    vol.resize(CHUNK + 10, allow_shrink=True)
    vol.resize(4 * CHUNK)
    assert vol.read(0, CHUNK + 10) == pattern(3, 4 * CHUNK)[: CHUNK + 10]
    assert vol.read(CHUNK + 10, 3 * CHUNK - 10) == bytes(3 * CHUNK - 10)
    vol.close()
    reopened = open_chain(store, ["a/", "b/"], read_only=True)
    assert reopened.size == 4 * CHUNK
    assert reopened.read(CHUNK + 10, 3 * CHUNK - 10) == bytes(3 * CHUNK - 10)
    assert read_layer(store, "b/") == (4 * CHUNK, CHUNK, CHUNK + 10)
    reopened.close()


def test_a_shrunk_frozen_layer_cuts_the_layers_under_it() -> None:
    store = MemoryObjectStore()
    create_layer(store, "a/", 4 * CHUNK, CHUNK)
    vol = open_chain(store, ["a/"])
    vol.write(0, pattern(5, 4 * CHUNK))
    vol.snapshot("b/")
    vol.resize(CHUNK, allow_shrink=True)
    vol.resize(4 * CHUNK)
    vol.snapshot("c/")  # c's floor is 4 chunks, b's is 1: a is cut at 1 chunk
    assert vol.read(0, 4 * CHUNK) == pattern(5, 4 * CHUNK)[:CHUNK] + bytes(3 * CHUNK)
    vol.close()
    again = open_chain(store, ["a/", "b/", "c/"], read_only=True)
    assert again.read(CHUNK, 3 * CHUNK) == bytes(3 * CHUNK)
    again.close()


def test_refuses_shrink_without_permission_and_snapshot_when_read_only() -> None:
    store = MemoryObjectStore()
    create_layer(store, "a/", 4 * CHUNK, CHUNK)
    vol = open_chain(store, ["a/"])
    with pytest.raises(StorageError) as info:
        vol.resize(CHUNK)
    assert info.value.errno == errno.EINVAL
    view = open_chain(store, ["a/"], read_only=True)
    with pytest.raises(StorageError) as info:
        view.snapshot("x/")
    assert info.value.errno == errno.EPERM
    vol.close()
    view.close()


def test_failed_commit_undoes_the_snapshot() -> None:
    store = MemoryObjectStore()
    create_layer(store, "a/", CHUNK, CHUNK)
    vol = open_chain(store, ["a/"])

    def commit() -> None:
        raise RuntimeError("catalogue down")

    with pytest.raises(RuntimeError):
        vol.snapshot("b/", commit=commit)
    assert layer_keys(store, "b/") == []
    vol.write(0, b"still a/")
    assert store.get("a/0000000000000000") is not None
    vol.close()


def test_flatten_copies_up_and_cuts_the_chain() -> None:
    store = MemoryObjectStore()
    create_layer(store, "a/", 3 * CHUNK, CHUNK)
    vol = open_chain(store, ["a/"])
    vol.write(0, pattern(4, 3 * CHUNK))
    vol.snapshot("b/")
    vol.write(CHUNK, b"top")
    seen: list[tuple[int, int]] = []
    vol.flatten(lambda done, total: seen.append((done, total)))
    assert vol.lower == []
    assert seen[-1] == (3 * CHUNK, 3 * CHUNK)
    remove_layer(store, "a/")
    assert layer_keys(store, "a/") == []
    expected = bytearray(pattern(4, 3 * CHUNK))
    expected[CHUNK : CHUNK + 3] = b"top"
    assert vol.read(0, 3 * CHUNK) == expected
    vol.close()
    alone = open_chain(store, ["b/"], read_only=True)
    assert alone.read(0, 3 * CHUNK) == expected
    alone.close()


def test_chunk_size_mismatch_in_a_chain_is_refused() -> None:
    store = MemoryObjectStore()
    create_layer(store, "a/", CHUNK, CHUNK)
    create_layer(store, "b/", CHUNK, 2 * CHUNK)
    with pytest.raises(StorageError) as info:
        open_chain(store, ["a/", "b/"])
    assert info.value.errno == errno.EINVAL


def test_missing_meta_is_enoent() -> None:
    with pytest.raises(StorageError) as info:
        open_chain(MemoryObjectStore(), ["nothing/"])
    assert info.value.errno == errno.ENOENT


SIZE = 5 * CHUNK + 1000


class LayeredChunks(RuleBasedStateMachine):
    """Random requests, snapshots, resizes and flattens against bytearray models."""

    store: ObjectStore

    def __init__(self) -> None:
        super().__init__()
        self.store = self.make_store()
        create_layer(self.store, "l0/", SIZE, CHUNK)
        self.volume = open_chain(self.store, ["l0/"], workers=3)
        self.model = bytearray(SIZE)
        self.chain = ["l0/"]
        self.snapshots: list[tuple[list[str], bytes]] = []

    def make_store(self) -> ObjectStore:
        return MemoryObjectStore()

    def _span(self, data: st.DataObject) -> tuple[int, int]:
        # Chunk boundaries and whole chunks often, so that copy-ups, whiteouts and floors are hit.
        size = len(self.model)
        boundaries = [i * CHUNK for i in range(size // CHUNK + 1)]
        offset = data.draw(st.one_of(st.sampled_from(boundaries), st.integers(0, size)))
        most = min(size - offset, 3 * CHUNK)
        wholes = [n * CHUNK for n in (1, 2, 3) if n * CHUNK <= most] or [most]
        length = data.draw(st.one_of(st.sampled_from(wholes), st.integers(0, most)))
        return offset, length

    @rule(data=st.data(), seed=st.integers(0, 1000))
    def write(self, data: st.DataObject, seed: int) -> None:
        offset, length = self._span(data)
        payload = pattern(seed, length)
        self.volume.write(offset, payload)
        self.model[offset : offset + length] = payload

    @rule(data=st.data(), how=st.sampled_from(["trim", "zero", "zero-keep"]))
    def zero(self, data: st.DataObject, how: str) -> None:
        offset, length = self._span(data)
        if how == "trim":
            self.volume.trim(offset, length)
        else:
            self.volume.write_zeroes(offset, length, may_trim=how == "zero")
        self.model[offset : offset + length] = bytes(length)

    @precondition(lambda self: len(self.snapshots) < 4)
    @rule()
    def snapshot(self) -> None:
        new = f"l{uuid.uuid4().hex[:8]}/"
        frozen = self.volume.snapshot(new)
        self.snapshots.append(([*self.chain], bytes(self.model)))
        assert frozen == self.chain[-1]
        self.chain.append(new)

    @rule(size=st.integers(0, 6 * CHUNK))
    def resize(self, size: int) -> None:
        self.volume.resize(size, allow_shrink=True)
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))

    @rule()
    def flatten(self) -> None:
        self.volume.flatten()
        self.chain = [self.chain[-1]]

    @rule()
    def reopen(self) -> None:
        self.volume.close()
        self.volume = open_chain(self.store, self.chain, workers=3)

    @invariant()
    def reads_match(self) -> None:
        assert self.volume.size == len(self.model)
        assert self.volume.read(0, len(self.model)) == self.model
        for extent in self.volume.extents(0, len(self.model)) if self.model else []:
            if extent.zero:
                end = extent.offset + extent.length
                assert self.model[extent.offset : end] == bytes(extent.length)

    @invariant()
    def snapshots_never_change(self) -> None:
        for chain, content in self.snapshots:
            view = open_chain(self.store, chain, read_only=True)
            try:
                assert view.read(0, len(content)) == content
            finally:
                view.close()

    def teardown(self) -> None:
        self.volume.close()


class LayeredChunksNoOffset(LayeredChunks):
    def make_store(self) -> ObjectStore:
        return NoOffsetStore()


TestLayeredChunks = LayeredChunks.TestCase
TestLayeredChunks.settings = settings(
    max_examples=60, stateful_step_count=20, deadline=None, database=None
)
TestLayeredChunksNoOffset = LayeredChunksNoOffset.TestCase
TestLayeredChunksNoOffset.settings = settings(
    max_examples=60, stateful_step_count=20, deadline=None, database=None
)
