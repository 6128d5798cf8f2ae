"""API keys -> tenants: parsing EZTINKER_API_KEYS and the keys file, and the caller a key names."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask, jsonify

from config import Settings, SettingsError
from config.tenants import (
    ADMIN_TENANT,
    DEFAULT_TENANT,
    TenantKey,
    key_tenants,
    parse_key_lines,
    parse_key_list,
)
from eztinker_web.auth import AUTH_OFF, Caller, caller, install_auth


def test_a_key_list_maps_keys_to_tenants_and_bare_keys_to_the_default_tenant() -> None:
    assert parse_key_list(" k1:alice, k2:bob ,k3,, k4:admin ") == (
        TenantKey("k1", "alice"),
        TenantKey("k2", "bob"),
        TenantKey("k3", DEFAULT_TENANT),
        TenantKey("k4", ADMIN_TENANT),
    )
    # The tenant follows the last colon: a key may hold colons itself.
    assert parse_key_list("a:b:carol") == (TenantKey("a:b", "carol"),)
    assert parse_key_list("") == ()


@pytest.mark.parametrize("raw", [":alice", "k1:", "k1:bad tenant", "k1:-x", "k 1:alice", "k1:a/b"])
def test_a_bad_key_list_entry_is_refused(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_key_list(raw)


def test_the_keys_file_has_one_key_and_tenant_per_line() -> None:
    text = "# keys\n\nka alice\n  kb   bob  \nkbare\n# kc carol\nkd admin\n"
    assert parse_key_lines(text) == (
        TenantKey("ka", "alice"),
        TenantKey("kb", "bob"),
        TenantKey("kbare", DEFAULT_TENANT),
        TenantKey("kd", ADMIN_TENANT),
    )
    with pytest.raises(ValueError, match="line 2"):
        parse_key_lines("ka alice\nkb bob extra\n")
    with pytest.raises(ValueError, match="line 1"):
        parse_key_lines("ka not/a/tenant\n")


def test_a_key_may_not_belong_to_two_tenants() -> None:
    same = key_tenants([TenantKey("k", "alice")], [TenantKey("k", "alice"), TenantKey("j")])
    assert same == {"k": "alice", "j": DEFAULT_TENANT}
    with pytest.raises(ValueError, match="two tenants"):
        key_tenants([TenantKey("k", "alice")], [TenantKey("k", "bob")])


def test_settings_merge_the_key_list_and_the_keys_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("kf alice\nkroot admin\n")
    s = Settings.from_env({"EZTINKER_API_KEYS": "kb:bob,kold", "EZTINKER_API_KEYS_FILE": str(keys)})
    assert s.key_tenants() == {
        "kb": "bob",
        "kold": DEFAULT_TENANT,
        "kf": "alice",
        "kroot": ADMIN_TENANT,
    }
    assert Settings.from_env({}).key_tenants() == {}  # auth off
    # The seed's form (a bare, comma-separated key list) still parses: one default tenant.
    assert set(Settings.from_env({"EZTINKER_API_KEYS": "k1, k2"}).key_tenants().values()) == {
        DEFAULT_TENANT
    }


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"EZTINKER_API_KEYS": "k1:bad tenant"}, "EZTINKER_API_KEYS"),
        ({"EZTINKER_API_KEYS_FILE": "/nonexistent/keys"}, "EZTINKER_API_KEYS_FILE"),
        ({"EZTINKER_TENANT_MAX_RUNS": "-1"}, "EZTINKER_TENANT_MAX_RUNS"),
        ({"EZTINKER_TENANT_MAX_QUEUED_OPS": "many"}, "EZTINKER_TENANT_MAX_QUEUED_OPS"),
    ],
)
def test_bad_tenant_settings_name_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env(env)


def test_an_empty_keys_file_or_a_key_given_twice_stops_start_up(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nobody\n")
    with pytest.raises(SettingsError, match="EZTINKER_API_KEYS_FILE"):
        Settings.from_env({"EZTINKER_API_KEYS_FILE": str(empty)})
    keys = tmp_path / "keys"
    keys.write_text("k1 bob\n")
    with pytest.raises(SettingsError, match="two tenants"):
        Settings.from_env({"EZTINKER_API_KEYS": "k1:alice", "EZTINKER_API_KEYS_FILE": str(keys)})


def test_limits_default_to_unlimited() -> None:
    s = Settings.from_env({})
    assert (s.tenant_max_runs, s.tenant_max_queued_ops) == (0, 0)
    s = Settings.from_env({"EZTINKER_TENANT_MAX_RUNS": "3", "EZTINKER_TENANT_MAX_QUEUED_OPS": "50"})
    assert (s.tenant_max_runs, s.tenant_max_queued_ops) == (3, 50)


def test_who_sees_what() -> None:
    alice = Caller.of_tenant("alice")
    admin = Caller.of_tenant(ADMIN_TENANT)
    assert alice.sees("alice") and not alice.sees("bob") and not alice.sees(None)
    assert alice.limited and not alice.sees_all
    assert admin.sees("alice") and admin.sees(None) and not admin.limited
    assert AUTH_OFF.tenant == DEFAULT_TENANT and AUTH_OFF.sees("anyone")


def _app(keys: dict[str, str]) -> Flask:
    app = Flask("t")
    install_auth(app, keys)

    @app.get("/v1/whoami")
    def whoami():
        who = caller()
        return jsonify(tenant=who.tenant, sees_all=who.sees_all, limited=who.limited)

    @app.get("/health")
    def health():
        return jsonify(tenant=caller().tenant)

    return app


def test_each_key_acts_for_its_tenant() -> None:
    client = _app({"ka": "alice", "kold": DEFAULT_TENANT, "kroot": ADMIN_TENANT}).test_client()

    def who(key: str) -> dict:
        r = client.get("/v1/whoami", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.get_json()
        return r.get_json()

    assert who("ka") == {"tenant": "alice", "sees_all": False, "limited": True}
    assert who("kold") == {"tenant": DEFAULT_TENANT, "sees_all": False, "limited": True}
    assert who("kroot") == {"tenant": ADMIN_TENANT, "sees_all": True, "limited": False}
    assert client.get("/v1/whoami", headers={"X-API-Key": "ka"}).get_json()["tenant"] == "alice"
    for headers in ({}, {"Authorization": "Bearer kb"}, {"Authorization": "Bearer ka2"}):
        denied = client.get("/v1/whoami", headers=headers)
        assert denied.status_code == 401 and denied.get_json()["code"] == "unauthorized"
    assert client.get("/health").status_code == 200  # open, as before


def test_with_auth_off_everyone_is_the_one_default_tenant() -> None:
    body = _app({}).test_client().get("/v1/whoami").get_json()
    assert body == {"tenant": DEFAULT_TENANT, "sees_all": True, "limited": True}
