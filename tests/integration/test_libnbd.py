"""python3-libnbd against the real ``nbs serve``: data path, concurrency and exact NBD errors.

Bad requests are sent with libnbd's strict mode off, so they reach the server and the error
checked is the one the server put on the wire (doc/proto.md, "Error values").
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.integration.conftest import NbsServer, require_module
from tests.integration.helpers import file_layout, merge

if TYPE_CHECKING:
    import nbd as libnbd  # for annotations: at run time require_module gives nbd

nbd = require_module("nbd")  # python3-libnbd, a Debian package

KiB = 1 << 10
MiB = 1 << 20
SIZE = 64 * MiB
PATTERN_OFFSET = 4 * KiB
PATTERN = bytes(random.Random(1).randbytes(4 * KiB))


@contextlib.contextmanager
def connect(
    uri: str,
    *,
    meta: bool = True,
    structured: bool = True,
    request_meta: bool = True,
) -> Iterator[libnbd.NBD]:
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if not structured:
        h.set_request_structured_replies(False)
    if not request_meta:
        h.set_request_meta_context(False)
    h.connect_uri(uri)
    try:
        yield h
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()


def sparse_file(path: Path, size: int = SIZE) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def error_of(caught: pytest.ExceptionInfo[libnbd.Error]) -> int:
    """The errno of a failed command (nbd.Error.errno is its symbolic name)."""
    err = caught.value
    assert err.errno == errno.errorcode.get(err.errnum), err.string
    assert isinstance(err.errnum, int)
    return err.errnum


def wait_all(h: libnbd.NBD, timeout_ms: int = 20_000) -> None:
    while h.aio_in_flight() > 0:
        assert h.poll(timeout_ms) == 1, "no progress while waiting for replies"


@pytest.fixture
def files(disk: Path, tmp_path: Path) -> dict[str, Path]:
    ro = sparse_file(tmp_path / "ro.img")
    with ro.open("r+b") as f:
        f.seek(PATTERN_OFFSET)
        f.write(PATTERN)
    return {"disk": disk, "ro": ro, "aligned": sparse_file(tmp_path / "aligned.img")}


@pytest.fixture
def server(nbs_server: Callable[..., NbsServer], files: dict[str, Path]) -> NbsServer:
    return nbs_server(
        "--listen",
        "127.0.0.1:0",
        "--export",
        f"disk={files['disk']}",
        "--export",
        f"ro={files['ro']},ro",
        "--export",
        f"aligned={files['aligned']},min-block=512",
    )


# ---------------------------------------------------------------------- data path


def test_pwrite_pread_round_trip(server: NbsServer, files: dict[str, Path]) -> None:
    rng = random.Random(2)
    cases = [
        (0, 4 * KiB),
        (1, 1),
        (12_345, 777),
        (MiB - 100, 300),
        (5 * MiB, 2 * MiB + 3),
        (SIZE - 1000, 1000),
    ]
    with connect(server.uri("disk")) as h:
        assert h.get_size() == SIZE
        for offset, length in cases:
            data = rng.randbytes(length)
            h.pwrite(data, offset)
            assert h.pread(length, offset) == data
            assert file_bytes(files["disk"], offset, length) == data


def test_large_read_of_data_and_holes_is_reassembled(
    server: NbsServer, files: dict[str, Path]
) -> None:
    # Reads this long may come back as data and hole chunks; libnbd must see the same bytes.
    data = random.Random(3).randbytes(8 * KiB)
    with connect(server.uri("disk")) as h:
        assert h.get_structured_replies_negotiated()
        h.pwrite(data, 2 * MiB + 100)
        got = h.pread(4 * MiB, 0)
    expected = bytearray(4 * MiB)
    expected[2 * MiB + 100 : 2 * MiB + 100 + len(data)] = data
    assert got == expected
    assert file_bytes(files["disk"], 0, 4 * MiB) == expected


def test_fua_write_reaches_the_file(server: NbsServer, files: dict[str, Path]) -> None:
    data = random.Random(4).randbytes(64 * KiB)
    with connect(server.uri("disk")) as h:
        assert h.can_fua()
        h.pwrite(data, 3 * MiB, nbd.CMD_FLAG_FUA)
        assert h.pread(len(data), 3 * MiB) == data
    assert file_bytes(files["disk"], 3 * MiB, len(data)) == data


def test_flush_after_writes(server: NbsServer, files: dict[str, Path]) -> None:
    with connect(server.uri("disk")) as h:
        assert h.can_flush()
        for i in range(8):
            h.pwrite(bytes([i + 1]) * 4096, i * 4096)
        h.flush()
    for i in range(8):
        assert file_bytes(files["disk"], i * 4096, 4096) == bytes([i + 1]) * 4096


def test_trim_then_read_zeroes(server: NbsServer, files: dict[str, Path]) -> None:
    with connect(server.uri("disk")) as h:
        assert h.can_trim()
        h.pwrite(b"\xee" * MiB, 4 * MiB)
        h.flush()
        h.trim(MiB, 4 * MiB)
        assert h.pread(MiB, 4 * MiB) == bytes(MiB)
        # Neighbours are untouched.
        h.pwrite(b"\x11" * 4096, 5 * MiB)
        assert h.pread(4096, 5 * MiB) == b"\x11" * 4096
    assert file_bytes(files["disk"], 4 * MiB, MiB) == bytes(MiB)
    # A trimmed file range is a hole again: no data run of the file overlaps it.
    data_runs = [(o, n) for o, n, is_data in file_layout(files["disk"]) if is_data]
    assert any(o <= 5 * MiB < o + n for o, n in data_runs)
    assert not [(o, n) for o, n in data_runs if o < 5 * MiB and o + n > 4 * MiB]


def test_zero_with_no_hole_keeps_the_range_allocated(
    server: NbsServer, files: dict[str, Path]
) -> None:
    disk = files["disk"]
    with connect(server.uri("disk")) as h:
        assert h.can_zero()
        h.pwrite(b"\xcd" * MiB, 8 * MiB)
        h.flush()
        before = allocated(disk)
        assert before >= MiB
        h.zero(MiB, 8 * MiB, nbd.CMD_FLAG_NO_HOLE)
        assert h.pread(MiB, 8 * MiB) == bytes(MiB)
        h.flush()
        assert allocated(disk) >= before, "NO_HOLE zeroing deallocated the range"
        # Without NO_HOLE the server may (and on a file does) punch the range out.
        h.pwrite(b"\xcd" * MiB, 8 * MiB)
        h.zero(MiB, 8 * MiB)
        assert h.pread(MiB, 8 * MiB) == bytes(MiB)
    assert file_bytes(disk, 8 * MiB, MiB) == bytes(MiB)


def test_fast_zero_succeeds_and_reads_zeroes(server: NbsServer, files: dict[str, Path]) -> None:
    with connect(server.uri("disk")) as h:
        assert h.can_fast_zero()
        h.pwrite(b"\x77" * (2 * MiB), 10 * MiB)
        h.zero(2 * MiB, 10 * MiB, nbd.CMD_FLAG_FAST_ZERO)
        assert h.pread(2 * MiB, 10 * MiB) == bytes(2 * MiB)
        h.pwrite(b"\x77" * MiB, 10 * MiB)
        h.zero(MiB, 10 * MiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
        assert h.pread(MiB, 10 * MiB) == bytes(MiB)
    assert file_bytes(files["disk"], 10 * MiB, 2 * MiB) == bytes(2 * MiB)


def test_cache_succeeds(server: NbsServer) -> None:
    with connect(server.uri("disk")) as h:
        assert h.can_cache()
        h.pwrite(b"\x42" * 4096, 0)
        h.cache(MiB, 0)
        h.cache(SIZE, 0)
        assert h.pread(4096, 0) == b"\x42" * 4096


def collect_block_status(
    h: libnbd.NBD, offset: int, length: int, flags: int = 0
) -> list[list[int]]:
    calls: list[list[int]] = []

    def extent(metacontext: str, off: int, entries: list[int], err: int) -> int:
        assert metacontext == nbd.CONTEXT_BASE_ALLOCATION
        assert off == offset
        calls.append(list(entries))
        return 0

    h.block_status(length, offset, extent, flags)
    return calls


def test_block_status_matches_the_file(server: NbsServer, files: dict[str, Path]) -> None:
    with connect(server.uri("disk")) as h:
        assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.pwrite(b"\x01" * (64 * KiB), MiB)
        h.pwrite(b"\x02" * 4096, 40 * MiB)
        h.pwrite(b"\x03" * (3 * MiB), 50 * MiB)
        h.flush()
        runs: list[tuple[int, int, bool]] = []
        pos = 0
        while pos < SIZE:
            calls = collect_block_status(h, pos, SIZE - pos)
            assert len(calls) == 1
            entries = calls[0]
            assert entries
            assert len(entries) % 2 == 0
            for length, state in zip(entries[::2], entries[1::2], strict=True):
                assert length > 0
                if state & nbd.STATE_HOLE:
                    assert state == nbd.STATE_HOLE | nbd.STATE_ZERO
                else:
                    assert state == 0, "data that is not zero reported with STATE_ZERO"
                covered = min(length, SIZE - pos)
                runs.append((pos, covered, not state & nbd.STATE_HOLE))
                pos += covered
                if pos >= SIZE:
                    break
    expected = merge(file_layout(files["disk"]))
    assert sum(1 for r in expected if r[2]) == 3
    assert merge(runs) == expected


def test_block_status_req_one_returns_one_extent(server: NbsServer) -> None:
    with connect(server.uri("disk")) as h:
        h.pwrite(b"\x01" * (64 * KiB), MiB)
        calls = collect_block_status(h, 0, 2 * MiB, nbd.CMD_FLAG_REQ_ONE)
        assert len(calls) == 1
        assert len(calls[0]) == 2
        length, state = calls[0]
        assert 0 < length <= MiB
        assert state & nbd.STATE_HOLE
        calls = collect_block_status(h, MiB, 2 * MiB, nbd.CMD_FLAG_REQ_ONE)
        assert calls == [[64 * KiB, 0]]


def test_block_status_after_trim_reports_a_hole(server: NbsServer) -> None:
    with connect(server.uri("disk")) as h:
        h.pwrite(b"\x09" * MiB, 6 * MiB)
        assert collect_block_status(h, 6 * MiB, MiB, nbd.CMD_FLAG_REQ_ONE) == [[MiB, 0]]
        h.trim(MiB, 6 * MiB)
        [[length, state]] = collect_block_status(h, 6 * MiB, MiB, nbd.CMD_FLAG_REQ_ONE)
        assert length == MiB
        assert state == nbd.STATE_HOLE | nbd.STATE_ZERO


# ---------------------------------------------------------------------- concurrency


def test_many_aio_writes_then_reads_in_flight(server: NbsServer, files: dict[str, Path]) -> None:
    rng = random.Random(5)
    count, size = 16, 256 * KiB
    chunks = [rng.randbytes(size) for _ in range(count)]
    with connect(server.uri("disk")) as h:
        buffers = [nbd.Buffer.from_bytearray(bytearray(c)) for c in chunks]
        cookies = [h.aio_pwrite(b, i * size) for i, b in enumerate(buffers)]
        most = h.aio_in_flight()
        wait_all(h)
        assert all(h.aio_command_completed(c) for c in cookies)

        reads = [nbd.Buffer(size) for _ in range(count)]
        # Reverse order, so replies can come back in any order relative to the offsets.
        read_cookies = [(i, h.aio_pread(reads[i], i * size)) for i in reversed(range(count))]
        most = max(most, h.aio_in_flight())
        wait_all(h)
        for i, cookie in read_cookies:
            assert h.aio_command_completed(cookie)
            assert reads[i].to_bytearray() == chunks[i], f"chunk {i} differs"
    assert most >= 2, "requests were never in flight together"
    assert file_bytes(files["disk"], 0, count * size) == b"".join(chunks)


def test_mixed_aio_commands_in_flight(server: NbsServer) -> None:
    rng = random.Random(6)
    with connect(server.uri("disk")) as h:
        h.pwrite(b"\x5a" * MiB, 20 * MiB)
        done: list[int] = []
        cookies = []
        writes = {}
        for i in range(8):
            data = rng.randbytes(64 * KiB)
            writes[i] = data
            buf = nbd.Buffer.from_bytearray(bytearray(data))
            cookies.append(h.aio_pwrite(buf, 30 * MiB + i * 64 * KiB))
        read_buf = nbd.Buffer(MiB)
        cookies.append(h.aio_pread(read_buf, 20 * MiB))
        cookies.append(h.aio_zero(MiB, 40 * MiB))
        cookies.append(h.aio_trim(MiB, 41 * MiB))
        cookies.append(h.aio_cache(MiB, 20 * MiB))
        assert h.aio_in_flight() >= 2
        wait_all(h)
        for cookie in cookies:
            assert h.aio_command_completed(cookie)
            done.append(cookie)
        # A flush after every reply covers everything.
        h.flush()
        assert read_buf.to_bytearray() == b"\x5a" * MiB
        for i, data in writes.items():
            assert h.pread(len(data), 30 * MiB + i * 64 * KiB) == data
        assert h.pread(2 * MiB, 40 * MiB) == bytes(2 * MiB)
    assert len(done) == 12


def test_writes_on_one_connection_are_seen_by_another(server: NbsServer) -> None:
    with connect(server.uri("disk")) as a, connect(server.uri("disk")) as b:
        assert a.can_multi_conn()
        a.pwrite(b"\x99" * 8192, 7 * MiB)
        a.flush()
        assert b.pread(8192, 7 * MiB) == b"\x99" * 8192


# ---------------------------------------------------------------------- bad requests


BAD_REQUESTS: dict[str, tuple[Callable[[libnbd.NBD], object], int]] = {
    "read_past_end": (lambda h: h.pread(512, SIZE), errno.EINVAL),
    "read_straddling_end": (lambda h: h.pread(1024, SIZE - 512), errno.EINVAL),
    "write_past_end": (lambda h: h.pwrite(b"x" * 512, SIZE), errno.ENOSPC),
    "write_straddling_end": (lambda h: h.pwrite(b"x" * 1024, SIZE - 512), errno.ENOSPC),
    "zero_past_end": (lambda h: h.zero(512, SIZE), errno.ENOSPC),
    "trim_past_end": (lambda h: h.trim(512, SIZE), errno.EINVAL),
    "cache_past_end": (lambda h: h.cache(512, SIZE), errno.EINVAL),
    "read_with_no_hole_flag": (lambda h: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL),
    "write_with_df_flag": (lambda h: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_DF), errno.EINVAL),
    "read_with_unknown_flag_0x80": (lambda h: h.pread(512, 0, 0x80), errno.EINVAL),
    "cache_with_unknown_flag_0x8000": (lambda h: h.cache(512, 0, 0x8000), errno.EINVAL),
    "df_read_over_64k": (lambda h: h.pread(64 * KiB + 512, 0, nbd.CMD_FLAG_DF), errno.EOVERFLOW),
    "zero_length_read": (lambda h: h.pread(0, 0), errno.EINVAL),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_exact_error_and_handle_survives(
    server: NbsServer, files: dict[str, Path], case: str
) -> None:
    bad, expected = BAD_REQUESTS[case]
    with connect(server.uri("disk")) as h:
        h.pwrite(PATTERN, PATTERN_OFFSET)
        h.set_strict_mode(0)
        with pytest.raises(nbd.Error) as caught:
            bad(h)
        err = caught.value
        assert error_of(caught) == expected, f"{case}: got {err.errno} ({err.string})"
        assert "command failed" in err.string, f"not a server reply: {err.string}"
        # The same handle is still connected and serving.
        assert h.aio_is_ready()
        assert h.pread(len(PATTERN), PATTERN_OFFSET) == PATTERN
        h.pwrite(b"\x01" * 512, 0)
        assert h.pread(512, 0) == b"\x01" * 512
    assert file_bytes(files["disk"], PATTERN_OFFSET, len(PATTERN)) == PATTERN
    assert server.alive()


def test_df_reads_up_to_64k_succeed(server: NbsServer) -> None:
    data = random.Random(7).randbytes(4096)
    with connect(server.uri("disk")) as h:
        assert h.can_df()
        # libnbd only takes DF on pread_structured unless its flag checks are off.
        h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_FLAGS)
        h.pwrite(data, 0)  # data followed by a hole: DF must still give one piece
        got = h.pread(64 * KiB, 0, nbd.CMD_FLAG_DF)
        assert got == data + bytes(64 * KiB - len(data))
        assert h.pread(512, 100, nbd.CMD_FLAG_DF) == data[100:612]


READ_ONLY_MUTATIONS: dict[str, Callable[[libnbd.NBD], object]] = {
    "write": lambda h: h.pwrite(b"\xff" * 4096, PATTERN_OFFSET),
    "trim": lambda h: h.trim(4096, PATTERN_OFFSET),
    "zero": lambda h: h.zero(4096, PATTERN_OFFSET),
}


@pytest.mark.parametrize("case", list(READ_ONLY_MUTATIONS))
def test_mutating_a_read_only_export_is_eperm(
    server: NbsServer, files: dict[str, Path], case: str
) -> None:
    # Spec, "Error values": EPERM for a write or trim on a read-only export; and
    # NBD_CMD_WRITE_ZEROES: EPERM for a write zeroes request on a read-only export.
    mutate = READ_ONLY_MUTATIONS[case]
    with connect(server.uri("ro")) as h:
        assert h.is_read_only()
        h.set_strict_mode(0)
        with pytest.raises(nbd.Error) as caught:
            mutate(h)
        assert error_of(caught) == errno.EPERM, caught.value.string
        assert "command failed" in caught.value.string
        assert h.pread(len(PATTERN), PATTERN_OFFSET) == PATTERN
    assert file_bytes(files["ro"], PATTERN_OFFSET, len(PATTERN)) == PATTERN


def test_misaligned_requests_are_einval_when_block_size_was_requested(server: NbsServer) -> None:
    with connect(server.uri("aligned")) as h:
        assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
        h.pwrite(b"\x33" * 1024, 1024)
        h.set_strict_mode(0)
        unaligned: tuple[Callable[[], object], ...] = (
            lambda: h.pread(100, 0),
            lambda: h.pread(512, 100),
            lambda: h.pwrite(b"x" * 100, 0),
            lambda: h.pwrite(b"x" * 512, 256),
            lambda: h.trim(512, 1),
            lambda: h.zero(1000, 0),
        )
        for bad in unaligned:
            with pytest.raises(nbd.Error) as caught:
                bad()
            assert error_of(caught) == errno.EINVAL, caught.value.string
            assert "command failed" in caught.value.string
        # Aligned requests still work on the same handle, and nothing was changed.
        assert h.pread(1024, 1024) == b"\x33" * 1024
        assert h.pread(512, 0) == bytes(512)


# ---------------------------------------------------------------------- negotiation variants


def test_simple_replies_when_structured_replies_are_not_requested(
    server: NbsServer, files: dict[str, Path]
) -> None:
    data = random.Random(8).randbytes(8 * KiB)
    with connect(server.uri("disk"), meta=False, structured=False) as h:
        assert not h.get_structured_replies_negotiated()
        assert not h.can_df()
        h.pwrite(data, MiB + 7)
        # Long enough that a structured server would send holes: simple replies carry zeroes.
        got = h.pread(2 * MiB, MiB)
        assert got[7 : 7 + len(data)] == data
        assert got[:7] == bytes(7)
        assert got[7 + len(data) :] == bytes(2 * MiB - 7 - len(data))
        h.set_strict_mode(0)
        with pytest.raises(nbd.Error) as caught:
            h.pread(512, SIZE)
        assert error_of(caught) == errno.EINVAL
        with pytest.raises(nbd.Error) as caught:
            h.pread(128 * KiB, 0, nbd.CMD_FLAG_DF)
        # DF was not advertised without structured replies: the flag itself is invalid.
        assert error_of(caught) == errno.EINVAL
        assert h.pread(len(data), MiB + 7) == data
    assert file_bytes(files["disk"], MiB + 7, len(data)) == data


def test_no_meta_context_requested(server: NbsServer) -> None:
    # libnbd >= 1.16 can skip SET_META_CONTEXT explicitly; older ones skip it when no
    # context was added, which is what the server sees either way.
    explicit = hasattr(nbd.NBD, "set_request_meta_context")
    with connect(server.uri("disk"), meta=explicit, request_meta=not explicit) as h:
        assert h.get_structured_replies_negotiated()
        assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.pwrite(b"\x12" * 4096, 0)
        assert h.pread(4096, 0) == b"\x12" * 4096
        with pytest.raises(nbd.Error):
            collect_block_status(h, 0, MiB)
        assert h.pread(4096, 0) == b"\x12" * 4096
