"""Where the volume catalogue lives when no ``--data-dir`` or config ``data_dir`` says."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path:
    """/var/lib/nbs as root, else $XDG_DATA_HOME/nbs (~/.local/share/nbs); NBS_DATA_DIR wins."""
    if "NBS_DATA_DIR" in os.environ:
        return Path(os.environ["NBS_DATA_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/nbs")
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "nbs"
