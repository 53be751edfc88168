from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.integration.conftest import NbsServer, require_tool


def test_nbdinfo_sees_export(nbs_server: Callable[..., NbsServer], disk: Path) -> None:
    nbdinfo = require_tool("nbdinfo")
    server = nbs_server("--listen", "127.0.0.1:0", "--export", f"disk={disk}")
    out = subprocess.run(
        [nbdinfo, "--json", server.uri("disk")], check=True, capture_output=True, text=True
    )
    info = json.loads(out.stdout)
    assert info["exports"][0]["export-size"] == 64 << 20
    assert server.stop() == 0
