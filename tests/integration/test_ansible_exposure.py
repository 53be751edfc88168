"""The nbs_storage role keeps plain NBD off the network unless told otherwise.

Runs ``ansible-playbook`` on localhost (connection=local) with only the role's guard tasks,
its nbs.socket drop-in template and its generated nbs.yaml: no VM, nothing installed.  The
whole role is exercised on a VM by test_ansible.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import require_tool

ANSIBLE_DIR = Path(__file__).resolve().parents[2] / "ansible"
ROLE = ANSIBLE_DIR / "roles" / "nbs_storage"

PLAYBOOK = """\
- hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - ansible.builtin.include_role:
        name: nbs_storage
        tasks_from: guard
        public: true
    - ansible.builtin.template:
        src: "{{ role_dir }}/templates/socket-dropin.conf.j2"
        dest: "{{ out }}/socket.conf"
        mode: "0644"
    - ansible.builtin.copy:
        content: "{{ nbs_storage_config | to_nice_yaml }}"
        dest: "{{ out }}/nbs.yaml"
        mode: "0644"
"""

TLS = {
    "nbs_storage_tls_cert_src": "pki/storage1-cert.pem",
    "nbs_storage_tls_key_src": "pki/storage1-key.pem",
    "nbs_storage_tls_ca_src": "pki/ca-cert.pem",
}


def render(tmp_path: Path, **variables: object) -> subprocess.CompletedProcess[str]:
    """Run the guard and render the socket drop-in and nbs.yaml into ``tmp_path``."""
    sibling = Path(sys.executable).parent / "ansible-playbook"
    playbook = str(sibling) if sibling.exists() else require_tool("ansible-playbook")
    (tmp_path / "play.yml").write_text(PLAYBOOK)
    (tmp_path / "vars.json").write_text(
        json.dumps({"out": str(tmp_path), "role_dir": str(ROLE), **variables})
    )
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"),
        "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCALHOST_WARNING": "False",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
    }
    return subprocess.run(
        [playbook, "-i", "localhost,", str(tmp_path / "play.yml"), "-e", f"@{tmp_path}/vars.json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def listen_streams(tmp_path: Path) -> list[str]:
    lines = (tmp_path / "socket.conf").read_text().splitlines()
    return [line for line in lines if line.startswith("ListenStream=")]


def test_defaults_listen_on_loopback_only(tmp_path: Path) -> None:
    result = render(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert listen_streams(tmp_path) == ["ListenStream=", "ListenStream=127.0.0.1:10809"]
    assert "tls" not in yaml.safe_load((tmp_path / "nbs.yaml").read_text())


def test_loopback_and_unix_socket_listeners_need_no_tls(tmp_path: Path) -> None:
    local = ["[::1]:10809", "127.0.0.2:10809", "/run/nbs/nbd.sock"]
    result = render(tmp_path, nbs_storage_nbd_listen=local, nbs_storage_listen=["localhost:1"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert listen_streams(tmp_path) == ["ListenStream=", *(f"ListenStream={a}" for a in local)]


@pytest.mark.parametrize(
    "variables",
    [
        {"nbs_storage_nbd_listen": ["10809"]},
        {"nbs_storage_nbd_listen": ["0.0.0.0:10809"]},
        {"nbs_storage_listen": ["192.0.2.10:10811"]},
        {"nbs_storage_nbd_listen": ["[::]:10809"], **TLS, "nbs_storage_tls_required": False},
    ],
)
def test_plaintext_nbd_beyond_loopback_is_refused(
    tmp_path: Path, variables: dict[str, object]
) -> None:
    result = render(tmp_path, **variables)
    assert result.returncode != 0
    assert "without TLS: every volume" in result.stdout
    assert not (tmp_path / "socket.conf").exists()


def test_exposed_with_required_tls_and_client_certificates(tmp_path: Path) -> None:
    result = render(tmp_path, nbs_storage_nbd_listen=["192.0.2.10:10809"], **TLS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert listen_streams(tmp_path) == ["ListenStream=", "ListenStream=192.0.2.10:10809"]
    tls = yaml.safe_load((tmp_path / "nbs.yaml").read_text())["tls"]
    assert tls == {
        "cert": "/etc/nbs/server-cert.pem",
        "key": "/etc/nbs/server-key.pem",
        "ca": "/etc/nbs/ca-cert.pem",
        "required": True,
    }


def test_plaintext_on_the_network_only_when_asked_for(tmp_path: Path) -> None:
    result = render(tmp_path, nbs_storage_nbd_listen=["10809"], nbs_storage_nbd_plaintext=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert listen_streams(tmp_path) == ["ListenStream=", "ListenStream=10809"]
