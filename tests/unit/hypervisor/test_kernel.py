"""The kernel nbd fallback without a kernel: messages, sizing, state, sysfs, the supervisor."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from backend.nbd.constants import TransmissionFlag
from hypervisor import kernel, netlink
from hypervisor.kernel import (
    Cmd,
    KernelDevice,
    NbdAttr,
    Record,
    attaching,
    family,
    handshake,
    records,
)
from hypervisor.kernel import state as state_files
from hypervisor.kernel import supervisor as supervision
from hypervisor.kernel import sysfs as sysfs_module
from hypervisor.nbdclient import ExportInfo
from hypervisor.netlink import Attr, GenlMessage, GenlSocket
from hypervisor.target import NbdTarget
from tests.unit.hypervisor.fake_netlink import NBD_FAMILY_ID, NBD_GROUP_ID, FakeKernel

URI = "nbd://10.0.2.100:10809/vol"
BACKEND = "nbs:" + URI
MULTI = TransmissionFlag.HAS_FLAGS | TransmissionFlag.CAN_MULTI_CONN
SINGLE = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH


def record(index: int = 0, **changes: object) -> Record:
    fields: dict[str, Any] = {
        "index": index,
        "target": URI,
        "backend_id": BACKEND,
        "interface": "netlink",
        "connections": 1,
        "size": 64 << 20,
        "block_size": 4096,
        "flags": int(SINGLE),
        "timeout": 30,
        "dead_conn_timeout": 120,
        "pid": None,
    }
    fields.update(changes)
    return Record(**fields)


def by_type(attrs: list[Attr]) -> dict[int, Attr]:
    return {a.type: a for a in attrs}


def socket_fds(attr: Attr) -> list[int]:
    assert attr.type == NbdAttr.SOCKETS
    assert attr.nested
    fds = []
    for item in attr.as_attrs():
        assert item.type == family.SOCK_ITEM
        (fd,) = item.as_attrs()
        assert fd.type == family.SOCK_FD
        fds.append(fd.as_u32())
    return fds


# -- messages -------------------------------------------------------------------------------


def test_connect_carries_every_attribute_and_no_index() -> None:
    attrs = family.connect_attrs(
        fds=[5, 6],
        size=1 << 30,
        block_size=4096,
        server_flags=int(MULTI),
        timeout=30,
        dead_conn_timeout=120,
        backend_id=BACKEND,
    )
    got = by_type(attrs)
    assert NbdAttr.INDEX not in got
    assert got[NbdAttr.SIZE_BYTES].as_u64() == 1 << 30
    assert got[NbdAttr.BLOCK_SIZE_BYTES].as_u64() == 4096
    assert got[NbdAttr.SERVER_FLAGS].as_u64() == MULTI
    assert got[NbdAttr.TIMEOUT].as_u64() == 30
    assert got[NbdAttr.DEAD_CONN_TIMEOUT].as_u64() == 120
    assert got[NbdAttr.BACKEND_IDENTIFIER].payload == BACKEND.encode() + b"\0"
    assert socket_fds(got[NbdAttr.SOCKETS]) == [5, 6]
    # Numbers other than INDEX are u64 on the wire (nbd_attr_policy).
    for kind in (NbdAttr.SIZE_BYTES, NbdAttr.TIMEOUT, NbdAttr.SERVER_FLAGS):
        assert len(got[kind].payload) == 8


def test_connect_with_an_index_puts_it_first_as_u32() -> None:
    attrs = family.connect_attrs(
        fds=[3],
        size=512,
        block_size=512,
        server_flags=1,
        timeout=1,
        dead_conn_timeout=1,
        backend_id="b",
        index=7,
    )
    assert attrs[0] == netlink.u32(NbdAttr.INDEX, 7)


def test_reconfigure_names_the_device_the_backend_and_the_new_sockets() -> None:
    attrs = family.reconfigure_attrs(index=2, fds=[9], backend_id=BACKEND)
    got = by_type(attrs)
    assert set(got) == {NbdAttr.INDEX, NbdAttr.BACKEND_IDENTIFIER, NbdAttr.SOCKETS}
    assert got[NbdAttr.INDEX].as_u32() == 2
    assert got[NbdAttr.BACKEND_IDENTIFIER].as_string() == BACKEND
    assert socket_fds(got[NbdAttr.SOCKETS]) == [9]


def test_disconnect_and_status_messages() -> None:
    assert family.disconnect_attrs(4) == [netlink.u32(NbdAttr.INDEX, 4)]
    assert family.status_attrs() == []
    assert family.status_attrs(1) == [netlink.u32(NbdAttr.INDEX, 1)]


def status_reply(*devices: tuple[int, int]) -> list[Attr]:
    items = [
        Attr(
            family.DEVICE_ITEM,
            netlink.encode_attrs(
                [netlink.u32(family.DEVICE_INDEX, i), netlink.u8(family.DEVICE_CONNECTED, c)]
            ),
        )
        for i, c in devices
    ]
    return [Attr(NbdAttr.DEVICE_LIST, netlink.encode_attrs(items))]


def test_parse_status_reads_the_device_list() -> None:
    reply = GenlMessage(NBD_FAMILY_ID, Cmd.STATUS, tuple(status_reply((1, 0), (0, 1))))
    assert family.parse_status([reply]) == [
        kernel.DeviceStatus(0, True),
        kernel.DeviceStatus(1, False),
    ]


def test_link_dead_indexes_counts_one_per_notification() -> None:
    dead = GenlMessage(NBD_FAMILY_ID, Cmd.LINK_DEAD, (netlink.u32(NbdAttr.INDEX, 3),))
    other = GenlMessage(NBD_FAMILY_ID + 1, Cmd.LINK_DEAD, (netlink.u32(NbdAttr.INDEX, 4),))
    status = GenlMessage(NBD_FAMILY_ID, Cmd.STATUS, ())
    assert family.link_dead_indexes([dead, other, status, dead], NBD_FAMILY_ID) == [3, 3]


# -- the family over a fake kernel ----------------------------------------------------------


def nbd_over(fake: FakeKernel) -> kernel.NbdNetlink:
    return kernel.NbdNetlink(GenlSocket(fake))


def test_connect_sends_one_request_and_returns_the_kernels_index() -> None:
    fake = FakeKernel(handlers={Cmd.CONNECT: lambda r: [[netlink.u32(NbdAttr.INDEX, 5)]]})
    nl = nbd_over(fake)
    index = nl.connect(
        fds=[7],
        size=4096,
        block_size=512,
        server_flags=1,
        timeout=30,
        dead_conn_timeout=120,
        backend_id=BACKEND,
    )
    assert index == 5
    (request,) = fake.commands()
    assert request.cmd == Cmd.CONNECT
    assert request.version == family.GENL_VERSION
    assert socket_fds(cast(Attr, request.attr(NbdAttr.SOCKETS))) == [7]


def refuse(code: int) -> Callable[[GenlMessage], list[list[Attr]]]:
    def handler(_request: GenlMessage) -> list[list[Attr]]:
        raise OSError(code, os.strerror(code))

    return handler


def test_eperm_becomes_not_permitted() -> None:
    nl = nbd_over(FakeKernel(handlers={Cmd.DISCONNECT: refuse(errno.EPERM)}))
    with pytest.raises(kernel.NotPermittedError, match="CAP_SYS_ADMIN"):
        nl.disconnect(0)


def test_other_refusals_become_device_errors_with_errno() -> None:
    nl = nbd_over(FakeKernel(handlers={Cmd.RECONFIGURE: refuse(errno.EINVAL)}))
    with pytest.raises(kernel.DeviceError) as info:
        nl.reconfigure(0, [3], BACKEND)
    assert info.value.errno == errno.EINVAL
    assert "NBD_CMD_RECONFIGURE" in str(info.value)


def test_status_and_subscription() -> None:
    fake = FakeKernel(handlers={Cmd.STATUS: lambda r: [status_reply((0, 1))]})
    nl = nbd_over(fake)
    assert nl.status() == [kernel.DeviceStatus(0, True)]
    nl.subscribe()
    assert fake.groups == [NBD_GROUP_ID]
    fake.notify(NBD_FAMILY_ID, Cmd.LINK_DEAD, [netlink.u32(NbdAttr.INDEX, 0)])
    assert nl.link_dead(0) == [0]
    assert nl.link_dead(0) == []


def test_missing_family_is_driver_missing_unless_the_ioctl_interface_exists(
    monkeypatch: pytest.MonkeyPatch, sysfs: Path
) -> None:
    def no_family(fd: int | None = None) -> kernel.NbdNetlink:
        raise netlink.FamilyNotFoundError(errno.ENOENT, "no family")

    monkeypatch.setattr(kernel.NbdNetlink, "open", no_family)
    with pytest.raises(kernel.DriverMissingError, match="modprobe nbd"):
        attaching._open_netlink(None)
    with pytest.raises(kernel.DriverMissingError):
        kernel.status()
    (sysfs / "nbd0").mkdir()  # the driver is there, only its netlink family is not
    assert attaching._open_netlink(None) is None
    with pytest.raises(kernel.DriverMissingError):
        attaching._open_netlink("netlink")


# -- sizing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("minimum", "preferred", "chosen"),
    [(1, 4096, 4096), (1, 65536, 4096), (1, 512, 512), (1, 1, 512), (1024, 512, 1024)],
)
def test_block_size_is_the_preferred_size_clamped(
    minimum: int, preferred: int, chosen: int
) -> None:
    assert records.block_size_for(ExportInfo(1 << 20, 1, minimum, preferred)) == chosen


def test_block_size_beyond_the_kernels_limit_is_refused() -> None:
    with pytest.raises(kernel.ExportError, match="4096"):
        records.block_size_for(ExportInfo(1 << 20, 1, 8192, 8192))


def test_one_connection_unless_the_export_allows_multi_conn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert records.connection_count(ExportInfo(1, int(SINGLE)), None) == 1
    assert records.connection_count(ExportInfo(1, int(MULTI)), None) == 4
    assert records.connection_count(ExportInfo(1, int(MULTI)), 2) == 2
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert records.connection_count(ExportInfo(1, int(MULTI)), None) == 2
    with pytest.raises(kernel.ExportError, match="CAN_MULTI_CONN"):
        records.connection_count(ExportInfo(1, int(SINGLE)), 2)
    with pytest.raises(kernel.KernelError):
        records.connection_count(ExportInfo(1, int(MULTI)), 0)


def test_backend_id_is_the_normalised_uri() -> None:
    assert kernel.backend_id_for(NbdTarget.parse(URI)) == BACKEND
    assert kernel.backend_id_for(NbdTarget.parse("vol", "nbd://10.0.2.100:10809")) == BACKEND


def test_tls_targets_are_refused() -> None:
    with pytest.raises(kernel.TlsUnsupportedError, match="TLS"):
        kernel.attach("nbds://server/vol")


# -- state files ----------------------------------------------------------------------------


def test_record_round_trip_ignores_unknown_keys(tmp_path: Path) -> None:
    mine = record(3, pid=42)
    assert Record.from_json(mine.to_json()) == mine
    data = json.loads(mine.to_json()) | {"added_later": 1}
    assert Record.from_json(json.dumps(data)) == mine


def test_save_load_remove(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state_files.save_record(state, record(0, pid=10))
    state_files.save_record(state, record(2, pid=11))
    assert sorted(p.name for p in state.iterdir()) == ["0.json", "2.json"]
    assert oct(state.stat().st_mode & 0o777) == "0o700"
    assert set(state_files.load_records(state)) == {0, 2}
    state_files.remove_record(state, 2, pid=99)  # not the recorded supervisor: kept
    assert set(state_files.load_records(state)) == {0, 2}
    state_files.remove_record(state, 2, pid=11)
    state_files.remove_record(state, 0)
    state_files.remove_record(state, 0)  # idempotent
    assert state_files.load_records(state) == {}


def test_unreadable_records_are_skipped(tmp_path: Path) -> None:
    state_files.save_record(tmp_path, record(1))
    (tmp_path / "5.json").write_text("{not json")
    (tmp_path / "6.json").write_text('{"index": 6}')
    assert list(state_files.load_records(tmp_path)) == [1]


def test_the_library_logs_nothing_unless_its_caller_configures_logging(tmp_path: Path) -> None:
    """Its warnings (here: an unreadable record) go to the caller's handlers, not stderr."""
    (tmp_path / "5.json").write_text("{not json")
    code = (
        "import pathlib, sys\n"
        "from hypervisor import kernel\n"
        "kernel.attached(state=pathlib.Path(sys.argv[1]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")


def test_missing_state_dir_has_no_records(tmp_path: Path) -> None:
    assert state_files.load_records(tmp_path / "absent") == {}


def test_state_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBS_KERNEL_STATE_DIR", "/tmp/elsewhere")
    assert kernel.state_dir() == Path("/tmp/elsewhere")
    monkeypatch.delenv("NBS_KERNEL_STATE_DIR")
    assert kernel.state_dir() == Path("/run/nbs/kernel")


# -- sysfs ----------------------------------------------------------------------------------


@pytest.fixture
def sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty fake /sys/block (and no /sys/module/nbd)."""
    root = tmp_path / "sys-block"
    root.mkdir()
    monkeypatch.setattr(sysfs_module, "SYS_BLOCK", root)
    monkeypatch.setattr(sysfs_module, "SYS_MODULE", tmp_path / "no-module")
    return root


def fake_device(
    sysfs: Path, index: int, *, size: int = 0, backend: str | None = None, pid: int | None = None
) -> None:
    device = sysfs / f"nbd{index}"
    device.mkdir(exist_ok=True)
    (device / "size").write_text(f"{size // 512}\n")
    if backend is not None:
        (device / "backend").write_text(backend + "\n")
    if pid is not None:
        (device / "pid").write_text(f"{pid}\n")


def test_attached_without_the_module_is_empty(sysfs: Path, tmp_path: Path) -> None:
    assert kernel.attached(state=tmp_path / "absent") == []
    assert not sysfs_module.driver_loaded()


def test_attached_lists_connected_devices_with_their_records(sysfs: Path, tmp_path: Path) -> None:
    fake_device(sysfs, 0, size=1 << 20, backend=BACKEND, pid=1)
    fake_device(sysfs, 1)  # free
    fake_device(sysfs, 2, size=2 << 20, backend="someone-else", pid=1)
    fake_device(sysfs, 10, size=3 << 20, pid=1)  # attached by nbd-client, no backend
    state = tmp_path / "state"
    state_files.save_record(state, record(0, connections=2))
    state_files.save_record(state, record(2))  # stale: the device now shows another backend
    state_files.save_record(state, record(5))  # stale: not connected
    devices = kernel.attached(state=state)
    assert [(d.index, d.path, d.size, d.backend_id) for d in devices] == [
        (0, "/dev/nbd0", 1 << 20, BACKEND),
        (2, "/dev/nbd2", 2 << 20, "someone-else"),
        (10, "/dev/nbd10", 3 << 20, None),
    ]
    assert devices[0].target == URI
    assert devices[0].connections == 2
    assert devices[0].supervisor_pid is None  # none running
    assert devices[1].target is None


def test_find_by_backend_needs_a_connected_device(sysfs: Path) -> None:
    fake_device(sysfs, 3, backend=BACKEND)
    assert sysfs_module.find_by_backend(BACKEND) is None
    fake_device(sysfs, 3, backend=BACKEND, pid=1)
    assert sysfs_module.find_by_backend(BACKEND) == 3


@pytest.mark.parametrize(
    ("what", "index"),
    [
        ("/dev/nbd4", 4),
        ("nbd12", 12),
        (7, 7),
        (KernelDevice(3, "/dev/nbd3", 0, None), 3),
        (URI, 1),
        (NbdTarget.parse(URI), 1),
        ("nbd://10.0.2.100:10809/other", None),
    ],
)
def test_resolve_index(
    sysfs: Path, tmp_path: Path, what: KernelDevice | NbdTarget | int | str, index: int | None
) -> None:
    fake_device(sysfs, 1, backend=BACKEND, pid=1)
    assert kernel.resolve_index(what, tmp_path) == index


def test_resolve_index_falls_back_to_records(sysfs: Path, tmp_path: Path) -> None:
    state_files.save_record(tmp_path, record(6))
    assert kernel.resolve_index(URI, tmp_path) == 6


def test_detach_of_what_is_not_attached_is_a_no_op(sysfs: Path, tmp_path: Path) -> None:
    result = kernel.detach(URI, state=tmp_path)
    assert not result.detached
    assert result.message == f"{URI} is not attached"
    fake_device(sysfs, 3)
    result = kernel.detach("/dev/nbd3", state=tmp_path)
    assert (result.detached, result.index) == (False, 3)
    assert "not connected" in result.message


def test_detach_forgets_a_record_whose_device_is_gone(sysfs: Path, tmp_path: Path) -> None:
    state_files.save_record(tmp_path, record(2, pid=None))
    result = kernel.detach(URI, state=tmp_path)
    assert (result.detached, result.index, result.backend_id) == (False, 2, BACKEND)
    assert "already disconnected" in result.message
    assert state_files.load_records(tmp_path) == {}


def test_detach_of_a_connected_device_needs_root(
    sysfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_device(sysfs, 0, backend=BACKEND, pid=1)
    monkeypatch.setattr(sysfs_module, "has_cap_sys_admin", lambda: False)
    with pytest.raises(kernel.NotPermittedError, match="root"):
        kernel.detach("/dev/nbd0", state=tmp_path)


def test_attach_needs_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sysfs_module, "has_cap_sys_admin", lambda: False)
    with pytest.raises(kernel.NotPermittedError, match="CAP_SYS_ADMIN"):
        kernel.attach(URI, state=tmp_path)


# -- the supervisor's process -----------------------------------------------------------------


@pytest.fixture
def lookalike() -> Iterator[Callable[[int], subprocess.Popen[bytes]]]:
    """Start processes whose command line looks like device N's supervisor."""
    started: list[subprocess.Popen[bytes]] = []

    def start(index: int) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-c", "import time; time.sleep(60)"]
        argv += ["-m", "hypervisor.kernel", "supervise", record(index).to_json()]
        process = subprocess.Popen(argv)
        started.append(process)
        # Popen can return before the child's exec shows in /proc: its cmdline then reads
        # empty, or still as ours.
        deadline = time.monotonic() + 10
        while b"supervise" not in Path(f"/proc/{process.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the look-alike never started"
            time.sleep(0.01)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_supervisor_alive_checks_the_command_line(
    lookalike: Callable[[int], subprocess.Popen[bytes]],
) -> None:
    process = lookalike(3)
    assert sysfs_module.supervisor_alive(process.pid, 3)
    assert not sysfs_module.supervisor_alive(process.pid, 4)
    assert not sysfs_module.supervisor_alive(os.getpid(), 3)  # some other process
    assert not sysfs_module.supervisor_alive(None, 3)


def test_stop_supervisor_stops_only_the_recorded_supervisor(
    lookalike: Callable[[int], subprocess.Popen[bytes]],
) -> None:
    process = lookalike(1)
    assert not supervision.stop_supervisor(process.pid, 2)
    assert process.poll() is None
    assert supervision.stop_supervisor(process.pid, 1)
    assert process.wait(5) in (-signal.SIGTERM, 0)


def test_child_env_makes_this_checkout_importable() -> None:
    root = str(Path(__file__).resolve().parents[3])  # the checkout: tests/unit/hypervisor/..
    assert supervision._child_env()["PYTHONPATH"].split(os.pathsep)[0] == root


# -- the supervisor's logic -------------------------------------------------------------------


class FakeNbd:
    """Stands in for NbdNetlink: scripted LINK_DEAD batches, recorded RECONFIGUREs."""

    def __init__(self, batches: list[list[int] | Exception], on_empty: Callable[[], None]) -> None:
        self.batches = batches
        self.on_empty = on_empty
        self.reconfigured: list[tuple[int, int, str]] = []

    def link_dead(self, timeout: float | None) -> list[int]:
        if not self.batches:
            if timeout == supervision.CHECK_INTERVAL:  # the idle check, not the gathering window
                self.on_empty()
            return []
        batch = self.batches.pop(0)
        if isinstance(batch, Exception):
            raise batch
        return batch

    def reconfigure(self, index: int, fds: list[int], backend_id: str) -> None:
        for fd in fds:
            os.fstat(fd)  # still open while the kernel takes it
        self.reconfigured.append((index, len(fds), backend_id))


@pytest.fixture
def dialled(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[socket.socket]]:
    """Make handshake.dial hand out local socket pairs; lists the ends it gave."""
    given: list[socket.socket] = []
    peers: list[socket.socket] = []

    def dial(target: NbdTarget) -> tuple[socket.socket, ExportInfo]:
        ours, theirs = socket.socketpair()
        given.append(ours)
        peers.append(theirs)
        return ours, ExportInfo(64 << 20, int(SINGLE))

    monkeypatch.setattr(handshake, "dial", dial)
    yield given
    for peer in peers:
        peer.close()


def supervised(
    sysfs: Path, tmp_path: Path, batches: list[list[int] | Exception], **changes: object
) -> tuple[supervision.Supervisor, FakeNbd]:
    fake_device(sysfs, 0, size=64 << 20, backend=BACKEND, pid=1)
    mine = record(0, pid=os.getpid(), **changes)
    state_files.save_record(tmp_path, mine)
    nl = FakeNbd(batches, on_empty=(sysfs / "nbd0" / "pid").unlink)
    return supervision.Supervisor(mine, nl, tmp_path), nl  # type: ignore[arg-type]


def test_supervisor_reconfigures_on_link_dead_and_exits_when_detached(
    sysfs: Path, tmp_path: Path, dialled: list[socket.socket]
) -> None:
    supervisor, nl = supervised(sysfs, tmp_path, [[], [3], [0]])
    assert supervisor.run() == 0
    assert nl.reconfigured == [(0, 1, BACKEND)]
    assert all(s.fileno() == -1 for s in dialled)  # our copies closed after RECONFIGURE
    assert state_files.load_records(tmp_path) == {}  # it cleaned up after the device went away


def test_supervisor_dials_one_socket_per_dead_connection(
    sysfs: Path, tmp_path: Path, dialled: list[socket.socket]
) -> None:
    supervisor, nl = supervised(sysfs, tmp_path, [[0], [0, 0, 0]], connections=2)
    assert supervisor.run() == 0
    assert nl.reconfigured == [(0, 2, BACKEND)]  # three notices, never more than it has


def test_supervisor_reconnects_everything_after_lost_notifications(
    sysfs: Path, tmp_path: Path, dialled: list[socket.socket]
) -> None:
    lost = netlink.NotificationsLostError(errno.ENOBUFS, "lost")
    supervisor, nl = supervised(sysfs, tmp_path, [lost], connections=3)
    assert supervisor.run() == 0
    assert nl.reconfigured == [(0, 3, BACKEND)]


def test_supervisor_retries_until_the_server_is_back(
    sysfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dialled: list[socket.socket]
) -> None:
    monkeypatch.setattr(supervision, "BACKOFF_FIRST", 0.001)
    failures = [kernel.ServerDownError("down"), kernel.ExportError("closed")]
    real_dial = handshake.dial

    def dial(target: NbdTarget) -> tuple[socket.socket, ExportInfo]:
        if failures:
            raise failures.pop(0)
        return real_dial(target)

    monkeypatch.setattr(handshake, "dial", dial)
    supervisor, nl = supervised(sysfs, tmp_path, [[0]])
    assert supervisor.run() == 0
    assert nl.reconfigured == [(0, 1, BACKEND)]
    assert failures == []


def test_supervisor_gives_up_after_its_deadline(
    sysfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervision, "BACKOFF_FIRST", 0.01)

    def dial(target: NbdTarget) -> tuple[socket.socket, ExportInfo]:
        raise kernel.ServerDownError("down")

    monkeypatch.setattr(handshake, "dial", dial)
    supervisor, nl = supervised(sysfs, tmp_path, [[0]])
    supervisor.give_up_after = 0.1
    assert supervisor.run() == 1
    assert nl.reconfigured == []
    assert set(state_files.load_records(tmp_path)) == {0}  # the device is still there: kept


# -- command line ---------------------------------------------------------------------------


def test_cli_attached_json_without_devices(
    sysfs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert kernel.main(["--state-dir", str(tmp_path), "attached", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_cli_detach_json_no_op(
    sysfs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert kernel.main(["--state-dir", str(tmp_path), "detach", URI, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["detached"] is False
    assert "not attached" in out["message"]


def test_cli_errors_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert kernel.main(["attach", "nbds://server/vol", "--json"]) == 1
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["type"] == "TlsUnsupportedError"
    assert kernel.ERRORS[error["type"]] is kernel.TlsUnsupportedError


def test_cli_errors_as_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert kernel.main(["attach", "not a volume!"]) == 1
    assert capsys.readouterr().err.startswith("error: ")
