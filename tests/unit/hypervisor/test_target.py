"""NBD URIs and volume names as the hypervisor side reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypervisor.target import NbdTarget, TargetError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nbd://10.0.0.5:10900/vol1", NbdTarget("vol1", "10.0.0.5", 10900)),
        ("nbd://host/vol1", NbdTarget("vol1", "host", 10809)),
        ("nbd://[::1]:7/v", NbdTarget("v", "::1", 7)),
        ("nbd+unix:///v?socket=/run/nbs.sock", NbdTarget("v", socket=Path("/run/nbs.sock"))),
        (
            "nbds://h:1/v?tls-certificates=/etc/pki/nbs&tls-hostname=store",
            NbdTarget("v", "h", 1, tls=True, tls_dir=Path("/etc/pki/nbs"), tls_hostname="store"),
        ),
    ],
)
def test_uris_parse_and_print_back(text: str, expected: NbdTarget) -> None:
    target = NbdTarget.parse(text)
    assert target == expected
    assert NbdTarget.parse(target.uri()) == target


def test_bare_volume_names_use_the_default_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NBS_SERVER", raising=False)
    assert NbdTarget.parse("data1") == NbdTarget("data1", "127.0.0.1", 10809)
    monkeypatch.setenv("NBS_SERVER", "nbd+unix:///?socket=/s")
    assert NbdTarget.parse("data1") == NbdTarget("data1", socket=Path("/s"))
    assert NbdTarget.parse("d", "nbd://store:1") == NbdTarget("d", "store", 1)


def test_qemu_socket_address_uses_a_string_port() -> None:
    assert NbdTarget.parse("nbd://h:5/v").qemu_server() == {
        "type": "inet",
        "host": "h",
        "port": "5",
    }
    assert NbdTarget.parse("nbd+unix:///v?socket=/s").qemu_server() == {
        "type": "unix",
        "path": "/s",
    }


@pytest.mark.parametrize(
    "text", ["http://h/v", "nbd+unix:///v", "nbd:///v", "../etc", "a/b", "", "nbd://h:99999/v"]
)
def test_bad_targets_are_refused(text: str) -> None:
    with pytest.raises(TargetError):
        NbdTarget.parse(text)
