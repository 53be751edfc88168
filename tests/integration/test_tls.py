"""STARTTLS with X.509 certificates: qemu-img and nbdinfo (GnuTLS clients) against ``nbs serve``.

The certificates are made with openssl in a directory laid out as qemu's tls-creds-x509 and
libnbd's tls-certificates expect (ca-cert.pem, server-*.pem, client-*.pem).
"""

from __future__ import annotations

import filecmp
import json
import random
import socket
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import NBS, NbsServer, require_tool
from tests.integration.pki import issue_client, issue_server, make_ca

MiB = 1 << 20
SIZE = 64 * MiB


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    work = tmp_path_factory.mktemp("pki-work")
    out = tmp_path_factory.mktemp("pki")
    make_ca(work, out)
    issue_server(work, out)
    issue_client(work, out)
    for name in ("ca-cert", "server-cert", "server-key", "client-cert", "client-key"):
        assert (out / f"{name}.pem").stat().st_size > 0
    return out


@pytest.fixture
def ca_only(pki: Path, tmp_path: Path) -> Path:
    """Client credentials that trust the CA but hold no client certificate."""
    directory = tmp_path / "ca-only"
    directory.mkdir()
    (directory / "ca-cert.pem").write_bytes((pki / "ca-cert.pem").read_bytes())
    return directory


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("disk", "secure", "plain"):
        path = tmp_path / f"{name}.img"
        with path.open("wb") as f:
            f.truncate(SIZE)
        out[name] = path
    return out


@pytest.fixture
def tls_server(
    nbs_server: Callable[..., NbsServer], pki: Path, images: dict[str, Path]
) -> NbsServer:
    return nbs_server(
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        str(pki / "server-cert.pem"),
        "--tls-key",
        str(pki / "server-key.pem"),
        "--tls-ca",
        str(pki / "ca-cert.pem"),
        "--export",
        f"disk={images['disk']}",
        "--export",
        f"secure={images['secure']},tls=required",
        "--export",
        f"plain={images['plain']},tls=off",
    )


def nbds(server: NbsServer, export: str, certs: Path) -> str:
    return f"nbds://127.0.0.1:{server.port}/{export}?tls-certificates={certs}"


def image_opts(server: NbsServer, export: str) -> str:
    return (
        f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={server.port},"
        f"export={export},tls-creds=tls0"
    )


def tls_object(certs: Path) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=client"]


def test_nbdinfo_over_tls(tls_server: NbsServer, pki: Path) -> None:
    result = run(require_tool("nbdinfo"), "--json", nbds(tls_server, "disk", pki))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == SIZE


def test_qemu_img_info_over_tls(tls_server: NbsServer, pki: Path) -> None:
    result = run(
        require_tool("qemu-img"),
        "info",
        "--output=json",
        *tls_object(pki),
        "--image-opts",
        image_opts(tls_server, "secure"),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["virtual-size"] == SIZE


def test_qemu_img_convert_over_tls_in_and_out(
    tls_server: NbsServer, pki: Path, images: dict[str, Path], tmp_path: Path
) -> None:
    qemu_img = require_tool("qemu-img")
    source = tmp_path / "source.img"
    with source.open("wb") as f:
        f.truncate(SIZE)
        f.seek(MiB)
        f.write(random.Random(31).randbytes(4 * MiB))
        f.seek(40 * MiB)
        f.write(b"\xa5" * MiB)
    into = run(
        qemu_img,
        "convert",
        "-n",
        *tls_object(pki),
        "-f",
        "raw",
        str(source),
        "--target-image-opts",
        image_opts(tls_server, "secure"),
        timeout=120,
    )
    assert into.returncode == 0, into.stderr
    assert filecmp.cmp(source, images["secure"], shallow=False)

    out = tmp_path / "out.img"
    back = run(
        qemu_img,
        "convert",
        *tls_object(pki),
        "--image-opts",
        image_opts(tls_server, "secure"),
        "-O",
        "raw",
        str(out),
        timeout=120,
    )
    assert back.returncode == 0, back.stderr
    assert filecmp.cmp(source, out, shallow=False)


def test_tls_required_export_refuses_plaintext_and_serves_tls(
    tls_server: NbsServer, pki: Path
) -> None:
    assert_tls_required(tls_server, "secure", pki, SIZE)
    assert tls_server.alive()


def assert_tls_required(server: NbsServer, export: str, pki: Path, size: int) -> None:
    """A plaintext client is told TLS is required; a client with a certificate is served."""
    nbdinfo = require_tool("nbdinfo")
    plain = run(nbdinfo, "--size", f"{server.tcp}/{export}")
    assert plain.returncode != 0
    assert "TLS" in plain.stderr
    secure = run(nbdinfo, "--size", nbds(server, export, pki))
    assert secure.returncode == 0, secure.stderr
    assert int(secure.stdout) == size


def test_tls_required_refuses_plaintext_clients_of_the_volume_catalogue(
    nbs_server: Callable[..., NbsServer], pki: Path, tmp_path: Path
) -> None:
    """tls.required (--tls-required): what an exposed server needs (docs/deployment.md)."""
    server = nbs_server(
        "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"),
        "--tls-cert", str(pki / "server-cert.pem"), "--tls-key", str(pki / "server-key.pem"),
        "--tls-ca", str(pki / "ca-cert.pem"), "--tls-required",
    )  # fmt: skip
    assert_tls_required(server, "default", pki, 1 << 30)
    listed = run(require_tool("nbdinfo"), "--list", server.tcp)  # no names in plaintext
    assert listed.returncode != 0
    assert "default" not in listed.stdout


def test_tls_required_without_a_certificate_exits_2(tmp_path: Path) -> None:
    result = serve_once("--listen", "127.0.0.1:0", "--data-dir", str(tmp_path), "--tls-required")
    assert result.returncode == 2
    assert error_lines(result) == [
        "nbs: error: --tls-required needs --tls-cert and --tls-key (or tls: in the config)"
    ]


def test_tls_off_export_is_not_served_over_tls(tls_server: NbsServer, pki: Path) -> None:
    nbdinfo = require_tool("nbdinfo")
    over_tls = run(nbdinfo, "--size", nbds(tls_server, "plain", pki))
    assert over_tls.returncode != 0
    plain = run(nbdinfo, "--size", f"{tls_server.tcp}/plain")
    assert plain.returncode == 0, plain.stderr
    assert int(plain.stdout) == SIZE


def test_default_policy_serves_both_with_and_without_tls(tls_server: NbsServer, pki: Path) -> None:
    nbdinfo = require_tool("nbdinfo")
    assert run(nbdinfo, "--size", f"{tls_server.tcp}/disk").returncode == 0
    over_tls = run(nbdinfo, "--json", nbds(tls_server, "disk", pki))
    assert over_tls.returncode == 0, over_tls.stderr
    assert json.loads(over_tls.stdout)["TLS"] is True


def test_list_over_tls_leaves_out_tls_off_exports(tls_server: NbsServer, pki: Path) -> None:
    result = run(require_tool("nbdinfo"), "--list", "--json", nbds(tls_server, "", pki))
    assert result.returncode == 0, result.stderr
    names = {e["export-name"] for e in json.loads(result.stdout)["exports"]}
    assert names == {"disk", "secure"}


def test_plaintext_list_leaves_out_tls_required_exports(tls_server: NbsServer) -> None:
    result = run(require_tool("nbdinfo"), "--list", "--json", tls_server.tcp)
    assert result.returncode == 0, result.stderr
    names = {e["export-name"] for e in json.loads(result.stdout)["exports"]}
    assert names == {"disk", "plain"}
    assert "secure" not in result.stdout + result.stderr


def test_tls_only_server_tells_a_plaintext_client_only_that_tls_is_required(
    nbs_server: Callable[..., NbsServer], pki: Path, images: dict[str, Path]
) -> None:
    server = nbs_server(
        "--listen", "127.0.0.1:0",
        "--tls-cert", str(pki / "server-cert.pem"), "--tls-key", str(pki / "server-key.pem"),
        "--export", f"secure={images['secure']},tls=required",
        "--export", f"hidden={images['disk']},tls=required",
    )  # fmt: skip
    listed = run(require_tool("nbdinfo"), "--list", server.tcp)
    assert listed.returncode != 0
    assert "secure" not in listed.stdout + listed.stderr
    assert "hidden" not in listed.stdout + listed.stderr
    # On the wire: NBD_OPT_LIST gets NBD_REP_ERR_TLS_REQD and nothing else.
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(struct.pack(">I", 3))  # C_FIXED_NEWSTYLE | C_NO_ZEROES
        sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_LIST, 0))
        sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_ABORT, 0))
        received = _until_closed(sock)
    assert received[:8] == b"NBDMAGIC"
    replies = _option_replies(received[18:])
    assert [(opt, kind) for opt, kind, _ in replies] == [
        (OPT_LIST, ERR_TLS_REQD),
        (OPT_ABORT, REP_ACK),
    ]
    assert b"secure" not in received
    assert b"hidden" not in received
    over_tls = run(require_tool("nbdinfo"), "--list", "--json", nbds(server, "", pki))
    assert over_tls.returncode == 0, over_tls.stderr
    names = {e["export-name"] for e in json.loads(over_tls.stdout)["exports"]}
    assert names == {"secure", "hidden"}


def test_plaintext_pipelined_behind_starttls_is_refused(tls_server: NbsServer) -> None:
    # A man in the middle appending STRUCTURED_REPLY to the client's STARTTLS must not get it
    # executed as if the client had sent it over TLS: no ACK, the server hangs up.
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as sock:
        greeting = sock.recv(18, socket.MSG_WAITALL)
        assert greeting[:8] == b"NBDMAGIC"
        sock.sendall(
            struct.pack(">I", 3)
            + struct.pack(">QII", IHAVEOPT, OPT_STARTTLS, 0)
            + struct.pack(">QII", IHAVEOPT, OPT_STRUCTURED_REPLY, 0)
        )
        assert _until_closed(sock) == b""
    assert tls_server.alive()


IHAVEOPT = 0x49484156454F5054
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_STRUCTURED_REPLY = 8
REP_ACK = 1
ERR_TLS_REQD = (1 << 31) | 5


def _until_closed(sock: socket.socket) -> bytes:
    received = bytearray()
    while chunk := sock.recv(65536):
        received += chunk
    return bytes(received)


def _option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    replies = []
    pos = 0
    while pos < len(data):
        _, opt, kind, length = struct.unpack_from(">QIII", data, pos)
        replies.append((opt, kind, data[pos + 20 : pos + 20 + length]))
        pos += 20 + length
    return replies


def test_client_without_certificate_is_refused_when_a_ca_is_set(
    tls_server: NbsServer, pki: Path, ca_only: Path
) -> None:
    nbdinfo = require_tool("nbdinfo")
    refused = run(nbdinfo, "--size", nbds(tls_server, "disk", ca_only))
    assert refused.returncode != 0
    assert tls_server.alive()
    accepted = run(nbdinfo, "--size", nbds(tls_server, "disk", pki))
    assert accepted.returncode == 0, accepted.stderr


def serve_once(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``nbs serve ARGS`` expected to fail at start-up."""
    return subprocess.run(
        [*NBS, "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
        stdin=subprocess.DEVNULL,
    )


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_missing_certificate_exits_2_with_one_line(
    pki: Path, images: dict[str, Path], tmp_path: Path
) -> None:
    result = serve_once(
        "--listen", "127.0.0.1:0", "--export", f"disk={images['disk']}",
        "--tls-cert", str(tmp_path / "no-such-cert.pem"), "--tls-key", str(pki / "server-key.pem"),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith("nbs: error:")
    assert result.stdout == ""


@pytest.mark.parametrize("which", ["cert", "key", "ca"])
def test_missing_tls_file_error_names_the_file(
    pki: Path, images: dict[str, Path], tmp_path: Path, which: str
) -> None:
    files = {
        "cert": pki / "server-cert.pem",
        "key": pki / "server-key.pem",
        "ca": pki / "ca-cert.pem",
    }
    missing = tmp_path / f"no-such-{which}.pem"
    files[which] = missing
    result = serve_once(
        "--listen", "127.0.0.1:0", "--export", f"disk={images['disk']}",
        "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"]),
        "--tls-ca", str(files["ca"]),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert str(missing) in lines[0], lines[0]


def test_key_that_does_not_match_the_certificate_exits_2(
    pki: Path, images: dict[str, Path]
) -> None:
    result = serve_once(
        "--listen", "127.0.0.1:0", "--export", f"disk={images['disk']}",
        "--tls-cert", str(pki / "server-cert.pem"), "--tls-key", str(pki / "client-key.pem"),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith("nbs: error:")
    assert "server-cert.pem" in lines[0]


def test_unreadable_ca_exits_2(pki: Path, images: dict[str, Path], tmp_path: Path) -> None:
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("not a certificate\n")
    result = serve_once(
        "--listen", "127.0.0.1:0", "--export", f"disk={images['disk']}",
        "--tls-cert", str(pki / "server-cert.pem"), "--tls-key", str(pki / "server-key.pem"),
        "--tls-ca", str(bad_ca),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert str(bad_ca) in lines[0]
