"""Importing images into volumes and exporting volumes to images, with qemu-img.

The volume is served for the copy by an in-process NBS server on a private Unix socket, and
``qemu-img convert`` reads or writes it over NBD: any format qemu-img knows (raw, qcow2, vmdk,
…, or an nbd:// URI) works both ways, and sparse regions stay sparse.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from backend.nbd import TLSPolicy
from backend.server.exports import Export, ExportTable
from backend.server.server import Server, UnixAddress
from backend.storage import Storage
from backend.storage.layers import ForwardingStorage
from backend.volumes.model import (
    SECTOR,
    ImportRequest,
    InvalidRequestError,
    StorageFailureError,
    VolumeError,
    VolumeInfo,
    parse_size,
)
from backend.volumes.service import VolumeService

Progress = Callable[[int, int], None]
_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        raise StorageFailureError("qemu-img is needed for import/export (apt install qemu-utils)")
    return path


def image_size(source: str) -> int:
    """Virtual size of an image file or NBD URI, as qemu-img sees it."""
    result = subprocess.run(
        [qemu_img(), "info", "--output=json", source],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        raise InvalidRequestError(f"cannot read image {source}: {result.stderr.strip()}")
    return int(json.loads(result.stdout)["virtual-size"])


@contextmanager
def serve_privately(name: str, storage: Storage, read_only: bool) -> Iterator[str]:
    """Serve ``storage`` as ``name`` on a private Unix socket; yields its NBD URI."""
    with tempfile.TemporaryDirectory(prefix="nbs-transfer-") as tmp:
        socket_path = Path(tmp) / "nbd.sock"
        # Borrowed: shutting the private server down closes its export's storage, and the
        # volume's storage belongs to its owner, who goes on using it.
        borrowed = ForwardingStorage(storage, owns_inner=False)
        export = Export(name, borrowed, tls=TLSPolicy.OFF, read_only=read_only)
        server = Server(ExportTable([export]), unix=[UnixAddress(socket_path)])
        server.bind()
        server.start()
        try:
            yield f"nbd+unix:///{name}?socket={socket_path}"
        finally:
            server.shutdown(grace=5)


def _convert(args: list[str], total: int, progress: Progress | None) -> None:
    with subprocess.Popen(
        [qemu_img(), "convert", "-p", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        _follow(process, total, progress)


def _follow(process: subprocess.Popen[bytes], total: int, progress: Progress | None) -> None:
    """Report qemu-img's ``-p`` percentages as bytes; raise if it fails."""
    assert process.stdout is not None
    assert process.stderr is not None
    buffered = b""
    while chunk := os.read(process.stdout.fileno(), 4096):
        buffered = (buffered + chunk)[-256:]
        found = _PERCENT.findall(buffered)
        if found and progress is not None:
            progress(int(total * float(found[-1]) / 100), total)
    error = process.stderr.read().decode(errors="replace").strip()
    if process.wait() != 0:
        raise StorageFailureError(f"qemu-img convert failed: {error}")
    if progress is not None:
        progress(total, total)


def import_image(
    storage: Storage, name: str, source: str, progress: Progress | None = None
) -> None:
    """Copy the image at ``source`` (file or NBD URI) into ``storage``."""
    total = image_size(source)
    if total > storage.size:
        raise InvalidRequestError(
            f"image {source} ({total} bytes) is larger than the volume ({storage.size} bytes)"
        )
    with serve_privately(name, storage, read_only=False) as uri:
        # -n: the target exists; --target-is-zero: a new volume reads as zeroes, so holes in
        # the source need no writes at all.
        _convert(["-n", "--target-is-zero", "-O", "raw", source, uri], total, progress)
    storage.flush()


def export_image(
    storage: Storage,
    name: str,
    dest: Path,
    fmt: str = "raw",
    progress: Progress | None = None,
) -> None:
    """Write ``storage`` to the image file ``dest`` in format ``fmt`` (raw, qcow2, …)."""
    with serve_privately(name, storage, read_only=True) as uri:
        _convert(["-f", "raw", "-O", fmt, uri, str(dest)], storage.size, progress)


def begin_import(service: VolumeService, request: ImportRequest) -> None:
    """Create the hidden (``creating``) volume an image will be copied into.

    Sized from ``request.volume.size`` or else the image, rounded up to whole sectors.
    Raises the VolumeError of a refused request; then nothing was created.
    """
    size = request.volume.size
    total = parse_size(size) if size is not None else image_size(request.source)
    total += -total % SECTOR
    service.create(dataclasses.replace(request.volume, size=total), ready=False)


def finish_import(
    service: VolumeService, request: ImportRequest, progress: Progress | None = None
) -> VolumeInfo:
    """Copy the image into the volume begin_import created and make it visible.

    On any failure the half-filled volume is removed and the error re-raised.
    """
    name, source = request.volume.name, request.source
    try:
        storage = service.open_creating(name)
        try:
            import_image(storage, name, source, progress)
        finally:
            storage.close()
    except BaseException:
        with contextlib.suppress(VolumeError):
            service.abandon(name)
        raise
    return service.mark_ready(name)
