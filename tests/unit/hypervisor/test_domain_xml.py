"""The libvirt <disk> element NBS generates (what `nbs xml` prints)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from hypervisor.domain import disk_xml
from hypervisor.target import NbdTarget


def test_tcp_disk_xml() -> None:
    disk = ET.fromstring(disk_xml(NbdTarget.parse("nbd://10.1.2.3:10809/vol7"), dev="vdc"))
    assert disk.attrib == {"type": "network", "device": "disk"}
    source = disk.find("source")
    assert source is not None
    assert source.attrib == {"protocol": "nbd", "name": "vol7"}
    host = source.find("host")
    assert host is not None
    assert host.attrib == {"name": "10.1.2.3", "port": "10809"}
    assert disk.findtext("serial") == "vol7"
    target = disk.find("target")
    assert target is not None
    assert target.attrib == {"dev": "vdc", "bus": "virtio"}
    alias = disk.find("alias")
    assert alias is not None
    assert alias.get("name") == "ua-nbs-vol7"
    assert disk.find("readonly") is None


def test_unix_tls_read_only_disk_xml() -> None:
    target = NbdTarget.parse("nbds+unix:///golden?socket=/run/nbs.sock&tls-hostname=store")
    disk = ET.fromstring(disk_xml(target, read_only=True))
    source = disk.find("source")
    assert source is not None
    assert source.get("tls") == "yes"
    assert source.get("tlsHostname") == "store"
    host = source.find("host")
    assert host is not None
    assert host.attrib == {"transport": "unix", "socket": "/run/nbs.sock"}
    assert disk.find("readonly") is not None


def test_long_volume_names_are_cut_to_the_virtio_serial_limit() -> None:
    disk = ET.fromstring(disk_xml(NbdTarget.parse("a-very-long-volume-name-indeed")))
    assert disk.findtext("serial") == "a-very-long-volume-n"
