"""Build the Debian 12 guest the Ansible test provisions (debootstrap, cached by content).

The image is a whole Debian system, unlike the tiny guest (images/tiny.py): systemd, sshd with
a generated key authorized for root, python3, python3-venv, python3-apt and every Debian
package the Ansible roles install (QEMU, libvirt, python3-libvirt, ...), so that the roles'
apt tasks find everything installed and no network is needed inside the guest.

:func:`build` runs ``debootstrap`` against the first Debian mirror of the host's apt sources
(the one ``apt-get`` already uses), configures the tree (network, fstab, serial console,
masked timers) and writes ``images/cache``-style entries to :func:`cache_root`:
``debian-<key>/`` with ``rootfs.raw`` (ext4, made by ``mke2fs -d``, no loop mounts),
``vmlinuz`` + ``vmlinux`` + ``initrd.img`` (the guest's own kernel and initramfs, booted with
``-kernel``/``-initrd``: no bootloader), ``id_ed25519`` (root's SSH key) and
``manifest.json``.  The key hashes every input: this file, the package list, the mirror, the
host's ``InRelease`` files for the suite (the mirror's state as apt last saw it) and the
configuration files written into the guest.  Boot a copy-on-write overlay of ``rootfs.raw``
(``qemu-img create -b``); the entry is never modified.

Run ``python -m images.debian`` to build (or reuse) and print the paths as JSON; the guest's
contract is in images/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from images.tiny import extract_pvh_vmlinux

SUITE = "bookworm"

PACKAGES: tuple[str, ...] = (
    # the base the test and Ansible need: init, sshd, Python with venv and apt bindings
    "systemd-sysv",
    "udev",
    # alternatives debootstrap does not resolve (libvirt-daemon-system needs them)
    "dbus",
    "libpam-systemd",
    "kmod",
    "iproute2",
    "openssh-server",
    "python3",
    "python3-venv",
    "python3-apt",
    # the guest's own kernel and initramfs
    "linux-image-amd64",
    "initramfs-tools",
    # what ansible/roles/nbs_hypervisor installs (nbs_hypervisor_apt_packages)
    "qemu-system-x86",
    "qemu-utils",
    "libvirt-daemon-system",
    "libvirt-clients",
    "python3-libvirt",
    # nbs_storage_ceph_packages (the test provisions with nbs_storage_ceph: true)
    "python3-rados",
    "python3-rbd",
)
"""Packages installed on top of debootstrap's ``minbase`` variant (with their dependencies)."""

GUEST_IP = "10.0.2.15"
GATEWAY_IP = "10.0.2.2"

ROOTFS_SIZE = 4 << 30
"""Size of ``rootfs.raw`` (sparse): the system takes ~1.2 GB, the rest is room for the roles."""

KERNEL_APPEND = "root=/dev/vda rw console=ttyS0 net.ifnames=0 quiet"
"""Kernel command line for :attr:`DebianImage.kernel`: root on the first virtio disk."""

GUEST_FILES: dict[str, str] = {
    "etc/hostname": "nbs-debian\n",
    "etc/hosts": "127.0.0.1 localhost\n127.0.1.1 nbs-debian\n",
    "etc/fstab": "/dev/vda / ext4 rw,errors=remount-ro 0 0\n",
    # QEMU user networking: fixed address, no DHCP wait at boot
    "etc/systemd/network/10-eth0.network": (
        f"[Match]\nName=eth0\n\n[Network]\nAddress={GUEST_IP}/24\nGateway={GATEWAY_IP}\n"
    ),
    # No PAM: each command over SSH (Ansible runs ~5 per task) skips the logind session setup
    "etc/ssh/sshd_config.d/nbs-test.conf": (
        "PermitRootLogin prohibit-password\nUseDNS no\nUsePAM no\n"
    ),
    # a guest without network must not wait for NTP or DNS
    "etc/systemd/system/systemd-networkd-wait-online.service.d/any.conf": (
        "[Service]\nExecStart=\nExecStart=/lib/systemd/systemd-networkd-wait-online --any "
        "--timeout=20\n"
    ),
}
"""Files written into the guest (path relative to its root -> text)."""

ENABLED_UNITS = ("systemd-networkd.service", "ssh.service")
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    "dpkg-db-backup.timer",
    "systemd-timesyncd.service",
)
"""Timers and services that only cost boot time in a throw-away test guest."""

POLICY_RC_D = (
    "#!/bin/sh\n# images/debian.py: never start daemons inside the build chroot\nexit 101\n"
)


class BuildError(RuntimeError):
    """A tool or input is missing or a build step failed."""


@dataclasses.dataclass(frozen=True)
class DebianImage:
    """A built Debian guest (one cache entry, never modified after it appears)."""

    directory: Path
    rootfs: Path
    """ext4 image of the whole system (raw); boot an overlay of it, never the file itself."""
    kernel: Path
    vmlinux: Path | None
    """The kernel as an ELF with a PVH entry point (QEMU boots it ~2 s faster), if extracted."""
    initrd: Path
    ssh_key: Path
    """Private ed25519 key whose public half is root's authorized_keys in the guest."""
    kernel_version: str
    key: str
    build_seconds: float | None
    """How long the build of this entry took (from its manifest)."""

    @property
    def boot_kernel(self) -> Path:
        """What to pass to ``-kernel``: :attr:`vmlinux` when available, else :attr:`kernel`."""
        return self.vmlinux or self.kernel


def cache_root(cache_dir: Path | None = None) -> Path:
    """``cache_dir``, else ``$NBS_IMAGE_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/nbs/images``.

    Unlike the tiny guest (images/cache, rebuilt in a second), this image takes minutes to
    build, so by default it lives outside the checkout and survives fresh clones.
    """
    if cache_dir is not None:
        return cache_dir
    env = os.environ.get("NBS_IMAGE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "nbs" / "images"


_DEB_LINE = re.compile(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)")


def find_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The first Debian mirror URI serving :data:`SUITE` in the host's apt sources."""
    files = [sources_dir / "sources.list", *sorted((sources_dir / "sources.list.d").glob("*"))]
    for path in files:
        try:
            text = path.read_text()
        except (FileNotFoundError, IsADirectoryError):
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {
                    k.strip(): v.strip()
                    for k, v in (line.split(":", 1) for line in stanza.splitlines() if ":" in line)
                    if not k.startswith("#")
                }
                suites = fields.get("Suites", "").split()
                if SUITE in suites and "deb" in fields.get("Types", "").split():
                    return fields["URIs"].split()[0]
        else:
            for line in text.splitlines():
                match = _DEB_LINE.match(line.strip())
                if match and match.group(2) == SUITE:
                    return str(match.group(1))
    raise BuildError(f"no apt source for {SUITE} in {sources_dir}/sources.list*")


def _release_file(mirror: str) -> bytes:
    """The host's copy of the mirror's InRelease for :data:`SUITE` (b"" if apt has none)."""
    stem = re.sub(r"^\w+://", "", mirror).rstrip("/").replace("/", "_")
    path = Path("/var/lib/apt/lists") / f"{stem}_dists_{SUITE}_InRelease"
    return path.read_bytes() if path.is_file() else b""


def cache_key(mirror: str) -> str:
    """SHA-256 (first 24 hex digits) over every input of the build."""
    inputs = [
        ("builder", Path(__file__).read_bytes()),
        ("mirror", mirror.encode()),
        ("release", _release_file(mirror)),
        ("packages", "\n".join(PACKAGES).encode()),
        *((f"file:{path}", text.encode()) for path, text in sorted(GUEST_FILES.items())),
    ]
    digest = hashlib.sha256()
    for label, data in inputs:  # length-prefixed, so no two input lists hash alike
        digest.update(f"{label}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()[:24]


def _tool(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise BuildError(f"{name} not found: apt-get install {package}")
    return path


def _run(args: Sequence[str], log: Path, **kwargs: object) -> None:
    """Run a build step, appending its output to ``log``; BuildError with the tail on failure."""
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(args)}\n".encode())
        out.flush()
        result = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise BuildError(f"{args[0]} failed ({result.returncode}); log {log}:\n{tail}")


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """Serialize builds across processes: a second builder waits and then finds the entry."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".debian.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _kill_chroot_processes(root: Path) -> None:
    """SIGKILL processes whose root is the build chroot (daemons a maintainer script left).

    policy-rc.d forbids starting services, so normally there are none; only processes whose
    ``/proc/PID/root`` is inside our own temporary build tree are touched.
    """
    target = str(root.resolve())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(proc / "root").startswith(target):
                os.kill(int(proc.name), 9)


def _configure(root: Path, public_key: str) -> None:
    """Write the guest's configuration into the debootstrapped tree ``root``."""
    for rel, text in GUEST_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(public_key)
    (ssh_dir / "authorized_keys").chmod(0o600)
    systemd = root / "etc/systemd/system"
    wants = systemd / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for unit in ENABLED_UNITS:
        link = wants / unit
        if not link.is_symlink():
            link.symlink_to(f"/lib/systemd/system/{unit}")
    for unit in MASKED_UNITS:
        link = systemd / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    # systemd makes a fresh machine-id on first boot of each overlay
    (root / "etc/machine-id").write_text("")
    (root / "usr/sbin/policy-rc.d").unlink(missing_ok=True)
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True)


def _newest(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if not found:
        raise BuildError(f"no {pattern} in the built tree")
    return found[-1]


def _entry(final: Path, key: str) -> DebianImage:
    manifest = json.loads((final / "manifest.json").read_text())
    vmlinux = final / "vmlinux"
    return DebianImage(
        directory=final,
        rootfs=final / "rootfs.raw",
        kernel=final / "vmlinuz",
        vmlinux=vmlinux if vmlinux.exists() else None,
        initrd=final / "initrd.img",
        ssh_key=final / "id_ed25519",
        kernel_version=manifest["kernel_version"],
        key=key,
        build_seconds=manifest.get("build_seconds"),
    )


def build(cache_dir: Path | None = None, *, mirror: str | None = None) -> DebianImage:
    """Return the cached image for the current inputs, building it first if needed (root).

    A build takes minutes (debootstrap downloads ~250 MB of packages into
    ``<cache>/debs``, kept for the next build, and configures them).  Concurrent callers wait
    for one build (a lock file) and the entry appears by an atomic rename.  Raises
    :class:`BuildError` when a tool is missing, without root, or when a step fails.
    """
    mirror = mirror or find_mirror()
    key = cache_key(mirror)
    root_dir = cache_root(cache_dir)
    final = root_dir / f"debian-{key}"
    if (final / "manifest.json").is_file():
        return _entry(final, key)
    debootstrap = _tool("debootstrap", "debootstrap")
    mke2fs = _tool("mke2fs", "e2fsprogs")
    ssh_keygen = _tool("ssh-keygen", "openssh-client")
    if os.geteuid() != 0:
        raise BuildError("debootstrap needs root")
    with _lock(root_dir):
        if (final / "manifest.json").is_file():
            return _entry(final, key)
        started = time.monotonic()
        debs = root_dir / "debs"
        debs.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-debian-", dir=root_dir))
        log = tmp / "build.log"
        tree = tmp / "root"
        try:
            _run(
                [
                    debootstrap,
                    "--foreign",
                    "--variant=minbase",
                    "--components=main",
                    f"--include={','.join(PACKAGES)}",
                    f"--cache-dir={debs}",
                    SUITE,
                    str(tree),
                    mirror,
                ],
                log,
            )
            policy = tree / "usr/sbin/policy-rc.d"
            policy.write_text(POLICY_RC_D)
            policy.chmod(0o755)
            try:
                _run(
                    ["chroot", str(tree), "/debootstrap/debootstrap", "--second-stage"],
                    log,
                    env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
                )
            except BuildError:
                with contextlib.suppress(OSError):
                    shutil.copyfile(
                        tree / "debootstrap/debootstrap.log", root_dir / "failed-build.log"
                    )
                raise
            finally:
                _kill_chroot_processes(tree)
                for mount in ("sys", "proc", "dev/pts", "dev"):
                    subprocess.run(
                        ["umount", "-l", str(tree / mount)], capture_output=True, check=False
                    )
            keygen = [ssh_keygen, "-q", "-t", "ed25519", "-N", "", "-C", "nbs-test"]
            _run([*keygen, "-f", str(tmp / "id_ed25519")], log)
            _configure(tree, (tmp / "id_ed25519.pub").read_text())
            kernel = _newest(tree / "boot", "vmlinuz-*")
            version = kernel.name.removeprefix("vmlinuz-")
            shutil.copyfile(kernel, tmp / "vmlinuz")
            shutil.copyfile(tree / "boot" / f"initrd.img-{version}", tmp / "initrd.img")
            vmlinux = extract_pvh_vmlinux(kernel.read_bytes())
            if vmlinux is not None:
                (tmp / "vmlinux").write_bytes(vmlinux)
            mkfs = [mke2fs, "-q", "-F", "-t", "ext4", "-L", "nbs-debian", "-d", str(tree)]
            _run([*mkfs, str(tmp / "rootfs.raw"), f"{ROOTFS_SIZE // 1024}k"], log)
            shutil.rmtree(tree)
            manifest = {
                "key": key,
                "mirror": mirror,
                "suite": SUITE,
                "packages": list(PACKAGES),
                "kernel_version": version,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "build_seconds": round(time.monotonic() - started, 1),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            tmp.chmod(0o755)
            tmp.rename(final)
        finally:
            if tmp.exists():
                _kill_chroot_processes(tmp)
                shutil.rmtree(tmp, ignore_errors=True)
    return _entry(final, key)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m images.debian``: build (or reuse) the image and print its paths as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m images.debian",
        description="Build (or reuse) the Debian guest for the Ansible test; print its paths.",
    )
    parser.add_argument("--cache-dir", type=Path, help="cache directory (default: see README)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        image = build(args.cache_dir)
    except BuildError as e:
        print(f"images.debian: {e}", file=sys.stderr)
        return 1
    result = {
        "rootfs": str(image.rootfs),
        "kernel": str(image.boot_kernel),
        "initrd": str(image.initrd),
        "append": KERNEL_APPEND,
        "ssh_key": str(image.ssh_key),
        "kernel_version": image.kernel_version,
        "key": image.key,
        "build_seconds": image.build_seconds,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
