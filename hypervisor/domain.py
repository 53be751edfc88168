"""Attach NBD volumes to libvirt domains (libvirt-python).

Attach: probe the export, then ``attachDeviceFlags`` of a ``<disk type='network'>`` (alias
``ua-nbs-VOLUME`` and serial from hypervisor/naming.py) live and/or persistent.  Detach:
``detachDeviceAlias`` from wherever the disk is (the running domain, its saved configuration
with ``persistent``, or both), then wait for libvirt's DEVICE_REMOVED event for that alias
(DEVICE_REMOVAL_FAILED or a timeout is an error; the request is never re-sent).  Both are
idempotent: each touches only the places (live, config) still missing or holding the disk.

Reconnects: libvirt 9.0 cannot set ``reconnect-delay`` on NBD disks, so without help QEMU fails
guest I/O as soon as the server goes away.  With ``reconnect_delay`` set, attach then rebuilds
the disk's storage node through libvirt's QEMU monitor passthrough: a temporary nbd node with
reconnect-delay is swapped in under libvirt's format node (blockdev-reopen), the original node
is recreated under its own name with reconnect-delay, swapped back, and the temporary one
removed.  libvirt's view of the domain (node names, XML) is unchanged, so its own detach keeps
working; it does mark the domain "tainted" for using the monitor.
"""

from __future__ import annotations

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
from hypervisor.disk_xml import DomainDisk, describe, disk_xml, ours
from hypervisor.naming import alias_for
from hypervisor.nbdclient import NbdClientError, probe
from hypervisor.qmp import (
    DEFAULT_DETACH_TIMEOUT,
    AttachConflictError,
    AttachExportError,
    GuestNotReadyError,
    NeedsOptionError,
    QmpError,
    VmUnreachableError,
)
from hypervisor.target import NbdTarget

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())

DEFAULT_CONNECT = defaults.LIBVIRT_CONNECT


class _Disks:
    """NBS's disks of a domain, in its running state and in its saved configuration."""

    def __init__(self, dom: libvirt.virDomain) -> None:
        # XMLDesc(0) of a domain that is shut off is its configuration, not a running state.
        self.xmls = [dom.XMLDesc(0)]
        self.live = ours(self.xmls[0]) if dom.isActive() else {}
        self.config: dict[str, ET.Element] = {}
        if dom.isPersistent():
            self.xmls.append(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            self.config = ours(self.xmls[-1])

    def get(self, alias: str) -> DomainDisk | None:
        disk = self.live.get(alias)
        if disk is None:
            disk = self.config.get(alias)
        if disk is None:
            return None
        return describe(disk, alias, live=alias in self.live, persistent=alias in self.config)

    def all(self) -> list[DomainDisk]:
        found = (self.get(alias) for alias in sorted(self.live.keys() | self.config.keys()))
        return [disk for disk in found if disk is not None]


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


def _check_scope(dom: libvirt.virDomain, live: bool, persistent: bool) -> None:
    if persistent and not dom.isPersistent():
        raise QmpError("the domain is transient: it has no persistent configuration")
    if not persistent and not (live and dom.isActive()):
        raise GuestNotReadyError("the domain is not running; use --persistent to change its config")


def _free_dev(*xmls: str) -> str:
    used = {
        t.get("dev") for xml in xmls for t in ET.fromstring(xml).iterfind("./devices/disk/target")
    }
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
        _check_scope(dom, live, persistent)
        present = _Disks(dom)
        existing = present.get(alias)
        if existing is not None and existing.uri.split("?")[0] != target.uri().split("?")[0]:
            raise AttachConflictError(
                f"volume {target.volume!r} is already attached from {existing.uri}"
            )
        flags = 0
        if live and dom.isActive() and alias not in present.live:
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        if persistent and alias not in present.config:
            flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if existing is not None and not flags:
            return existing
        try:
            info = probe(target, read_only=read_only)
        except NbdClientError as err:
            raise AttachExportError(str(err)) from err
        dev = _free_dev(*present.xmls)
        element = disk_xml(target, dev=dev, read_only=read_only or info.read_only, alias=alias)
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
        done = _Disks(dom).get(alias)
        if done is None:
            raise QmpError("libvirt accepted the disk but does not list it")
        return done


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
    disk = ours(dom.XMLDesc(0)).get(alias)
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
    """Detach ``volume``; returns what was detached, or None if it was not attached.

    ``live``: from the running domain; ``persistent``: from its saved configuration as well,
    also when the disk is no longer (or never was) in the running domain.
    """
    alias = alias_for(volume)
    with _domain(connect, domain) as (conn, dom):
        present = _Disks(dom)
        found = present.get(alias)
        if found is None:
            return None
        flags = 0
        if live and found.live:
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        if persistent and found.persistent:
            flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if not flags:
            raise NeedsOptionError(
                f"{volume} is attached to {domain} only in its persistent configuration;"
                " detach it with --persistent"
            )
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
    return alias in ours(dom.XMLDesc(0))


def attached(domain: str, *, connect: str = DEFAULT_CONNECT) -> list[DomainDisk]:
    """NBS volumes attached to ``domain``: in the running domain, its configuration, or both."""
    with _domain(connect, domain) as (_, dom):
        return _Disks(dom).all()
