"""The libvirt <disk> element NBS generates (what `nbs xml` prints)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from hypervisor.disk_xml import describe, disk_xml, ours
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


def test_long_volume_names_get_a_unique_serial_and_a_valid_alias() -> None:
    one = ET.fromstring(disk_xml(NbdTarget.parse("abcdefghijklmnopqrst-1")))
    two = ET.fromstring(disk_xml(NbdTarget.parse("abcdefghijklmnopqrst-2")))
    serials = {one.findtext("serial"), two.findtext("serial")}
    assert len(serials) == 2
    assert all(s is not None and len(s) <= 20 for s in serials)
    dotted = ET.fromstring(disk_xml(NbdTarget.parse("my.volume")))
    alias = dotted.find("alias")
    assert alias is not None
    assert alias.get("name", "").startswith("ua-nbs-my_volume-")  # libvirt refuses "."


def test_disks_read_back_name_the_volume_even_behind_a_hashed_alias() -> None:
    name = "v" * 200
    xml = f"<domain><devices>{disk_xml(NbdTarget.parse(name))}</devices></domain>"
    [(alias, element)] = ours(xml).items()
    disk = describe(element, alias, live=False, persistent=True)
    assert disk.volume == name
    assert disk.serial is not None
    assert disk.by_id == f"/dev/disk/by-id/virtio-{disk.serial}"
    assert (disk.live, disk.persistent) == (False, True)
