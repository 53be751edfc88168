"""Boot the tiny guest (images/tiny.py) under QEMU or libvirt and run commands in it.

:class:`TinyVM` runs ``qemu-system-x86_64`` directly; :class:`LibvirtVM` defines a transient
libvirt domain of the same guest.  Both talk to the guest's command agent on its second serial
port (protocol in images/README.md) and share the :meth:`run` / :meth:`check` /
:meth:`wait_ready` / :meth:`stop` API.  Every QEMU or daemon process is owned by the object that
started it and stopped by PID, never by name.  Guests only get QEMU user networking with
``restrict=on``: they reach the host solely through guestfwd to 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape, quoteattr

from images.tiny import (
    BEGIN_MARKER,
    BUSYBOX,
    COMMAND_MARKER,
    END_MARKER,
    GUESTFWD_IP,
    HOSTROOT_TAG,
    READY_MARKER,
    TinyImage,
)

if TYPE_CHECKING:
    import libvirt

DEFAULT_APPEND = "console=ttyS0 panic=-1 quiet"
"""Kernel command line every guest gets; ``append`` arguments are added after it."""

_PING_INTERVAL = 1.0


def qemu_accel() -> str:
    """The QEMU accelerator: ``$NBS_QEMU_ACCEL`` or ``tcg`` (stock kernels hang under KVM here)."""
    return os.environ.get("NBS_QEMU_ACCEL", "tcg")


@dataclasses.dataclass(frozen=True)
class CompletedRun:
    """Result of one guest command: exit status and combined stdout+stderr."""

    rc: int
    raw: bytes
    """The output bytes exactly as the guest produced them."""

    @property
    def output(self) -> str:
        """The output decoded as UTF-8 (undecodable bytes replaced)."""
        return self.raw.decode("utf-8", "replace")


class GuestCommandError(AssertionError):
    """``check()`` saw a non-zero exit status; the message holds the command and its output."""

    def __init__(self, command: str, result: CompletedRun) -> None:
        super().__init__(f"guest command {command!r} exited {result.rc}:\n{result.output}")
        self.command = command
        self.result = result


class AgentTimeoutError(TimeoutError):
    """The agent did not answer in time (the guest may still be running the command)."""


class AgentClient:
    """Host side of the agent protocol over the guest's serial port (a unix stream socket).

    One request at a time (serialized by a lock).  Replies carry the request id, so the output
    of an earlier request that timed out on the host is skipped, never mistaken for a newer one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._token = secrets.token_hex(3)
        self._counter = 0
        self._lock = threading.Lock()

    def connect(self, deadline: float, alive: Callable[[], bool] = lambda: True) -> None:
        """Connect to the socket, retrying until ``deadline`` (a ``time.monotonic()`` value)."""
        while self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
            except OSError:
                sock.close()
                if time.monotonic() > deadline or not alive():
                    raise
                time.sleep(0.05)
            else:
                self._sock = sock

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def request(
        self, command: str, limit: int, deadline: float | None, *, resend_on_ready: bool = False
    ) -> CompletedRun:
        """Run ``command`` via ``sh -c`` in the guest, killed there after ``limit`` s (0: never).

        Waits until ``deadline`` (``time.monotonic()``; None: forever) and raises
        :class:`AgentTimeoutError` when it passes; ``OSError`` when the connection is gone.
        With ``resend_on_ready`` the request is sent again when the agent announces that it
        (re)started, since it may have lost the first copy while the port was being set up.
        """
        with self._lock:
            return self._request(command, limit, deadline, resend_on_ready)

    def _request(
        self, command: str, limit: int, deadline: float | None, resend_on_ready: bool
    ) -> CompletedRun:
        if self._sock is None:
            raise OSError(f"agent socket {self.path} is not connected (call wait_ready first)")
        self._counter += 1
        request_id = f"{self._token}.{self._counter}"
        encoded = base64.b64encode(command.encode()).decode()
        line_out = f"\n{COMMAND_MARKER} {request_id} {limit} {encoded}\n".encode()
        self._sock.sendall(line_out)
        begin = f"{BEGIN_MARKER} {request_id}".encode()
        end_prefix = f"{END_MARKER} {request_id} ".encode()
        payload: list[bytes] | None = None
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                line = line.strip()
                if line == begin:
                    payload = []
                elif payload is not None and line.startswith(end_prefix):
                    rc = int(line[len(end_prefix) :])
                    return CompletedRun(rc, base64.b64decode(b"".join(payload)))
                elif payload is not None:
                    payload.append(line)
                elif resend_on_ready and line == READY_MARKER.encode():
                    self._sock.sendall(line_out)
            if deadline is None:
                self._sock.settimeout(None)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AgentTimeoutError(f"no answer from the guest agent to {command!r}")
                self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise ConnectionError(f"agent socket {self.path} closed")
            self._buffer += chunk


class AgentGuest:
    """What TinyVM and LibvirtVM share: the agent, boot timing, run/check/wait_ready."""

    def __init__(self, agent_path: Path) -> None:
        self._agent = AgentClient(agent_path)
        self._started_at: float | None = None
        self.boot_seconds: float | None = None
        """Seconds from start() until the agent first answered (set by wait_ready)."""

    def alive(self) -> bool:
        """Whether the VM is still running."""
        raise NotImplementedError

    def diagnostics(self) -> str:
        """Logs worth showing when the guest misbehaves."""
        raise NotImplementedError

    def wait_ready(self, timeout: float = 90) -> float:
        """Wait until the agent answers; returns (and records) the boot time in seconds.

        Raises RuntimeError with the logs if the VM dies, TimeoutError after ``timeout``.
        """
        if self._started_at is None:
            raise RuntimeError("wait_ready() before start()")
        deadline = time.monotonic() + timeout
        try:
            self._agent.connect(deadline, self.alive)
        except OSError as e:
            raise RuntimeError(f"cannot reach the agent socket: {e}\n{self.diagnostics()}") from e
        while True:
            if not self.alive():
                raise RuntimeError(f"the VM exited during boot\n{self.diagnostics()}")
            ping_deadline = min(deadline, time.monotonic() + _PING_INTERVAL)
            try:
                result = self._agent.request("echo ready", 5, ping_deadline, resend_on_ready=True)
            except AgentTimeoutError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"guest agent not ready after {timeout} s\n{self.diagnostics()}"
                    ) from None
                continue
            except OSError as e:
                if not self.alive():
                    continue  # reported at the top of the loop
                raise RuntimeError(f"agent connection failed: {e}\n{self.diagnostics()}") from e
            if result.rc == 0:
                if self.boot_seconds is None:
                    self.boot_seconds = time.monotonic() - self._started_at
                return self.boot_seconds

    def run(self, command: str, timeout: float | None = 60) -> CompletedRun:
        """Run ``command`` with ``sh -c`` as root in the guest (stdin /dev/null).

        The guest kills it (SIGKILL, exit status 137) after ``timeout`` seconds; the host gives
        up 10 s later with :class:`AgentTimeoutError`.  ``timeout=None`` waits forever.
        """
        limit = 0 if timeout is None else max(1, math.ceil(timeout))
        deadline = None if timeout is None else time.monotonic() + timeout + 10
        return self._agent.request(command, limit, deadline)

    def check(self, command: str, timeout: float | None = 60) -> str:
        """Like :meth:`run`, but raise :class:`GuestCommandError` on a non-zero exit status.

        Returns the output as text.
        """
        result = self.run(command, timeout)
        if result.rc != 0:
            raise GuestCommandError(command, result)
        return result.output


def _wait_exit(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def stop_qemu(process: subprocess.Popen[bytes], qmp_path: Path, timeout: float = 10) -> int:
    """End ``process`` (a QEMU) by PID: QMP ``quit`` on ``qmp_path``, then SIGTERM, SIGKILL.

    Waits ``timeout`` s after ``quit`` and 5 s after SIGTERM; returns QEMU's exit status.
    """
    if process.poll() is None:
        with contextlib.suppress(OSError, QmpError, ValueError):
            qmp_execute(qmp_path, "quit", None, 3)
        rc = _wait_exit(process, timeout)
        if rc is None:
            process.send_signal(signal.SIGTERM)
            rc = _wait_exit(process, 5)
        if rc is None:
            process.kill()
    return process.wait()


class QmpError(RuntimeError):
    """QMP answered with an error."""


def qmp_execute(
    path: Path, command: str, arguments: Mapping[str, Any] | None = None, timeout: float = 10
) -> Any:
    """Run one QMP command on the monitor socket ``path`` and return its ``return`` value.

    Opens a fresh connection (capabilities negotiation included) and closes it; events are
    ignored.  Raises :class:`QmpError` on an error reply, ``OSError``/``TimeoutError`` on I/O.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        reader = sock.makefile("rb")

        def reply() -> dict[str, Any]:
            while True:
                line = reader.readline()
                if not line:
                    raise ConnectionError("QMP connection closed")
                message: dict[str, Any] = json.loads(line)
                if "return" in message or "error" in message:
                    return message

        reader.readline()  # greeting
        sock.sendall(b'{"execute": "qmp_capabilities"}\n')
        reply()
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        sock.sendall(json.dumps(request).encode() + b"\n")
        try:
            message = reply()
        except ConnectionError:
            if command == "quit":
                return {}
            raise
        if "error" in message:
            raise QmpError(f"{command}: {message['error'].get('desc', message['error'])}")
        return message["return"]


class TinyVM(AgentGuest):
    """The tiny guest under ``qemu-system-x86_64`` (machine ``pc``, TCG unless NBS_QEMU_ACCEL).

    Console (ttyS0) goes to ``workdir/console.log``, QEMU's own output to
    ``workdir/qemu.log``; the agent is on ttyS1 through a unix socket.  ``qmp_path`` is a QMP
    socket for the code under test; the harness keeps a second, private one for
    :meth:`qmp` and :meth:`stop`.  Sockets live in a short private directory under the system
    temporary directory (unix socket paths are limited to 107 bytes).

    Options: ``guestfwd`` maps ``10.0.2.100:guest_port`` to ``127.0.0.1:host_port`` (a
    ``busybox nc`` per guest connection, user networking with ``restrict=on``; a virtio NIC is
    added when ``guestfwd`` is given or ``network`` is true); ``host_root`` shares the host's
    ``/`` read-only over virtio-9p (the guest mounts it at /host, ready for ``chroot /host``);
    ``shares`` maps 9p mount tags to host directories the guest mounts read-write at
    /mnt/TAG; ``extra_args`` are appended to QEMU's command line (e.g. ``-drive`` for a disk
    present at boot); ``append`` is added to the kernel command line.  Start once; a stopped
    TinyVM is not restarted.
    """

    def __init__(
        self,
        image: TinyImage,
        workdir: Path,
        *,
        name: str = "tiny",
        memory_mib: int = 256,
        smp: int = 1,
        append: str = "",
        guestfwd: Sequence[tuple[int, int]] = (),
        network: bool | None = None,
        host_root: bool = False,
        shares: Mapping[str, Path] | None = None,
        extra_args: Sequence[str] = (),
        accel: str | None = None,
        qemu: str = "qemu-system-x86_64",
    ) -> None:
        self.image = image
        self.workdir = Path(workdir)
        self.name = name
        self.memory_mib = memory_mib
        self.smp = smp
        self.append = append
        self.guestfwd = list(guestfwd)
        self.network = bool(guestfwd) if network is None else network
        self.host_root = host_root
        self.shares = dict(shares or {})
        self.extra_args = list(extra_args)
        self.accel = accel or qemu_accel()
        self.qemu = qemu
        self._socket_dir = Path(tempfile.mkdtemp(prefix=f"nbsvm-{name}-"))
        self.qmp_path = self._socket_dir / "qmp.sock"
        """QMP monitor socket for the code under test (one client at a time)."""
        self._control_path = self._socket_dir / "control.sock"
        self.console_path = self.workdir / f"{name}-console.log"
        self.qemu_log_path = self.workdir / f"{name}-qemu.log"
        self.process: subprocess.Popen[bytes] | None = None
        super().__init__(self._socket_dir / "agent.sock")

    @property
    def pid(self) -> int:
        """QEMU's PID (only after start())."""
        if self.process is None:
            raise RuntimeError("not started")
        return self.process.pid

    def command(self) -> list[str]:
        """The full QEMU command line."""
        args = [
            self.qemu,
            "-name",
            self.name,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-accel",
            self.accel,
            "-machine",
            "pc",
            "-m",
            str(self.memory_mib),
            "-smp",
            str(self.smp),
            "-kernel",
            str(self.image.boot_kernel),
            "-initrd",
            str(self.image.initrd),
            "-append",
            f"{DEFAULT_APPEND} {self.append}".strip(),
            "-chardev",
            f"file,id=console,path={self.console_path}",
            "-serial",
            "chardev:console",
            "-chardev",
            f"socket,id=agent,path={self._agent.path},server=on,wait=off",
            "-serial",
            "chardev:agent",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-qmp",
            f"unix:{self._control_path},server=on,wait=off",
        ]
        if self.network:
            netdev = "user,id=net0,restrict=on"
            for guest_port, host_port in self.guestfwd:
                netdev += (
                    f",guestfwd=tcp:{GUESTFWD_IP}:{guest_port}"
                    f"-cmd:{BUSYBOX} nc 127.0.0.1 {host_port}"
                )
            args += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=net0"]
        if self.host_root:
            args += [
                "-fsdev",
                "local,id=fs-hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
                "-device",
                f"virtio-9p-pci,fsdev=fs-hostroot,mount_tag={HOSTROOT_TAG}",
            ]
        for index, (tag, path) in enumerate(self.shares.items()):
            args += [
                "-fsdev",
                f"local,id=fs{index},path={path},security_model=none,multidevs=remap",
                "-device",
                f"virtio-9p-pci,fsdev=fs{index},mount_tag={tag}",
            ]
        return args + self.extra_args

    def start(self) -> None:
        """Start QEMU (returns at once; call :meth:`wait_ready` to wait for the guest)."""
        if self.process is not None:
            raise RuntimeError("already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.qemu_log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._started_at = time.monotonic()

    def alive(self) -> bool:
        """Whether QEMU is still running."""
        return self.process is not None and self.process.poll() is None

    def console_log(self) -> str:
        """Everything the guest wrote to its console (ttyS0) so far."""
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def qemu_log(self) -> str:
        """QEMU's own stdout and stderr so far."""
        try:
            return self.qemu_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def diagnostics(self) -> str:
        """QEMU's log and the tail of the console log."""
        return (
            f"--- qemu ({self.qemu_log_path}) ---\n{self.qemu_log()}"
            f"--- console ({self.console_path}) ---\n{self.console_log()[-6000:]}"
        )

    def qmp(
        self, command: str, arguments: Mapping[str, Any] | None = None, timeout: float = 10
    ) -> Any:
        """Run a QMP command on the harness's private monitor; returns its ``return`` value."""
        return qmp_execute(self._control_path, command, arguments, timeout)

    def stop(self, timeout: float = 10) -> int | None:
        """Stop QEMU and wait for it: QMP ``quit``, then SIGTERM, then SIGKILL, by PID.

        Idempotent; returns QEMU's exit status (None if never started).
        """
        self._agent.close()
        try:
            if self.process is None:
                return None
            return stop_qemu(self.process, self._control_path, timeout)
        finally:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> TinyVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- libvirt -------------------------------------------------------------------------------

LIBVIRT_URI = "qemu:///system"
LIBVIRTD_SOCKET = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


def _pid_running(pid: int, name: str) -> bool:
    """Whether ``pid`` is a live (non-zombie) process whose command name is ``name``."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    comm = stat_line[stat_line.index("(") + 1 : stat_line.rindex(")")]
    state = stat_line[stat_line.rindex(")") + 2 :].split()[0]
    return comm == name[:15] and state not in ("Z", "X")


@dataclasses.dataclass
class LibvirtDaemon:
    """A reachable system libvirtd (``qemu:///system``), possibly started by us.

    ``started`` lists ``(name, pid)`` of the daemons this object started; :meth:`stop` ends
    exactly those, by PID, and leaves a libvirtd that was already running alone.
    """

    uri: str = LIBVIRT_URI
    started: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    log_path: Path | None = None

    @classmethod
    def ensure(cls, log_dir: Path, timeout: float = 30) -> LibvirtDaemon:
        """Use the running libvirtd, or start ``virtlogd -d`` and ``libvirtd -d`` (as root).

        Daemon logs (warnings and errors) go to ``log_dir``.  Raises RuntimeError when a
        daemon does not come up within ``timeout`` seconds.
        """
        daemon = cls(log_path=log_dir / "libvirtd.log")
        if _accepts(LIBVIRTD_SOCKET):
            return daemon
        env = dict(os.environ)
        try:
            if not _accepts(VIRTLOGD_SOCKET):
                env["LIBVIRT_LOG_OUTPUTS"] = f"3:file:{log_dir / 'virtlogd.log'}"
                daemon._spawn("virtlogd", VIRTLOGD_SOCKET, Path("/run/virtlogd.pid"), env, timeout)
            env["LIBVIRT_LOG_OUTPUTS"] = f"3:file:{daemon.log_path}"
            daemon._spawn("libvirtd", LIBVIRTD_SOCKET, Path("/run/libvirtd.pid"), env, timeout)
        except BaseException:
            daemon.stop()
            raise
        return daemon

    def _spawn(
        self, name: str, sock: Path, pidfile: Path, env: dict[str, str], timeout: float
    ) -> None:
        binary = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
        if binary is None:
            raise RuntimeError(f"{name} is not installed")
        subprocess.run([binary, "-d"], env=env, check=True, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        pid: int | None = None
        while time.monotonic() < deadline:
            if pid is None and pidfile.exists():
                with contextlib.suppress(ValueError):
                    pid = int(pidfile.read_text().split()[0])
                    self.started.append((name, pid))
            if pid is not None and _accepts(sock):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not come up within {timeout} s (pidfile {pidfile})")

    def connect(self) -> libvirt.virConnect:
        """A new read-write connection to :attr:`uri` (libvirt-python)."""
        import libvirt  # noqa: PLC0415 - optional dependency, only needed with libvirt

        return libvirt.open(self.uri)

    def active_domains(self) -> list[str]:
        """Names of the running domains (of any user of this daemon)."""
        conn = self.connect()
        try:
            return [domain.name() for domain in conn.listAllDomains(1)]  # ..._ACTIVE
        finally:
            conn.close()

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM (then SIGKILL) the daemons this object started, newest first, by PID.

        A libvirtd we started is left running while it still runs domains: other test sessions
        may have found it running and be using it (killing it would orphan their QEMUs).
        """
        if any(name == "libvirtd" for name, _ in self.started):
            try:
                busy = bool(self.active_domains())
            except Exception:  # libvirt.libvirtError: the daemon is unusable anyway
                busy = False
            if busy:
                self.started.clear()
                return
        while self.started:
            name, pid = self.started.pop()
            _terminate(pid, name, timeout)


def _terminate(pid: int, name: str, timeout: float) -> None:
    """SIGTERM process ``pid`` if it is a live ``name``, SIGKILL after ``timeout`` s."""
    if not _pid_running(pid, name):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_running(pid, name) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _pid_running(pid, name):
        os.kill(pid, signal.SIGKILL)


class LibvirtVM(AgentGuest):
    """The tiny guest as a transient libvirt domain (``<domain type='qemu'>``, machine pc).

    (``type='kvm'`` when NBS_QEMU_ACCEL=kvm.)  Start once; a stopped LibvirtVM is not restarted.

    Direct kernel boot of ``image``, ACPI on (PCI hot-plug needs it), console ttyS0 to
    ``workdir/NAME-console.log``, the agent on a ``<serial type='unix'>`` bind socket (ttyS1).
    QEMU runs as root without relabelling (``<seclabel model='dac'>`` +0:+0) so it can read
    the image cache and create sockets in our private directory.  ``devices_xml`` is inserted
    into ``<devices>`` (disks, interfaces, ...).  With ``persistent`` the domain is defined
    (it has a saved configuration) and then started.  :meth:`stop` destroys the domain and
    undefines a persistent one.
    """

    def __init__(
        self,
        conn: libvirt.virConnect,
        image: TinyImage,
        workdir: Path,
        *,
        name: str | None = None,
        memory_mib: int = 256,
        append: str = "",
        devices_xml: str = "",
        persistent: bool = False,
    ) -> None:
        self.conn = conn
        self.persistent = persistent
        self.image = image
        self.workdir = Path(workdir)
        self.domain_name = name or f"nbs-tiny-{secrets.token_hex(4)}"
        self.memory_mib = memory_mib
        self.append = append
        self.devices_xml = devices_xml
        self.domain: libvirt.virDomain | None = None
        self.qemu_pid: int | None = None
        """PID of the domain's QEMU once started."""
        self._socket_dir = Path(tempfile.mkdtemp(prefix="nbsvirt-"))
        self.console_path = self.workdir / f"{self.domain_name}-console.log"
        super().__init__(self._socket_dir / "agent.sock")

    def xml(self) -> str:
        """The domain XML :meth:`start` creates."""
        cmdline = f"{DEFAULT_APPEND} {self.append}".strip()
        domain_type = "kvm" if qemu_accel() == "kvm" else "qemu"
        return f"""<domain type='{domain_type}'>
  <name>{escape(self.domain_name)}</name>
  <memory unit='MiB'>{self.memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(self.image.boot_kernel))}</kernel>
    <initrd>{escape(str(self.image.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'>
      <source path={quoteattr(str(self.console_path))}/>
      <target port='0'/>
    </serial>
    <serial type='unix'>
      <source mode='bind' path={quoteattr(str(self._agent.path))}/>
      <target port='1'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    {self.devices_xml}
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
"""

    def start(self) -> None:
        """Create the domain (returns once QEMU runs; then :meth:`wait_ready`).

        Records QEMU's PID (:attr:`qemu_pid`, from libvirt's pidfile) so that :meth:`stop`
        can end it even if libvirtd is gone.
        """
        if self.domain is not None:
            raise RuntimeError("already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._started_at = time.monotonic()
        if self.persistent:
            self.domain = self.conn.defineXML(self.xml())
            self.domain.create()
        else:
            self.domain = self.conn.createXML(self.xml(), 0)
        with contextlib.suppress(OSError, ValueError):
            pidfile = Path("/run/libvirt/qemu") / f"{self.domain_name}.pid"
            self.qemu_pid = int(pidfile.read_text().split()[0])

    def alive(self) -> bool:
        """Whether the domain exists and is running."""
        if self.domain is None:
            return False
        try:
            state, _reason = self.domain.state()
        except Exception:  # libvirt.libvirtError once the transient domain is gone
            return False
        return bool(state == 1)  # VIR_DOMAIN_RUNNING

    def console_log(self) -> str:
        """Everything the guest wrote to its console (ttyS0) so far."""
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def diagnostics(self) -> str:
        """libvirt's QEMU log for the domain and the tail of the console log."""
        qemu_log = Path("/var/log/libvirt/qemu") / f"{self.domain_name}.log"
        try:
            qemu_text = qemu_log.read_text(errors="replace")[-4000:]
        except OSError:
            qemu_text = ""
        return (
            f"--- libvirt qemu log ({qemu_log}) ---\n{qemu_text}"
            f"--- console ({self.console_path}) ---\n{self.console_log()[-6000:]}"
        )

    def stop(self) -> None:
        """Destroy the domain and wait for its QEMU to exit (idempotent).

        If libvirt cannot destroy it (e.g. libvirtd died), QEMU is ended by PID instead.
        """
        self._agent.close()
        try:
            if self.domain is not None:
                with contextlib.suppress(Exception):  # libvirtError: gone, or no daemon
                    self.domain.destroy()
                if self.persistent:
                    with contextlib.suppress(Exception):
                        self.domain.undefine()
                self.domain = None
            if self.qemu_pid is not None:
                _terminate(self.qemu_pid, "qemu-system-x86_64", 10)
                self.qemu_pid = None
        finally:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> LibvirtVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
