"""Sign-in for the dashboard through Panel's auth providers: hashed passwords or OAuth.

Off unless configured. ``AUTH_USERS`` (``user:pbkdf2_sha256:...`` pairs, made with
``study-query-llm auth hash-password``) turns on a sign-in page whose handler checks the
hashes; Panel's own basic auth compares plain passwords, so this module plugs a
`BasicAuthProvider` subclass with its own login handler into Panel instead.
``PANEL_OAUTH_PROVIDER`` (with ``PANEL_OAUTH_KEY``, ``PANEL_OAUTH_SECRET``, ...) hands
sign-in to Panel's OAuth providers. Either way every page and the websocket need a
signed-in user (Bokeh's `authenticated` handlers), the session cookie is signed with
``PANEL_COOKIE_SECRET``, and /health shows details only to a signed-in user.

The sign-in and sign-out pages load nothing from outside the server. Repeated failed
sign-ins from one address are refused for a while.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

from jinja2 import DictLoader, Environment
from panel.auth import AUTH_PROVIDERS, BasicAuthProvider, BasicLoginHandler, LogoutHandler
from panel.config import config
from panel.io.state import state
from panel.util import base64url_encode

from study_query_llm.config import Settings
from study_query_llm.security import PasswordHashError, check_login, parse_users

log = logging.getLogger(__name__)

LOGIN_PATH = "/login"
LOGOUT_PATH = "/logout"
MAX_FAILURES = 10  # failed sign-ins per address ...
FAILURE_WINDOW_S = 600.0  # ... within this many seconds, then refused until they age out
_TRACKED_ADDRESSES = 10_000

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Study Query LLM · {{ title }}</title>
<style>
  body { margin: 0; min-height: 100vh; display: flex; align-items: center;
         justify-content: center; background: #f4f6f8; color: #1f2a36;
         font-family: -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif; }
  main { background: #fff; border: 1px solid #d8dee4; border-radius: 6px;
         padding: 2em 2.2em; width: 320px; }
  h1 { font-size: 1.25em; margin: 0 0 0.2em; color: #2f4f6f; }
  p { margin: 0.4em 0 1em; }
  label { display: block; font-size: 0.9em; margin: 0.8em 0 0.3em; }
  input { width: 100%; box-sizing: border-box; padding: 0.55em; font-size: 1em;
          border: 1px solid #b8c2cc; border-radius: 4px; }
  button { margin-top: 1.3em; width: 100%; padding: 0.65em; font-size: 1em; border: 0;
           border-radius: 4px; background: #2f4f6f; color: #fff; cursor: pointer; }
  .sqllm-login-error { color: #b00020; font-weight: 600; }
  a { color: #2f4f6f; }
</style>
</head>
<body><main>{% block main %}{% endblock %}</main></body>
</html>
"""

_LOGIN_BODY = """{% extends "page" %}{% block main %}<h1>Study Query LLM</h1>
<p>Sign in to use the dashboard.</p>
{% if error %}<p class="sqllm-login-error" role="alert">{{ error }}</p>{% endif %}
<form class="sqllm-login-form" action=".{{ action }}" method="post">
  {{ xsrf|safe }}
  <label for="username">User name</label>
  <input id="username" name="username" type="text" autocomplete="username"
         autocapitalize="off" autocorrect="off" required autofocus>
  <label for="password">Password</label>
  <input id="password" name="password" type="password" autocomplete="current-password"
         required>
  <button type="submit">Sign in</button>
</form>
{% endblock %}"""

_LOGOUT_BODY = """{% extends "page" %}{% block main %}<h1>Study Query LLM</h1>
<p class="sqllm-logged-out">You are signed out.</p>
<p><a href=".{{ login }}">Sign in again</a></p>
{% endblock %}"""

_templates = Environment(
    loader=DictLoader({"page": _PAGE, "login": _LOGIN_BODY, "logout": _LOGOUT_BODY}),
    autoescape=True,
)


class AuthSettingsError(ValueError):
    """The sign-in settings are inconsistent; the message names the setting to fix."""


def _next_path(value: str | None) -> str:
    """Where to go after signing in: a path on this server only (no open redirects)."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


@dataclass
class FailedSignIns:
    """Recent failed sign-ins per remote address (bounded, in memory)."""

    limit: int = MAX_FAILURES
    window_s: float = FAILURE_WINDOW_S
    _seen: dict[str, deque[float]] = field(default_factory=dict)

    def _recent(self, address: str, now: float) -> deque[float]:
        times = self._seen.get(address, deque())
        while times and now - times[0] > self.window_s:
            times.popleft()
        return times

    def blocked_for(self, address: str) -> float:
        """Seconds until `address` may try again (0: it may now)."""
        now = time.monotonic()
        times = self._recent(address, now)
        if len(times) < self.limit:
            return 0.0
        return max(0.0, self.window_s - (now - times[0]))

    def add(self, address: str) -> None:
        now = time.monotonic()
        times = self._recent(address, now)
        times.append(now)
        self._seen[address] = times
        if len(self._seen) > _TRACKED_ADDRESSES:
            self._seen.pop(next(iter(self._seen)))

    def clear(self, address: str) -> None:
        self._seen.pop(address, None)


class PasswordLoginHandler(BasicLoginHandler):
    """GET: the sign-in form. POST: check the password hash, set the signed cookie."""

    users: ClassVar[dict[str, str]] = {}
    failures: ClassVar[FailedSignIns]

    def get(self) -> None:
        error = self.get_argument("error", "")
        next_path = _next_path(self.get_argument("next", None))
        self.set_cookie("next_url", next_path, httponly=True, samesite="Lax")
        self._render(error)

    def _render(self, error: str) -> None:
        self.set_header("Cache-Control", "no-store")
        page = _templates.get_template("login")
        xsrf = self.xsrf_form_html()  # the form carries a token matching a cookie (no CSRF)
        self.finish(page.render(title="Sign in", error=error, action=LOGIN_PATH, xsrf=xsrf))

    async def post(self) -> None:
        self.check_xsrf_cookie()  # 403 unless the form came from this server's page
        address = self.request.remote_ip or "?"
        wait_s = self.failures.blocked_for(address)
        if wait_s > 0:
            log.warning(
                "sign-in refused: too many failures",
                extra={"event": "login_blocked", "remote_ip": address},
            )
            self.set_status(429)
            self.set_header("Retry-After", str(int(wait_s) + 1))
            minutes = int(wait_s // 60) + 1
            self._render(f"Too many failed sign-ins; try again in {minutes} min.")
            return
        username = self.get_argument("username", "").strip()
        password = self.get_argument("password", "")
        ok = await asyncio.to_thread(check_login, self.users, username, password)
        if not ok:
            self.failures.add(address)
            known = username in self.users
            log.warning(
                "sign-in failed",
                extra={
                    "event": "login_failed",
                    "user": username if known else None,
                    "user_known": known,
                    "remote_ip": address,
                },
            )
            self.redirect(f".{LOGIN_PATH}?error=Wrong+user+name+or+password.")
            return
        self.failures.clear(address)
        next_path = _next_path(self.get_cookie("next_url"))
        self.set_current_user(username)
        log.info("signed in", extra={"event": "login", "user": username, "remote_ip": address})
        self.clear_cookie("next_url")
        self.redirect(next_path)

    def set_current_user(self, user: str) -> None:
        """The signed cookies Panel reads (``user``, ``id_token``), Secure over HTTPS."""
        options: dict[str, Any] = {
            "expires_days": config.oauth_expiry,
            "httponly": True,
            "path": config.cookie_path,
            "samesite": "Lax",
            "secure": self.request.protocol == "https",
        }
        self.clear_cookie("is_guest")
        self.set_secure_cookie("user", user, **options)
        id_token: Any = base64url_encode(json.dumps({"user": user}))
        if state.encryption:
            id_token = state.encryption.encrypt(id_token.encode("utf-8"))
        self.set_secure_cookie("id_token", id_token, **options)


class SignOutHandler(LogoutHandler):
    """Clears the sign-in cookies and says so (no outside resources)."""

    def get(self) -> None:
        user = self.get_secure_cookie("user", max_age_days=config.oauth_expiry)
        for name in ("user", "id_token", "access_token", "refresh_token", "oauth_expiry"):
            self.clear_cookie(name, path=config.cookie_path)
        if user:
            log.info(
                "signed out",
                extra={"event": "logout", "user": user.decode("utf-8", "replace")},
            )
        self.set_header("Cache-Control", "no-store")
        page = _templates.get_template("logout")
        self.finish(page.render(title="Signed out", login=LOGIN_PATH))


class PasswordAuthProvider(BasicAuthProvider):
    """Panel's basic auth provider with hashed passwords (`AUTH_USERS`)."""

    def __init__(self, users: dict[str, str]) -> None:
        attrs = {"users": dict(users), "failures": FailedSignIns()}
        self._login = type("PasswordLoginHandler", (PasswordLoginHandler,), attrs)
        super().__init__(login_endpoint=LOGIN_PATH, logout_endpoint=LOGOUT_PATH)

    @property
    def login_handler(self):
        return self._login

    @property
    def logout_handler(self):
        return SignOutHandler


@dataclass(frozen=True)
class AuthSetup:
    """How the server signs people in: mode and the keyword arguments for `pn.serve`."""

    mode: str  # "off", "password" or "oauth"
    serve_kwargs: dict[str, Any]
    cookie_secret_generated: bool = False

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


def auth_setup(settings: Settings) -> AuthSetup:
    """The sign-in configuration from the settings; `AuthSettingsError` when inconsistent."""
    users_text = settings.secret("auth_users")
    provider = settings.panel_oauth_provider
    if users_text and provider:
        raise AuthSettingsError("set AUTH_USERS or PANEL_OAUTH_PROVIDER, not both")
    if not users_text and not provider:
        return AuthSetup("off", {})
    cookie_secret = settings.secret("panel_cookie_secret")
    generated = cookie_secret is None
    if cookie_secret is None:
        cookie_secret = secrets.token_urlsafe(32)
    if users_text:
        try:
            users = parse_users(users_text)
        except PasswordHashError as exc:
            raise AuthSettingsError(str(exc)) from None
        if not users:
            raise AuthSettingsError("AUTH_USERS lists no users")
        kwargs = {"auth_provider": PasswordAuthProvider(users), "cookie_secret": cookie_secret}
        return AuthSetup("password", kwargs, generated)
    if provider not in AUTH_PROVIDERS:
        raise AuthSettingsError(
            f"PANEL_OAUTH_PROVIDER={provider!r} is not one of Panel's providers: "
            + ", ".join(sorted(AUTH_PROVIDERS))
        )
    key, secret = settings.panel_oauth_key, settings.secret("panel_oauth_secret")
    if not key or not secret:
        raise AuthSettingsError(
            f"PANEL_OAUTH_PROVIDER={provider} needs PANEL_OAUTH_KEY and _SECRET"
        )
    extra: dict[str, Any] = {}
    if settings.panel_oauth_extra_params:
        try:
            extra = json.loads(settings.panel_oauth_extra_params)
        except ValueError:
            extra = None  # type: ignore[assignment]
        if not isinstance(extra, dict):
            raise AuthSettingsError(
                'PANEL_OAUTH_EXTRA_PARAMS must be a JSON object like {"tenant": "..."}'
            )
    kwargs = {
        "oauth_provider": provider,
        "oauth_key": key,
        "oauth_secret": secret,
        "oauth_redirect_uri": settings.panel_oauth_redirect_uri,
        "oauth_extra_params": extra,
        "cookie_secret": cookie_secret,
    }
    encryption = settings.secret("panel_oauth_encryption")
    if encryption:
        _enable_token_encryption(encryption)
    return AuthSetup("oauth", kwargs, generated)


def _enable_token_encryption(key: str) -> None:
    """Encrypt the OAuth tokens Panel keeps in cookies (what `panel serve` does for its flag)."""
    try:
        from cryptography.fernet import Fernet
    except ImportError:
        raise AuthSettingsError(
            "PANEL_OAUTH_ENCRYPTION needs the cryptography package (pip install cryptography)"
        ) from None
    try:
        fernet = Fernet(key.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise AuthSettingsError(
            "PANEL_OAUTH_ENCRYPTION must be 32 URL-safe base64-encoded bytes "
            "(make one with: python -c 'from cryptography.fernet import Fernet; "
            "print(Fernet.generate_key().decode())')"
        ) from None
    config.oauth_encryption_key = key.encode("ascii")
    state.encryption = fernet
