"""``prefixserve serve``'s server flags come from ServerConfig: the same defaults, units and
names, written once."""

from __future__ import annotations

from dataclasses import fields

import pytest

from prefixserve.cli import build_parser
from prefixserve.config import EngineConfig
from prefixserve.quota import TenantQuota
from prefixserve.server.config import AdapterSpec, ServerConfig, server_config, server_options


def parsed(*flags: str) -> ServerConfig:
    args = build_parser().parse_args(["serve", *flags])
    return server_config({o.dest: getattr(args, o.dest) for o in server_options()}, EngineConfig())


def test_no_flags_give_the_config_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFIXSERVE_CACHE", str(tmp_path))
    monkeypatch.delenv("PREFIXSERVE_API_KEYS", raising=False)
    got, want = parsed(), ServerConfig()
    for f in fields(ServerConfig):
        if f.name != "api_keys":
            assert getattr(got, f.name) == getattr(want, f.name), f.name
    assert got.api_keys.open and want.api_keys.open
    assert got.registry_dir == tmp_path / "registry"  # one default, the persistent registry


def test_every_field_has_a_flag():
    dests = {(o.section, o.field) for o in server_options()}
    for f in fields(ServerConfig):
        if f.name not in ("engine", "quota"):
            assert (None, f.name) in dests, f.name
    for f in fields(TenantQuota):
        assert ("quota", f.name) in dests, f.name


def test_flags_set_fields_in_their_units(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("acme sk-acme-123456\n")
    config = parsed(
        "--port", "0", "--max-upload-mb", "1.5", "--max-request-kb", "8",
        "--max-adapter-mb-per-tenant", "2", "--max-waiting-per-tenant", "none",
        "--max-waiting", "none", "--registry-dir", "none", "--api-keys", str(keys),
        "--adapter", "acme/pirate=examples/adapters/pirate", "--adapter", "shout=x",
    )  # fmt: skip
    assert config.port == 0 and config.max_waiting is None and config.registry_dir is None
    assert config.max_upload_bytes == int(1.5 * 2**20) and config.max_request_bytes == 8192
    assert config.quota == TenantQuota(max_adapter_bytes=2 * 2**20, max_waiting=None)
    assert set(config.api_keys.tenants) == {"acme"}
    assert config.adapters == [
        AdapterSpec("pirate", "examples/adapters/pirate", "acme"),
        AdapterSpec("shout", "x"),
    ]


def test_bad_values_name_the_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-upload-mb", "lots"])
    assert "--max-upload-mb" in capsys.readouterr().err
    with pytest.raises(ValueError, match="NAME=PATH"):
        parsed("--adapter", "no-equals-sign")


def test_readme_lists_every_environment_variable():
    from pathlib import Path

    from prefixserve.config import ENVIRONMENT

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = [name for name in ENVIRONMENT if f"| `{name}` |" not in readme]
    assert not missing, f"README's environment table lacks {missing}"


def test_api_keys_none_is_an_open_server(monkeypatch):
    monkeypatch.setenv("PREFIXSERVE_API_KEYS", "acme sk-acme-123456")
    assert not parsed().api_keys.open  # the environment's keys, without a file
    assert parsed("--api-keys", "none").api_keys.open


def test_api_keys_carry_admin_and_weight():
    from prefixserve.server import ApiKeys

    keys = ApiKeys.parse(
        "a key-aaaa-1 weight=2\nops key-ops-1 admin\nb key-bbbb-1 admin weight=0.5;"
        "a key-aaaa-2 weight=2",
        "test",
    )
    tenant = keys.authenticate([("authorization", "Bearer key-aaaa-2")])
    assert (tenant.name, tenant.admin, tenant.weight) == ("a", False, 2.0)
    tenant = keys.authenticate([("x-api-key", "key-bbbb-1")])
    assert (tenant.name, tenant.admin, tenant.weight) == ("b", True, 0.5)
    assert keys.authenticate([("x-api-key", "key-ops-1")]).weight == 1.0
    for text, message in [
        ("a key-aaaa-1 weight=0", "weight must be a number > 0, got '0'"),
        ("a key-aaaa-1 weight=x", "weight must be a number > 0, got 'x'"),
        ("a key-aaaa-1 owner", "got 'owner' after the key"),
        ("a key-aaaa-1 weight=2\na key-aaaa-2", "keys of different weights"),
        ("a", "got 1 field"),
    ]:
        with pytest.raises(ValueError, match=message):
            ApiKeys.parse(text, "test")
