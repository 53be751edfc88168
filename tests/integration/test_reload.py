"""SIGHUP reloads the config of a running ``nbs serve`` without dropping connections.

Checked with independent clients: nbdinfo for new connections, a python3-libnbd handle opened
before the reload for the old ones; ``nbs config check`` validates files the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from tests.integration.conftest import NbsServer, require_module, require_tool
from tests.integration.helpers import free_port, nbs
from tests.integration.pki import issue_server, make_ca

if TYPE_CHECKING:
    import nbd as libnbd  # for annotations: at run time require_module gives nbd

nbd = require_module("nbd")  # python3-libnbd, a Debian package

MiB = 1 << 20


def image(tmp_path: Path, name: str, size: int = 4 * MiB) -> Path:
    path = tmp_path / f"{name}.img"
    with path.open("wb") as f:
        f.truncate(size)
    return path


def write_config(path: Path, **config: object) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def nbdinfo(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("nbdinfo"), *args, uri],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def reload(server: NbsServer, expect: str, timeout: float = 10) -> None:
    """SIGHUP, then wait until the log says ``expect`` (e.g. 'reloaded')."""
    seen = server.log().count(expect)
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: server.log().count(expect) > seen, timeout, f"{expect!r} in the log")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def open_files(server: NbsServer) -> set[str]:
    fds = Path(f"/proc/{server.process.pid}/fd")
    found = set()
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            found.add(os.readlink(fd))
    return found


@contextlib.contextmanager
def connect(uri: str) -> Iterator[libnbd.NBD]:
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)  # for tls-certificates=DIR
    h.connect_uri(uri)
    try:
        yield h
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()


def test_sighup_changes_exports_listeners_and_logs_and_keeps_connections(
    nbs_server: Callable[..., NbsServer], tmp_path: Path
) -> None:
    old_image, new_image = image(tmp_path, "old"), image(tmp_path, "new", 8 * MiB)
    first, second = free_port(), free_port()
    config = write_config(
        tmp_path / "nbs.yaml",
        listen=[f"127.0.0.1:{first}"],
        exports=[{"name": "old", "path": str(old_image)}],
    )
    server = nbs_server("--config", str(config))
    data = os.urandom(64 * 1024)
    with connect(f"nbd://127.0.0.1:{first}/old") as h:
        h.pwrite(data, 0)
        changed = {
            "listen": [f"127.0.0.1:{first}", f"127.0.0.1:{second}"],
            "exports": [{"name": "new", "path": str(new_image)}],
            "log_format": "json",
            "log_level": "debug",
        }
        write_config(config, **changed)
        reload(server, "reloaded")

        added = nbdinfo(f"nbd://127.0.0.1:{second}/new", "--json")
        assert added.returncode == 0, added.stderr
        assert json.loads(added.stdout)["exports"][0]["export-size"] == 8 * MiB
        assert nbdinfo(f"nbd://127.0.0.1:{first}/old").returncode != 0  # gone for new clients
        # The connection opened before the reload still reads, writes and flushes.
        assert h.pread(len(data), 0) == data
        h.pwrite(data[::-1], len(data))
        h.flush()
        assert str(old_image) in open_files(server)

        # The listener the connection came through goes away; the connection stays.
        write_config(config, **{**changed, "listen": [f"127.0.0.1:{second}"]})
        reload(server, "reloaded")
        assert nbdinfo(f"nbd://127.0.0.1:{first}/new").returncode != 0
        assert nbdinfo(f"nbd://127.0.0.1:{second}/new").returncode == 0
        assert h.pread(2 * len(data), 0) == data + data[::-1]

    # Its storage is flushed and closed once the last client of the removed export is gone.
    wait_for(lambda: str(old_image) not in open_files(server), 10, "old.img to be closed")
    assert old_image.read_bytes()[: 2 * len(data)] == data + data[::-1]

    lines = server.log().splitlines()
    start = next(i for i, line in enumerate(lines) if "reloading" in line)
    after = [json.loads(line) for line in lines[start + 1 :]]
    assert {"time", "level", "logger", "message"} <= after[0].keys()
    assert any(e["level"] == "debug" for e in after)  # the new log level took effect
    assert any(e["message"].startswith("stopped listening on nbd://") for e in after)
    assert server.stop() == 0


def test_a_bad_config_on_reload_is_logged_and_the_running_one_stays(
    nbs_server: Callable[..., NbsServer], tmp_path: Path
) -> None:
    disk = image(tmp_path, "disk")
    config = write_config(tmp_path / "nbs.yaml", exports=[{"name": "disk", "path": str(disk)}])
    server = nbs_server("--config", str(config), "--listen", "127.0.0.1:0")
    with connect(server.uri("disk")) as h:
        for bad in (
            "exports: [{name: disk, path: " + str(disk) + ", tls: yes}]\n",  # a bad value
            "exports: [{name: other, path: /nonexistent/file.img}]\n",  # cannot be opened
            "exports: [\n",  # not YAML
        ):
            config.write_text(bad)
            reload(server, "reload failed")
            assert nbdinfo(server.uri("disk")).returncode == 0
            h.pwrite(b"x" * 512, 0)
    assert "exports[0].tls: expected one of off, allowed, required" in server.log()
    assert server.stop() == 0


def make_pki(tmp_path: Path, name: str) -> Path:
    """A CA of its own and a server certificate for localhost/127.0.0.1 (as in test_tls)."""
    work, out = tmp_path / f"{name}-work", tmp_path / name
    work.mkdir()
    out.mkdir()
    make_ca(work, out)
    issue_server(work, out)
    return out


def test_sighup_swaps_the_tls_certificate_for_new_connections(
    nbs_server: Callable[..., NbsServer], tmp_path: Path
) -> None:
    old, new = make_pki(tmp_path, "old-pki"), make_pki(tmp_path, "new-pki")
    disk = image(tmp_path, "disk")

    def config_for(pki: Path) -> dict[str, object]:
        tls = {"cert": str(pki / "server-cert.pem"), "key": str(pki / "server-key.pem")}
        exports = [{"name": "disk", "path": str(disk), "tls": "required"}]
        return {"tls": tls, "exports": exports}

    config = write_config(tmp_path / "nbs.yaml", **config_for(old))
    server = nbs_server("--config", str(config), "--listen", "127.0.0.1:0")
    tls_uri = f"nbds://127.0.0.1:{server.port}/disk?tls-certificates="
    with connect(tls_uri + str(old)) as h:
        h.pwrite(b"y" * 4096, 0)
        write_config(config, **config_for(new))
        reload(server, "reloaded")
        assert nbdinfo(tls_uri + str(new)).returncode == 0
        assert nbdinfo(tls_uri + str(old)).returncode != 0  # the old CA no longer verifies it
        assert h.pread(4096, 0) == b"y" * 4096  # the session that negotiated before goes on
    assert server.stop() == 0


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("log_format: xml\n", "log_format: expected one of text, json, got 'xml'"),
        ("metrics: {listen: localhost}\n", "metrics.listen: expected HOST:PORT"),
        ("metrics: {port: 1}\n", "metrics.port: unknown key (known: listen)"),
        ("api: {listen: [':x']}\n", "api.listen[0]: port must be a number, got 'x'"),
        ("api: {tls: {cert: c.pem}}\n", "api.tls: expected both 'cert' and 'key'"),
        ("api: {token_file: 3}\n", "api.token_file: expected a non-empty string, got 3"),
    ],
)
def test_config_check_names_the_file_and_the_bad_key(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "nbs.yaml"
    path.write_text(text)
    result = nbs("config", "check", str(path), check=False)
    assert result.returncode == 2
    assert f"{path}: {error}" in result.stderr


def test_config_check_accepts_every_documented_key(tmp_path: Path) -> None:
    path = tmp_path / "nbs.yaml"
    path.write_text(
        "log_format: json\n"
        "metrics: {listen: '127.0.0.1:9810'}\n"
        "api: {listen: ['127.0.0.1:10810', '[::1]:10810'], token_file: /etc/nbs/api-token,"
        " tls: {cert: /etc/nbs/api-cert.pem, key: /etc/nbs/api-key.pem}}\n"
    )
    result = nbs("config", "check", str(path))
    assert result.stdout == f"{path}: ok\n"
