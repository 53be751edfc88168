"""The supervisor: one detached process per device that keeps it connected.

``python -m hypervisor.kernel supervise`` listens on the "nbd_mc_group" multicast group and,
on NBD_CMD_LINK_DEAD for its device, dials the server again (with backoff, until a deadline),
redoes the handshake and sends NBD_CMD_RECONFIGURE with the new sockets and the same
BACKEND_IDENTIFIER. An ioctl-attached device's supervisor instead sits in NBD_DO_IT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import hypervisor
from hypervisor.kernel import handshake
from hypervisor.kernel.errors import KernelError, SupervisorError
from hypervisor.kernel.family import NbdNetlink
from hypervisor.kernel.ioctl import serve_ioctl
from hypervisor.kernel.records import Record, device_path
from hypervisor.kernel.state import remove_record
from hypervisor.kernel.sysfs import (
    is_connected,
    read_backend,
    read_stripped,
    supervisor_alive,
)
from hypervisor.netlink import NotificationsLostError
from hypervisor.target import NbdTarget

log = logging.getLogger(__name__)

SUPERVISOR_START_TIMEOUT = 20.0
SUPERVISOR_STOP_TIMEOUT = 10.0
CHECK_INTERVAL = 5.0  # s between the supervisor's checks that its device is still there
LINK_DEAD_GATHER = 0.2  # s to wait for the other connections' LINK_DEAD after the first
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0


def log_tail(directory: Path, index: int, lines: int = 5) -> str:
    text = read_stripped(directory / f"{index}.log") or "(no log)"
    return " | ".join(text.splitlines()[-lines:])


def _child_env() -> dict[str, str]:
    """Our environment, with this checkout importable whatever the supervisor's cwd."""
    env = dict(os.environ)
    root = str(Path(hypervisor.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def start_supervisor(
    record: Record,
    directory: Path,
    *,
    netlink_fd: int | None = None,
    sock_fd: int | None = None,
    revive: bool = False,
) -> int:
    """Start the device's supervisor, detached from us; returns its PID once it is ready."""
    brief = dataclasses.replace(record, pid=None).to_json()
    argv = [sys.executable, "-m", "hypervisor.kernel", "--state-dir", str(directory)]
    argv += ["supervise", brief]
    fds: list[int] = []
    if netlink_fd is not None:
        argv += ["--netlink-fd", str(netlink_fd)]
        fds.append(netlink_fd)
    if sock_fd is not None:
        argv += ["--sock-fd", str(sock_fd)]
        fds.append(sock_fd)
    if revive:
        argv.append("--revive")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with (directory / f"{record.index}.log").open("ab") as logfile:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=logfile,
            pass_fds=fds,
            start_new_session=True,
            cwd="/",
            env=_child_env(),
        )
    assert process.stdout is not None
    # The process forks: the supervisor proper says "ready PID", the parent exits at once.
    line = b""
    deadline = time.monotonic() + SUPERVISOR_START_TIMEOUT
    with process.stdout:
        fd = process.stdout.fileno()
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                chunk = os.read(fd, 256)
                if not chunk:
                    break
                line += chunk
    try:
        process.wait(SUPERVISOR_START_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    match = re.fullmatch(rb"ready (\d+)\n", line)
    if match is None:
        raise SupervisorError(
            f"the supervisor of {device_path(record.index)} did not start: "
            f"{log_tail(directory, record.index)}"
        )
    return int(match.group(1))


def stop_supervisor(pid: int | None, index: int) -> bool:
    """SIGTERM the recorded supervisor of device ``index`` (never another process)."""
    if not supervisor_alive(pid, index):
        return False
    assert pid is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + SUPERVISOR_STOP_TIMEOUT
    while supervisor_alive(pid, index):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return True


def _on_sigterm(signum: int, frame: object) -> None:
    log.info("stopped by signal %d", signum)
    raise SystemExit(0)


class Supervisor:
    """Keeps one netlink-attached device connected: re-dials on LINK_DEAD, RECONFIGUREs."""

    def __init__(self, record: Record, nl: NbdNetlink, directory: Path) -> None:
        self.record = record
        self.nl = nl
        self.directory = directory
        self.target = NbdTarget.parse(record.target)
        self.give_up_after = float(max(record.dead_conn_timeout, 10))

    def run(self) -> int:
        index = self.record.index
        while True:
            try:
                dead = self.nl.link_dead(CHECK_INTERVAL).count(index)
            except NotificationsLostError:
                log.warning("notifications were lost: reconnecting to be safe")
                dead = self.record.connections
            if dead:
                dead += self._gather(LINK_DEAD_GATHER)
                log.info("%d connection(s) of %s died", dead, device_path(index))
                if not self.reconnect(min(dead, self.record.connections)):
                    return 1
            elif read_backend(index) != self.record.backend_id or not is_connected(index):
                log.info("%s was disconnected: exiting", device_path(index))
                remove_record(self.directory, index, pid=os.getpid())
                return 0

    def _gather(self, window: float) -> int:
        """More LINK_DEAD for our device arriving within ``window`` seconds (multi-conn)."""
        count = 0
        deadline = time.monotonic() + window
        while (left := deadline - time.monotonic()) > 0:
            try:
                count += self.nl.link_dead(left).count(self.record.index)
            except NotificationsLostError:
                return self.record.connections
        return count

    def reconnect(self, count: int) -> bool:
        """Dial ``count`` new sockets and RECONFIGURE; False once the deadline has passed."""
        index = self.record.index
        deadline = time.monotonic() + self.give_up_after
        delay = BACKOFF_FIRST
        while True:
            try:
                self._reconfigure(count)
                log.info("%s reconnected to %s", device_path(index), self.target.uri())
                return True
            except (KernelError, OSError) as err:
                if read_backend(index) != self.record.backend_id:
                    log.info("%s is gone: stop reconnecting", device_path(index))
                    return True
                if time.monotonic() + delay > deadline:
                    log.error(
                        "giving up on %s after %.0f s: %s",
                        device_path(index),
                        self.give_up_after,
                        err,
                    )
                    return False
                log.info("reconnect failed (%s); retrying in %.1f s", err, delay)
            time.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def _reconfigure(self, count: int) -> None:
        socks = []
        try:
            for _ in range(count):
                sock, info = handshake.dial(self.target)
                socks.append(sock)
                if info.size != self.record.size:
                    log.warning(
                        "the export is now %d bytes, the device %d: keeping the device's size",
                        info.size,
                        self.record.size,
                    )
            self.nl.reconfigure(
                self.record.index, [s.fileno() for s in socks], self.record.backend_id
            )
        finally:
            for s in socks:
                s.close()


def supervise(
    record: Record,
    directory: Path,
    *,
    netlink_fd: int | None = None,
    sock_fd: int | None = None,
    revive: bool = False,
    daemon: bool = True,
) -> int:
    """The supervisor's main: detach, say "ready PID" on stdout, then keep the device alive."""
    if daemon and os.fork():
        os._exit(0)  # the caller waits for this parent; the child carries on, orphaned

    def ready() -> None:
        sys.stdout.write(f"ready {os.getpid()}\n")
        sys.stdout.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if record.interface == "ioctl":
            if sock_fd is None:
                raise KernelError("the ioctl supervisor needs --sock-fd")
            return serve_ioctl(record, sock_fd, ready)
        nl = NbdNetlink.open(netlink_fd)
        with nl:
            if netlink_fd is None:
                nl.subscribe()
            supervisor = Supervisor(record, nl, directory)
            ready()
            log.info("supervising %s for %s", device_path(record.index), record.target)
            if revive and not supervisor.reconnect(record.connections):
                return 1
            return supervisor.run()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
