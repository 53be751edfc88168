"""The registry of storage kinds and layers: one entry each, and docs/storage.md says the same."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.storage import MemoryStorage, cow
from backend.storage.chunked import ChunkedStorage
from backend.storage.layers import CachingStorage, RetryingStorage
from backend.volumes.backends import ChunkedBackend, FileBackend
from backend.volumes.kinds import KINDS, LAYERS, docs_tables
from backend.volumes.locations import Backends
from backend.volumes.service import DEFAULT_CHUNK
from backend.volumes.storages import parse_storage

ROOT = Path(__file__).resolve().parents[3]
MiB = 1 << 20


def test_docs_tables_are_the_registry() -> None:
    # The option tables in docs/storage.md are generated from KINDS and LAYERS; regenerate them
    # with `python -c "from backend.volumes.kinds import docs_tables; print(docs_tables())"`.
    assert docs_tables() in (ROOT / "docs" / "storage.md").read_text()


def test_every_option_default_passes_its_own_limits() -> None:
    for name, kind in [*KINDS.items(), *LAYERS.items()]:
        for key, option in kind.options.items():
            if option.default not in (None, ""):
                assert option.parse(str(option.default)) == option.default, (name, key)


def test_spec_records_only_what_was_given_and_factories_get_defaults(tmp_path: Path) -> None:
    spec = parse_storage("dir+cache+retry:attempts=3")
    assert spec.params == ()
    assert LAYERS["retry"].resolved(dict(spec.layers[1].params)) == {
        "attempts": 3,
        "deadline": 30.0,
        "backoff": 0.05,
    }
    backends = Backends(tmp_path, 128 * 1024)
    try:
        chunked = backends.get(spec)
        assert isinstance(chunked, ChunkedBackend)
        assert chunked.chunk_size == 4 * MiB  # the kind's default
        files = backends.get(parse_storage("file"))
        assert isinstance(files, FileBackend)
        assert files.chunk_size == 128 * 1024  # the service's, as the docs say
        assert files.directory == tmp_path / "layers"
        assert backends.get(parse_storage("dir+cache")) is chunked  # one per location
    finally:
        backends.close()


def test_the_file_default_shown_is_the_services() -> None:
    assert DEFAULT_CHUNK == cow.DEFAULT_CHUNK_SIZE
    assert "`chunk_size` (64KiB;" in KINDS["file"].options["chunk_size"].describe("chunk_size")


def test_layers_wrap_in_the_registry_order_with_defaults() -> None:
    cache = LAYERS["cache"]
    storage = cache.wrap(MemoryStorage(MiB), cache.resolved({}))
    assert isinstance(storage, CachingStorage)
    assert repr(storage).endswith(f"{256 * MiB}, write-through)")
    retry = LAYERS["retry"]
    outer = retry.wrap(storage, retry.resolved({"attempts": 2}))
    assert isinstance(outer, RetryingStorage)
    assert outer.inner is storage
    outer.close()


@pytest.mark.parametrize("kind", ["s3", "rados"])
def test_stores_whose_missing_container_means_no_data(kind: str) -> None:
    assert KINDS[kind].missing_container_is_empty
    assert not KINDS["dir"].missing_container_is_empty  # an unmounted disk comes back


def test_a_dir_volume_opens_through_its_kind(tmp_path: Path) -> None:
    backends = Backends(tmp_path, 64 * 1024)
    try:
        backend = backends.get(parse_storage(f"dir:path={tmp_path},chunk_size=64KiB"))
        backend.create("top", MiB)
        storage = backend.open(["top"], read_only=False)
        assert isinstance(storage, ChunkedStorage)
        storage.write(0, b"x")
        assert storage.capabilities.can_resize  # an opened chain is layered
        storage.close()
    finally:
        backends.close()
