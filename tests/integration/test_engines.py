"""Volumes on every storage engine, end to end through ``nbs serve``, with clients nobody here
wrote: a 1 GiB image copied in with ``qemu-img convert`` compares equal (``qemu-img
compare``) on chunks in a directory, on S3 (SeaweedFS), on RADOS and as an RBD image (a real
single-node Ceph); snapshots and clones on each; deleting everything leaves nothing behind.
Then faults through NBD: a dead S3 server or OSD reaches the client as EIO while other volumes
keep being served, a short outage is retried away, and flushed data survives; two servers on
one Ceph cluster share an RBD image read-only but only one holds it writable."""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.cephrig import CephCluster
from tests.integration.conftest import NbsServer, require_tool
from tests.integration.helpers import nbs
from tests.integration.s3rig import SeaweedS3

pytestmark = pytest.mark.integration

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture(scope="module")
def image_1g(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1 GiB raw image: 160 MiB of random data in runs of 1-8 MiB at random offsets (some
    unaligned, so chunks are partly written), small scattered writes, holes elsewhere."""
    path = tmp_path_factory.mktemp("image") / "disk.raw"
    rng = random.Random(20261122)
    with path.open("wb") as f:
        f.truncate(GiB)
        written = 0
        while written < 160 * MiB:
            length = rng.randint(1, 8) * MiB - rng.choice([0, 4096, 12345])
            offset = rng.randrange(0, GiB - length)
            f.seek(offset)
            f.write(rng.randbytes(length))
            written += length
        for _ in range(200):
            f.seek(rng.randrange(0, GiB - 512))
            f.write(rng.randbytes(rng.randint(1, 512)))
    return path


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [require_tool("qemu-img"), *args], check=False, capture_output=True, text=True, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stderr + result.stdout
    return result


def qemu_io(uri: str, *commands: str, read_only: bool = False) -> subprocess.CompletedProcess[str]:
    argv = [require_tool("qemu-io"), "-f", "raw", *(["-r"] if read_only else [])]
    for command in commands:
        argv += ["-c", command]
    return subprocess.run([*argv, uri], check=False, capture_output=True, text=True, timeout=300)


def io_ok(uri: str, *commands: str, read_only: bool = False) -> None:
    result = qemu_io(uri, *commands, read_only=read_only)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "failed" not in result.stdout, result.stdout


class Engine:
    """A storage under test: its spec for ``--storage`` and a look at what it holds."""

    def __init__(self, name: str, spec: str, held: Callable[[], list[str]]) -> None:
        self.name = name
        self.spec = spec
        self.held = held


def _dir_engine(tmp_path: Path) -> Engine:
    root = tmp_path / "objects"

    def held() -> list[str]:
        return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.exists() else []

    return Engine("dir", f"dir:path={root},chunk_size=1MiB,create=true", held)


def _s3_engine(s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> Engine:
    bucket = f"nbs-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)

    def held() -> list[str]:
        client = s3.client()
        try:
            answer = client.list_objects_v2(Bucket=bucket)
            return sorted(o["Key"] for o in answer.get("Contents", []))
        finally:
            client.close()

    spec = f"s3:bucket={bucket},endpoint={s3.endpoint},region={s3.region}"
    return Engine("s3", spec, held)


def _rados_engine(ceph: CephCluster) -> Engine:
    namespace = uuid.uuid4().hex[:12]

    def held() -> list[str]:
        result = subprocess.run(
            ["rados", "-c", str(ceph.conf_path), "-p", "nbs", "-N", namespace, "ls"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return sorted(result.stdout.split())

    spec = f"rados:pool=nbs,namespace={namespace},conf={ceph.conf_path},timeout=10"
    return Engine("rados", spec, held)


def _rbd_engine(ceph: CephCluster) -> Engine:
    before = set(ceph.rbd("ls", "rbd").split())

    def held() -> list[str]:
        return sorted(set(ceph.rbd("ls", "rbd").split()) - before)

    return Engine("rbd", f"rbd:pool=rbd,conf={ceph.conf_path},timeout=10", held)


@pytest.fixture(params=["dir", "s3", "rados", "rbd"])
def engine(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Engine:
    if request.param == "dir":
        return _dir_engine(tmp_path)
    if request.param == "s3":
        return _s3_engine(request.getfixturevalue("s3_server"), monkeypatch)
    ceph = request.getfixturevalue("ceph_cluster")
    return _rados_engine(ceph) if request.param == "rados" else _rbd_engine(ceph)


def _serve(nbs_server: Callable[..., NbsServer], data: Path) -> NbsServer:
    return nbs_server("--data-dir", str(data), "--listen", "127.0.0.1:0")


def test_1g_image_round_trip_snapshot_clone_and_cleanup(
    engine: Engine, image_1g: Path, tmp_path: Path, nbs_server: Callable[..., NbsServer]
) -> None:
    data = tmp_path / "data"
    d = ["--data-dir", str(data)]
    nbs("volume", "create", "v", "--size", "1GiB", "--storage", engine.spec, *d)
    info = json.loads(nbs("volume", "info", "v", "--json", *d).stdout)
    assert info["storage"].split(":")[0] == engine.name
    server = _serve(nbs_server, data)
    uri = server.uri("v")
    started = time.monotonic()
    qemu_img("convert", "-n", "--target-is-zero", "-f", "raw", "-O", "raw", str(image_1g), uri)
    copy_seconds = time.monotonic() - started
    qemu_img("compare", "-f", "raw", "-F", "raw", str(image_1g), uri)
    print(f"{engine.name}: 1 GiB image (160 MiB data) copied in {copy_seconds:.1f} s")

    # A snapshot taken while served, a later write, and a clone of the snapshot.
    nbs("snapshot", "create", "v", "s1", *d)
    io_ok(uri, "write -P 0x55 0 3M", "flush")
    nbs("volume", "clone", "v@s1", "c", *d)
    qemu_img("compare", "-f", "raw", "-F", "raw", str(image_1g), server.uri("c"))
    io_ok(uri, "read -P 0x55 0 3M")
    io_ok(server.uri("c"), "write -P 0x66 1M 1M", "read -P 0x66 1M 1M")
    io_ok(uri, "read -P 0x55 1M 1M")
    clone = json.loads(nbs("volume", "info", "c", "--json", *d).stdout)
    assert (clone["origin"], clone["storage"]) == ("v@s1", info["storage"])
    assert engine.held(), "the engine holds the volumes' data"

    # Deleting everything (the clone is flattened away by deleting it first) leaves nothing.
    nbs("volume", "delete", "c", "--force", *d)
    nbs("snapshot", "delete", "v@s1", *d)
    nbs("volume", "delete", "v", "--force", *d)
    assert server.alive()
    assert engine.held() == []


# --- Faults through NBD -------------------------------------------------------------------------


def _failed(result: subprocess.CompletedProcess[str]) -> str:
    """The error qemu-io reported for a failed request ("" when none failed)."""
    out = result.stdout + result.stderr
    return out if "failed" in out or result.returncode != 0 else ""


@pytest.fixture
def s3_down_then_up(s3_server: SeaweedS3) -> Iterator[SeaweedS3]:
    """The S3 server, restarted after the test if the test left it down."""
    yield s3_server
    if not s3_server.alive():
        s3_server.start()


def test_s3_outage_is_eio_for_its_volume_only_and_flushed_data_survives(
    s3_down_then_up: SeaweedS3,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    nbs_server: Callable[..., NbsServer],
) -> None:
    s3 = s3_down_then_up
    engine = _s3_engine(s3, monkeypatch)
    data = tmp_path / "data"
    d = ["--data-dir", str(data)]
    spec = f"{engine.spec},attempts=2,timeout=3+retry:attempts=3,deadline=6"
    nbs("volume", "create", "cold", "--size", "64MiB", "--storage", spec, *d)
    nbs("volume", "create", "local", "--size", "64MiB", *d)
    server = _serve(nbs_server, data)
    io_ok(server.uri("cold"), "write -P 0xaa 0 4M", "flush")

    s3.stop()
    started = time.monotonic()
    error = _failed(qemu_io(server.uri("cold"), "read 0 1M"))
    assert "Input/output error" in error, error
    assert time.monotonic() - started < 60
    error = _failed(qemu_io(server.uri("cold"), "write -P 0xbb 8M 1M"))
    assert "Input/output error" in error, error
    # The server and its other volumes carry on.
    io_ok(server.uri("local"), "write -P 0x11 0 1M", "flush", "read -P 0x11 0 1M")
    assert server.alive()

    s3.start()
    io_ok(server.uri("cold"), "read -P 0xaa 0 4M")


def test_short_s3_outage_is_retried_away(
    s3_down_then_up: SeaweedS3,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    nbs_server: Callable[..., NbsServer],
) -> None:
    s3 = s3_down_then_up
    engine = _s3_engine(s3, monkeypatch)
    data = tmp_path / "data"
    spec = f"{engine.spec},attempts=2,timeout=3+retry:attempts=100,deadline=120"
    nbs("volume", "create", "v", "--size", "64MiB", "--storage", spec, "--data-dir", str(data))
    server = _serve(nbs_server, data)
    io_ok(server.uri("v"), "write -P 0xaa 0 4M", "flush")

    s3.stop()
    restart = threading.Timer(2.0, s3.start)
    restart.start()
    try:
        io_ok(server.uri("v"), "write -P 0xcc 1M 2M", "flush", "read -P 0xcc 1M 2M")
    finally:
        restart.join()
    io_ok(server.uri("v"), "read -P 0xaa 0 1M", "read -P 0xaa 3M 1M")
    assert "retry" in server.log().lower()


@pytest.fixture
def osd_down_then_up(ceph_cluster: CephCluster) -> Iterator[CephCluster]:
    """The Ceph cluster, its OSD restarted after the test if the test left it down."""
    yield ceph_cluster
    if ceph_cluster.pid("osd") is None:
        ceph_cluster.start_osd()


@pytest.mark.parametrize("kind", ["rados", "rbd"])
def test_osd_outage_is_eio_and_flushed_data_survives(
    kind: str,
    osd_down_then_up: CephCluster,
    tmp_path: Path,
    nbs_server: Callable[..., NbsServer],
) -> None:
    ceph = osd_down_then_up
    engine = _rados_engine(ceph) if kind == "rados" else _rbd_engine(ceph)
    data = tmp_path / "data"
    d = ["--data-dir", str(data)]
    spec = engine.spec.replace("timeout=10", "timeout=5")
    nbs("volume", "create", "v", "--size", "1GiB", "--storage", spec, *d)
    nbs("volume", "create", "local", "--size", "64MiB", *d)
    server = _serve(nbs_server, data)
    io_ok(server.uri("v"), "write -P 0xaa 0 4M", "flush")

    ceph.kill_osd()
    # A write that must reach the OSD (a flush too: librbd may cache the write itself).
    error = _failed(qemu_io(server.uri("v"), "write -P 0xbb 256M 64k", "flush"))
    assert "Input/output error" in error, error
    io_ok(server.uri("local"), "write -P 0x11 0 1M", "flush", "read -P 0x11 0 1M")
    assert server.alive()

    ceph.start_osd()
    io_ok(server.uri("v"), "read -P 0xaa 0 4M", "read -P 0 512M 64k")
    nbs("volume", "delete", "v", "--force", *d)


def test_two_servers_share_an_rbd_image_read_only_but_one_writer(
    ceph_cluster: CephCluster, tmp_path: Path, nbs_server: Callable[..., NbsServer]
) -> None:
    ceph = ceph_cluster
    image = f"shared-{uuid.uuid4().hex[:8]}"
    ceph.rbd("create", "--size", "64M", f"rbd/{image}")
    spec = f"rbd:pool=rbd,image={image},conf={ceph.conf_path}"
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    nbs("volume", "create", "shared", "--storage", spec, "--data-dir", str(a))
    nbs("volume", "create", "shared", "--storage", spec, "--data-dir", str(b))
    nbs("volume", "create", "view", "--read-only", "--storage", spec, "--data-dir", str(c))
    info = json.loads(nbs("volume", "info", "shared", "--json", "--data-dir", str(b)).stdout)
    assert info["size"] == 64 * MiB
    first, second, viewer = (_serve(nbs_server, d) for d in (a, b, c))

    io_ok(first.uri("shared"), "write -P 0x77 0 1M", "flush")
    # The second server cannot take it writable while the first holds it: a clear error
    # (libnbd 1.14 shows only the code; QEMU prints the server's message).
    refused = subprocess.run(
        [require_tool("nbdinfo"), second.uri("shared")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0
    refused = qemu_io(second.uri("shared"), "read 0 4k")
    assert refused.returncode != 0
    assert "held writable by" in refused.stderr, refused.stderr
    # Read-only, any number of servers can serve it.
    io_ok(viewer.uri("view"), "read -P 0x77 0 1M", read_only=True)
    io_ok(first.uri("shared"), "read -P 0x77 0 1M")

    assert first.stop() == 0  # releases the image
    io_ok(second.uri("shared"), "write -P 0x78 0 1M", "flush", "read -P 0x78 0 1M")
    second.stop()
    # Adopted images are the operator's: deleting the volumes keeps the image.
    nbs("volume", "delete", "shared", "--data-dir", str(a))
    nbs("volume", "delete", "shared", "--data-dir", str(b))
    viewer.stop()
    nbs("volume", "delete", "view", "--data-dir", str(c))
    assert image in ceph.rbd("ls", "rbd").split()
    ceph.rbd("rm", f"rbd/{image}")


def test_full_rados_pool_is_enospc_through_nbd(
    ceph_cluster: CephCluster, tmp_path: Path, nbs_server: Callable[..., NbsServer]
) -> None:
    """A pool over its quota: writes fail with ENOSPC (not EIO, not a hang), other volumes
    carry on, and what was written before reads back."""
    ceph = ceph_cluster
    pool = f"full-{uuid.uuid4().hex[:8]}"
    ceph.ceph("osd", "pool", "create", pool, "8", "8")
    ceph.ceph("osd", "pool", "application", "enable", pool, "nbs")
    ceph.ceph("osd", "pool", "set-quota", pool, "max_bytes", str(2 * MiB))
    try:
        data = tmp_path / "data"
        d = ["--data-dir", str(data)]
        spec = f"rados:pool={pool},conf={ceph.conf_path},chunk_size=256KiB"
        nbs("volume", "create", "v", "--size", "64MiB", "--storage", spec, *d)
        nbs("volume", "create", "local", "--size", "64MiB", *d)
        server = _serve(nbs_server, data)
        io_ok(server.uri("v"), "write -P 0xaa 0 256k", "flush")
        deadline = time.monotonic() + 90
        offset, error = 256 * 1024, ""
        while not error and time.monotonic() < deadline:
            result = qemu_io(server.uri("v"), f"write -P 0xbb {offset} 256k", "flush")
            error = _failed(result)
            offset += 256 * 1024
            time.sleep(0.2)
        assert "No space left on device" in error, error or "the quota never applied"
        io_ok(server.uri("local"), "write -P 0x11 0 1M", "flush", "read -P 0x11 0 1M")
        io_ok(server.uri("v"), "read -P 0xaa 0 256k")
        assert server.alive()
    finally:
        ceph.ceph("osd", "pool", "delete", pool, pool, "--yes-i-really-really-mean-it")
