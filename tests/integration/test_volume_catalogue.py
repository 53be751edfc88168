"""The volume catalogue from the command line, as users run it: several `nbs volume` commands
at once on one data directory, storage specs with bad numbers or relative paths, and failed
creates and leftovers on a real S3 server (SeaweedFS, tests/integration/s3rig.py) and a real
Ceph cluster (tests/integration/cephrig.py).

An import is slowed down legitimately: its source is an nbdkit ``pattern`` disk behind the
``rate`` filter (every 8 bytes hold their own offset, so the copy is checked word by word).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

from tests.integration.cephrig import CephCluster
from tests.integration.conftest import NBS, NbsServer, require_tool
from tests.integration.s3rig import SeaweedS3

pytestmark = pytest.mark.integration

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 32 * MiB
RATE = "16M"  # bits (!) per second out of nbdkit, 2 MB/s: the copy takes ~17 s
# Commands run from other directories too: they import the code under test from PYTHONPATH.
ENV = {"PYTHONPATH": str(ROOT), **os.environ}


def nbs(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NBS, *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        env={**ENV, **(env or {})},
        check=False,
    )


def assert_one_line_usage_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nbs: error: "), lines
    assert len(lines[0]) < 400, lines[0]
    for needle in needles:
        assert needle in lines[0]


def query(data_dir: Path, sql: str) -> list[tuple[str, ...]]:
    """Rows of ``sql`` on the catalogue, read straight from its file."""
    db = sqlite3.connect(f"file:{data_dir / 'catalogue.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def rows(data_dir: Path) -> dict[str, str]:
    """name → state of every volume row."""
    return dict(cast(list[tuple[str, str]], query(data_dir, "SELECT name, state FROM volumes")))


def layers(data_dir: Path) -> list[str]:
    return [row[0] for row in query(data_dir, "SELECT id FROM layers")]


def create_on(
    data_dir: Path, spec: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """`nbs volume create v --size 4MiB --storage SPEC`."""
    return nbs(
        "volume", "create", "v", "--size", "4MiB", "--storage", spec, "--data-dir", str(data_dir),
        env=env, cwd=cwd,
    )  # fmt: skip


def storage_of(data_dir: Path, name: str = "v") -> str:
    info = nbs("volume", "info", name, "--json", "--data-dir", str(data_dir))
    return str(json.loads(info.stdout)["storage"])


def wait_for_row(data_dir: Path, name: str, state: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(sqlite3.OperationalError):  # made, but no tables yet
            if (data_dir / "catalogue.sqlite3").exists() and rows(data_dir).get(name) == state:
                return
        time.sleep(0.1)
    raise AssertionError(f"volume {name} never became {state}")


@pytest.fixture
def slow_image(tmp_path: Path) -> Iterator[str]:
    """An NBD URI of a 32 MiB pattern disk served at 2 MB/s by nbdkit (stopped by PID)."""
    nbdkit = require_tool("nbdkit")
    sock = tmp_path / "slow.sock"
    process = subprocess.Popen(
        [
            nbdkit,
            "-f",
            "-U",
            str(sock),
            "--filter=rate",
            "pattern",
            f"size={IMAGE_SIZE}",
            f"rate={RATE}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert process.poll() is None, "nbdkit exited"
        assert time.monotonic() < deadline, "nbdkit did not start"
        time.sleep(0.05)
    yield f"nbd+unix:///?socket={sock}"
    process.terminate()
    process.wait(timeout=20)


def start_import(data_dir: Path, name: str, source: str, log: Path) -> subprocess.Popen[bytes]:
    """`nbs volume create NAME --from-image SOURCE` in a session of its own (so that kill -9
    of its group ends its qemu-img too)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                *NBS,
                "volume",
                "create",
                name,
                "--size",
                "64MiB",
                "--from-image",
                source,
                "--data-dir",
                str(data_dir),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=ENV,
            start_new_session=True,
        )


def check_pattern(path: Path, length: int) -> None:
    """Every 8-byte word of ``path`` up to ``length`` holds its offset (nbdkit-pattern)."""
    with path.open("rb") as f:
        for offset in range(0, length, 997 * 4096):
            f.seek(offset)
            assert struct.unpack(">Q", f.read(8))[0] == offset
    assert path.stat().st_size == 64 * MiB


# --- item 1: a running import is never collected ---------------------------------------------


def test_a_running_import_survives_other_commands(tmp_path: Path, slow_image: str) -> None:
    data = tmp_path / "data"
    importer = start_import(data, "big", slow_image, tmp_path / "import.log")
    try:
        wait_for_row(data, "big", "creating")
        # Every other local command while the copy runs: readers, gc, and other changes.
        for args in (
            ["volume", "list"],
            ["volume", "info", "big"],
            ["volume", "gc"],
            ["volume", "create", "other", "--size", "1MiB"],
            ["snapshot", "list"],
        ):
            result = nbs(*args, "--data-dir", str(data))
            assert "big" not in result.stdout + result.stderr or args[1] == "info", (args, result)
            assert "crash" not in result.stderr, (args, result.stderr)
        assert rows(data)["big"] == "creating", "still being copied: the test proves nothing"
        assert importer.wait(timeout=120) == 0, (tmp_path / "import.log").read_text()
    finally:
        if importer.poll() is None:
            os.killpg(importer.pid, signal.SIGKILL)
            importer.wait()
    assert rows(data) == {"big": "ready", "other": "ready"}
    assert list((data / "creating").iterdir()) == []
    exported = tmp_path / "big.raw"
    assert nbs("volume", "export", "big", str(exported), "--data-dir", str(data)).returncode == 0
    check_pattern(exported, IMAGE_SIZE)


def test_an_import_whose_process_was_killed_is_collected(tmp_path: Path, slow_image: str) -> None:
    data = tmp_path / "data"
    importer = start_import(data, "big", slow_image, tmp_path / "import.log")
    try:
        wait_for_row(data, "big", "creating")
    finally:
        os.killpg(importer.pid, signal.SIGKILL)  # the importer and its qemu-img
        importer.wait()
    listed = nbs("volume", "list", "--data-dir", str(data))
    assert listed.stdout.strip() == "no volumes"
    assert rows(data) == {"big": "creating"}  # reading collects nothing
    result = nbs("volume", "gc", "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    assert "removed volume big" in result.stdout
    assert rows(data) == {}
    assert list((data / "creating").iterdir()) == []
    assert list((data / "layers").iterdir()) == []
    # The name is free again.
    again = nbs("volume", "create", "big", "--size", "1MiB", "--data-dir", str(data))
    assert again.returncode == 0, again.stderr


def test_reading_commands_create_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-data-dir"
    for args in (["volume", "list"], ["snapshot", "list"], ["volume", "list", "--json"]):
        result = nbs(*args, "--data-dir", str(missing))
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
    assert nbs("volume", "info", "v", "--data-dir", str(missing)).returncode == 1
    assert not missing.exists()
    shared = tmp_path / "shared"
    shared.mkdir()
    assert nbs("volume", "create", "v", "--size", "1MiB", "--data-dir", str(shared)).returncode == 0
    shared.chmod(0o750)  # an operator's choice that reading must not undo
    before = sorted(p.name for p in shared.iterdir())
    assert nbs("volume", "list", "--data-dir", str(shared)).returncode == 0
    assert nbs("volume", "info", "v", "--data-dir", str(shared)).returncode == 0
    assert shared.stat().st_mode & 0o777 == 0o750
    assert sorted(p.name for p in shared.iterdir()) == before


# --- item 6: dir paths are absolute and must exist --------------------------------------------


def test_a_relative_dir_path_is_stored_absolute_and_served_from_anywhere(
    tmp_path: Path, nbs_server: Callable[..., NbsServer]
) -> None:
    qemu_io = require_tool("qemu-io")
    data, home = tmp_path / "data", tmp_path / "home"
    (home / "chunks").mkdir(parents=True)
    created = create_on(data, "dir:path=chunks,chunk_size=64KiB", cwd=home)
    assert created.returncode == 0, created.stderr
    assert storage_of(data) == f"dir:chunk_size=65536,path={home / 'chunks'}"
    # The server runs elsewhere (start_server's cwd is the repository root).
    assert not (ROOT / "chunks").exists()
    server = nbs_server("--listen", "127.0.0.1:0", "--data-dir", str(data))
    write = subprocess.run(
        [qemu_io, "-f", "raw", "-c", "write -P 0x5a 0 64k", "-c", "flush", server.uri("v")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert write.returncode == 0, write.stderr
    server.stop()
    assert not (ROOT / "chunks").exists()
    chunk_files = [p for p in (home / "chunks").rglob("*") if p.is_file()]
    assert any(p.read_bytes()[:4] == b"\x5a" * 4 for p in chunk_files)


def test_a_missing_dir_path_is_refused_unless_create_is_asked(tmp_path: Path) -> None:
    data, where = tmp_path / "data", tmp_path / "new" / "chunks"
    refused = create_on(data, f"dir:path={where}")
    assert_one_line_usage_error(refused, "does not exist", "create=true")
    assert not where.exists()
    assert not (data / "catalogue.sqlite3").exists()
    created = create_on(data, f"dir:path={where},create=true")
    assert created.returncode == 0, created.stderr
    assert where.is_dir()
    assert storage_of(data) == f"dir:path={where}"


def test_a_server_whose_default_storage_dir_is_missing_says_so(tmp_path: Path) -> None:
    config = tmp_path / "nbs.yaml"
    config.write_text(
        f"default_storage: dir:path={tmp_path / 'nope'}\n"
        f"listen: ['127.0.0.1:0']\ndata_dir: {tmp_path / 'data'}\n"
    )
    result = nbs("serve", "--config", str(config))
    assert_one_line_usage_error(result, "does not exist", "create=true")
    assert not (tmp_path / "nope").exists()


# --- items 15 and 16: every number is bounded, one line, exit 2, locally and over the API ----

BAD_CREATES = [
    pytest.param(
        ["--size", "1GiB", "--storage", "file:chunk_size=32MiB"],
        "from 512B to 16MiB",
        id="file-chunk-32MiB",
    ),
    pytest.param(["--size", "1" * 5000], "invalid size", id="size-5000-digits"),
    pytest.param(["--size", "2EiB"], "larger than the limit", id="size-2EiB"),
    pytest.param(
        ["--size", "1GiB", "--storage", "file+retry:deadline=nan"],
        "must be seconds",
        id="deadline-nan",
    ),
    pytest.param(
        ["--size", "1GiB", "--storage", "file+retry:attempts=100000000000000000000000"],
        "from 1 to 1000",
        id="attempts-1e23",
    ),
    pytest.param(
        ["--size", "1GiB", "--storage", "file+retry:attempts=10^23"],
        "from 1 to 1000",
        id="attempts-10^23",
    ),
    pytest.param(
        ["--size", "1GiB", "--storage", "file+cache:size=" + "9" * 5000],
        "invalid size",
        id="cache-5000-digits",
    ),
    pytest.param(
        ["--size", "1GiB", "--storage", "s3:bucket=b,timeout=inf"],
        "must be seconds",
        id="timeout-inf",
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD_CREATES)
def test_bad_numbers_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    data = tmp_path / "data"
    result = nbs("volume", "create", "a", *args, "--data-dir", str(data))
    assert_one_line_usage_error(result, message)
    assert not (data / "catalogue.sqlite3").exists() or rows(data) == {}


def test_bad_numbers_over_the_api_are_400_and_one_line(
    tmp_path: Path, nbs_server: Callable[..., NbsServer]
) -> None:
    data = tmp_path / "data"
    nbs_server("--listen", "127.0.0.1:0", "--data-dir", str(data))  # the CLI goes through it
    for param in BAD_CREATES:
        args, message = cast(tuple[list[str], str], param.values)
        result = nbs("volume", "create", "a", *args, "--data-dir", str(data))
        assert_one_line_usage_error(result, message)
    resize = nbs("volume", "resize", "default", "9" * 5000, "--data-dir", str(data))
    assert_one_line_usage_error(resize, "invalid size")
    assert rows(data) == {"default": "ready"}


# --- item 17: a failed S3 create leaves nothing that warns forever ---------------------------


@pytest.fixture
def s3_env(s3_server: SeaweedS3) -> Iterator[dict[str, str]]:
    """Credentials for the rig, and the rig started again if a test left it down."""
    yield {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    if not s3_server.alive():
        s3_server.start()


def test_a_create_in_a_missing_bucket_leaves_nothing(
    tmp_path: Path, s3_server: SeaweedS3, s3_env: dict[str, str]
) -> None:
    data = tmp_path / "data"
    spec = f"s3:bucket=nbs-no-such-bucket,endpoint={s3_server.endpoint},region={s3_server.region}"
    failed = create_on(data, spec, s3_env)
    assert failed.returncode == 1
    (line,) = failed.stderr.strip().splitlines()  # the error; no warning about leftovers
    assert "bucket 'nbs-no-such-bucket' does not exist" in line
    assert layers(data) == []
    for args in (["volume", "list"], ["volume", "create", "w", "--size", "1MiB"]):
        later = nbs(*args, "--data-dir", str(data), env=s3_env)
        assert later.returncode == 0, (args, later.stderr)
        assert later.stderr == "", (args, later.stderr)


def test_a_create_in_a_missing_rados_pool_leaves_nothing(
    tmp_path: Path, ceph_cluster: CephCluster
) -> None:
    data = tmp_path / "data"
    failed = create_on(data, f"rados:pool=nbs-no-such-pool,conf={ceph_cluster.conf_path}")
    assert failed.returncode == 1
    (line,) = failed.stderr.strip().splitlines()  # the error; no warning about leftovers
    assert "nbs-no-such-pool" in line
    assert layers(data) == []
    later = nbs("volume", "create", "w", "--size", "1MiB", "--data-dir", str(data))
    assert later.returncode == 0, later.stderr
    assert later.stderr == ""


def test_a_volume_whose_rados_pool_was_deleted_can_be_deleted(
    tmp_path: Path, ceph_cluster: CephCluster
) -> None:
    data, pool = tmp_path / "data", "nbs-gone"
    ceph_cluster.ceph("osd", "pool", "create", pool, "8", "8")
    created = create_on(data, f"rados:pool={pool},conf={ceph_cluster.conf_path}")
    assert created.returncode == 0, created.stderr
    ceph_cluster.ceph("osd", "pool", "delete", pool, pool, "--yes-i-really-really-mean-it")
    deleted = nbs("volume", "delete", "v", "--data-dir", str(data))
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stderr == ""  # the pool and its objects are gone: nothing left to warn about
    assert layers(data) == []


def test_a_create_cut_by_an_s3_outage_is_cleared_by_gc(
    tmp_path: Path, s3_server: SeaweedS3, s3_env: dict[str, str]
) -> None:
    data = tmp_path / "data"
    bucket = "nbs-outage"
    s3_server.create_bucket(bucket)
    spec = (
        f"s3:bucket={bucket},endpoint={s3_server.endpoint},region={s3_server.region},"
        "attempts=1,timeout=2"
    )
    s3_server.stop()
    failed = create_on(data, spec, s3_env)
    assert failed.returncode == 1, failed.stderr
    (leftover,) = layers(data)  # its data could not be checked for, so the row stays
    # Later commands do not repeat the warning (nor slow down on the dead store: reads
    # never collect, changes collect quietly).
    for args in (["volume", "list"], ["volume", "create", "w", "--size", "1MiB"]):
        later = nbs(*args, "--data-dir", str(data), env=s3_env)
        assert later.returncode == 0, later.stderr
        assert "cannot remove" not in later.stderr, (args, later.stderr)
    down = nbs("volume", "gc", "--data-dir", str(data), env=s3_env)
    assert f"cannot remove layer {leftover} yet" in down.stderr  # asked: told why
    s3_server.start()
    cleared = nbs("volume", "gc", "--data-dir", str(data), env=s3_env)
    assert cleared.returncode == 0, cleared.stderr
    assert f"removed {leftover}" in cleared.stdout
    assert cleared.stderr == ""
    assert len(layers(data)) == 1  # w's
    assert nbs("volume", "gc", "--data-dir", str(data), env=s3_env).stdout.strip() == (
        "nothing to clean up"
    )
