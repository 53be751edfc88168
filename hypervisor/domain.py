"""Attach NBD volumes to libvirt domains (libvirt-python).

Attach: probe the export, then ``attachDeviceFlags`` of a ``<disk type='network'>`` (alias
``ua-nbs-VOLUME``, serial = volume) live and/or persistent.  Detach: ``detachDeviceAlias``,
then wait for libvirt's DEVICE_REMOVED event for that alias (DEVICE_REMOVAL_FAILED or a
timeout is an error; the request is never re-sent).  Both are idempotent.

Reconnects: libvirt 9.0 cannot set ``reconnect-delay`` on NBD disks, so without help QEMU fails
guest I/O as soon as the server goes away.  With ``reconnect_delay`` set, attach then rebuilds
the disk's storage node through libvirt's QEMU monitor passthrough: a temporary nbd node with
reconnect-delay is swapped in under libvirt's format node (blockdev-reopen), the original node
is recreated under its own name with reconnect-delay, swapped back, and the temporary one
removed.  libvirt's view of the domain (node names, XML) is unchanged, so its own detach keeps
working; it does mark the domain "tainted" for using the monitor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import libvirt
import libvirt_qemu

from hypervisor import defaults
from hypervisor.nbdclient import NbdClientError, probe
from hypervisor.qmp import (
    DEFAULT_DETACH_TIMEOUT,
    SERIAL_MAX,
    AttachConflictError,
    ExportUnavailableError,
    GuestNotReadyError,
    QmpError,
    VmUnreachableError,
)
from hypervisor.target import NbdTarget

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())

ALIAS_PREFIX = "ua-nbs-"
DEFAULT_CONNECT = defaults.LIBVIRT_CONNECT


@dataclasses.dataclass(frozen=True)
class DomainDisk:
    volume: str
    alias: str
    target_dev: str
    uri: str
    read_only: bool
    serial: str | None


def alias_for(volume: str) -> str:
    return ALIAS_PREFIX + volume


def disk_xml(
    target: NbdTarget,
    *,
    dev: str = "vdb",
    read_only: bool = False,
    alias: str | None = None,
) -> str:
    """The ``<disk>`` element for ``target`` (what ``nbs xml`` prints for virsh attach-device).

    With TLS, libvirt takes certificates from qemu.conf (``nbd_tls_x509_cert_dir``), not from
    the URI.
    """
    disk = ET.Element("disk", type="network", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw", cache="none", discard="unmap")
    source = ET.SubElement(disk, "source", protocol="nbd", name=target.export)
    if target.tls:
        source.set("tls", "yes")
        if target.tls_hostname:
            source.set("tlsHostname", target.tls_hostname)
    if target.socket is not None:
        ET.SubElement(source, "host", transport="unix", socket=str(target.socket))
    else:
        ET.SubElement(source, "host", name=str(target.host), port=str(target.port))
    ET.SubElement(disk, "target", dev=dev, bus="virtio")
    ET.SubElement(disk, "serial").text = target.volume[:SERIAL_MAX]
    if read_only:
        ET.SubElement(disk, "readonly")
    ET.SubElement(disk, "alias", name=alias or alias_for(target.volume))
    ET.indent(disk)
    return ET.tostring(disk, encoding="unicode") + "\n"


def _uri_of(source: ET.Element) -> str:
    host = source.find("host")
    scheme = "nbds" if source.get("tls") == "yes" else "nbd"
    name = source.get("name", "")
    if host is not None and host.get("transport") == "unix":
        return f"{scheme}+unix:///{name}?socket={host.get('socket')}"
    if host is not None:
        return f"{scheme}://{host.get('name')}:{host.get('port', '10809')}/{name}"
    return f"{scheme}:///{name}"


def _disks(xml: str) -> Iterator[tuple[ET.Element, str]]:
    for disk in ET.fromstring(xml).iterfind("./devices/disk"):
        alias = disk.find("alias")
        yield disk, alias.get("name", "") if alias is not None else ""


def _describe(disk: ET.Element, alias: str) -> DomainDisk:
    source = disk.find("source")
    target = disk.find("target")
    serial = disk.find("serial")
    return DomainDisk(
        volume=alias[len(ALIAS_PREFIX) :],
        alias=alias,
        target_dev=target.get("dev", "") if target is not None else "",
        uri=_uri_of(source) if source is not None else "",
        read_only=disk.find("readonly") is not None,
        serial=serial.text if serial is not None else None,
    )


class _Events:
    """libvirt's default event loop on a daemon thread (needed for device-removed events)."""

    _started = False
    _lock = threading.Lock()

    @classmethod
    def ensure(cls) -> None:
        with cls._lock:
            if cls._started:
                return
            libvirt.virEventRegisterDefaultImpl()

            def loop() -> None:
                while True:
                    libvirt.virEventRunDefaultImpl()

            threading.Thread(target=loop, name="libvirt-events", daemon=True).start()
            cls._started = True


@contextmanager
def _domain(connect: str, name: str) -> Iterator[tuple[libvirt.virConnect, libvirt.virDomain]]:
    _Events.ensure()
    try:
        conn = libvirt.open(connect)
    except libvirt.libvirtError as err:
        raise VmUnreachableError(f"cannot connect to libvirt at {connect}: {err}") from err
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError as err:
            raise VmUnreachableError(f"no libvirt domain {name!r}: {err}") from err
        yield conn, dom
    finally:
        conn.close()


def _flags(dom: libvirt.virDomain, live: bool, persistent: bool) -> int:
    flags = 0
    if live and dom.isActive():
        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    if persistent:
        if not dom.isPersistent():
            raise QmpError("the domain is transient: it has no persistent configuration")
        flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
    if not flags:
        raise GuestNotReadyError("the domain is not running; use --persistent to change its config")
    return flags


def _free_dev(xml: str) -> str:
    used = {t.get("dev") for t in ET.fromstring(xml).iterfind("./devices/disk/target")}
    for letter in "bcdefghijklmnopqrstuvwxyz":
        if f"vd{letter}" not in used:
            return f"vd{letter}"
    raise QmpError("no free virtio disk name (vdb..vdz all in use)")


def attach(
    domain: str,
    target: NbdTarget,
    *,
    connect: str = DEFAULT_CONNECT,
    live: bool = True,
    persistent: bool = False,
    reconnect_delay: int | None = None,
    read_only: bool = False,
) -> DomainDisk:
    """Attach ``target`` to ``domain`` (see module doc).  Idempotent.  Without
    ``read_only``, an export the server offers read-only is refused."""
    alias = alias_for(target.volume)
    with _domain(connect, domain) as (_, dom):
        xml = dom.XMLDesc(0)
        for disk, name in _disks(xml):
            if name == alias:
                existing = _describe(disk, name)
                if existing.uri.split("?")[0] != target.uri().split("?")[0]:
                    raise AttachConflictError(
                        f"volume {target.volume!r} is already attached from {existing.uri}"
                    )
                return existing
        try:
            info = probe(target, read_only=read_only)
        except NbdClientError as err:
            raise ExportUnavailableError(str(err)) from err
        element = disk_xml(
            target, dev=_free_dev(xml), read_only=read_only or info.read_only, alias=alias
        )
        flags = _flags(dom, live, persistent)
        try:
            dom.attachDeviceFlags(element, flags)
        except libvirt.libvirtError as err:
            raise QmpError(f"libvirt refused the disk: {err.get_error_message()}") from err
        if reconnect_delay and flags & libvirt.VIR_DOMAIN_AFFECT_LIVE:
            try:
                enable_reconnect(dom, alias, target, reconnect_delay)
            except QmpError:
                dom.detachDeviceAlias(alias, flags)
                raise
        for disk, name in _disks(dom.XMLDesc(0)):
            if name == alias:
                return _describe(disk, name)
        raise QmpError("libvirt accepted the disk but does not list it")


def _monitor(dom: libvirt.virDomain, command: str, arguments: dict[str, Any]) -> Any:
    request = json.dumps({"execute": command, "arguments": arguments})
    try:
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, request, 0))
    except libvirt.libvirtError as err:
        raise QmpError(f"monitor command {command} failed: {err.get_error_message()}") from err
    if "error" in reply:
        raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
    return reply.get("return")


def enable_reconnect(
    dom: libvirt.virDomain, alias: str, target: NbdTarget, reconnect_delay: int
) -> None:
    """Give a libvirt-attached NBD disk a reconnect-delay (module docstring explains how)."""
    disk = next((d for d, name in _disks(dom.XMLDesc(0)) if name == alias), None)
    source = disk.find("source") if disk is not None else None
    index = source.get("index") if source is not None else None
    if index is None:
        raise QmpError(f"libvirt did not report the node index of {alias}")
    fmt, storage = f"libvirt-{index}-format", f"libvirt-{index}-storage"
    nodes = {n["node-name"]: n for n in _monitor(dom, "query-named-block-nodes", {"flat": True})}
    if fmt not in nodes or storage not in nodes:
        raise QmpError(f"{alias}: expected nodes {fmt} over {storage}, found {sorted(nodes)}")
    read_only = bool(nodes[fmt].get("ro"))
    options: dict[str, Any] = {
        "driver": "nbd",
        "server": target.qemu_server(),
        "export": target.export,
        "reconnect-delay": reconnect_delay,
        "read-only": read_only,
        "discard": "unmap",
        "cache": {"direct": True, "no-flush": False},
    }
    if target.tls:
        objects = _monitor(dom, "qom-list", {"path": "/objects"})
        creds = [o["name"] for o in objects if o["name"].startswith(f"obj{storage}_tls")]
        if not creds:
            raise QmpError(f"{alias}: cannot find libvirt's TLS credentials object")
        options["tls-creds"] = creds[0]
    temporary = f"nbs-swap-{index}"
    fmt_options = {
        "driver": "raw",
        "node-name": fmt,
        "read-only": read_only,
        "discard": "unmap",
        "cache": {"direct": True, "no-flush": False},
    }
    _monitor(dom, "blockdev-add", {**options, "node-name": temporary})
    try:
        _monitor(dom, "blockdev-reopen", {"options": [{**fmt_options, "file": temporary}]})
    except QmpError:
        _monitor(dom, "blockdev-del", {"node-name": temporary})
        raise
    _monitor(dom, "blockdev-del", {"node-name": storage})
    _monitor(dom, "blockdev-add", {**options, "node-name": storage})
    _monitor(dom, "blockdev-reopen", {"options": [{**fmt_options, "file": storage}]})
    _monitor(dom, "blockdev-del", {"node-name": temporary})
    log.info("%s: reconnect-delay %ds enabled", alias, reconnect_delay)


def detach(
    domain: str,
    volume: str,
    *,
    connect: str = DEFAULT_CONNECT,
    live: bool = True,
    persistent: bool = False,
    timeout: float = DEFAULT_DETACH_TIMEOUT,
) -> DomainDisk | None:
    """Detach ``volume``; returns what was detached, or None if it was not attached."""
    alias = alias_for(volume)
    with _domain(connect, domain) as (conn, dom):
        found = next((_describe(d, n) for d, n in _disks(dom.XMLDesc(0)) if n == alias), None)
        if found is None and persistent and dom.isPersistent():
            inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            found = next((_describe(d, n) for d, n in _disks(inactive) if n == alias), None)
        if found is None:
            return None
        flags = _flags(dom, live, persistent)
        if flags & libvirt.VIR_DOMAIN_AFFECT_LIVE:
            state = dom.state()[0]
            if state != libvirt.VIR_DOMAIN_RUNNING:
                raise GuestNotReadyError(
                    "the domain is paused or not running: its guest cannot release the disk;"
                    " resume it and detach again"
                )
        outcome: dict[str, bool] = {}
        done = threading.Event()

        def removed(_c: object, _d: object, dev_alias: str, _o: object) -> None:
            if dev_alias == alias:
                outcome["removed"] = True
                done.set()

        def failed(_c: object, _d: object, dev_alias: str, _o: object) -> None:
            if dev_alias == alias:
                outcome["removed"] = False
                done.set()

        ids = [
            conn.domainEventRegisterAny(
                dom, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, removed, None
            ),
            conn.domainEventRegisterAny(
                dom, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED, failed, None
            ),
        ]
        try:
            try:
                dom.detachDeviceAlias(alias, flags)
            except libvirt.libvirtError as err:
                raise QmpError(f"libvirt refused to detach: {err.get_error_message()}") from err
            if flags & libvirt.VIR_DOMAIN_AFFECT_LIVE:
                if not done.wait(timeout) and _still_attached(dom, alias):
                    raise GuestNotReadyError(
                        f"the guest did not release {alias} within {timeout:.0f}s; the unplug"
                        " request stays pending: detach again later"
                    )
                if outcome.get("removed") is False:
                    raise GuestNotReadyError(f"the guest refused to release {alias}")
        finally:
            for callback in ids:
                conn.domainEventDeregisterAny(callback)
        return found


def _still_attached(dom: libvirt.virDomain, alias: str) -> bool:
    return any(name == alias for _, name in _disks(dom.XMLDesc(0)))


def attached(domain: str, *, connect: str = DEFAULT_CONNECT) -> list[DomainDisk]:
    """NBS volumes attached to ``domain`` (live configuration when running)."""
    with _domain(connect, domain) as (_, dom):
        return [_describe(d, n) for d, n in _disks(dom.XMLDesc(0)) if n.startswith(ALIAS_PREFIX)]
