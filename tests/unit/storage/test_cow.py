"""CowStorage: the conformance suite and the model test over one layer and over a chain whose
lower layers hold data, then what chains add: snapshots (also taken under concurrent writes),
clones, crash safety (reopen without flush, a simulated power cut at every map write, a writer
killed with SIGKILL), resizing, space accounting, flattening, locking and mismatched chains.
The layer format and corrupt maps are tested in test_cow_format.py, the allocation bitmap in
test_cow_bitmap.py."""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from backend.storage import Extent, StorageError
from backend.storage import cow as cow_module
from backend.storage.cow import (
    CowStorage,
    allocated_bytes,
    create_layer,
    flatten_into,
    layer_files,
    layer_size,
)
from backend.storage.cow import engine as cow_engine
from tests.unit.storage.conformance import *  # noqa: F403
from tests.unit.storage.conformance import (
    SIZE,
    StorageFactory,
    assert_extents_consistent,
    collect_extents,
    pattern,
)
from tests.unit.storage.model import MODEL_SIZE, make_model_test, spans

KIB = 1024
MIB = 1024 * KIB
CHUNK = cow_module.DEFAULT_CHUNK_SIZE
REPO = Path(__file__).resolve().parents[3]
# Hypothesis and the crash tests make many layers: tmpfs (where there is one) keeps their
# fsyncs free.  It punches holes and reports them with SEEK_DATA like ext4 or XFS.
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else None


def _layer(stem: Path, size: int, chunk_size: int = CHUNK) -> Path:
    create_layer(stem, size, chunk_size)
    return stem


def _fill(chain: list[Path], *ops: Callable[[CowStorage], object]) -> None:
    """Apply ``ops`` to the chain's top through a CowStorage, flush and close it."""
    with closing(CowStorage(chain)) as storage:
        for op in ops:
            op(storage)
        storage.flush()


def _read_all(chain: list[Path]) -> bytes:
    with closing(CowStorage(chain, read_only=True)) as storage:
        return storage.read(0, storage.size)


def _hashes(stems: list[Path]) -> list[str]:
    return [
        hashlib.sha256(path.read_bytes()).hexdigest()
        for stem in stems
        for path in layer_files(stem)
    ]


# -- Conformance and model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def hidden_lowers(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two frozen layers: the bottom one (smaller than the volume) full of data, the one above
    zeroing all of it in every way there is.  A chain over them reads as zeroes, as the suite
    wants, yet every request crosses copy-up, masking and reads from lower layers."""
    directory = tmp_path_factory.mktemp("lowers")
    bottom_size = SIZE - 300_001
    bottom = _layer(directory / "bottom", bottom_size)
    _fill([bottom], lambda s: s.write(0, pattern(99, bottom_size)))
    middle = _layer(directory / "middle", SIZE)
    _fill(
        [bottom, middle],
        lambda s: s.write_zeroes(0, 500_001, may_trim=True),
        lambda s: s.write_zeroes(500_001, 400_000, may_trim=False),
        lambda s: s.trim(900_001, 100_000),
        lambda s: s.write(1_000_001, bytes(200_000)),
        lambda s: s.write_zeroes(1_200_001, bottom_size - 1_200_001, fast=True),
    )
    return [bottom, middle]


@pytest.fixture(params=["one-layer", "chain"])
def storage_factory(
    request: pytest.FixtureRequest, tmp_path: Path, hidden_lowers: list[Path]
) -> StorageFactory:
    lowers = hidden_lowers if request.param == "chain" else []
    names = itertools.count()
    return lambda size: CowStorage([*lowers, _layer(tmp_path / f"top{next(names)}", size)])


@pytest.fixture
def read_only_storage_factory(tmp_path: Path, hidden_lowers: list[Path]) -> StorageFactory:
    def factory(size: int) -> CowStorage:
        chain = [*hidden_lowers, _layer(tmp_path / "read-only", size)]
        _fill(chain, lambda s: s.write(0, pattern(42, size)))
        return CowStorage(chain, read_only=True)

    return factory


def _unlinked_cow_storage(size: int) -> CowStorage:
    # The model makes many storages; their files are unlinked once open and vanish on close.
    directory = Path(tempfile.mkdtemp(prefix="nbs-cow-", dir=SCRATCH))
    try:
        return CowStorage([_layer(directory / "top", size)])
    finally:
        shutil.rmtree(directory)


TestCowModel = make_model_test(_unlinked_cow_storage)

MODEL_CHUNK = 4096


class ChainModel(RuleBasedStateMachine):
    """A 3-layer chain whose lower layers were filled with random data through CowStorage
    (with zeroing, trimming, a shrink and a grow) and then frozen, against a bytearray that
    knows that content.  Besides the requests of the generic model it takes snapshots (checked
    at the end), grows and shrinks back, reopens after a flush, and reopens after closing
    without one (each chunk then reads as one of its contents since the last flush)."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="nbs-cow-chain-", dir=SCRATCH))
        self.names = itertools.count()
        self.model = bytearray()
        self.storage: CowStorage | None = None
        self.snapshots: list[tuple[list[Path], bytes]] = []
        # Per chunk, every content it had since the last flush: what a crash may leave.
        self.history: list[list[bytes]] = []

    @property
    def live(self) -> CowStorage:
        assert self.storage is not None
        return self.storage

    def _stem(self) -> Path:
        return self.directory / f"layer{next(self.names)}"

    @initialize(seed=st.integers(0, 2**32))
    def build(self, seed: int) -> None:
        rng = random.Random(seed)
        size = MODEL_SIZE - rng.randrange(1, 3 * MODEL_CHUNK)
        storage = CowStorage([_layer(self._stem(), size, MODEL_CHUNK)])
        model = bytearray(size)
        for round_ in range(2):
            for _ in range(rng.randrange(2, 6)):
                offset = rng.randrange(size)
                length = rng.randrange(1, size - offset + 1)
                kind = rng.choice(["write", "write", "zero", "trim"])
                if kind == "write":
                    storage.write(offset, rng.randbytes(length))
                    model[offset : offset + length] = storage.read(offset, length)
                else:
                    if kind == "zero":
                        storage.write_zeroes(offset, length, may_trim=rng.random() < 0.5)
                    else:
                        storage.trim(offset, length)
                    model[offset : offset + length] = bytes(length)
            storage.snapshot(self._stem())
            if round_ == 0 and rng.random() < 0.5:
                size -= rng.randrange(1, 2 * MODEL_CHUNK)
                storage.resize(size, allow_shrink=True)
                del model[size:]
            if round_ == 0:
                storage.resize(MODEL_SIZE)
                model.extend(bytes(MODEL_SIZE - len(model)))
                size = MODEL_SIZE
        assert len(storage.layers) == 3
        assert storage.read(0, MODEL_SIZE) == model
        self.storage, self.model = storage, model
        self._flushed()

    def teardown(self) -> None:
        try:
            if self.storage is not None:
                assert self.live.read(0, MODEL_SIZE) == self.model
                for chain, content in self.snapshots:
                    assert _read_all(chain) == content
        finally:
            if self.storage is not None:
                self.storage.close()
            shutil.rmtree(self.directory)

    def _chunks(self, offset: int, length: int) -> range:
        return range(offset // MODEL_CHUNK, (offset + length - 1) // MODEL_CHUNK + 1)

    def _content(self, chunk: int) -> bytes:
        return bytes(self.model[chunk * MODEL_CHUNK : (chunk + 1) * MODEL_CHUNK])

    def _changed(self, offset: int, length: int, durable: bool) -> None:
        for chunk in self._chunks(offset, length):
            if durable:
                self.history[chunk] = [self._content(chunk)]
            else:
                self.history[chunk].append(self._content(chunk))

    def _flushed(self) -> None:
        count = -(-MODEL_SIZE // MODEL_CHUNK)
        self.history = [[self._content(chunk)] for chunk in range(count)]

    @rule(span=spans(MODEL_SIZE), seed=st.integers(0, 2**32), fua=st.booleans())
    def write(self, span: tuple[int, int], seed: int, fua: bool) -> None:
        offset, length = span
        data = random.Random(seed).randbytes(length)
        self.live.write(offset, data, fua=fua)
        self.model[offset : offset + length] = data
        self._changed(offset, length, fua)

    @rule(span=spans(MODEL_SIZE))
    def read(self, span: tuple[int, int]) -> None:
        offset, length = span
        assert self.live.read(offset, length) == self.model[offset : offset + length]

    @rule(span=spans(MODEL_SIZE), fua=st.booleans(), may_trim=st.booleans(), fast=st.booleans())
    def write_zeroes(self, span: tuple[int, int], fua: bool, may_trim: bool, fast: bool) -> None:
        offset, length = span
        self.live.write_zeroes(offset, length, fua=fua, may_trim=may_trim, fast=fast)
        self.model[offset : offset + length] = bytes(length)
        self._changed(offset, length, fua)

    @rule(span=spans(MODEL_SIZE), fua=st.booleans())
    def trim(self, span: tuple[int, int], fua: bool) -> None:
        offset, length = span
        self.live.trim(offset, length, fua=fua)
        self.model[offset : offset + length] = bytes(length)
        self._changed(offset, length, fua)

    @rule()
    def flush(self) -> None:
        self.live.flush()
        self._flushed()

    @rule(span=spans(MODEL_SIZE))
    def extents(self, span: tuple[int, int]) -> None:
        offset, length = span
        answer = self.live.extents(offset, length)
        assert answer
        assert answer[0].offset == offset
        for extent in collect_extents(self.live, offset, length):
            if extent.zero or extent.hole:
                run = self.model[extent.offset : extent.offset + extent.length]
                assert run == bytes(extent.length), f"{extent} holds data in the model"

    @rule()
    def snapshot(self) -> None:
        frozen = self.live.snapshot(self._stem())
        chain = list(self.live.layers[:-1])
        assert chain[-1] == frozen
        self.snapshots.append((chain, bytes(self.model)))
        self._flushed()

    @rule(extra=st.integers(1, 3 * MODEL_CHUNK))
    def grow_and_shrink_back(self, extra: int) -> None:
        self.live.resize(MODEL_SIZE + extra)
        assert self.live.read(MODEL_SIZE - 10, extra + 10) == self.model[-10:] + bytes(extra)
        self.live.resize(MODEL_SIZE, allow_shrink=True)
        self._flushed()

    @rule(flush=st.booleans())
    def reopen(self, flush: bool) -> None:
        if flush:
            self.live.flush()
            self._flushed()
        layers = list(self.live.layers)
        self.live.close()
        self.storage = CowStorage(layers)
        for chunk, contents in enumerate(self.history):
            got = self._content_of(chunk)
            assert got in contents, f"chunk {chunk} reads neither of its recent contents"
            self.model[chunk * MODEL_CHUNK : chunk * MODEL_CHUNK + len(got)] = got
        self._flushed()

    def _content_of(self, chunk: int) -> bytes:
        start = chunk * MODEL_CHUNK
        return self.live.read(start, min(MODEL_CHUNK, MODEL_SIZE - start))


ChainModel.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[phase for phase in Phase if phase is not Phase.explain],
)
TestChainModel = ChainModel.TestCase


# -- Chains -----------------------------------------------------------------------------------


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A frozen layer of SIZE bytes filled with pattern(1)."""
    stem = _layer(tmp_path / "base", SIZE)
    _fill([stem], lambda s: s.write(0, pattern(1, SIZE)))
    return stem


def test_partial_writes_copy_up_across_chunks(tmp_path: Path, base: Path) -> None:
    top = _layer(tmp_path / "top", SIZE)
    old = pattern(1, SIZE)
    with closing(CowStorage([base, top])) as storage:
        data = pattern(2, 2 * CHUNK)
        storage.write(CHUNK // 2, data)
        storage.write(5 * CHUNK - 1, b"ab")
        expected = bytearray(old)
        expected[CHUNK // 2 : CHUNK // 2 + 2 * CHUNK] = data
        expected[5 * CHUNK - 1 : 5 * CHUNK + 1] = b"ab"
        assert storage.read(0, SIZE) == expected
        storage.flush()
        assert allocated_bytes(top) == 5 * CHUNK  # chunks 0-2, 4 and 5, each whole
    # The top alone holds the copied-up chunks whole; nothing else.
    alone = _read_all([top])
    assert alone[: 3 * CHUNK] == expected[: 3 * CHUNK]
    assert alone[3 * CHUNK : 4 * CHUNK] == bytes(CHUNK)
    assert alone[4 * CHUNK : 6 * CHUNK] == expected[4 * CHUNK : 6 * CHUNK]


def test_extents_of_a_chain(tmp_path: Path) -> None:
    bottom = _layer(tmp_path / "bottom", 16 * CHUNK)
    _fill([bottom], lambda s: s.write(0, pattern(1, 4 * CHUNK)))
    top = _layer(tmp_path / "top", 16 * CHUNK)
    with closing(CowStorage([bottom, top])) as storage:
        storage.write_zeroes(CHUNK, CHUNK)  # hides the bottom: zero, not a hole
        storage.write(6 * CHUNK, pattern(2, CHUNK))
        storage.trim(6 * CHUNK, CHUNK)  # nothing below: a real hole again
        storage.write(8 * CHUNK + 5, b"x")
        assert storage.extents(0, 16 * CHUNK) == [
            Extent(0, CHUNK),
            Extent(CHUNK, CHUNK, zero=True),
            Extent(2 * CHUNK, 2 * CHUNK),
            Extent(4 * CHUNK, 4 * CHUNK, hole=True, zero=True),
            Extent(8 * CHUNK, CHUNK),
            Extent(9 * CHUNK, 7 * CHUNK, hole=True, zero=True),
        ]
        assert storage.extents(CHUNK + 3, 2) == [Extent(CHUNK + 3, 2, zero=True)]
        storage.write_zeroes(10 * CHUNK, CHUNK, may_trim=False)  # NO_HOLE: stays allocated
        assert storage.extents(10 * CHUNK, CHUNK) == [Extent(10 * CHUNK, CHUNK, zero=True)]


def test_extents_are_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stem = _layer(tmp_path / "top", 64 * 4096, chunk_size=4096)
    monkeypatch.setattr(cow_engine, "MAX_EXTENTS", 10)
    with closing(CowStorage([stem])) as storage:
        for chunk in range(0, 64, 2):
            storage.write(chunk * 4096, b"x")
        answer = storage.extents(0, storage.size)
        assert len(answer) == 10
        assert answer[0] == Extent(0, 4096)
        assert_extents_consistent(storage, answer)
        assert collect_extents(storage, 0, storage.size)[-1].hole


def test_lower_layers_smaller_than_the_top(tmp_path: Path, base: Path) -> None:
    top = _layer(tmp_path / "top", SIZE + 100_000)
    with closing(CowStorage([base, top])) as storage:
        assert storage.read(SIZE - 5, 10) == pattern(1, SIZE)[-5:] + bytes(5)
        # A copy-up of the chunk straddling the lower layer's end reads zeroes past it.
        storage.write(SIZE - 1, b"xy")
        assert storage.read(SIZE - 5, 10) == pattern(1, SIZE)[-5:-1] + b"xy" + bytes(4)
        assert storage.extents(SIZE + 1, 100) == [Extent(SIZE + 1, 100)]
        tail = storage.extents(SIZE + CHUNK, 100)
        assert tail == [Extent(SIZE + CHUNK, 100, hole=True, zero=True)]


# -- Snapshots and clones ---------------------------------------------------------------------


def test_snapshot_freezes_what_was_written_before(tmp_path: Path, base: Path) -> None:
    old = pattern(1, SIZE)
    first_top = _layer(tmp_path / "v1", SIZE)
    storage = CowStorage([base, first_top])
    try:
        storage.write(1000, pattern(2, 200_000))  # not flushed: the snapshot flushes
        before = storage.read(0, SIZE)
        assert storage.snapshot(tmp_path / "v2") == first_top
        assert storage.layers == (base, first_top, tmp_path / "v2")
        storage.write(0, pattern(3, 100_000))
        storage.write_zeroes(150_000, 300_000)
        storage.trim(SIZE - 70_000, 70_000)
        after = storage.read(0, SIZE)
        assert _read_all([base, first_top]) == before
        assert _read_all([base]) == old
        storage.flush()
        assert allocated_bytes(first_top) == 4 * CHUNK
    finally:
        storage.close()
    assert _read_all([base, first_top, tmp_path / "v2"]) == after


def test_snapshot_onto_an_existing_layer_keeps_the_top(tmp_path: Path, base: Path) -> None:
    top = _layer(tmp_path / "top", SIZE)
    taken = _layer(tmp_path / "taken", CHUNK)
    with closing(CowStorage([base, top])) as storage:
        with pytest.raises(StorageError) as excinfo:
            storage.snapshot(taken)
        assert excinfo.value.errno == errno.EEXIST
        assert storage.layers == (base, top)
        storage.write(0, b"still the top")
        storage.flush()
    assert _read_all([top])[:13] == b"still the top"
    assert layer_size(taken) == CHUNK


def test_snapshots_while_writing(tmp_path: Path) -> None:
    """Every write completed before snapshot() started is in the snapshot, none that started
    after it returned is, and the live volume has them all."""
    slot_length, slots, threads_count = 3001, 160, 4  # slots share chunks: concurrent copy-ups
    storage = CowStorage([_layer(tmp_path / "v0", slots * slot_length)])
    ticket = itertools.count()
    # (slot, version, ticket when the write started, ticket when it had completed)
    logs: list[list[tuple[int, int, int, int]]] = [[] for _ in range(threads_count)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def content(slot: int, version: int) -> bytes:
        return pattern(slot * 100_000 + version, slot_length)

    def writer(index: int) -> None:
        rng = random.Random(index)
        try:
            for version in itertools.count(1):
                if stop.is_set():
                    return
                slot = index + threads_count * rng.randrange(slots // threads_count)
                started = next(ticket)
                storage.write(slot * slot_length, content(slot, version))
                logs[index].append((slot, version, started, next(ticket)))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(threads_count)]
    snapshots: list[tuple[list[Path], int, int]] = []
    try:
        for thread in threads:
            thread.start()
        for number in range(1, 4):
            time.sleep(0.03)
            started = next(ticket)
            storage.snapshot(tmp_path / f"v{number}")
            snapshots.append((list(storage.layers[:-1]), started, next(ticket)))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    try:
        assert not errors, errors
        writes = sorted(w for log in logs for w in log)  # by slot, then version
        by_slot = {slot: list(group) for slot, group in itertools.groupby(writes, lambda w: w[0])}
        live = storage.read(0, storage.size)
        for slot, history in by_slot.items():
            last = history[-1]
            assert live[slot * slot_length : (slot + 1) * slot_length] == content(slot, last[1])
        for chain, started, returned in snapshots:
            image = _read_all(chain)
            for slot, history in by_slot.items():
                done = [w for w in history if w[3] < started]
                allowed = {content(slot, done[-1][1]) if done else bytes(slot_length)}
                # Writes that overlapped the snapshot may be on either side of it.
                allowed |= {
                    content(slot, w[1]) for w in history if w[2] < returned and w[3] > started
                }
                got = image[slot * slot_length : (slot + 1) * slot_length]
                assert got in allowed, f"slot {slot} of snapshot {chain[-1].name}"
    finally:
        storage.close()


def test_clones_are_independent(tmp_path: Path, base: Path) -> None:
    old = pattern(1, SIZE)
    frozen = _hashes([base])
    clone_a = CowStorage([base, _layer(tmp_path / "a", SIZE)])
    clone_b = CowStorage([base, _layer(tmp_path / "b", SIZE)])
    bigger = CowStorage([base, _layer(tmp_path / "c", SIZE + 3 * CHUNK)])
    try:
        model_a, model_b = bytearray(old), bytearray(old)
        clone_a.write(100, pattern(2, 100_000))
        model_a[100:100_100] = pattern(2, 100_000)
        clone_a.trim(500_000, 200_000)
        model_a[500_000:700_000] = bytes(200_000)
        clone_b.write(50_000, pattern(3, 300_000), fua=True)
        model_b[50_000:350_000] = pattern(3, 300_000)
        clone_b.write_zeroes(0, 70_000, may_trim=False)
        model_b[:70_000] = bytes(70_000)
        clone_b.write_zeroes(SIZE - 1, 1, fast=True)
        model_b[-1:] = b"\0"
        for clone in (clone_a, clone_b):
            clone.flush()
        assert clone_a.read(0, SIZE) == model_a
        assert clone_b.read(0, SIZE) == model_b
        assert bigger.read(0, bigger.size) == old + bytes(3 * CHUNK)
    finally:
        for clone in (clone_a, clone_b, bigger):
            clone.close()
    assert _hashes([base]) == frozen
    assert _read_all([base]) == old


def test_layers_are_locked(tmp_path: Path, base: Path) -> None:
    top = _layer(tmp_path / "top", SIZE)
    with closing(CowStorage([base, top])):
        for chain, read_only in [([base, top], False), ([top], True), ([base], False)]:
            with pytest.raises(StorageError) as excinfo:
                CowStorage(chain, read_only=read_only)
            assert excinfo.value.errno == errno.EBUSY
            assert ".map" in str(excinfo.value)
        # Other clones and read-only views of the frozen layer share it.
        with closing(CowStorage([base, _layer(tmp_path / "other", SIZE)])):
            assert _read_all([base]) == pattern(1, SIZE)
    with closing(CowStorage([base, top])):
        pass


def test_read_only_chain_refuses_changes(tmp_path: Path, base: Path) -> None:
    with closing(CowStorage([base], read_only=True)) as storage:
        assert storage.capabilities.read_only
        for call in (
            lambda: storage.snapshot(tmp_path / "new"),
            lambda: storage.resize(SIZE + 1),
            lambda: storage.write(0, b"x"),
        ):
            with pytest.raises(StorageError) as excinfo:
                call()
            assert excinfo.value.errno == errno.EPERM
        storage.flush()
    assert not (tmp_path / "new.map").exists()


def test_closed_storage_raises_ebadf(tmp_path: Path) -> None:
    storage = CowStorage([_layer(tmp_path / "top", CHUNK)])
    storage.close()
    for call in (
        lambda: storage.read(0, 1),
        lambda: storage.write(0, b"x"),
        storage.flush,
        lambda: storage.extents(0, 1),
        lambda: storage.snapshot(tmp_path / "next"),
    ):
        with pytest.raises(StorageError) as excinfo:
            call()
        assert excinfo.value.errno == errno.EBADF
    storage.close()


# -- Crash safety -----------------------------------------------------------------------------


def test_unflushed_writes_read_old_or_new_after_reopen(tmp_path: Path, base: Path) -> None:
    old = pattern(1, SIZE)
    top = _layer(tmp_path / "top", SIZE)
    storage = CowStorage([base, top])
    storage.write(0, pattern(2, 3 * CHUNK))
    storage.flush()
    flushed = storage.read(0, SIZE)
    storage.write(CHUNK + 10, pattern(3, 100))  # in place, in a chunk the top holds
    storage.write(10 * CHUNK + 10, pattern(4, 3 * CHUNK))  # new to the top
    storage.write_zeroes(20 * CHUNK, 2 * CHUNK)  # hides the base, not flushed
    latest = storage.read(0, SIZE)
    storage.close()  # flushes nothing
    with closing(CowStorage([base, top])) as reopened:
        got = reopened.read(0, SIZE)
    for start in range(0, SIZE, CHUNK):
        chunk = got[start : start + CHUNK]
        assert chunk in (flushed[start : start + CHUNK], latest[start : start + CHUNK]), start
    assert got[: 3 * CHUNK] == latest[: 3 * CHUNK]
    # Unflushed chunks new to the top have no bit on disk: they read from the base again.
    assert got[10 * CHUNK : 22 * CHUNK] == old[10 * CHUNK : 22 * CHUNK]


class _PowerCut:
    """What a power cut may leave, in the worst case for a copy-on-write map: every write to
    a map file issued so far reached the disk, but data files hold only what was synced.

    os.fsync/os.fdatasync are wrapped to record each file's content when synced (by inode, so
    renames and links keep it); ``on_map_write`` runs after each pwrite to a map file."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.durable: dict[int, bytes] = {}
        self.on_map_write: Callable[[], None] | None = None
        for name in ("fsync", "fdatasync"):
            monkeypatch.setattr(os, name, self._recording(getattr(os, name)))
        real_pwrite = os.pwrite

        def pwrite(fd: int, data: bytes, offset: int) -> int:
            written = real_pwrite(fd, data, offset)
            if self.on_map_write and os.readlink(f"/proc/self/fd/{fd}").endswith(".map"):
                self.on_map_write()
            return written

        monkeypatch.setattr(os, "pwrite", pwrite)

    def _recording(self, sync: Callable[[int], None]) -> Callable[[int], None]:
        def recorded(fd: int) -> None:
            sync(fd)
            path = os.readlink(f"/proc/self/fd/{fd}")
            if os.path.isfile(path):
                self.durable[os.fstat(fd).st_ino] = Path(path).read_bytes()

        return recorded

    def image(self, stems: tuple[Path, ...], directory: Path) -> list[Path]:
        directory.mkdir()
        chain = []
        for stem in stems:
            data, map_ = layer_files(stem)
            copy_data, copy_map = layer_files(directory / stem.name)
            copy_data.write_bytes(self.durable[data.stat().st_ino])
            shutil.copyfile(map_, copy_map)
            chain.append(directory / stem.name)
        return chain


def test_power_cut_never_exposes_unsynced_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunk, count = 4096, 160
    size = chunk * count - 1000
    cut = _PowerCut(monkeypatch)
    # The bottom covers half the volume: above it, trims clear bits instead of setting them.
    bottom = _layer(tmp_path / "bottom", size // 2, chunk)
    _fill([bottom], lambda s: s.write(0, pattern(1, size // 2)))
    storage = CowStorage([bottom, _layer(tmp_path / "top", size, chunk)])
    model = bytearray(pattern(1, size // 2) + bytes(size - size // 2))
    # Per chunk, every content since its last durable point: what a crash may leave.
    history = [[bytes(model[c * chunk : (c + 1) * chunk])] for c in range(count)]
    images = itertools.count()
    map_writes = 0

    def check() -> None:
        image = cut.image(storage.layers, tmp_path / f"cut{next(images)}")
        got = _read_all(image)
        for c in range(count):
            assert got[c * chunk : (c + 1) * chunk] in history[c], f"chunk {c} after a cut"

    def content(c: int) -> bytes:
        return bytes(model[c * chunk : (c + 1) * chunk])

    def durable(chunks: range) -> None:
        for c in chunks:
            history[c] = [content(c)]

    def map_written() -> None:
        nonlocal map_writes
        map_writes += 1
        check()

    cut.on_map_write = map_written
    rng = random.Random(7)
    try:
        for step in range(150):
            offset = rng.randrange(size)
            length = rng.randrange(1, min(size - offset, 12 * chunk) + 1)
            kind = rng.choice(["write", "write", "write", "zero", "trim", "trim", "flush"])
            fua = rng.random() < 0.15
            if kind == "flush":
                storage.flush()
                durable(range(count))
                continue
            # The new contents are allowed as soon as the request is issued: the request's
            # own FUA flush writes the map before it returns.
            data = pattern(step + 10, length) if kind == "write" else bytes(length)
            model[offset : offset + length] = data
            touched = range(offset // chunk, (offset + length - 1) // chunk + 1)
            for c in touched:
                history[c].append(content(c))
            if kind == "write":
                storage.write(offset, data, fua=fua)
            elif kind == "zero":
                storage.write_zeroes(offset, length, fua=fua, may_trim=rng.random() < 0.5)
            else:
                storage.trim(offset, length, fua=fua)
            if fua:
                durable(touched)
            check()
        storage.flush()
        durable(range(count))
        check()
    finally:
        cut.on_map_write = None
        storage.close()
    assert map_writes > 15


_KILLED_WRITER = """
import random, sys
from pathlib import Path
from backend.storage.cow import CowStorage

size, chunk = int(sys.argv[1]), int(sys.argv[2])
storage = CowStorage([Path(p) for p in sys.argv[3:]])
for generation in range(1, 1000):
    content = random.Random(generation).randbytes(size)
    rng = random.Random(-generation)
    # Pieces of whole sectors that do not follow chunk boundaries: partial chunks copy up.
    cuts = sorted({0, size, *(rng.randrange(size // 512) * 512 for _ in range(size // chunk * 2))})
    pieces = list(zip(cuts, cuts[1:]))
    rng.shuffle(pieces)
    for start, stop in pieces:
        storage.write(start, content[start:stop])
    storage.flush()
    print(generation, flush=True)
"""


def test_writer_killed_mid_write(tmp_path: Path) -> None:
    """SIGKILL a process writing generation after generation: on reopening, every sector holds
    the last generation it reported flushed, or one it was writing or flushing after it."""
    chunk, size = 16 * KIB, MIB
    bottom = _layer(tmp_path / "bottom", size, chunk)
    _fill([bottom], lambda s: s.write(0, random.Random(0).randbytes(size)))
    rng = random.Random(3)
    for round_ in range(3):
        chain = [bottom, _layer(tmp_path / f"top{round_}", size, chunk)]
        child = subprocess.Popen(
            [sys.executable, "-c", _KILLED_WRITER, str(size), str(chunk), *map(str, chain)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        reported = [int(child.stdout.readline()) for _ in range(1 + round_)]
        time.sleep(rng.uniform(0, 0.03))
        child.send_signal(signal.SIGKILL)
        reported += [int(line) for line in child.stdout.read().split()]
        child.wait()
        child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        flushed = reported[-1]
        generations = [random.Random(g).randbytes(size) for g in range(flushed, flushed + 3)]
        got = _read_all(chain)
        for start in range(0, size, 512):
            sector = got[start : start + 512]
            assert any(sector == g[start : start + 512] for g in generations), (round_, start)


# -- Resizing ---------------------------------------------------------------------------------


def test_grow(tmp_path: Path, base: Path) -> None:
    top = _layer(tmp_path / "top", SIZE)
    with closing(CowStorage([base, top])) as storage:
        storage.resize(SIZE + 5 * CHUNK + 7)
        assert storage.size == SIZE + 5 * CHUNK + 7
        assert storage.read(0, storage.size) == pattern(1, SIZE) + bytes(5 * CHUNK + 7)
        storage.write(storage.size - 3, b"end")
        storage.flush()
    assert layer_size(top) == SIZE + 5 * CHUNK + 7
    assert layer_size(base) == SIZE
    assert _read_all([base, top])[-3:] == b"end"


def test_shrink_needs_allow_shrink(tmp_path: Path, base: Path) -> None:
    top = _layer(tmp_path / "top", SIZE)
    with closing(CowStorage([base, top])) as storage:
        with pytest.raises(StorageError) as excinfo:
            storage.resize(SIZE - 1)
        assert excinfo.value.errno == errno.EINVAL
        assert storage.size == SIZE
        storage.resize(SIZE - CHUNK - 1, allow_shrink=True)
        assert storage.size == SIZE - CHUNK - 1
        with pytest.raises(StorageError):
            storage.read(SIZE - 10, 5)  # past the new end: refused, not a crash
    assert layer_size(top) == SIZE - CHUNK - 1
    assert layer_files(top)[0].stat().st_size == SIZE - CHUNK - 1


@pytest.mark.parametrize("cut", [CHUNK * 7, CHUNK * 7 + 100])
def test_shrink_then_grow_reads_zeroes(tmp_path: Path, base: Path, cut: int) -> None:
    old = pattern(1, SIZE)
    top = _layer(tmp_path / "top", SIZE)
    with closing(CowStorage([base, top])) as storage:
        storage.write(cut - 50, b"y" * 100)
        storage.resize(cut, allow_shrink=True)
        storage.resize(SIZE)
        expected = old[: cut - 50] + b"y" * 50 + bytes(SIZE - cut)
        assert storage.read(0, SIZE) == expected
        # Without the write, the boundary chunk comes from the base and is copied up.
        storage.trim(0, SIZE)
        storage.write(0, old)
        storage.resize(cut + 1, allow_shrink=True)
        storage.resize(SIZE)
        assert storage.read(0, SIZE) == old[: cut + 1] + bytes(SIZE - cut - 1)
    assert _read_all([base, top]) == old[: cut + 1] + bytes(SIZE - cut - 1)


def test_frozen_smaller_layer_cuts_the_ones_below(tmp_path: Path, base: Path) -> None:
    # A volume shrunk, then snapshotted: a clone made larger shows zeroes past the cut.
    middle = _layer(tmp_path / "middle", SIZE)
    with closing(CowStorage([base, middle])) as storage:
        storage.resize(MIB, allow_shrink=True)
    clone = _layer(tmp_path / "clone", SIZE)
    assert _read_all([base, middle, clone]) == pattern(1, SIZE)[:MIB] + bytes(SIZE - MIB)


# -- Space and flattening ---------------------------------------------------------------------


def test_allocated_bytes(tmp_path: Path, base: Path) -> None:
    top = _layer(tmp_path / "top", SIZE)
    with closing(CowStorage([base, top])) as storage:
        storage.write(CHUNK - 1, b"ab")
        storage.write(10 * CHUNK, bytes(CHUNK))
        assert allocated_bytes(top) == 0  # the map on disk lags until the flush
        storage.flush()
        assert allocated_bytes(top) == 3 * CHUNK
        storage.trim(20 * CHUNK, 2 * CHUNK)  # hides the base: allocated, punched
        storage.flush()
        assert allocated_bytes(top) == 5 * CHUNK
    assert allocated_bytes(base) == -(-SIZE // CHUNK) * CHUNK
    alone = _layer(tmp_path / "alone", SIZE)
    with closing(CowStorage([alone])) as storage:
        storage.write(0, pattern(2, 4 * CHUNK))
        storage.trim(CHUNK, 2 * CHUNK)  # nothing below: deallocated
        storage.write_zeroes(3 * CHUNK, CHUNK, may_trim=False)  # NO_HOLE: stays
        storage.flush()
        assert allocated_bytes(alone) == 2 * CHUNK


def test_flatten_into(tmp_path: Path, base: Path) -> None:
    middle = _layer(tmp_path / "middle", SIZE)
    _fill(
        [base, middle],
        lambda s: s.write(CHUNK + 5, pattern(2, 3 * CHUNK)),
        lambda s: s.write_zeroes(6 * CHUNK, 4 * CHUNK),
        lambda s: s.write(MIB, bytes(CHUNK)),
    )
    top = _layer(tmp_path / "top", SIZE + CHUNK)
    _fill([base, middle, top], lambda s: s.write(3 * CHUNK, pattern(3, 100)))
    chain = [base, middle, top]
    lowers = _hashes([base, middle])
    expected = _read_all(chain)
    calls: list[tuple[int, int]] = []
    flatten_into(chain, lambda done, total: calls.append((done, total)))
    assert _read_all([top]) == expected
    assert _read_all(chain) == expected
    assert _hashes([base, middle]) == lowers
    total = SIZE + CHUNK
    assert calls[0] == (0, total)
    assert calls[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(calls))
    assert len(calls) > 2
    # Zeroed chunks were not copied: the top holds less than the volume.
    assert allocated_bytes(top) < total - 4 * CHUNK


def test_flatten_into_refuses_a_top_in_use(tmp_path: Path, base: Path) -> None:
    top = _layer(tmp_path / "top", SIZE)
    with closing(CowStorage([base, top])):
        with pytest.raises(StorageError) as excinfo:
            flatten_into([base, top])
        assert excinfo.value.errno == errno.EBUSY


# -- Mismatched chains --------------------------------------------------------------------------


def test_mismatched_chain(tmp_path: Path) -> None:
    small = _layer(tmp_path / "small", MIB, chunk_size=4096)
    large = _layer(tmp_path / "large", MIB)
    with pytest.raises(StorageError) as excinfo:
        CowStorage([small, large])
    assert excinfo.value.errno == errno.EINVAL
    assert str(layer_files(large)[1]) in str(excinfo.value)
    for chain in ([], [small, small]):
        with pytest.raises(StorageError) as excinfo:
            CowStorage(chain)
        assert excinfo.value.errno == errno.EINVAL
    # Nothing stays locked after a failed open.
    with closing(CowStorage([small])), closing(CowStorage([large])):
        pass


def test_missing_layer_files(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as excinfo:
        CowStorage([tmp_path / "nothing"])
    assert excinfo.value.errno == errno.ENOENT
    assert "nothing.map" in str(excinfo.value)
    stem = _layer(tmp_path / "half", CHUNK)
    layer_files(stem)[0].unlink()
    with pytest.raises(StorageError) as excinfo:
        CowStorage([stem])
    assert excinfo.value.errno == errno.ENOENT
    assert "half.data" in str(excinfo.value)
    with closing(CowStorage([_layer(tmp_path / "again", CHUNK)])):
        pass
