"""The catalogue's transactions: named changes that commit together or not at all, and the
rule that SQL is written in backend/volumes/catalogue.py only."""

from __future__ import annotations

import ast
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.volumes.catalogue import FILE_STORAGE, Catalogue, SnapshotRow, VolumeRow
from backend.volumes.storages import FILE, parse_storage

ROOT = Path(__file__).resolve().parents[3]
SQL = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP|PRAGMA|BEGIN|COMMIT)\s")


@pytest.fixture
def catalogue(tmp_path: Path) -> Iterator[Catalogue]:
    cat = Catalogue(tmp_path / "catalogue.sqlite3")
    yield cat
    cat.close()


def volume(name: str, top: str, *, origin: str | None = None) -> VolumeRow:
    return VolumeRow(name, 4096, "", {"k": "v"}, False, top, origin, "creating", 1.0)


def test_changes_commit_together_and_bump_the_generation(catalogue: Catalogue) -> None:
    before = catalogue.generation()
    with catalogue.transaction() as changes:
        changes.add_layer("base", None)
        changes.add_volume(volume("v", "base"))
        changes.set_state("v", "ready")
        changes.set_size("v", 8192)
    row = catalogue.volume("v")
    assert row is not None
    assert (row.state, row.size, row.labels) == ("ready", 8192, {"k": "v"})
    assert catalogue.generation() == before + 1


def test_a_failed_transaction_changes_nothing(catalogue: Catalogue) -> None:
    before = catalogue.generation()

    def create_then_fail() -> None:
        with catalogue.transaction() as changes:
            changes.add_layer("base", None)
            changes.add_volume(volume("v", "base"))
            raise RuntimeError("storage work failed")

    with pytest.raises(RuntimeError):
        create_then_fail()
    assert catalogue.volume("v") is None
    assert catalogue.parents() == {}
    assert catalogue.generation() == before


def test_a_state_the_schema_refuses_rolls_back(catalogue: Catalogue) -> None:
    with catalogue.transaction() as changes:
        changes.add_layer("base", None)
        changes.add_volume(volume("v", "base"))

    def resize_and_set_a_bad_state() -> None:
        with catalogue.transaction() as changes:
            changes.set_size("v", 8192)
            changes.set_state("v", "gone")

    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        resize_and_set_a_bad_state()
    row = catalogue.volume("v")
    assert row is not None
    assert (row.state, row.size) == ("creating", 4096)


def test_snapshot_moves_the_top_and_flatten_cuts_the_chain(catalogue: Catalogue) -> None:
    with catalogue.transaction() as changes:
        changes.add_layer("base", None)
        changes.add_volume(volume("gold", "base"))
    with catalogue.transaction() as changes:  # a snapshot that freezes the top
        changes.add_layer("top", "base")
        changes.set_top("gold", "top")
        changes.add_snapshot(SnapshotRow("gold", "s1", "base", 4096, 2.0))
    with catalogue.transaction() as changes:  # a clone of it
        changes.add_layer("clone", "base")
        changes.add_volume(volume("c", "clone", origin="gold@s1"))
    assert catalogue.chain("clone") == ["base", "clone"]
    assert catalogue.snapshots("gold") == [SnapshotRow("gold", "s1", "base", 4096, 2.0)]
    with catalogue.transaction() as changes:  # flattened
        changes.set_parent("clone", None)
        changes.set_origin("c", None)
    assert catalogue.chain("clone") == ["clone"]
    clone = catalogue.volume("c")
    assert clone is not None
    assert clone.origin is None
    gold = catalogue.volume("gold")
    assert gold is not None
    assert gold.top == "top"


def test_removals(catalogue: Catalogue) -> None:
    with catalogue.transaction() as changes:
        changes.add_layer("base", None)
        changes.add_layer("top", "base")
        changes.add_volume(volume("v", "top"))
        changes.add_snapshot(SnapshotRow("v", "s1", "base", 4096, 2.0))
        changes.add_snapshot(SnapshotRow("v", "s2", "base", 4096, 3.0))
    with catalogue.transaction() as changes:
        changes.remove_snapshot("v", "s1")
    assert [s.name for s in catalogue.snapshots("v")] == ["s2"]
    with catalogue.transaction() as changes:
        changes.remove_snapshots("v")
        changes.remove_volume("v")
        changes.remove_layer("top")
        changes.remove_layer("base")
    assert catalogue.volumes(state=None) == []
    assert catalogue.snapshots() == []
    assert catalogue.parents() == {}


CATALOGUE = ROOT / "backend" / "volumes" / "catalogue.py"


def sql_in(path: Path) -> list[str]:
    """The string literals in ``path`` that are SQL statements."""
    return [
        f"{path.relative_to(ROOT)}:{node.lineno}: {node.value[:40]}"
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.match(node.value)
    ]


def test_sql_is_written_in_the_catalogue_only() -> None:
    others = [p for p in sorted((ROOT / "backend").rglob("*.py")) if p != CATALOGUE]
    assert [line for path in others for line in sql_in(path)] == []


def test_the_check_sees_the_catalogue_s_sql() -> None:
    found = sql_in(CATALOGUE)
    assert any("UPDATE volumes SET size" in line for line in found)
    assert any("DELETE FROM snapshots" in line for line in found)


def test_specs_are_typed_and_the_schema_default_is_file_s_json(catalogue: Catalogue) -> None:
    assert FILE.to_json() == FILE_STORAGE
    spec = parse_storage("dir:path=/srv/x,chunk_size=1MiB+retry:attempts=3")
    with catalogue.transaction() as changes:
        changes.add_layer("base", None, spec)
    assert catalogue.layer_storage("base") == spec
    assert catalogue.layer_storage("none") is None
