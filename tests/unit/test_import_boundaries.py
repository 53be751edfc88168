"""The architecture's import rules, read from docs/architecture.md's table and checked on the
source: every row, and every package or top-level module under some row."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "docs" / "architecture.md"
OURS = ("backend", "hypervisor")


def imports_in(path: Path) -> list[str]:
    """Every absolute import in one file, lazy and TYPE_CHECKING ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            if node.module:
                found.append(node.module)
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for top in OURS for p in sorted((ROOT / top).rglob("*.py"))}


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def rules() -> dict[str, tuple[str, ...]]:
    """``{row: what it may import}`` from the table under "Packages and their rules"."""
    section = TABLE.read_text().split("## Packages and their rules", 1)[1].split("\n## ", 1)[0]
    table: dict[str, tuple[str, ...]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        allowed = tuple(re.findall(r"`([a-z_.]+)`", cells[2]))
        assert all(name.startswith(OURS) for name in allowed), line
        table[cells[0].strip("`")] = allowed
    return table


def row_of(module: str, table: dict[str, tuple[str, ...]]) -> str | None:
    """The most specific row that covers ``module``."""
    covering = [row for row in table if under(module, row)]
    return max(covering, key=len, default=None)


RULES = rules()


def test_the_table_has_the_rows_the_checks_rely_on() -> None:
    assert {
        "backend.nbd",
        "backend.storage",
        "backend.server",
        "backend.volumes",
        "backend.api",
        "backend",
        "backend.cli",
        "hypervisor",
    } <= set(RULES)
    modules = sources()
    for row in RULES:  # no row names a module that is gone
        assert any(under(module, row) for module in modules), row


def test_every_module_falls_under_a_row() -> None:
    assert [m for m in sources() if row_of(m, RULES) is None] == []


def violations(row: str, modules: dict[str, Path]) -> list[str]:
    """Imports of backend and hypervisor, in the modules whose most specific row is ``row``,
    that are neither of the row's own package nor allowed by it."""
    # A package row's package; a module row's own package (a package may import itself).
    own = row if (ROOT / row.replace(".", "/")).is_dir() else row.rpartition(".")[0]
    bad = []
    for module, path in modules.items():
        if row_of(module, RULES) != row:
            continue
        for name in imports_in(path):
            if name.split(".")[0] in OURS and not any(under(name, ok) for ok in (own, *RULES[row])):
                bad.append(f"{module}: {name}")
    return bad


@pytest.mark.parametrize("row", sorted(RULES))
def test_row_holds(row: str) -> None:
    assert violations(row, sources()) == []


@pytest.mark.parametrize(
    ("module", "source", "row"),
    [
        ("backend.volumes.client", "from backend.api.client import client_for", "backend.volumes"),
        ("backend.server.volume_exports", "import backend.volumes.service", "backend.server"),
        ("backend.volumes.exports", "from backend.server.server import Server", "backend.volumes"),
        ("backend.config", "from hypervisor import cli", "backend"),
        ("hypervisor.kernel", "from backend.server import tls", "hypervisor"),
        ("backend.storage.file", "from backend.nbd import TLSPolicy", "backend.storage"),
    ],
)
def test_an_upward_import_is_caught(tmp_path: Path, module: str, source: str, row: str) -> None:
    """The check itself: the upward imports this layout removed are outside their rows."""
    path = tmp_path / "m.py"
    path.write_text(f"def later() -> None:\n    {source}\n")
    assert violations(row, {module: path}) == [f"{module}: {source.split()[1]}"]


def test_the_protocol_core_is_stdlib_only_and_io_free() -> None:
    io = {"socket", "ssl", "asyncio", "selectors", "threading"}
    bad = [
        f"{path.relative_to(ROOT)}: {name}"
        for module, path in sources().items()
        if under(module, "backend.nbd")
        for name in imports_in(path)
        if not under(name, "backend.nbd")
        and (name.split(".")[0] not in sys.stdlib_module_names or name.split(".")[0] in io)
    ]
    assert bad == []


def test_the_command_line_parses_and_serving_composes() -> None:
    """backend/cli.py turns arguments into a config; what runs is built in backend/serving.py
    (issue 11: the command-line module was the composition root)."""
    builders = {"Server", "VolumeService", "VolumeExports", "ApiServer", "MetricsEndpoint"}
    cli = {
        node.id
        for node in ast.walk(ast.parse((ROOT / "backend" / "cli.py").read_text()))
        if isinstance(node, ast.Name)
    }
    assert cli & (builders | {"signal"}) == set()
    serving = imports_in(ROOT / "backend" / "serving.py")
    assert {"backend.server.server", "backend.volumes.service", "signal"} <= set(serving)
