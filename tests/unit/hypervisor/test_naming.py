"""The names a volume goes by in a VM: serial, QEMU node/device id, libvirt alias."""

from __future__ import annotations

import re

import pytest

from hypervisor.naming import (
    alias_for,
    by_id_path,
    export_of_filename,
    qemu_id_for,
    serial_for,
)

QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,30}")  # QEMU's id_wellformed + node_name[32]
ALIAS = re.compile(r"ua-[A-Za-z0-9_-]+")  # libvirt's user aliases
SERIAL = re.compile(r"[A-Za-z0-9._+-]{1,20}")  # virtio's 20 bytes; chars udev keeps in by-id

NAMES = [
    "v",
    "data1",
    "abcdefghijklmnopqrst",  # exactly 20
    "abcdefghijklmnopqrst-1",
    "abcdefghijklmnopqrst-2",
    "a" * 27,
    "a" * 28,
    "x" * 60,
    "y" * 255,
    "my.volume",
    "with space",
    "ünïcödé-name",
    "default",
]


@pytest.mark.parametrize("name", NAMES)
def test_every_name_gets_identifiers_within_each_limit(name: str) -> None:
    assert SERIAL.fullmatch(serial_for(name)), serial_for(name)
    assert len(serial_for(name).encode()) <= 20
    assert QEMU_ID.fullmatch(qemu_id_for(name)), qemu_id_for(name)
    assert ALIAS.fullmatch(alias_for(name)), alias_for(name)
    assert len(alias_for(name)) <= 64


def test_identifiers_are_unique_per_name_and_deterministic() -> None:
    for make in (serial_for, qemu_id_for, alias_for):
        assert len({make(n) for n in NAMES}) == len(NAMES), make.__name__
        assert [make(n) for n in NAMES] == [make(n) for n in NAMES]


def test_names_that_fit_are_used_verbatim() -> None:
    assert serial_for("abcdefghijklmnopqrst") == "abcdefghijklmnopqrst"
    assert qemu_id_for("data1") == "nbs-data1"
    assert qemu_id_for("a" * 27) == "nbs-" + "a" * 27
    assert alias_for("lv1") == "ua-nbs-lv1"
    assert by_id_path("data1") == "/dev/disk/by-id/virtio-data1"


def test_names_that_do_not_fit_keep_a_readable_start_and_a_hash() -> None:
    one, two = serial_for("abcdefghijklmnopqrst-1"), serial_for("abcdefghijklmnopqrst-2")
    assert one.startswith("abcdefghijk+")
    assert one != two
    assert len(one) == 20
    # "+" marks a hashed serial: no verbatim serial contains it, so the two kinds never clash.
    assert "+" not in serial_for("abcdefghijk")
    assert qemu_id_for("a" * 28).startswith("nbs-" + "a" * 18 + "-")
    assert len(qemu_id_for("a" * 28)) == 31


@pytest.mark.parametrize(
    ("filename", "export"),
    [
        ("nbd://127.0.0.1:10809/data1", "data1"),
        ("nbd://127.0.0.1:10809/", ""),
        ("nbd+unix:///vol.a?socket=/run/nbs.sock", "vol.a"),
        ('json:{"driver": "nbd", "export": "tls-vol", "tls-creds": "c"}', "tls-vol"),
        ("json:{broken", None),
        ("nbd://127.0.0.1:10809", None),
    ],
)
def test_export_is_read_back_from_the_filename_qemu_reports(
    filename: str, export: str | None
) -> None:
    assert export_of_filename(filename) == export
