"""The kernel nbd fallback on another (bare-metal) host, over SSH with paramiko.

Each call opens one SSH connection, runs ``python3 -m hypervisor.kernel … --json`` there and
parses its answer::

    remote_attach(host, target)   -> KernelDevice      (kernel.attach on the host)
    remote_detach(host, what)     -> DetachResult      (kernel.detach)
    remote_attached(host)         -> list[KernelDevice] (kernel.attached)

``host`` is ``[USER@]HOST[:PORT]`` (``[USER@][V6ADDR]:PORT`` for IPv6). The host needs NBS
installed for the interpreter named by ``SshOptions.python`` (``pip install nbs``, so that
``python3 -m hypervisor.kernel`` runs there), the nbd module, and root: log in as root or set
``sudo=True`` for ``sudo -n``. Bare volume names are resolved here (``NBS_SERVER``), not
there, so the host is told an NBD URI; it must be able to reach that server.

Authentication is by key: ``key_filename`` or, without one, the SSH agent and the usual
~/.ssh keys. Host keys are checked against known_hosts (``known_hosts`` or ~/.ssh/known_hosts)
and an unknown host is refused, unless ``accept_new_host_key`` is set: then a new host's key is
accepted and saved, like OpenSSH's ``StrictHostKeyChecking=accept-new``; a changed key is
always refused.

Errors: what the remote side refused arrives as the same ``KernelError`` subclass it raised
there, its message prefixed with the host; SSH failures are ``RemoteError`` (``HostKeyError``
for host key trouble).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

import paramiko

from hypervisor import kernel
from hypervisor.kernel import DetachResult, KernelDevice, KernelError
from hypervisor.target import NbdTarget

SSH_PORT = 22
_HOST = re.compile(
    r"^(?:(?P<user>[^@\s]+)@)?(?:\[(?P<v6>[^\]]+)\]|(?P<name>[^@:\s\[\]]+))(?::(?P<port>\d+))?$"
)


class RemoteError(KernelError):
    """The remote host could not be reached or did not run the command."""


class HostKeyError(RemoteError):
    """The host's key is unknown (and new keys are not accepted) or has changed."""


@dataclasses.dataclass(frozen=True)
class SshHost:
    host: str
    user: str | None = None
    port: int = SSH_PORT

    @classmethod
    def parse(cls, spec: str) -> SshHost:
        """``[USER@]HOST[:PORT]``, with ``[ADDR]`` around IPv6 addresses."""
        match = _HOST.match(spec.strip())
        if match is None:
            raise ValueError(f"{spec!r} is not [USER@]HOST[:PORT]")
        port = int(match["port"]) if match["port"] else SSH_PORT
        if not 0 < port < 65536:
            raise ValueError(f"{spec!r}: port {port} out of range")
        return cls(match["v6"] or match["name"], match["user"], port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        return f"{user}{host}" + (f":{self.port}" if self.port != SSH_PORT else "")


@dataclasses.dataclass(frozen=True)
class SshOptions:
    key_filename: Path | None = None  # None: the SSH agent and ~/.ssh's default keys
    known_hosts: Path | None = None  # None: ~/.ssh/known_hosts
    accept_new_host_key: bool = False
    python: str = "python3"  # the interpreter on the host that has NBS installed
    sudo: bool = False  # run as ``sudo -n`` (for a non-root login)
    state_dir: str | None = None  # the host's kernel state directory (default there)
    connect_timeout: float = 15.0
    command_timeout: float = 180.0


def _host(host: SshHost | str) -> SshHost:
    return host if isinstance(host, SshHost) else SshHost.parse(host)


def _known_hosts(options: SshOptions) -> Path:
    return (options.known_hosts or Path("~/.ssh/known_hosts")).expanduser()


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's form: SHA256:base64 of the key's blob, unpadded."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class _RefuseUnknown:
    """paramiko's missing-host-key policy (duck-typed): refuse, saying what was offered."""

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        raise HostKeyError(
            f"{hostname}: host key {key.get_name()} {fingerprint(key)} is not in known_hosts; "
            "check it and add it, or accept new host keys explicitly"
        )


def connect(host: SshHost | str, options: SshOptions = SshOptions()) -> paramiko.SSHClient:
    """An authenticated SSH connection (the caller closes it)."""
    host = _host(host)
    client = paramiko.SSHClient()
    known = _known_hosts(options)
    try:
        if options.accept_new_host_key:
            known.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            known.touch(mode=0o600, exist_ok=True)
        if known.exists():
            client.load_host_keys(str(known))  # also where accepted keys are saved
        policy: Any = paramiko.AutoAddPolicy() if options.accept_new_host_key else _RefuseUnknown()
        client.set_missing_host_key_policy(policy)
        client.connect(
            host.host,
            port=host.port,
            username=host.user,
            key_filename=str(options.key_filename) if options.key_filename else None,
            look_for_keys=options.key_filename is None,
            allow_agent=True,
            timeout=options.connect_timeout,
            banner_timeout=options.connect_timeout,
            auth_timeout=options.connect_timeout,
        )
    except HostKeyError:
        client.close()
        raise
    except paramiko.BadHostKeyException as err:
        client.close()
        raise HostKeyError(
            f"{host}: host key CHANGED (got {fingerprint(err.key)}, known_hosts has "
            f"{fingerprint(err.expected_key)}): refusing to connect"
        ) from err
    except paramiko.AuthenticationException as err:
        client.close()
        raise RemoteError(f"{host}: SSH authentication failed: {err}") from err
    except (OSError, paramiko.SSHException, EOFError) as err:
        client.close()
        raise RemoteError(f"{host}: cannot connect over SSH: {err}") from err
    return client


def command(args: list[str], options: SshOptions) -> str:
    """The shell command run on the host."""
    argv = ["sudo", "-n"] if options.sudo else []
    argv += [options.python, "-m", "hypervisor.kernel"]
    if options.state_dir:
        argv += ["--state-dir", options.state_dir]
    return shlex.join([*argv, *args, "--json"])


def run(host: SshHost | str, args: list[str], options: SshOptions = SshOptions()) -> Any:
    """Run ``hypervisor.kernel ARGS --json`` on the host; its parsed JSON answer."""
    host = _host(host)
    line = command(args, options)
    client = connect(host, options)
    try:
        stdin, stdout, stderr = client.exec_command(line, timeout=options.command_timeout)
        stdin.close()
        out = stdout.read()
        err = stderr.read()
        status = stdout.channel.recv_exit_status()
    except (OSError, paramiko.SSHException) as failure:
        raise RemoteError(f"{host}: running {line!r} failed: {failure}") from failure
    finally:
        client.close()
    return parse_answer(str(host), line, status, out, err)


def parse_answer(host: str, line: str, status: int, out: bytes, err: bytes) -> Any:
    """The command's JSON, or the error it reported raised as its own ``KernelError`` class."""
    try:
        answer = json.loads(out)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        error = answer["error"]
        cls = kernel.ERRORS.get(str(error.get("type")), KernelError)
        raise cls(f"{host}: {error.get('message', 'failed')}")
    if status != 0 or answer is None:
        detail = (err or out).decode(errors="replace").strip().splitlines()[-3:]
        raise RemoteError(f"{host}: {line!r} exited {status}: {' | '.join(detail) or 'no output'}")
    return answer


def remote_attach(
    host: SshHost | str,
    target: NbdTarget | str,
    *,
    connections: int | None = None,
    timeout: int | None = None,
    dead_conn_timeout: int | None = None,
    interface: kernel.Interface | None = None,
    read_only: bool = False,
    ssh: SshOptions = SshOptions(),
) -> KernelDevice:
    """``kernel.attach`` on the host; the target is resolved to a URI here first."""
    args = ["attach", kernel.as_target(target).uri()]
    if read_only:
        args.append("--read-only")
    if connections is not None:
        args += ["--connections", str(connections)]
    if timeout is not None:
        args += ["--timeout", str(timeout)]
    if dead_conn_timeout is not None:
        args += ["--dead-conn-timeout", str(dead_conn_timeout)]
    if interface is not None:
        args += ["--interface", interface]
    return KernelDevice.from_json(run(host, args, ssh))


def remote_detach(
    host: SshHost | str,
    what: KernelDevice | NbdTarget | int | str,
    *,
    ssh: SshOptions = SshOptions(),
) -> DetachResult:
    """``kernel.detach`` on the host: a device (/dev/nbdN, nbdN, index) or a volume / URI."""
    if isinstance(what, KernelDevice):
        name = what.path
    elif isinstance(what, int):
        name = kernel.device_path(what)
    elif isinstance(what, str) and re.fullmatch(r"(?:/dev/)?nbd\d+", what):
        name = what
    else:
        name = kernel.as_target(what).uri()
    data = run(host, ["detach", name], ssh)
    fields = {f.name for f in dataclasses.fields(DetachResult)}
    return DetachResult(**{k: v for k, v in data.items() if k in fields})


def remote_attached(host: SshHost | str, *, ssh: SshOptions = SshOptions()) -> list[KernelDevice]:
    """``kernel.attached`` on the host (needs neither root nor the nbd module there)."""
    data = run(host, ["attached"], ssh)
    if not isinstance(data, list):
        raise RemoteError(f"{host}: unexpected answer to attached: {data!r}")
    return [KernelDevice.from_json(d) for d in data]
