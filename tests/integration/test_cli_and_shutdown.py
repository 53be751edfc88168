"""The ``nbs serve`` command line: start-up errors, YAML config, defaults and clean shutdown."""

from __future__ import annotations

import errno
import json
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.integration.conftest import NBS, NbsServer, require_module, require_tool

if TYPE_CHECKING:
    import nbd as libnbd  # for annotations: at run time require_module gives nbd

nbd = require_module("nbd")  # python3-libnbd, a Debian package

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
SIZE = 64 * MiB
ROOT = Path(__file__).resolve().parents[2]


def serve_once(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``nbs serve ARGS`` expected to exit by itself (a start-up error)."""
    return subprocess.run(
        [*NBS, "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a start-up error prints, after checking exit code 2 and no stdout."""
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr}"
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{result.stderr}"
    assert lines[0].startswith("nbs: error: "), lines[0]
    return lines[0]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


# ---------------------------------------------------------------------- start-up errors


def test_missing_export_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.img"
    line = one_line_error(serve_once("--listen", "127.0.0.1:0", "--export", f"disk={missing}"))
    assert str(missing) in line
    assert "disk" in line


def test_port_in_use_exits_2(disk: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        line = one_line_error(
            serve_once("--listen", f"127.0.0.1:{port}", "--export", f"disk={disk}")
        )
    assert f"127.0.0.1:{port}" in line
    assert "in use" in line


def test_bad_certificate_exits_2(disk: Path, tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    key = tmp_path / "key.pem"
    key.write_text("garbage\n")
    line = one_line_error(
        serve_once(
            "--listen",
            "127.0.0.1:0",
            "--export",
            f"disk={disk}",
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
        )
    )
    assert str(cert) in line


def test_certificate_without_key_exits_2(disk: Path, tmp_path: Path) -> None:
    line = one_line_error(
        serve_once(
            "--listen",
            "127.0.0.1:0",
            "--export",
            f"disk={disk}",
            "--tls-cert",
            str(tmp_path / "cert.pem"),
        )
    )
    assert "--tls-key" in line


@pytest.mark.parametrize(
    "spec",
    [
        "no-equals-sign",
        "bad name={disk}",
        "disk={disk},bogus-option",
        "disk={disk},tls=sometimes",
        "disk={disk},min-block=3",
        "disk=",
    ],
)
def test_invalid_export_syntax_exits_2_with_one_line(disk: Path, spec: str) -> None:
    line = one_line_error(serve_once("--listen", "127.0.0.1:0", "--export", spec.format(disk=disk)))
    assert "--export" in line or "export" in line


def test_tls_required_without_certificate_exits_2(disk: Path) -> None:
    line = one_line_error(
        serve_once("--listen", "127.0.0.1:0", "--export", f"disk={disk},tls=required")
    )
    assert "disk" in line
    assert "TLS" in line


def test_same_export_name_twice_exits_2(disk: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(b"")
    line = one_line_error(
        serve_once(
            "--listen", "127.0.0.1:0", "--export", f"disk={disk}", "--export", f"disk={other}"
        )
    )
    assert "disk" in line


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        (
            "listen: 127.0.0.1:0\nbogus_key: 1\nexports:\n  - name: a\n    path: {disk}\n",
            "bogus_key",
        ),
        (
            "listen: 127.0.0.1:0\nexports:\n  - name: a\n    path: {disk}\n    colour: blue\n",
            "exports[0].colour",
        ),
        ("listen: 127.0.0.1:0\ntls:\n  cert: a.pem\n  key: b.pem\n  pin: 1\n", "tls.pin"),
        (
            "listen: 127.0.0.1:0\nexports:\n  - name: a\n    path: {disk}\n    tls: maybe\n",
            "exports[0].tls",
        ),
    ],
    ids=["top-level", "export", "tls", "bad-value"],
)
def test_bad_yaml_config_names_file_and_key(
    disk: Path, tmp_path: Path, yaml_text: str, key: str
) -> None:
    config = tmp_path / "nbs.yaml"
    config.write_text(yaml_text.format(disk=disk))
    line = one_line_error(serve_once("--config", str(config)))
    assert str(config) in line
    assert key in line


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "absent.yaml"
    line = one_line_error(serve_once("--config", str(config)))
    assert str(config) in line


# ---------------------------------------------------------------------- configuration


def test_yaml_config_with_exports_and_listen_serves_them(
    nbs_server: Callable[..., NbsServer], disk: Path, tmp_path: Path
) -> None:
    golden = tmp_path / "golden.img"
    with golden.open("wb") as f:
        f.truncate(16 * MiB)
    config = tmp_path / "nbs.yaml"
    config.write_text(
        "listen:\n"
        "  - 127.0.0.1:0\n"
        "log_level: warning\n"
        "exports:\n"
        f"  - name: scratch\n    path: {disk}\n    description: Scratch space\n"
        f"  - name: golden\n    path: {golden}\n    read_only: true\n"
    )
    server = nbs_server("--config", str(config))
    assert server.tcp.startswith("nbd://127.0.0.1:")
    nbdinfo = require_tool("nbdinfo")
    listed = run(nbdinfo, "--list", "--json", server.tcp)
    assert listed.returncode == 0, listed.stderr
    exports = {e["export-name"]: e for e in json.loads(listed.stdout)["exports"]}
    assert set(exports) == {"scratch", "golden"}
    assert exports["scratch"]["export-size"] == SIZE
    assert exports["scratch"]["is_read_only"] is False
    assert exports["golden"]["export-size"] == 16 * MiB
    assert exports["golden"]["is_read_only"] is True
    described = run(nbdinfo, "--json", server.uri("scratch"))
    assert json.loads(described.stdout)["exports"][0]["description"] == "Scratch space"
    assert server.stop() == 0


def test_command_line_exports_add_to_the_config(
    nbs_server: Callable[..., NbsServer], disk: Path, tmp_path: Path
) -> None:
    extra = tmp_path / "extra.img"
    with extra.open("wb") as f:
        f.truncate(8 * MiB)
    config = tmp_path / "nbs.yaml"
    config.write_text(f"listen: 127.0.0.1:0\nexports:\n  - name: fromyaml\n    path: {disk}\n")
    server = nbs_server("--config", str(config), "--export", f"fromcli={extra}")
    sizes = {}
    for name in ("fromyaml", "fromcli"):
        out = run(require_tool("nbdinfo"), "--size", server.uri(name))
        assert out.returncode == 0, out.stderr
        sizes[name] = int(out.stdout)
    assert sizes == {"fromyaml": SIZE, "fromcli": 8 * MiB}


def test_default_export_is_a_1g_sparse_volume_in_the_data_dir(
    nbs_server: Callable[..., NbsServer], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    server = nbs_server("--listen", "127.0.0.1:0", "--data-dir", str(data_dir))
    listed = run(*NBS, "volume", "list", "--json", "--data-dir", str(data_dir))
    assert listed.returncode == 0, listed.stderr
    (volume,) = json.loads(listed.stdout)
    assert (volume["name"], volume["size"]) == ("default", GiB)
    assert volume["used_bytes"] < MiB, "the default volume is not sparse"
    # The empty export name reaches the default export.
    info = run(require_tool("qemu-img"), "info", "--output=json", server.tcp)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["virtual-size"] == GiB
    named = run(require_tool("nbdinfo"), "--size", server.uri("default"))
    assert int(named.stdout) == GiB

    h = nbd.NBD()
    h.connect_uri(server.tcp)
    try:
        h.pwrite(b"\x7e" * 4096, GiB - 4096)
        h.flush()
    finally:
        h.shutdown()
    assert server.stop() == 0

    # A second start reuses the volume instead of creating a new one.
    again = nbs_server("--listen", "127.0.0.1:0", "--data-dir", str(data_dir))
    h = nbd.NBD()
    h.connect_uri(again.uri("default"))
    try:
        assert h.pread(4096, GiB - 4096) == b"\x7e" * 4096
    finally:
        h.shutdown()


# ---------------------------------------------------------------------- shutdown


def test_sigterm_with_a_connected_client_exits_0_and_keeps_the_data(
    nbs_server: Callable[..., NbsServer], disk: Path
) -> None:
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"disk={disk}")
    data = random.Random(51).randbytes(MiB)
    h = nbd.NBD()
    h.connect_uri(server.uri("disk"))
    h.pwrite(data, 3 * MiB)
    h.pwrite(b"\x01" * 4096, 0, nbd.CMD_FLAG_FUA)
    assert h.pread(MiB, 3 * MiB) == data
    h.zero(MiB, 10 * MiB)
    # No flush: the server flushes on its way out.
    started = time.monotonic()
    assert server.stop(signal.SIGTERM, timeout=10) == 0
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"shutdown took {elapsed:.1f}s"
    with disk.open("rb") as f:
        f.seek(3 * MiB)
        assert f.read(MiB) == data
        f.seek(0)
        assert f.read(4096) == b"\x01" * 4096
    # The client notices the server is gone instead of hanging.
    with pytest.raises(nbd.Error):
        h.pread(4096, 0)
    del h


def test_sigint_exits_0(nbs_server: Callable[..., NbsServer], disk: Path) -> None:
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"disk={disk}")
    assert run(require_tool("nbdinfo"), "--size", server.uri("disk")).returncode == 0
    assert server.stop(signal.SIGINT, timeout=10) == 0


_CONNECTION_GONE = {errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE, errno.ESHUTDOWN}


@pytest.mark.parametrize("round_", range(3))
def test_sigterm_with_requests_in_flight_answers_them_and_does_not_hang(
    nbs_server: Callable[..., NbsServer], disk: Path, round_: int
) -> None:
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"disk={disk}")
    h = nbd.NBD()
    h.connect_uri(server.uri("disk"))
    size = (64 * KiB, 256 * KiB, MiB)[round_]
    count = 48
    writes: dict[int, tuple[int, bytes, libnbd.Buffer]] = {}
    reads: dict[int, libnbd.Buffer] = {}
    for i in range(count):
        offset = i * size
        if i % 4 == 3:
            buf = nbd.Buffer(size)
            reads[h.aio_pread(buf, offset)] = buf
        else:
            data = bytes([i + 1]) * size
            buf = nbd.Buffer.from_bytearray(bytearray(data))
            writes[h.aio_pwrite(buf, offset)] = (offset, data, buf)
    assert h.aio_in_flight() >= 2

    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    deadline = started + 15
    while h.aio_in_flight() > 0:
        assert time.monotonic() < deadline, f"{h.aio_in_flight()} requests never answered"
        poll_error: libnbd.Error | None = None
        try:
            h.poll(1000)
        except nbd.Error as err:
            poll_error = err
        if poll_error is not None:
            # The server may hang up, but never send something the client cannot match.
            assert poll_error.errnum in _CONNECTION_GONE, poll_error.string
            if h.aio_is_dead() or h.aio_is_closed():
                break  # every request still pending was failed with ENOTCONN
            # libnbd 1.14's poll reports a bare POLLERR (a reset seen before the kernel marks
            # the socket closed) as ENOTCONN and retires nothing: polling again reads the
            # replies already received, then the reset.

    outcomes: dict[int, str] = {}
    for cookie in [*writes, *reads]:
        failure: libnbd.Error | None = None
        try:
            completed = h.aio_command_completed(cookie)
        except nbd.Error as err:
            failure = err
        if failure is None:
            assert completed, f"cookie {cookie} still pending"
            outcomes[cookie] = "ok"
        else:
            # A reply (ESHUTDOWN for requests parsed after the signal) or a closed link.
            assert failure.errnum in _CONNECTION_GONE, f"cookie {cookie}: {failure.string}"
            outcomes[cookie] = errno.errorcode[failure.errnum]
    assert server.stop(signal.SIGTERM, timeout=10) == 0
    assert time.monotonic() - started < 10

    with disk.open("rb") as f:
        for cookie, (offset, data, _) in writes.items():
            if outcomes[cookie] == "ok":
                f.seek(offset)
                assert f.read(len(data)) == data, f"acknowledged write at {offset} lost"
    for cookie, buf in reads.items():
        if outcomes[cookie] == "ok":
            assert len(buf.to_bytearray()) == size
    del h
