"""Epochs fence old writers, on the replica side (issue 12).

A real `nbs serve` on a catalogue; real clients: python3-libnbd (in this process, and in a
child process that gets SIGSTOPped), qemu-io with `--image-opts`; `nbs volume info` through
the server's API.  The export name `NAME;epoch=N;uid=U` is docs/replication.md's "Replica
protocol".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.integration.conftest import NbsServer, require_module, require_tool
from tests.integration.helpers import nbs

if TYPE_CHECKING:
    import nbd as libnbd  # for annotations: at run time require_module gives nbd

nbd = require_module("nbd")

BLOCK = 4096


@pytest.fixture
def data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    nbs("volume", "create", "r", "--size", "16MiB", "--data-dir", str(data))
    return data


@pytest.fixture
def replica(nbs_server: Callable[..., NbsServer], data: Path) -> NbsServer:
    return nbs_server("--listen", "127.0.0.1:0", "--data-dir", str(data))


def _connect(server: NbsServer, name: str) -> libnbd.NBD:
    handle = nbd.NBD()
    handle.set_export_name(name)
    handle.connect_tcp("127.0.0.1", str(server.port))
    return handle


def _info(data: Path) -> dict[str, Any]:
    out = nbs("volume", "info", "r", "--json", "--data-dir", str(data)).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def _refused(server: NbsServer, name: str) -> str:
    with pytest.raises(nbd.Error) as refused:
        _connect(server, name)
    return str(refused.value)


def test_a_newer_epoch_fences_out_the_older_connection(replica: NbsServer, data: Path) -> None:
    old = _connect(replica, "r;epoch=1")
    assert not old.is_read_only()
    old.pwrite(b"1" * BLOCK, 0)

    new = _connect(replica, "r;epoch=2")
    assert _info(data)["epoch"] == 2
    with pytest.raises(nbd.Error) as fenced:
        old.pwrite(b"X" * BLOCK, 0)
    assert fenced.value.errno == "EPERM"
    with pytest.raises(nbd.Error):  # and the server closed it
        old.pread(BLOCK, 0)
    assert new.pread(BLOCK, 0) == b"1" * BLOCK  # the fenced write is not on disk
    new.pwrite(b"2" * BLOCK, 0)

    assert "policy" in _refused(replica, "r;epoch=1")  # NBD_REP_ERR_POLICY
    again = _connect(replica, "r;epoch=2")  # the same epoch: a second engine connection
    assert not again.is_read_only()
    assert again.pread(BLOCK, 0) == b"2" * BLOCK
    holders = _info(data)["holders"]
    assert [(h["writable"], h["epoch"]) for h in holders] == [(True, 2), (True, 2)]
    text = nbs("volume", "info", "r", "--data-dir", str(data)).stdout
    assert "epoch:       2" in text
    assert text.count(" writable epoch 2 since ") == 2
    for handle in (new, again):
        handle.shutdown()


def test_the_promised_epoch_survives_kill_9(
    nbs_server: Callable[..., NbsServer], replica: NbsServer, data: Path
) -> None:
    engine = _connect(replica, "r;epoch=5")
    engine.pwrite(b"5" * BLOCK, 0)
    engine.flush()
    replica.stop(signal.SIGKILL)
    del engine

    restarted = nbs_server("--listen", "127.0.0.1:0", "--data-dir", str(data))
    assert "policy" in _refused(restarted, "r;epoch=4")
    assert "policy" in _refused(restarted, "r;epoch=1")
    engine = _connect(restarted, "r;epoch=5")
    assert engine.pread(BLOCK, 0) == b"5" * BLOCK
    engine.shutdown()
    assert _info(data)["epoch"] == 5


_FROZEN_ENGINE = textwrap.dedent(
    """
    import os, signal, sys
    import nbd
    h = nbd.NBD()
    h.set_export_name("r;epoch=1")
    h.connect_tcp("127.0.0.1", sys.argv[1])
    h.pwrite(b"A" * 4096, 0)
    print("connected", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # frozen here, its next write about to be sent
    try:
        h.pwrite(b"O" * 4096, 0)
        h.flush()
        print("written", flush=True)
    except nbd.Error as err:
        print("refused", err.errno, flush=True)
    """
)


def _stopped(pid: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.02)
    raise AssertionError("the engine never stopped")


def test_a_frozen_engine_that_wakes_up_writes_nothing(replica: NbsServer) -> None:
    frozen = subprocess.Popen(
        [sys.executable, "-c", _FROZEN_ENGINE, str(replica.port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert frozen.stdout is not None
        assert frozen.stdout.readline().strip() == "connected"
        _stopped(frozen.pid)

        engine = _connect(replica, "r;epoch=2")
        assert engine.pread(BLOCK, 0) == b"A" * BLOCK
        engine.pwrite(b"N" * BLOCK, 0)
        engine.flush()

        os.kill(frozen.pid, signal.SIGCONT)
        out, _ = frozen.communicate(timeout=30)
        assert out.split() in (["refused", "EPERM"], ["refused", "ENOTCONN"]), out
        assert engine.pread(BLOCK, 0) == b"N" * BLOCK  # the old write never landed
        engine.shutdown()
    finally:
        if frozen.poll() is None:
            frozen.kill()
            frozen.wait()


def test_a_wrong_uid_is_refused(replica: NbsServer, data: Path) -> None:
    uid = _info(data)["uid"]
    assert isinstance(uid, str)
    assert len(uid) == 32
    other = "f" * 32 if uid != "f" * 32 else "e" * 32
    _refused(replica, f"r;epoch=1;uid={other}")
    qemu_io = require_tool("qemu-io")
    opts = f"driver=nbd,host=127.0.0.1,port={replica.port},export=r;epoch=1;uid={other}"
    wrong = _qemu_io(qemu_io, opts)
    assert wrong.returncode != 0
    assert f"volume r has uid {uid}, not {other}" in wrong.stdout + wrong.stderr
    assert _info(data)["epoch"] == 0  # refused before anything was taken
    engine = _connect(replica, f"r;uid={uid};epoch=1")
    engine.pwrite(b"U" * BLOCK, 0)
    engine.shutdown()


def test_plain_clients_read_a_fenced_volume_only(replica: NbsServer, data: Path) -> None:
    qemu_io = require_tool("qemu-io")
    plain = _connect(replica, "r")  # before any epoch: an ordinary writer
    assert not plain.is_read_only()
    plain.pwrite(b"P" * BLOCK, 0)

    engine = _connect(replica, "r;epoch=3")  # drains and revokes the plain writer
    with pytest.raises(nbd.Error) as fenced:
        plain.pwrite(b"p" * BLOCK, 0)
    assert fenced.value.errno == "EPERM"

    reader = _connect(replica, "r")
    assert reader.is_read_only()
    assert reader.pread(BLOCK, 0) == b"P" * BLOCK
    write = _qemu_io(qemu_io, f"driver=nbd,host=127.0.0.1,port={replica.port},export=r")
    assert write.returncode != 0  # opened read-only: the write fails, nothing lands
    by_engine = _qemu_io(
        qemu_io, f"driver=nbd,host=127.0.0.1,port={replica.port},export=r;epoch=3", "0x45"
    )
    assert by_engine.returncode == 0, by_engine.stdout + by_engine.stderr
    stale = _qemu_io(qemu_io, f"driver=nbd,host=127.0.0.1,port={replica.port},export=r;epoch=2")
    assert stale.returncode != 0
    assert "promised epoch 3: epoch 2 is fenced out" in stale.stdout + stale.stderr
    assert engine.pread(BLOCK, 0) == b"\x45" * BLOCK
    engine.shutdown()
    reader.shutdown()


def _qemu_io(qemu_io: str, opts: str, pattern: str = "0x42") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [qemu_io, "--image-opts", opts, "-c", f"write -P {pattern} 0 4k"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
