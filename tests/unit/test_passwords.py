"""Password hashes for sign-in, AUTH_USERS parsing, the sign-in settings, `auth hash-password`."""

from __future__ import annotations

import io
import re

import pytest

from panel_app.auth import AuthSettingsError, FailedSignIns, PasswordAuthProvider, auth_setup
from study_query_llm.cli import main
from study_query_llm.config import Settings
from study_query_llm.security import (
    PasswordHashError,
    check_login,
    hash_password,
    parse_users,
    verify_password,
)


def test_hash_round_trip_and_wrong_password() -> None:
    encoded = hash_password("correct horse", iterations=1000)
    algorithm, iterations, *_salt_and_digest = encoded.split(":")
    assert (algorithm, iterations) == ("pbkdf2_sha256", "1000")
    assert verify_password("correct horse", encoded)
    assert not verify_password("correct hors", encoded)
    assert hash_password("correct horse", iterations=1000) != encoded, "salted"
    assert not set(encoded) & set("$,'\" \\"), "safe in .env and compose files unquoted"


def test_default_hash_uses_owasp_iterations() -> None:
    assert hash_password("x" * 12).split(":")[1] == "600000"


def test_unknown_user_and_bad_password_both_fail() -> None:
    users = {"alice": hash_password("pw-alice-123", iterations=1000)}
    assert check_login(users, "alice", "pw-alice-123")
    assert not check_login(users, "alice", "nope")
    assert not check_login(users, "mallory", "pw-alice-123")


def test_parse_users_accepts_commas_and_new_lines() -> None:
    a, b = hash_password("a-password", iterations=10), hash_password("b-password", iterations=10)
    assert parse_users(f"alice:{a},\n bob@lab.org:{b}") == {"alice": a, "bob@lab.org": b}
    assert parse_users("  ") == {}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("alice", "AUTH_USERS entry 1 must be user:hash"),
        ("alice:plaintext", "AUTH_USERS entry 1 (alice): not a pbkdf2_sha256"),
        ("al ice:x", "AUTH_USERS entry 1 must be user:hash"),
        ("alice:pbkdf2_sha256:many:c2FsdA:ZGln", "bad iteration count"),
    ],
)
def test_parse_users_names_the_bad_entry(value: str, message: str) -> None:
    with pytest.raises(PasswordHashError, match=re.escape(message)):
        parse_users(value)


def test_parse_users_refuses_a_user_twice() -> None:
    h = hash_password("x-password", iterations=10)
    with pytest.raises(PasswordHashError, match="lists alice twice"):
        parse_users(f"alice:{h},alice:{h}")


def _settings(**values) -> Settings:
    return Settings(_env_file=None, database_url="sqlite://", **values)


def test_sign_in_is_off_unless_configured() -> None:
    setup = auth_setup(_settings())
    assert (setup.mode, setup.enabled, setup.serve_kwargs) == ("off", False, {})


def test_auth_users_turn_on_the_password_provider() -> None:
    h = hash_password("pw-alice-123", iterations=10)
    setup = auth_setup(_settings(auth_users=f"alice:{h}", panel_cookie_secret="c" * 32))
    assert setup.mode == "password" and not setup.cookie_secret_generated
    provider = setup.serve_kwargs["auth_provider"]
    assert isinstance(provider, PasswordAuthProvider)
    assert provider.login_handler.users == {"alice": h}
    assert setup.serve_kwargs["cookie_secret"] == "c" * 32
    assert auth_setup(_settings(auth_users=f"alice:{h}")).cookie_secret_generated


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"auth_users": "alice:x", "panel_oauth_provider": "github"}, "not both"),
        ({"auth_users": "alice:x"}, "entry 1 \\(alice\\)"),
        ({"panel_oauth_provider": "myspace"}, "not one of Panel's providers"),
        ({"panel_oauth_provider": "github"}, "needs PANEL_OAUTH_KEY and _SECRET"),
        (
            {
                "panel_oauth_provider": "github",
                "panel_oauth_key": "k",
                "panel_oauth_secret": "s",
                "panel_oauth_extra_params": "[1]",
            },
            "PANEL_OAUTH_EXTRA_PARAMS must be a JSON object",
        ),
    ],
)
def test_inconsistent_sign_in_settings_name_the_setting(values: dict, message: str) -> None:
    with pytest.raises(AuthSettingsError, match=message):
        auth_setup(_settings(**values))


def test_oauth_settings_become_panel_serve_arguments() -> None:
    setup = auth_setup(
        _settings(
            panel_oauth_provider="github",
            panel_oauth_key="client-id",
            panel_oauth_secret="client-secret",
            panel_oauth_redirect_uri="https://lab.example.org/",
            panel_oauth_extra_params='{"scope": "read:user"}',
        )
    )
    assert setup.mode == "oauth"
    assert setup.serve_kwargs | {"cookie_secret": None} == {
        "oauth_provider": "github",
        "oauth_key": "client-id",
        "oauth_secret": "client-secret",
        "oauth_redirect_uri": "https://lab.example.org/",
        "oauth_extra_params": {"scope": "read:user"},
        "cookie_secret": None,
    }


def test_failed_sign_ins_block_an_address_until_they_age_out() -> None:
    failures = FailedSignIns(limit=3, window_s=600)
    for _ in range(3):
        assert failures.blocked_for("192.0.2.1") == 0
        failures.add("192.0.2.1")
    assert 0 < failures.blocked_for("192.0.2.1") <= 600
    assert failures.blocked_for("192.0.2.2") == 0
    failures.clear("192.0.2.1")
    assert failures.blocked_for("192.0.2.1") == 0
    expired = FailedSignIns(limit=1, window_s=0)
    expired.add("192.0.2.3")
    assert expired.blocked_for("192.0.2.3") == 0


def test_cli_hash_password_prints_an_auth_users_entry(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough password\n"))
    assert main(["auth", "hash-password", "alice", "--password-stdin"]) == 0
    out, err = capsys.readouterr()
    entry = out.strip()
    assert parse_users(entry).keys() == {"alice"}
    assert verify_password("a long enough password", parse_users(entry)["alice"])
    assert "AUTH_USERS" in err


@pytest.mark.parametrize(
    ("user", "password", "message"),
    [
        ("alice", "short", "at least 8 characters"),
        ("al:ice", "long enough pw", "user name may use"),
    ],
)
def test_cli_hash_password_refuses_bad_input(
    monkeypatch, capsys, tmp_path, user: str, password: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO(password + "\n"))
    assert main(["auth", "hash-password", user, "--password-stdin"]) == 2
    assert message in capsys.readouterr().err
