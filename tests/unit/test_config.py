"""YAML configuration and the CLI's export syntax."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.config import (
    ConfigError,
    ExportConfig,
    load_config,
    parse_config,
    parse_export_spec,
    parse_host_port,
)
from backend.nbd import TLSPolicy
from backend.server.limits import ConnectionLimits


def test_full_config_parses(tmp_path: Path) -> None:
    path = tmp_path / "nbs.yaml"
    path.write_text(
        """
listen: ["127.0.0.1:10809", "[::1]:10810"]
sockets: [/run/nbs.sock]
log_level: debug
io_threads: 4
max_request: 128MiB
shutdown_grace: 2.5
max_connections: 100
max_connections_per_client: 10
handshake_timeout: 5.5
tls: {cert: /c.pem, key: /k.pem, ca: /ca.pem}
exports:
  - {name: disk, path: /d.img, read_only: true, tls: required, description: hi, min_block: 512}
"""
    )
    config = load_config(path)
    assert config.listen == ("127.0.0.1:10809", "[::1]:10810")
    assert config.sockets == (Path("/run/nbs.sock"),)
    assert config.io_threads == 4
    assert config.max_request == 128 << 20
    assert config.shutdown_grace == 2.5
    assert config.limits == ConnectionLimits(100, 10, 5.5)
    assert config.tls is not None
    assert config.tls.ca == Path("/ca.pem")
    assert config.exports == (
        ExportConfig("disk", Path("/d.img"), True, TLSPolicy.REQUIRED, "hi", 512),
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"lisen": []}, "f.yaml: lisen: unknown key"),
        ({"listen": "nope"}, "f.yaml: listen[0]: expected HOST:PORT"),
        ({"listen": ["h:99999"]}, "listen[0]: port must be 0-65535"),
        ({"log_level": "loud"}, "f.yaml: log_level: expected one of debug"),
        ({"io_threads": "4"}, "io_threads: expected an integer"),
        ({"max_request": "48MiB"}, "max_request: expected a power of two from 1MiB to 1GiB"),
        ({"max_request": 512 << 10}, "max_request: expected a power of two"),
        ({"max_request": "2GiB"}, "max_request: expected a power of two"),
        ({"max_request": True}, "max_request: expected a power of two"),
        ({"max_request": "9" * 5000}, "max_request: expected a power of two"),
        ({"exports": {}}, "exports: expected a list"),
        ({"exports": [{"path": "/x"}]}, "exports[0].name: required"),
        ({"exports": [{"name": "a/b", "path": "/x"}]}, "exports[0].name: export name"),
        ({"exports": [{"name": "a", "path": "/x", "tls": "yes"}]}, "exports[0].tls: expected"),
        ({"exports": [{"name": "a", "path": "/x", "min_block": 3}]}, "a power of two"),
        ({"exports": [{"name": "a", "path": "/x", "colour": 1}]}, "exports[0].colour: unknown"),
        ({"tls": {"cert": "/c"}}, "tls: expected both"),
        ({"tls": {"cert": "/c", "key": "/k", "required": "yes"}}, "tls.required: expected true"),
        ({"max_connections": 0}, "f.yaml: max_connections: expected an integer from 1 to"),
        ({"max_connections_per_client": "x"}, "max_connections_per_client: expected an integer"),
        ({"handshake_timeout": float("nan")}, "f.yaml: handshake_timeout: expected a number"),
        ([1, 2], "f.yaml: top level: expected a mapping"),
    ],
)
def test_bad_config_names_file_key_and_expectation(data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(data, "f.yaml")


def test_tls_policy_of_exports_without_their_own() -> None:
    assert parse_config({}, "f.yaml").tls_policy is TLSPolicy.OFF
    tls = {"cert": "/c", "key": "/k"}
    assert parse_config({"tls": tls}, "f.yaml").tls_policy is TLSPolicy.ALLOWED
    required = parse_config({"tls": {**tls, "required": True}}, "f.yaml")
    assert required.tls_policy is TLSPolicy.REQUIRED


def test_limits_default_when_not_configured() -> None:
    assert parse_config({}, "f.yaml").limits == ConnectionLimits(1024, 512, 60.0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"shutdown_grace": float("nan")}, "shutdown_grace: expected a number of seconds from 0"),
        ({"shutdown_grace": float("inf")}, "from 0 to 3600, got inf"),
        ({"shutdown_grace": 10**400}, "from 0 to 3600, got 1000"),
        ({"io_threads": 10**5000}, "io_threads: expected an integer from 1 to 1024"),
        ({"listen": ["h:" + "9" * 5000]}, "port must be 0-65535, got '99999999"),
        ({"exports": [{"name": "a", "path": "/x", "min_block": 10**5000}]}, "a power of two"),
        ({"storages": {"s": {"type": "file", "chunk_size": 10**5000}}}, "chunk_size: number out"),
        ({"storages": {"s": {"type": "dir", "path": "/x", "chunk_size": 1 << 26}}}, "32MiB"),
    ],
)
def test_every_number_in_the_config_is_bounded(data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        parse_config(data, "f.yaml")
    assert len(str(err.value)) < 300


def test_export_min_block_of_thousands_of_digits_is_one_line() -> None:
    with pytest.raises(ValueError, match="a power of two from 1 to 65536") as err:
        parse_export_spec("d=/x.img,min-block=" + "9" * 5000)
    assert len(str(err.value)) < 200


def test_unreadable_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_export_spec_forms() -> None:
    assert parse_export_spec("d=/x.img") == ExportConfig("d", Path("/x.img"))
    spec = parse_export_spec("d=/x.img,ro,tls=required,description=my disk,min-block=4096")
    assert spec == ExportConfig("d", Path("/x.img"), True, TLSPolicy.REQUIRED, "my disk", 4096)


@pytest.mark.parametrize("spec", ["d", "d=", "=/x", "../d=/x", "d=/x,bogus", "d=/x,tls=maybe"])
def test_bad_export_specs(spec: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_export_spec(spec)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:1", ("127.0.0.1", 1)), ("[::1]:2", ("::1", 2)), (":3", ("", 3))],
)
def test_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


def test_max_request_defaults_to_64mib_and_takes_bytes() -> None:
    assert parse_config({}, "f.yaml").max_request == 64 << 20
    assert parse_config({"max_request": 1 << 20}, "f.yaml").max_request == 1 << 20


def test_storage_nodes_parse() -> None:
    config = parse_config(
        {
            "nodes": {
                "a": {"api": "http://127.0.0.1:9001", "token": "t", "nbd": "nbd://127.0.0.1:1"},
                "b.2": {
                    "api": "https://node-b:9443",
                    "token_file": "/etc/nbs/b.token",
                    "ca": "/etc/nbs/ca.pem",
                    "nbd": "nbds://node-b:10809?tls-certificates=/etc/nbs/pki",
                },
            }
        },
        "nbs.yaml",
    )
    a, b = config.nodes["a"], config.nodes["b.2"]
    assert (a.api, a.token, a.token_file) == ("http://127.0.0.1:9001", "t", None)
    assert (b.token, b.token_file, b.ca) == (
        None,
        Path("/etc/nbs/b.token"),
        Path("/etc/nbs/ca.pem"),
    )
    target = b.target("r-1;epoch=3;uid=u")
    assert (target.host, target.port, target.tls, target.export) == (
        "node-b",
        10809,
        True,
        "r-1;epoch=3;uid=u",
    )
    assert target.tls_certificates == "/etc/nbs/pki"
    assert parse_config({}, "x").nodes == {}


NODE = {"api": "http://127.0.0.1:9001", "token": "t", "nbd": "nbd://127.0.0.1:10809"}


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        ([], "nbs.yaml: nodes: expected a mapping of node names to nodes, got []"),
        ({"a/b": NODE}, "nbs.yaml: nodes: a node name is letters"),
        ({"a": {**NODE, "port": 1}}, "nbs.yaml: nodes.a.port: unknown key"),
        ({"a": {"token": "t", "nbd": "nbd://h"}}, "nbs.yaml: nodes.a.api: required"),
        ({"a": {"api": "http://h", "token": "t"}}, "nbs.yaml: nodes.a.nbd: required"),
        ({"a": {**NODE, "token_file": "/t"}}, "nodes.a: expected one of 'token' and 'token_file'"),
        ({"a": {k: v for k, v in NODE.items() if k != "token"}}, "expected one of 'token'"),
        ({"a": {**NODE, "api": "ftp://h"}}, "nodes.a.api: expected an http:// or https:// URL"),
        ({"a": {**NODE, "api": "http://"}}, "nodes.a.api: expected an http:// or https:// URL"),
        ({"a": {**NODE, "nbd": "http://h"}}, "nbs.yaml: nodes.a.nbd: "),
        ({"a": {**NODE, "nbd": "nbd://h/vol"}}, "nodes.a.nbd: the node's NBD listener, without"),
        ({"a": {**NODE, "token": ""}}, "nodes.a.token: expected a non-empty string"),
    ],
)
def test_bad_storage_nodes(nodes: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"nodes": nodes}, "nbs.yaml")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_replication_probe_interval() -> None:
    assert parse_config({}, "x").replication.probe_interval == 2.0
    config = parse_config({"replication": {"probe_interval": 0.5}}, "x")
    assert config.replication.probe_interval == 0.5
    for bad in (0, -1, "2", True, float("nan"), 4000):
        with pytest.raises(ConfigError, match=r"replication\.probe_interval: expected seconds"):
            parse_config({"replication": {"probe_interval": bad}}, "x")
    with pytest.raises(ConfigError, match=r"replication\.every: unknown key"):
        parse_config({"replication": {"every": 1}}, "x")


def test_replication_scrub_schedule() -> None:
    default = parse_config({}, "x").replication
    assert (default.scrub_interval, default.scrub_repair) == (0.0, False)
    config = parse_config({"replication": {"scrub_interval": 604800, "scrub_repair": True}}, "x")
    assert (config.replication.scrub_interval, config.replication.scrub_repair) == (604800, True)
    for bad in (0.5, -1, "1d", True, float("nan"), 400 * 86400):
        with pytest.raises(ConfigError, match=r"replication\.scrub_interval: expected 0 \(none\)"):
            parse_config({"replication": {"scrub_interval": bad}}, "x")
    with pytest.raises(ConfigError, match=r"replication\.scrub_repair: expected true or false"):
        parse_config({"replication": {"scrub_repair": "yes"}}, "x")
