"""The names a volume goes by inside a VM: virtio serial, QEMU node/device id, libvirt alias.

Each identifier has its own rules (docs/decisions/0050-guest-disk-names.md):

    virtio-blk serial   at most 20 bytes (VIRTIO_BLK_ID_BYTES); the guest's udev makes it
                        /dev/disk/by-id/virtio-SERIAL
    QEMU node name      at most 31 characters, [A-Za-z][A-Za-z0-9._-]* (QEMU's id_wellformed);
                        the device id is the same string
    libvirt user alias  "ua-" then [A-Za-z0-9_-] only (libvirt rejects anything else); no
                        length limit in libvirt, we keep it to 64 characters

A volume whose name fits is named verbatim (PREFIX + name), as before.  Any other name becomes
PREFIX + a readable start of the name + a separator + 8 hex digits of the name's SHA-256: a
function of the name alone, so detach finds the device again from the volume name, and names
that share their first bytes still differ.  Hashed serials use "+", a character no verbatim
serial has, so a hashed serial never equals another volume's verbatim one; for the ids, a clash
would be refused as an attach conflict, never silently shared.
"""

from __future__ import annotations

import hashlib
import json
import re

from hypervisor import defaults

QEMU_PREFIX = "nbs-"
ALIAS_PREFIX = "ua-nbs-"
QEMU_ID_MAX = 31  # BlockDriverState.node_name is char[32]
ALIAS_MAX = 64
BY_ID_DIR = "/dev/disk/by-id/"
HASH_DIGITS = 8

_SERIAL_CHARS = re.compile(r"[A-Za-z0-9._-]+")
_QEMU_CHARS = re.compile(r"[A-Za-z0-9._-]+")
_ALIAS_CHARS = re.compile(r"[A-Za-z0-9_-]+")


def _named(volume: str, prefix: str, allowed: re.Pattern[str], limit: int, sep: str) -> str:
    if allowed.fullmatch(volume) and len(prefix) + len(volume) <= limit:
        return prefix + volume
    digest = hashlib.sha256(volume.encode()).hexdigest()[:HASH_DIGITS]
    readable = "".join(c if allowed.fullmatch(c) else "_" for c in volume)
    room = limit - len(prefix) - len(sep) - HASH_DIGITS
    return prefix + readable[:room] + sep + digest


def serial_for(volume: str) -> str:
    """The virtio-blk serial the guest sees for ``volume`` (at most 20 bytes)."""
    return _named(volume, "", _SERIAL_CHARS, defaults.SERIAL_MAX, "+")


def by_id_path(serial: str) -> str:
    """Where udev links a virtio disk with ``serial`` in the guest."""
    return f"{BY_ID_DIR}virtio-{serial}"


def qemu_id_for(volume: str) -> str:
    """The QMP node name and device id for ``volume`` (at most 31 characters)."""
    return _named(volume, QEMU_PREFIX, _QEMU_CHARS, QEMU_ID_MAX, "-")


def alias_for(volume: str) -> str:
    """The libvirt user alias (device id) for ``volume`` (at most 64 characters)."""
    return _named(volume, ALIAS_PREFIX, _ALIAS_CHARS, ALIAS_MAX, "-")


def volume_of_export(export: str) -> str:
    """The volume name an export goes by on the VM side (the empty export is "default")."""
    return export or "default"


def export_of_filename(filename: str) -> str | None:
    """The export of an nbd node, from the filename QEMU reports for it, or None.

    QEMU 7.2 reports ``nbd://HOST:PORT/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH``, and
    ``json:{"driver": "nbd", "export": ..., ...}`` when options such as tls-creds are set.
    """
    if filename.startswith("json:"):
        try:
            options = json.loads(filename[len("json:") :])
        except ValueError:
            return None
        export = options.get("export") if isinstance(options, dict) else None
        return export if isinstance(export, str) else None
    if filename.startswith("nbd+unix://"):
        match = re.fullmatch(r"nbd\+unix:///(.*)\?socket=.*", filename, re.DOTALL)
    else:
        match = re.fullmatch(r"nbd://[^/]*/(.*)", filename, re.DOTALL)
    return match.group(1) if match else None
