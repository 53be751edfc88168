"""Defaults shared by the attach paths and the command line (kept import-light)."""

from __future__ import annotations

RECONNECT_DELAY = 30  # seconds QEMU holds guest I/O while the server is unreachable
OPEN_TIMEOUT = 10  # seconds QEMU keeps trying to open a new NBD disk
DETACH_TIMEOUT = 60.0  # seconds to wait for the guest to release a disk
LIBVIRT_CONNECT = "qemu:///system"
SERIAL_MAX = 20  # virtio-blk serials are at most 20 bytes (VIRTIO_BLK_ID_BYTES)
