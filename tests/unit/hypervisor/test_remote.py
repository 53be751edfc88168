"""The SSH side of the kernel fallback without SSH: host specs, commands, answers."""

from __future__ import annotations

import json

import pytest

from hypervisor import kernel
from hypervisor.remote import RemoteError, SshHost, SshOptions, command, parse_answer


@pytest.mark.parametrize(
    ("spec", "host"),
    [
        ("bm1", SshHost("bm1")),
        ("root@bm1", SshHost("bm1", "root")),
        ("root@bm1:2222", SshHost("bm1", "root", 2222)),
        ("10.1.2.3:22", SshHost("10.1.2.3")),
        ("[::1]:2200", SshHost("::1", None, 2200)),
        ("ops@[fe80::1]", SshHost("fe80::1", "ops")),
    ],
)
def test_host_specs(spec: str, host: SshHost) -> None:
    assert SshHost.parse(spec) == host


@pytest.mark.parametrize("spec", ["", "a b", "host:port", "host:70000", "::1", "@host"])
def test_bad_host_specs(spec: str) -> None:
    with pytest.raises(ValueError, match=r"HOST|range"):
        SshHost.parse(spec)


def test_host_prints_back() -> None:
    assert str(SshHost("::1", "root", 2200)) == "root@[::1]:2200"
    assert str(SshHost("bm1")) == "bm1"


def test_command_is_quoted_and_asks_for_json() -> None:
    options = SshOptions(python="/opt/nbs/bin/python", sudo=True, state_dir="/run/x y")
    line = command(["attach", "nbd://h:1/a b"], options)
    assert line == (
        "sudo -n /opt/nbs/bin/python -m hypervisor.kernel --state-dir '/run/x y' "
        "attach 'nbd://h:1/a b' --json"
    )
    assert command(["attached"], SshOptions()) == "python3 -m hypervisor.kernel attached --json"


def test_answers_are_parsed() -> None:
    assert parse_answer("h", "cmd", 0, b"[]\n", b"") == []


def test_remote_errors_come_back_as_their_own_class() -> None:
    out = json.dumps({"error": {"type": "NoSuchExportError", "message": "no export 'x'"}})
    with pytest.raises(kernel.NoSuchExportError, match=r"^bm1: no export 'x'$"):
        parse_answer("bm1", "cmd", 1, out.encode(), b"")
    out = json.dumps({"error": {"type": "SomethingNew", "message": "odd"}})
    with pytest.raises(kernel.KernelError, match="odd"):
        parse_answer("bm1", "cmd", 1, out.encode(), b"")


def test_a_command_that_did_not_run_is_a_remote_error() -> None:
    err = b"Traceback...\nModuleNotFoundError: No module named 'hypervisor'\n"
    with pytest.raises(RemoteError, match=r"exited 1: .*No module named 'hypervisor'"):
        parse_answer("bm1", "python3 -m hypervisor.kernel", 1, b"", err)
    with pytest.raises(RemoteError, match="exited 0"):
        parse_answer("bm1", "cmd", 0, b"not json", b"")
