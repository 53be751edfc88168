"""TLS material for STARTTLS: an X.509 server certificate, optionally verifying clients."""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path


class TLSConfigError(Exception):
    """The certificate, key or CA cannot be used."""


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path
    ca: Path | None = None  # when set, clients must present a certificate signed by it


def server_context(files: TLSFiles) -> ssl.SSLContext:
    """An SSLContext for the server side of STARTTLS (TLS 1.2 or newer)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for what, path in (("certificate", files.cert), ("key", files.key), ("CA", files.ca)):
        if path is not None and not path.is_file():
            raise TLSConfigError(f"TLS {what} {path} does not exist or is not a file")
    try:
        ctx.load_cert_chain(str(files.cert), str(files.key))
    except (ssl.SSLError, OSError) as err:
        raise TLSConfigError(
            f"cannot use TLS certificate {files.cert} with key {files.key}: {err}"
        ) from err
    if files.ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(files.ca))
        except (ssl.SSLError, OSError) as err:
            raise TLSConfigError(f"cannot use TLS CA {files.ca}: {err}") from err
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
