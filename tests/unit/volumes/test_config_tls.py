"""The server-wide TLS policy: ``tls.policy`` in the YAML file."""

from __future__ import annotations

import pytest

from backend.nbd import TLSPolicy
from backend.volumes.config import ConfigError, parse_config


def test_tls_policy_defaults_to_allowed() -> None:
    config = parse_config({"tls": {"cert": "/c.pem", "key": "/k.pem"}}, "f.yaml")
    assert config.tls is not None
    assert config.tls.policy is TLSPolicy.ALLOWED


def test_tls_policy_required() -> None:
    config = parse_config({"tls": {"cert": "/c", "key": "/k", "policy": "required"}}, "f.yaml")
    assert config.tls is not None
    assert config.tls.policy is TLSPolicy.REQUIRED


@pytest.mark.parametrize("policy", ["off", "yes", 1])
def test_tls_policy_is_allowed_or_required(policy: object) -> None:
    with pytest.raises(ConfigError, match=r"f\.yaml: tls\.policy: expected"):
        parse_config({"tls": {"cert": "/c", "key": "/k", "policy": policy}}, "f.yaml")
