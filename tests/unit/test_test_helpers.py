"""How the tests share code, checked on their source: helpers live in modules that are not
test modules, and "this test needs Python module X" goes through one helper.

A test module imported by another is collected as itself and read as a library at once, and
its private names change with its tests; a copied import-or-skip preamble drifts (one raised
under CI, another skipped).  tests/integration/conftest.py ``require_module`` is the one way.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
REQUIRE_MODULE = TESTS / "integration" / "conftest.py"


def sources() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(TESTS.rglob("*.py")):
        yield str(path.relative_to(ROOT)), ast.parse(path.read_text(), str(path))


def test_no_test_imports_a_test_module_or_private_helpers() -> None:
    bad = []
    for name, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules, names = [node.module], [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                modules, names = [alias.name for alias in node.names], []
            else:
                continue
            for module in modules:
                if not module.startswith("tests."):
                    continue
                if module.rsplit(".", 1)[-1].startswith("test_"):
                    bad.append(f"{name}:{node.lineno} imports the test module {module}")
                private = [n for n in names if n.startswith("_")]
                if private:
                    bad.append(f"{name}:{node.lineno} imports private {private} from {module}")
    assert bad == []


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(
        isinstance(k, ast.Name) and k.id in {"ImportError", "ModuleNotFoundError"} for k in kinds
    )


def test_optional_modules_are_required_through_one_helper() -> None:
    bad = []
    for name, tree in sources():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "importorskip"
                and isinstance(node.value, ast.Name)
                and node.value.id == "pytest"
            ):
                bad.append(f"{name}:{node.lineno} pytest.importorskip")
            elif (
                isinstance(node, ast.Try)
                and any(_catches_import_error(h) for h in node.handlers)
                and name != str(REQUIRE_MODULE.relative_to(ROOT))
            ):
                bad.append(f"{name}:{node.lineno} try/except ImportError")
    assert bad == [], "use tests.integration.conftest.require_module"
