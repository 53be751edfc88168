"""Comments, docstrings and docs name files and modules that exist.

Prose that names a module drifts when code moves (a constants docstring named two modules that
never existed; a package docstring still promised its catalogue "later").  Checked here: every
``*.py`` / ``*.md`` path under the project's folders named in the source or in docs, every
``backend.…``/``hypervisor.…`` module named in docs, and the module map of each package
docstring that has one (it lists exactly the package's modules).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = "backend|hypervisor|images|tests|docs|bench|scripts|ansible"
PATH = re.compile(rf"(?<![\w/.-])((?:{FOLDERS})/[\w./-]*\w\.(?:py|md))\b")
MODULE = re.compile(r"`((?:backend|hypervisor|images)(?:\.\w+)+)")
# A package docstring's module map: lines "    name.py   what it holds".
MAP_LINE = re.compile(r"^\s{4}(\w+\.py)\s{2,}\S", re.MULTILINE)
MAPPED_PACKAGES = ["backend/api", "backend/replication", "backend/storage/cow", "backend/volumes"]
FILE_SUFFIXES = {"py", "md", "yml", "yaml", "json", "toml"}  # `hypervisor.yml` is a file


def project_files(*suffixes: str) -> list[Path]:
    """The project's own files with these suffixes (not the venv, not images/cache)."""
    found = [p for p in ROOT.glob("*") if p.is_file() and p.suffix in suffixes]
    for folder in FOLDERS.split("|"):
        found += [
            p
            for p in (ROOT / folder).rglob("*")
            if p.suffix in suffixes and "cache" not in p.relative_to(ROOT).parts[:2]
        ]
    return sorted(found)


def is_module(dotted: str) -> bool:
    """``dotted`` or a prefix of it (the rest being attributes) is a module or package."""
    parts = dotted.split(".")
    for end in range(len(parts), 1, -1):
        base = ROOT.joinpath(*parts[:end])
        if base.with_suffix(".py").is_file() or base.is_dir():
            return True
    return False


def test_named_files_exist() -> None:
    missing = []
    for path in project_files(".py", ".md"):
        if path.is_relative_to(ROOT / "docs" / "decisions"):
            continue  # decision records tell history: they name what was there then
        for number, line in enumerate(path.read_text().splitlines(), 1):
            missing += [
                f"{path.relative_to(ROOT)}:{number}: {name}"
                for name in PATH.findall(line)
                if not (ROOT / name).exists()
            ]
    assert missing == []


def test_modules_named_in_docs_exist() -> None:
    missing = []
    for path in project_files(".md"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            missing += [
                f"{path.relative_to(ROOT)}:{number}: {name}"
                for name in MODULE.findall(line)
                if name.rsplit(".", 1)[1] not in FILE_SUFFIXES and not is_module(name)
            ]
    assert missing == []


@pytest.mark.parametrize("package", MAPPED_PACKAGES)
def test_package_docstring_maps_every_module(package: str) -> None:
    init = ROOT / package / "__init__.py"
    docstring = ast.get_docstring(ast.parse(init.read_text())) or ""
    listed = set(MAP_LINE.findall(docstring))
    modules = {p.name for p in (ROOT / package).glob("*.py") if p.name != "__init__.py"}
    assert listed == modules
