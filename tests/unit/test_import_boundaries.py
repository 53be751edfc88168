"""The architecture's import rules (docs/architecture.md), checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEAM = ROOT / "backend" / "cli.py"


def imports_of(package: str) -> list[tuple[Path, str]]:
    found = []
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(path, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((path, node.module))
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        # The protocol core is sans-IO and knows nothing of storage or transport.
        ("backend.nbd", ("socket", "ssl", "asyncio", "selectors", "threading", "backend.")),
        # Storage never imports the wire format or the server.
        ("backend.storage", ("backend.nbd", "backend.server", "backend.volumes", "hypervisor")),
        # backend and hypervisor do not import each other (hypervisor may use backend.nbd);
        # the command line (backend/cli.py) is the one seam that registers both.
        ("backend", ("hypervisor",)),
    ],
)
def test_package_does_not_import(package: str, forbidden: tuple[str, ...]) -> None:
    own = package + "."
    bad = [
        f"{path.relative_to(ROOT)}: {name}"
        for path, name in imports_of(package)
        if path != SEAM
        and any(name == f.rstrip(".") or name.startswith(f) for f in forbidden)
        and not name.startswith(own)
        and name != package
    ]
    assert bad == []


def test_hypervisor_uses_only_the_protocol_core_of_backend() -> None:
    bad = [
        f"{path.relative_to(ROOT)}: {name}"
        for path, name in imports_of("hypervisor")
        if name.startswith("backend") and not name.startswith("backend.nbd")
    ]
    assert bad == []
