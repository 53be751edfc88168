"""libvirt's ``<disk>`` element for an NBD volume: building it and reading it back.

Pure XML (no libvirt binding), so ``nbs xml`` and the listings work without libvirt-python.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from collections.abc import Iterator

from hypervisor.naming import ALIAS_PREFIX, alias_for, by_id_path, serial_for, volume_of_export
from hypervisor.target import NbdTarget


@dataclasses.dataclass(frozen=True)
class DomainDisk:
    """An NBS disk of a libvirt domain.

    ``live``: in the running domain; ``persistent``: in its saved configuration.  A disk that
    is persistent but not live is attached at the next boot only (config-only).
    """

    volume: str
    alias: str
    target_dev: str
    uri: str
    read_only: bool
    serial: str | None
    by_id: str | None = None
    live: bool = True
    persistent: bool = False


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
    ET.SubElement(disk, "serial").text = serial_for(target.volume)
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


def disks(xml: str) -> Iterator[tuple[ET.Element, str]]:
    """Every ``<disk>`` of a domain's XML with its alias ("" when it has none)."""
    for disk in ET.fromstring(xml).iterfind("./devices/disk"):
        alias = disk.find("alias")
        yield disk, alias.get("name", "") if alias is not None else ""


def describe(disk: ET.Element, alias: str, *, live: bool, persistent: bool) -> DomainDisk:
    """What ``disk`` (one of ours, named ``alias``) attaches."""
    source = disk.find("source")
    target = disk.find("target")
    serial = disk.findtext("serial")
    # The volume comes from the export: hashed aliases (naming.py) do not spell it out.
    export = source.get("name") if source is not None else None
    return DomainDisk(
        volume=volume_of_export(export) if export is not None else alias[len(ALIAS_PREFIX) :],
        alias=alias,
        target_dev=target.get("dev", "") if target is not None else "",
        uri=_uri_of(source) if source is not None else "",
        read_only=disk.find("readonly") is not None,
        serial=serial,
        by_id=by_id_path(serial) if serial else None,
        live=live,
        persistent=persistent,
    )


def ours(xml: str) -> dict[str, ET.Element]:
    """NBS's disks in a domain's XML, by alias."""
    return {alias: disk for disk, alias in disks(xml) if alias.startswith(ALIAS_PREFIX)}
