"""S3ObjectStore against a real S3 server (SeaweedFS, tests/integration/s3rig.py).

The storage conformance suite and the model test over ChunkedStorage on S3 (no offset writes:
every partial write is a read-modify-write of a chunk), the ObjectStore contract on S3 itself,
the mapping of S3 refusals to errnos, and real faults: the server killed with SIGKILL while a
writer is busy, then started again within the retry deadline, or left down past it.

Tests share one server and one bucket; each store gets a key prefix of its own.
"""

from __future__ import annotations

import errno
import http.server
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from backend.storage import Storage, StorageError
from backend.storage.chunked import ChunkedStorage, create_layer, open_chain, remove_layer
from backend.storage.layers import CachingStorage, RetryingStorage
from backend.storage.objects import S3ObjectStore
from tests.integration.s3rig import SeaweedS3
from tests.unit.storage.conformance import *  # noqa: F403
from tests.unit.storage.conformance import StorageFactory, pattern
from tests.unit.storage.model import make_model_test

pytestmark = pytest.mark.integration

KIB = 1024
CHUNK = 64 * KIB
BUCKET = "nbs-tests"
TRANSIENT = {errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET}

_prefixes = itertools.count()


def _prefix(name: str) -> str:
    return f"{name}-{next(_prefixes)}/"


@pytest.fixture(scope="module")
def s3(s3_server: SeaweedS3) -> SeaweedS3:
    """The session's server, with the tests' bucket in it."""
    if BUCKET not in _buckets(s3_server):
        s3_server.create_bucket(BUCKET)
    return s3_server


def _buckets(server: SeaweedS3) -> set[str]:
    client = server.client()
    try:
        return {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    finally:
        client.close()


@pytest.fixture
def make_store(s3: SeaweedS3) -> Iterator[Callable[..., S3ObjectStore]]:
    """Factory of stores on a fresh prefix of the tests' bucket; all closed at teardown."""
    stores: list[S3ObjectStore] = []

    def make(**options: Any) -> S3ObjectStore:
        options.setdefault("prefix", _prefix("store"))
        store = s3.store(BUCKET, **options)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


# -- The conformance suite and the model over ChunkedStorage(S3ObjectStore) --------------------


def _chunked(server: SeaweedS3, size: int) -> ChunkedStorage:
    store = server.store(BUCKET, prefix=_prefix("volume"), max_connections=16)
    return ChunkedStorage(store, size, chunk_size=CHUNK, workers=8)


def _layered(server: SeaweedS3, size: int) -> Storage:
    """What ``s3:...+cache:mode=write-back+retry`` builds, over a two-layer chain."""
    store = server.store(BUCKET, prefix=_prefix("layered"), max_connections=16)
    create_layer(store, "base/", size, CHUNK)
    base = open_chain(store, ["base/"])
    base.write(0, bytes(min(size, CHUNK)))  # a chunk below to copy up from (zeroes)
    base.snapshot("top/")
    base.close()
    chain = open_chain(store, ["base/", "top/"], workers=8, owns_store=True)
    return CachingStorage(RetryingStorage(chain), 512 * 1024, block=16 * 1024, write_back=True)


@pytest.fixture(params=["chunked", "layers+cache+retry"])
def storage_factory(s3: SeaweedS3, request: pytest.FixtureRequest) -> StorageFactory:
    if request.param == "chunked":
        return lambda size: _chunked(s3, size)
    return lambda size: _layered(s3, size)


# The model test is a unittest class, built before any fixture runs: its factory finds the
# server through this holder, filled by the fixture the class uses.
_model_server: list[SeaweedS3] = []


@pytest.fixture
def model_server(s3: SeaweedS3) -> Iterator[None]:
    _model_server.append(s3)
    yield
    _model_server.clear()


TestS3ChunkedModel = pytest.mark.usefixtures("model_server")(
    make_model_test(lambda size: _chunked(_model_server[0], size), max_examples=15)
)
TestS3LayeredModel = pytest.mark.usefixtures("model_server")(
    make_model_test(lambda size: _layered(_model_server[0], size), max_examples=10)
)


# -- The ObjectStore contract on S3 ------------------------------------------------------------


def test_get_put_delete(make_store: Callable[..., S3ObjectStore]) -> None:
    store = make_store()
    assert not store.supports_offset_writes
    assert store.get("a") is None
    assert store.get_range("a/b", 0, 5) is None
    assert store.get_range("a/b", 0, 0) is None
    store.delete("missing")  # no error
    store.put("a/b/c", b"hello")
    store.put("a/d", bytearray(b"x"))
    store.put("e", memoryview(b"..yy..")[2:-2])
    store.put("empty", b"")
    assert store.get("a/b/c") == b"hello"
    assert store.get("e") == b"yy"
    assert store.get("empty") == b""
    assert store.get_range("a/b/c", 1, 3) == b"ell"
    assert store.get_range("a/b/c", 3, 10) == b"lo"  # shorter where the object ends
    assert store.get_range("a/b/c", 5, 10) == b""  # starts at the end
    assert store.get_range("a/b/c", 100, 10) == b""  # starts past the end
    assert store.get_range("a/b/c", 2, 0) == b""
    assert store.get_range("empty", 0, 10) == b""
    store.put("a/d", b"new")
    assert store.get("a/d") == b"new"
    store.delete("a/d")
    assert store.get("a/d") is None
    store.delete("a/d")
    with pytest.raises(NotImplementedError):
        store.put_range("e", 0, b"z")
    store.sync()


def test_empty_objects_exist_and_read_empty(make_store: Callable[..., S3ObjectStore]) -> None:
    store = make_store()
    store.put("whiteout", b"")
    assert store.exists("whiteout")
    assert not store.exists("nothing")
    assert store.get("whiteout") == b""
    assert store.get_range("whiteout", 0, 4096) == b""
    assert store.get_range("nothing", 0, 4096) is None


def test_layered_volume_snapshot_whiteout_and_flatten(
    make_store: Callable[..., S3ObjectStore],
) -> None:
    """Copy-on-write layers (backend.storage.chunked) on S3: copy-up, whiteouts, flatten."""
    store = make_store()
    create_layer(store, "a/", 4 * CHUNK, CHUNK)
    vol = open_chain(store, ["a/"])
    vol.write(0, b"\xaa" * (3 * CHUNK))
    vol.snapshot("b/")
    vol.write(10, b"top")  # a partial write: copy-up of chunk 0
    vol.trim(CHUNK, CHUNK)  # a whiteout over chunk 1
    assert store.get("b/0000000000000001") == b""
    snapshot = open_chain(store, ["a/"], read_only=True)
    assert snapshot.read(0, 3 * CHUNK) == b"\xaa" * (3 * CHUNK)
    expected = bytearray(b"\xaa" * (3 * CHUNK))
    expected[10:13] = b"top"
    expected[CHUNK : 2 * CHUNK] = bytes(CHUNK)
    assert vol.read(0, 3 * CHUNK) == expected
    vol.flatten()
    remove_layer(store, "a/")
    assert vol.read(0, 3 * CHUNK) == expected
    for storage in (vol, snapshot):
        storage.close()


def test_large_object_round_trip(make_store: Callable[..., S3ObjectStore]) -> None:
    store = make_store()
    data = pattern(1, 5 * 1024 * KIB + 3)  # more than SeaweedFS's 4 MiB filer chunks
    store.put("big", data)
    assert store.get("big") == data
    assert store.get_range("big", 4 * 1024 * KIB - 7, 20) == data[4 * 1024 * KIB - 7 :][:20]


def test_list_strips_the_prefix_and_sorts(make_store: Callable[..., S3ObjectStore]) -> None:
    prefix = _prefix("list")
    store = make_store(prefix=prefix)
    neighbour = make_store(prefix=prefix[:-1] + "x/")  # shares the bucket, not the prefix
    keys = ["b", "a/2", "a/10", "a/1", "c.d", "a-b", "z/y/x"]
    for key in keys:
        store.put(key, key.encode())
    neighbour.put("a/1", b"other")
    assert store.keys() == sorted(keys)
    assert store.keys("a/") == ["a/1", "a/10", "a/2"]
    assert store.keys("a/1") == ["a/1", "a/10"]
    assert store.keys("nothing") == []
    assert neighbour.keys() == ["a/1"]
    store.delete("a/10")
    assert store.keys("a/") == ["a/1", "a/2"]


def test_list_paginates(s3: SeaweedS3, make_store: Callable[..., S3ObjectStore]) -> None:
    prefix = _prefix("pages")
    store = make_store(prefix=prefix, page_size=3)
    keys = [f"k{i:03d}" for i in range(11)]
    for key in keys:
        store.put(key, b"")
    assert store.keys() == keys
    assert store.keys("k00") == keys[:10]
    # The same keys, seen through the server's own listing: one page would not hold them.
    client = s3.client()
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix, MaxKeys=3)
    client.close()
    assert listed["IsTruncated"]
    assert len(listed["Contents"]) == 3


def test_list_skips_objects_that_are_not_keys(
    s3: SeaweedS3, make_store: Callable[..., S3ObjectStore]
) -> None:
    prefix = _prefix("foreign")
    store = make_store(prefix=prefix)
    store.put("good", b"1")
    client = s3.client()
    client.put_object(Bucket=BUCKET, Key=prefix + "bad key", Body=b"2")
    client.close()
    assert store.keys() == ["good"]


@pytest.mark.parametrize("key", ["", "../x", "a/../b", "a//b", "/abs", "a/", "sp ace", "a~b", "."])
def test_refuses_bad_keys(make_store: Callable[..., S3ObjectStore], key: str) -> None:
    store = make_store()
    calls: list[Callable[[], object]] = [
        lambda: store.put(key, b"x"),
        lambda: store.get(key),
        lambda: store.get_range(key, 0, 1),
        lambda: store.delete(key),
    ]
    for call in calls:
        with pytest.raises(StorageError) as excinfo:
            call()
        assert excinfo.value.errno == errno.EINVAL
    with pytest.raises(StorageError) as excinfo:
        store.keys("sp ace")
    assert excinfo.value.errno == errno.EINVAL


def test_close_is_idempotent_then_ebadf(make_store: Callable[..., S3ObjectStore]) -> None:
    store = make_store()
    store.put("k", b"v")
    store.close()
    store.close()
    calls: list[Callable[[], object]] = [
        lambda: store.get("k"),
        lambda: store.get_range("k", 0, 1),
        lambda: store.put("k", b"w"),
        lambda: store.delete("k"),
        store.keys,
        store.sync,
    ]
    for call in calls:
        with pytest.raises(StorageError) as excinfo:
            call()
        assert excinfo.value.errno == errno.EBADF


def test_concurrent_puts_are_atomic(make_store: Callable[..., S3ObjectStore]) -> None:
    """Readers racing writers of whole objects only ever see one writer's whole object."""
    store = make_store(max_connections=8)
    size = 256 * KIB
    versions = [bytes([n]) * size for n in range(1, 5)]
    store.put("k", versions[0])
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: set[bytes] = set()

    def write(n: int) -> None:
        try:
            while not stop.is_set():
                store.put("k", versions[n])
        except BaseException as err:
            errors.append(err)

    def read() -> None:
        try:
            while not stop.is_set():
                data = store.get("k")
                assert data in versions, "a torn or mixed object was read"
                seen.add(data[:1])
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    threads += [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    stop.set()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(seen) > 1, "the readers saw a single version: the test raced nothing"


def test_create_bucket(s3: SeaweedS3) -> None:
    name = "nbs-created"
    store = s3.store(name, create_bucket=True)
    store.put("k", b"v")
    again = s3.store(name, create_bucket=True)  # an existing bucket is fine
    assert again.get("k") == b"v"
    store.close()
    again.close()


# -- Refusals reach the caller with their errno ------------------------------------------------


def test_wrong_secret_is_eacces(s3: SeaweedS3) -> None:
    store = s3.store(BUCKET, secret_key="not-the-secret", attempts=5)
    storage = ChunkedStorage(store, 4 * CHUNK, chunk_size=CHUNK)
    for call in (lambda: storage.read(0, 10), lambda: storage.write(0, b"x")):
        with pytest.raises(StorageError) as excinfo:
            call()
        assert excinfo.value.errno == errno.EACCES
        assert "SignatureDoesNotMatch" in excinfo.value.message
        assert BUCKET in excinfo.value.message
    storage.close()


def test_unknown_access_key_is_eacces(s3: SeaweedS3) -> None:
    store = s3.store(BUCKET, access_key="nobody", secret_key="x")
    with pytest.raises(StorageError) as excinfo:
        store.get("k")
    assert excinfo.value.errno == errno.EACCES
    assert "InvalidAccessKeyId" in excinfo.value.message
    store.close()


def test_missing_bucket_is_enoent(s3: SeaweedS3) -> None:
    store = s3.store("nbs-no-such-bucket", prefix="p/")
    calls: list[Callable[[], object]] = [
        lambda: store.get("k"),
        lambda: store.put("k", b"v"),
        store.keys,
    ]
    for call in calls:
        with pytest.raises(StorageError) as excinfo:
            call()
        assert excinfo.value.errno == errno.ENOENT
        assert "'nbs-no-such-bucket' does not exist" in excinfo.value.message
        assert "NoSuchBucket" in excinfo.value.message
    store.close()
    assert "nbs-no-such-bucket" not in _buckets(s3)


# -- Retries and errnos, against a scripted server ---------------------------------------------


class _ScriptedS3(http.server.BaseHTTPRequestHandler):
    """Answers every request with the server's ``status`` and S3 error ``code``."""

    server: _ScriptedServer
    # HTTP/1.1, so that a PUT's "Expect: 100-continue" is answered at once, not waited on.
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        self.server.requests += 1
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = (
            f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{self.server.code}</Code>"
            f"<Message>scripted</Message></Error>"
        ).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


for _verb in ("GET", "PUT", "DELETE", "HEAD"):
    setattr(_ScriptedS3, f"do_{_verb}", _ScriptedS3._answer)


class _ScriptedServer(http.server.ThreadingHTTPServer):
    status = 500
    code = "InternalError"
    requests = 0


@pytest.fixture
def scripted() -> Iterator[_ScriptedServer]:
    """An HTTP server on 127.0.0.1 (its thread owned here) that fails every request."""
    server = _ScriptedServer(("127.0.0.1", 0), _ScriptedS3)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,))
    thread.start()
    yield server
    server.shutdown()
    thread.join()
    server.server_close()


def _store_at(port: int, **options: Any) -> S3ObjectStore:
    """A store on the server at 127.0.0.1:``port``, with made-up credentials and quick
    retries (``options`` override them)."""
    options = {"attempts": 3, "backoff": 0.01, "max_backoff": 0.05, **options}
    return S3ObjectStore(
        "bucket",
        prefix="p/",
        endpoint=f"http://127.0.0.1:{port}",
        region="us-east-1",
        access_key="a",
        secret_key="s",
        **options,
    )


@pytest.mark.parametrize(
    ("status", "code", "expected", "tries"),
    [
        (500, "InternalError", errno.EIO, 3),
        (503, "SlowDown", errno.EIO, 3),
        (503, "ServiceUnavailable", errno.EIO, 3),
        (429, "TooManyRequests", errno.EIO, 3),
        (507, "InsufficientStorage", errno.ENOSPC, 1),
        (400, "EntityTooLarge", errno.ENOSPC, 1),
        (403, "QuotaExceeded", errno.ENOSPC, 1),
        (403, "AccessDenied", errno.EACCES, 1),
        (404, "NoSuchBucket", errno.ENOENT, 1),
        (400, "InvalidArgument", errno.EINVAL, 1),
        (409, "OperationAborted", errno.EPROTO, 1),
    ],
)
def test_s3_errors_map_to_errnos(
    scripted: _ScriptedServer, status: int, code: str, expected: int, tries: int
) -> None:
    scripted.status, scripted.code = status, code
    store = _store_at(scripted.server_address[1])
    with pytest.raises(StorageError) as excinfo:
        store.put("vol/0001", b"data")
    assert excinfo.value.errno == expected
    assert scripted.requests == tries  # transient ones retried `attempts` times, no more
    message = excinfo.value.message
    assert "bucket" in message
    assert "p/vol/0001" in message
    assert code in message
    store.close()


def test_missing_key_is_not_an_error_even_from_head(scripted: _ScriptedServer) -> None:
    scripted.status, scripted.code = 404, "NoSuchKey"
    store = _store_at(scripted.server_address[1])
    assert store.get("k") is None
    assert store.get_range("k", 0, 10) is None
    assert store.get_range("k", 0, 0) is None  # a HEAD: no error document, just 404
    store.delete("k")
    assert scripted.requests == 4
    store.close()


def test_retries_stop_at_the_deadline(scripted: _ScriptedServer) -> None:
    store = _store_at(
        scripted.server_address[1], attempts=10_000, deadline=1.0, backoff=0.05, max_backoff=0.2
    )
    started = time.monotonic()
    with pytest.raises(StorageError) as excinfo:
        store.get("k")
    assert time.monotonic() - started < 1.0 + 30  # the deadline, and slack for a busy box
    assert excinfo.value.errno == errno.EIO
    assert "gave up after" in excinfo.value.message
    assert 2 <= scripted.requests < 10_000
    store.close()


def test_nothing_listening_is_econnreset() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = _store_at(port, attempts=2)
    with pytest.raises(StorageError) as excinfo:
        store.get("k")
    assert excinfo.value.errno == errno.ECONNRESET
    assert "gave up after 2 attempts" in excinfo.value.message
    store.close()


def test_a_server_that_never_answers_is_etimedout() -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        store = _store_at(silent.getsockname()[1], attempts=2, read_timeout=0.5)
        with pytest.raises(StorageError) as excinfo:
            store.get("k")
        store.close()
    assert excinfo.value.errno == errno.ETIMEDOUT
    assert "gave up after 2 attempts" in excinfo.value.message


# -- Real faults: the server killed with SIGKILL -----------------------------------------------


@pytest.fixture
def restarts(s3: SeaweedS3) -> Iterator[SeaweedS3]:
    """The server, started again at teardown if a test left it down."""
    yield s3
    if not s3.alive():
        s3.start()


def test_writer_survives_a_restart_within_the_deadline(
    restarts: SeaweedS3, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="backend.storage.objects.s3")
    server = restarts
    store = server.store(
        BUCKET,
        prefix=_prefix("restart"),
        attempts=1000,
        deadline=120,
        backoff=0.1,
        max_backoff=1.0,
        connect_timeout=2,
        read_timeout=20,
    )
    size = 8 * CHUNK
    storage = ChunkedStorage(store, size, chunk_size=CHUNK, workers=4)
    model = bytearray(size)
    done = 0
    progress = threading.Condition()
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        nonlocal done
        try:
            for n in itertools.count():
                if stop.is_set():
                    return
                # 3 KiB + change, straddling a chunk boundary every other time: two
                # read-modify-writes in parallel.
                offset = (n * 37 * KIB + 1000) % (size - 4 * KIB)
                data = pattern(n, 3 * KIB + 7)
                storage.write(offset, data)
                model[offset : offset + len(data)] = data
                with progress:
                    done += 1
                    progress.notify_all()
        except BaseException as err:
            errors.append(err)
            with progress:
                progress.notify_all()

    def wait_for(count: int) -> None:
        with progress:
            assert progress.wait_for(lambda: done >= count or errors, 120), "writer stuck"
        assert not errors, errors

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_for(5)
        server.stop()
        time.sleep(1)  # writes now fail: connection refused, retried
        server.start()
        wait_for(done + 5)
    finally:
        stop.set()
        thread.join(150)
    assert not thread.is_alive()
    assert not errors, errors
    retried = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert retried, "no request was retried: the outage was not seen by the writer"
    assert storage.read(0, size) == model
    storage.close()
    fresh = ChunkedStorage(server.store(BUCKET, prefix=store.prefix), size, chunk_size=CHUNK)
    assert fresh.read(0, size) == model
    fresh.close()


def test_outage_past_the_deadline_fails_then_flushed_data_survives(restarts: SeaweedS3) -> None:
    server = restarts
    deadline, connect_timeout, read_timeout = 6.0, 2.0, 5.0
    prefix = _prefix("outage")
    store = server.store(
        BUCKET,
        prefix=prefix,
        attempts=1000,
        deadline=deadline,
        backoff=0.1,
        max_backoff=1.0,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    size = 6 * CHUNK
    storage = ChunkedStorage(store, size, chunk_size=CHUNK, workers=4)
    before = pattern(1, size - 1000)
    storage.write(500, before)
    storage.flush()
    server.stop()

    outcomes: dict[str, BaseException | None] = {}

    def attempt(name: str, call: Callable[[], object]) -> None:
        try:
            call()
            outcomes[name] = None
        except BaseException as err:
            outcomes[name] = err

    calls: dict[str, Callable[[], object]] = {
        "partial write": lambda: storage.write(CHUNK - 10, b"y" * 20),
        "whole write": lambda: storage.write(2 * CHUNK, bytes(CHUNK)),
        "read": lambda: storage.read(0, size),
        "flush": storage.flush,
    }
    # The bound: the deadline, one attempt's timeouts past it, and slack for a loaded box.
    bound = deadline + connect_timeout + read_timeout + 30
    started = time.monotonic()
    threads = [threading.Thread(target=attempt, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(bound)
    elapsed = time.monotonic() - started
    assert not any(thread.is_alive() for thread in threads), f"still retrying after {bound} s"
    assert elapsed < bound
    # A flush has nothing to send to S3: it succeeds; everything else fails, transiently.
    assert outcomes.pop("flush") is None
    for name, outcome in outcomes.items():
        assert isinstance(outcome, StorageError), f"{name}: {outcome!r}"
        assert outcome.errno in TRANSIENT, f"{name}: {outcome}"
        assert BUCKET in outcome.message
        assert "gave up after" in outcome.message
    storage.close()

    server.start()
    fresh = ChunkedStorage(server.store(BUCKET, prefix=prefix), size, chunk_size=CHUNK)
    assert fresh.read(500, len(before)) == before
    assert fresh.read(0, 500) == bytes(500)
    fresh.close()
