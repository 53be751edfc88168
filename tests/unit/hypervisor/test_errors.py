"""One error root for the hypervisor package, drawn in hypervisor/errors.py; no name clashes.

Also the kernel package's shape: ``python -m hypervisor.kernel`` still runs, and each of its
modules says what it is for.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import backend.nbd
import hypervisor
import hypervisor.kernel
from hypervisor import cli, errors
from hypervisor.cli import FAILURE, USAGE_ERROR, CommandError, UsageError
from hypervisor.errors import HypervisorError
from hypervisor.kernel import KernelError, TlsUnsupportedError
from hypervisor.nbdclient import NbdClientError
from hypervisor.qmp import NeedsOptionError, QmpError
from hypervisor.remote import RemoteError
from hypervisor.target import TargetError

ROOT = Path(__file__).resolve().parents[3]


def hypervisor_modules() -> list[ModuleType]:
    names = [
        info.name
        for info in pkgutil.walk_packages(hypervisor.__path__, "hypervisor.")
        if not info.name.endswith("__main__")  # running it would run the CLI
    ]
    return [importlib.import_module(name) for name in names]


def exceptions_defined_in_hypervisor() -> list[type[BaseException]]:
    found = {
        obj
        for module in hypervisor_modules()
        for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__.startswith("hypervisor.")
    }
    return sorted(found, key=lambda cls: (cls.__module__, cls.__name__))


def test_every_hypervisor_error_derives_from_the_root() -> None:
    classes = exceptions_defined_in_hypervisor()
    assert len(classes) > 20  # the walk found the modules (qmp, kernel/*, netlink, remote …)
    outside = [
        f"{c.__module__}.{c.__name__}" for c in classes if not issubclass(c, errors.HypervisorError)
    ]
    assert outside == []


def test_the_root_docstring_draws_every_error() -> None:
    tree = errors.__doc__ or ""
    missing = [
        c.__name__
        for c in exceptions_defined_in_hypervisor()
        if not re.search(rf"─ {c.__name__}\b|^    {c.__name__}$", tree, re.M)
    ]
    assert missing == []


def test_no_error_name_is_also_one_of_backend_nbds() -> None:
    ours = {c.__name__ for c in exceptions_defined_in_hypervisor()}
    theirs = {
        name
        for name, obj in vars(backend.nbd).items()
        if inspect.isclass(obj) and issubclass(obj, BaseException)
    }
    assert "ExportUnavailableError" in theirs  # the clash this guards against
    assert ours & theirs == set()


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (TargetError("not a volume"), USAGE_ERROR),
        (UsageError("missing binding"), USAGE_ERROR),
        (NeedsOptionError("needs --persistent"), USAGE_ERROR),
        (CommandError("failed"), FAILURE),
        (QmpError("QEMU said no"), FAILURE),
        (NbdClientError("no such export"), FAILURE),
        (KernelError("modprobe nbd"), FAILURE),
        (RemoteError("ssh: host down"), FAILURE),
    ],
)
def test_run_turns_each_error_into_one_line_and_its_exit_code(
    error: HypervisorError, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(_args: argparse.Namespace) -> int:
        raise error

    assert cli.run(argparse.Namespace(func=fail)) == code
    assert capsys.readouterr().err == f"nbs: error: {error}\n"


def test_nbs_attach_kernel_reports_a_kernel_error_in_one_line() -> None:
    """The real CLI: the kernel path refuses nbds:// before it needs root or the driver."""
    done = subprocess.run(
        [sys.executable, "-m", "backend.cli", "attach", "--kernel", "nbds://127.0.0.1/vol"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert issubclass(TlsUnsupportedError, HypervisorError)
    assert done.returncode == FAILURE
    assert done.stdout == ""
    assert done.stderr.startswith("nbs: error: nbds://127.0.0.1")
    assert "TLS" in done.stderr
    assert done.stderr.count("\n") == 1


def test_python_m_hypervisor_kernel_still_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hypervisor.kernel", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m hypervisor.kernel")
    for command in ("attach", "detach", "attached", "status", "supervise"):
        assert command in done.stdout


def test_each_kernel_module_says_what_it_is_for() -> None:
    modules = [m for m in hypervisor_modules() if m.__name__.startswith("hypervisor.kernel.")]
    assert len(modules) >= 9  # errors, records, family, sysfs, state, … cli
    assert [m.__name__ for m in modules if not (m.__doc__ or "").strip()] == []
    assert hypervisor.kernel.__doc__ is not None
    for module in modules:
        assert module.__name__.rsplit(".", 1)[1] in hypervisor.kernel.__doc__
