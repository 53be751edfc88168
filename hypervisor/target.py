"""Where a volume is served: an NBD URI, parsed (the NBD URI spec, doc/uri.md in nbd).

    nbd://HOST[:PORT]/EXPORT            nbds://… is the same over TLS
    nbd+unix:///EXPORT?socket=PATH      nbds+unix://… likewise
    query: tls-certificates=DIR (ca-cert.pem, client-cert.pem, client-key.pem), tls-hostname=H

A bare volume name means that export on the default server (``NBS_SERVER`` or
nbd://127.0.0.1:10809).
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any

from hypervisor.errors import HypervisorError

DEFAULT_PORT = 10809
DEFAULT_SERVER = f"nbd://127.0.0.1:{DEFAULT_PORT}"
_SCHEMES = {
    "nbd": (False, False),
    "nbds": (True, False),
    "nbd+unix": (False, True),
    "nbds+unix": (True, True),
}
_VOLUME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


class TargetError(HypervisorError, ValueError):
    """Not a volume name or NBD URI we can use."""


@dataclasses.dataclass(frozen=True)
class NbdTarget:
    """One export on one NBD server."""

    export: str
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: Path | None = None
    tls: bool = False
    tls_dir: Path | None = None
    tls_hostname: str | None = None

    @property
    def volume(self) -> str:
        """The name the volume goes by on the VM side (serial, device ids)."""
        return self.export or "default"

    def uri(self) -> str:
        scheme = ("nbds" if self.tls else "nbd") + ("+unix" if self.socket else "")
        query: dict[str, str] = {}
        if self.socket is not None:
            query["socket"] = str(self.socket)
        if self.tls_dir is not None:
            query["tls-certificates"] = str(self.tls_dir)
        if self.tls_hostname:
            query["tls-hostname"] = self.tls_hostname
        qs = ("?" + urllib.parse.urlencode(query, safe="/")) if query else ""
        path = urllib.parse.quote(self.export)
        if self.socket is not None:
            return f"{scheme}:///{path}{qs}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{path}{qs}"

    def qemu_server(self) -> dict[str, Any]:
        """The SocketAddress QMP expects (port is a string in QEMU 7.2)."""
        if self.socket is not None:
            return {"type": "unix", "path": str(self.socket)}
        return {"type": "inet", "host": self.host, "port": str(self.port)}

    @classmethod
    def parse(cls, what: str, default_server: str | None = None) -> NbdTarget:
        """A URI, or a bare volume name on ``default_server`` (``NBS_SERVER`` by default)."""
        if "://" not in what:
            if not _VOLUME.match(what):
                raise TargetError(f"{what!r} is neither a volume name nor an NBD URI")
            server = default_server or os.environ.get("NBS_SERVER", DEFAULT_SERVER)
            base = cls.parse(server.rstrip("/") + "/")
            return dataclasses.replace(base, export=what)
        url = urllib.parse.urlsplit(what)
        if url.scheme not in _SCHEMES:
            raise TargetError(f"unsupported URI scheme {url.scheme!r} in {what!r}")
        tls, unix = _SCHEMES[url.scheme]
        query = dict(urllib.parse.parse_qsl(url.query))
        export = urllib.parse.unquote(url.path[1:] if url.path.startswith("/") else url.path)
        tls_dir = Path(query["tls-certificates"]) if "tls-certificates" in query else None
        common: dict[str, Any] = {
            "export": export,
            "tls": tls,
            "tls_dir": tls_dir,
            "tls_hostname": query.get("tls-hostname"),
        }
        if unix:
            if "socket" not in query:
                raise TargetError(f"{what!r}: nbd+unix URIs need ?socket=PATH")
            return cls(socket=Path(query["socket"]), **common)
        if not url.hostname:
            raise TargetError(f"{what!r}: no host")
        try:
            port = url.port or DEFAULT_PORT
        except ValueError as err:
            raise TargetError(f"{what!r}: {err}") from None
        return cls(host=url.hostname, port=port, **common)
