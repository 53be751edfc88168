"""Hot-plug NBD volumes into a running QEMU through its QMP socket (qemu.qmp).

Attach:  probe the export ourselves (clear errors, and a dead server never blocks QEMU's
         monitor) → blockdev-add an ``nbd`` node ``nbs-VOLUME`` with reconnect-delay and
         open-timeout → device_add virtio-blk-pci ``nbs-VOLUME`` with serial VOLUME, so the
         guest finds it at /dev/disk/by-id/virtio-VOLUME (names that do not fit QEMU's or
         virtio's limits are shortened with a hash: hypervisor/naming.py).  If device_add
         fails the node is removed again: nothing is left half-attached.
Detach:  listen for DEVICE_DELETED first, device_del once (never re-sent: QEMU refuses a
         second one while the guest has not answered), wait a bounded time for the event with
         ``data.device`` = our id, then blockdev-del.
Both are idempotent: attaching what is attached returns it, detaching what is not attached
says so.

Errors (all QmpError, under hypervisor.errors.HypervisorError):
    QmpError
     ├── VmUnreachableError     no QMP socket / QEMU gone
     ├── AttachExportError export missing or server down (from the probe)
     ├── AttachConflictError    the volume name is attached with a different URI
     ├── NoFreeSlotError        no PCI slot / root port to hot-plug into
     ├── GuestNotReadyError     the guest is paused or did not release the disk in time
     └── NeedsOptionError       the request needs an option it was not given (a usage error)
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient

from hypervisor import defaults
from hypervisor.errors import HypervisorError
from hypervisor.naming import (
    QEMU_PREFIX,
    by_id_path,
    export_of_filename,
    qemu_id_for,
    serial_for,
    volume_of_export,
)
from hypervisor.nbdclient import NbdClientError, probe
from hypervisor.target import NbdTarget

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())

PREFIX = QEMU_PREFIX
DEFAULT_RECONNECT_DELAY = defaults.RECONNECT_DELAY
DEFAULT_OPEN_TIMEOUT = defaults.OPEN_TIMEOUT
DEFAULT_DETACH_TIMEOUT = defaults.DETACH_TIMEOUT


class QmpError(HypervisorError):
    """Base of this module's errors."""


class VmUnreachableError(QmpError):
    pass


class AttachExportError(QmpError):
    pass


class AttachConflictError(QmpError):
    pass


class NoFreeSlotError(QmpError):
    pass


class GuestNotReadyError(QmpError):
    pass


class NeedsOptionError(QmpError):
    pass


@dataclasses.dataclass(frozen=True)
class Attachment:
    """A volume attached to a VM by us."""

    volume: str
    node: str
    device: str | None  # None: a node left without its device (cleaned up by attach/detach)
    uri: str
    read_only: bool = False
    serial: str | None = None
    by_id: str | None = dataclasses.field(init=False)  # where the guest's udev links the disk

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_id", by_id_path(self.serial) if self.serial else None)


def ids_for(volume: str) -> str:
    """The node name and device id used for ``volume`` (hypervisor/naming.py)."""
    return qemu_id_for(volume)


def _volume_of(node_name: str, filename: str) -> str:
    export = export_of_filename(filename)
    # Hashed ids (naming.py) do not spell the volume out; the node's export does.
    return volume_of_export(export) if export is not None else node_name[len(PREFIX) :]


class _Session:
    def __init__(self, qmp: QMPClient) -> None:
        self.qmp = qmp

    async def run(self, command: str, args: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(command, args)

    async def devices(self) -> set[str]:
        items = await self.run("qom-list", {"path": "/machine/peripheral"})
        return {i["name"] for i in items if str(i.get("type", "")).startswith("child<")}

    async def nodes(self) -> dict[str, dict[str, Any]]:
        nodes = await self.run("query-named-block-nodes", {"flat": True})
        return {n["node-name"]: n for n in nodes if n.get("node-name", "").startswith(PREFIX)}

    async def running(self) -> str:
        status = await self.run("query-status")
        return str(status["status"])

    async def serial_of(self, device: str) -> str | None:
        try:
            value = await self.run(
                "qom-get", {"path": f"/machine/peripheral/{device}", "property": "serial"}
            )
        except ExecuteError:
            return None
        return str(value) if value is not None else None

    async def attachments(self) -> list[Attachment]:
        devices = await self.devices()
        out = []
        for name, node in sorted((await self.nodes()).items()):
            device = name if name in devices else None
            uri = str(node.get("file", ""))
            out.append(
                Attachment(
                    volume=_volume_of(name, uri),
                    node=name,
                    device=device,
                    uri=uri,
                    read_only=bool(node.get("ro", False)),
                    serial=await self.serial_of(name) if device else None,
                )
            )
        return out


async def _connect(qmp_path: Path) -> _Session:
    qmp = QMPClient("nbs")
    try:
        await qmp.connect(str(qmp_path))
    except Exception as err:  # qemu.qmp raises ConnectError wrapping OSError
        raise VmUnreachableError(f"cannot reach QEMU at {qmp_path}: {err}") from err
    return _Session(qmp)


def _tls_object_id(tls_dir: Path) -> str:
    return PREFIX + "tls-" + hashlib.sha256(str(tls_dir).encode()).hexdigest()[:12]


def _same_target(uri_on_node: str, target: NbdTarget) -> bool:
    # QEMU reports the node as an nbd:// filename (or json:{...} when it has extra options);
    # compare on what identifies the export: its name and server address.
    where = str(target.socket) if target.socket else f"{target.host}:{target.port}"
    return target.export in uri_on_node and where in uri_on_node


async def _free_root_port(session: _Session) -> str | None:
    """A pcie-root-port with nothing plugged in (q35 machines hot-plug only into those)."""
    for bus in await session.run("query-pci"):
        for dev in bus.get("devices", []):
            bridge = dev.get("pci_bridge")
            if bridge is not None and dev.get("qdev_id") and not bridge.get("devices"):
                return str(dev["qdev_id"])
    return None


async def _attach(
    qmp_path: Path,
    target: NbdTarget,
    *,
    reconnect_delay: int,
    open_timeout: int,
    bus: str | None,
    read_only: bool,
) -> Attachment:
    session = await _connect(qmp_path)
    try:
        name = ids_for(target.volume)
        devices = await session.devices()
        nodes = await session.nodes()
        if name in devices and name in nodes:
            uri = str(nodes[name].get("file", ""))
            if _same_target(uri, target):
                log.info("%s already attached as %s", target.uri(), name)
                return Attachment(
                    target.volume,
                    name,
                    name,
                    uri,
                    bool(nodes[name].get("ro")),
                    await session.serial_of(name),
                )
            raise AttachConflictError(f"volume {target.volume!r} is already attached from {uri}")
        if name in devices:
            raise AttachConflictError(f"a device with id {name!r} exists and is not ours")
        try:
            info = await asyncio.to_thread(probe, target, read_only=read_only)
        except NbdClientError as err:
            raise AttachExportError(str(err)) from err
        if name in nodes:  # a node left behind by an interrupted attach
            await session.run("blockdev-del", {"node-name": name})
        options: dict[str, Any] = {
            "driver": "nbd",
            "node-name": name,
            "server": target.qemu_server(),
            "export": target.export,
            "reconnect-delay": reconnect_delay,
            "open-timeout": open_timeout,
            "read-only": read_only or info.read_only,
        }
        if target.tls:
            if target.tls_dir is None:
                raise AttachExportError("nbds:// needs ?tls-certificates=DIR for QEMU")
            creds = _tls_object_id(target.tls_dir)
            objects = await session.run("qom-list", {"path": "/objects"})
            if creds not in {o["name"] for o in objects}:
                await session.run(
                    "object-add",
                    {
                        "qom-type": "tls-creds-x509",
                        "id": creds,
                        "dir": str(target.tls_dir),
                        "endpoint": "client",
                    },
                )
            options["tls-creds"] = creds
            if target.tls_hostname:
                options["tls-hostname"] = target.tls_hostname
        try:
            await session.run("blockdev-add", options)
        except ExecuteError as err:
            raise AttachExportError(f"QEMU could not open {target.uri()}: {err}") from err
        serial = serial_for(target.volume)
        device: dict[str, Any] = {
            "driver": "virtio-blk-pci",
            "id": name,
            "drive": name,
            "serial": serial,
        }
        try:
            if bus is not None:
                device["bus"] = bus
            try:
                await session.run("device_add", device)
            except ExecuteError as err:
                if bus is not None or "hotplug" not in str(err).lower():
                    raise
                port = await _free_root_port(session)
                if port is None:
                    raise NoFreeSlotError(
                        "no free hot-plug slot: this machine type hot-plugs only into"
                        " pcie-root-port devices, and none is free (start QEMU with more)"
                    ) from err
                await session.run("device_add", {**device, "bus": port})
        except (ExecuteError, QmpError) as err:
            await session.run("blockdev-del", {"node-name": name})
            if isinstance(err, QmpError):
                raise
            text = str(err)
            if "slot" in text.lower() or "no free" in text.lower():
                raise NoFreeSlotError(f"no free hot-plug slot: {text}") from err
            raise QmpError(f"device_add failed: {text}") from err
        uri = str((await session.nodes())[name].get("file", target.uri()))
        log.info("attached %s as %s (serial %s)", target.uri(), name, serial)
        return Attachment(target.volume, name, name, uri, read_only or info.read_only, serial)
    finally:
        await session.qmp.disconnect()


async def _detach(qmp_path: Path, volume: str, timeout: float) -> Attachment | None:
    session = await _connect(qmp_path)
    try:
        name = ids_for(volume)
        devices = await session.devices()
        nodes = await session.nodes()
        if name not in devices and name not in nodes:
            return None
        found = Attachment(
            volume,
            name,
            name if name in devices else None,
            str(nodes.get(name, {}).get("file", "")),
        )
        if name in devices:
            status = await session.running()
            if status != "running":
                raise GuestNotReadyError(
                    f"the VM is {status}: a guest that does not run cannot release the disk;"
                    " resume it and detach again"
                )
            with session.qmp.listener("DEVICE_DELETED") as listener:
                try:
                    await session.run("device_del", {"id": name})
                except ExecuteError as err:
                    # An unplug already in progress: wait for it rather than re-send.
                    if "in the process of unplug" not in str(err):
                        raise QmpError(f"device_del failed: {err}") from err
                await _wait_deleted(listener, name, timeout)
        if name in nodes or name in devices:
            await session.run("blockdev-del", {"node-name": name})
        log.info("detached %s", name)
        return found
    finally:
        await session.qmp.disconnect()


async def _wait_deleted(listener: EventListener, device: str, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise GuestNotReadyError(
                f"the guest did not release {device} within {timeout:.0f}s (still booting, or"
                " no ACPI hot-plug?); the unplug request stays pending: detach again later"
            )
        try:
            event = await asyncio.wait_for(listener.get(), remaining)
        except TimeoutError:
            continue
        data = event.get("data")
        if isinstance(data, dict) and data.get("device") == device:
            return


async def _list(qmp_path: Path) -> list[Attachment]:
    session = await _connect(qmp_path)
    try:
        return await session.attachments()
    finally:
        await session.qmp.disconnect()


def attach(
    qmp_path: Path,
    target: NbdTarget,
    *,
    reconnect_delay: int = DEFAULT_RECONNECT_DELAY,
    open_timeout: int = DEFAULT_OPEN_TIMEOUT,
    bus: str | None = None,
    read_only: bool = False,
) -> Attachment:
    """Hot-plug ``target`` into the VM whose QMP socket is ``qmp_path`` (see module doc).
    Without ``read_only``, an export the server offers read-only is refused."""
    return asyncio.run(
        _attach(
            qmp_path,
            target,
            reconnect_delay=reconnect_delay,
            open_timeout=open_timeout,
            bus=bus,
            read_only=read_only,
        )
    )


def detach(
    qmp_path: Path, volume: str, timeout: float = DEFAULT_DETACH_TIMEOUT
) -> Attachment | None:
    """Unplug ``volume``; returns what was detached, or None if it was not attached."""
    return asyncio.run(_detach(qmp_path, volume, timeout))


def attached(qmp_path: Path) -> list[Attachment]:
    """Volumes this module attached to the VM."""
    return asyncio.run(_list(qmp_path))
