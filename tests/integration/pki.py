"""Test certificates made with openssl, laid out as qemu's tls-creds-x509 and libnbd's
tls-certificates expect (ca-cert.pem, server-*.pem, client-*.pem).

Shared by test_tls.py and test_reload.py; keys are EC P-256 and live for two days.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.integration.conftest import require_tool

CA_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = NBS test CA
[ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
"""
SERVER_EXT = """\
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
"""
CLIENT_EXT = """\
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
"""


def openssl(*args: str, timeout: float = 60) -> None:
    """Run ``openssl`` with ``args``; it must succeed."""
    result = subprocess.run(
        [require_tool("openssl"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def make_ca(work: Path, out: Path) -> None:
    """A self-signed CA: its key in ``work`` (ca-key.pem), its certificate in ``out``."""
    (work / "ca.cnf").write_text(CA_CONFIG)
    openssl(
        "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(work / "ca-key.pem"), "-out", str(out / "ca-cert.pem"),
        "-days", "2", "-config", str(work / "ca.cnf"), "-extensions", "ext",
    )  # fmt: skip


def issue(work: Path, out: Path, *, name: str, subject: str, ext: str) -> None:
    """``out/{name}-key.pem`` and ``out/{name}-cert.pem``, signed by the CA of :func:`make_ca`."""
    key = out / f"{name}-key.pem"
    csr = work / f"{name}.csr"
    ext_file = work / f"{name}.ext"
    ext_file.write_text(ext)
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", subject,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(out / "ca-cert.pem"),
        "-CAkey", str(work / "ca-key.pem"), "-CAcreateserial", "-days", "2",
        "-out", str(out / f"{name}-cert.pem"), "-extfile", str(ext_file),
    )  # fmt: skip


def issue_server(work: Path, out: Path) -> None:
    """A server certificate for localhost and 127.0.0.1."""
    issue(work, out, name="server", subject="/CN=localhost", ext=SERVER_EXT)


def issue_client(work: Path, out: Path) -> None:
    """A client certificate (CN=client)."""
    issue(work, out, name="client", subject="/CN=client", ext=CLIENT_EXT)
