"""With sign-in on, the served dashboard refuses anonymous pages, websockets and /health details.

One dashboard subprocess (SQLite, AUTH_USERS with a hashed password) answers real HTTP
and websocket requests. It trusts X-Real-IP (PANEL_USE_XHEADERS), so the throttling test
can fail sign-ins from an address of its own without locking out the other tests.
"""

from __future__ import annotations

import http.cookiejar
import json
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from study_query_llm.security import hash_password
from study_query_llm.testing.dashboard import ServedDashboard, clean_env, served_dashboard

USER, PASSWORD = "alice", "correct horse battery"
COOKIE_SECRET = "cookie-secret-for-tests-0123456789"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedDashboard]:
    workdir = tmp_path_factory.mktemp("secured")
    settings = {
        "DATABASE_URL": f"sqlite:///{workdir / 'app.db'}",
        "AUTH_USERS": f"{USER}:{hash_password(PASSWORD, iterations=1000)}",
        "PANEL_COOKIE_SECRET": COOKIE_SECRET,
        "PANEL_USE_XHEADERS": "true",
        "MOCK_LATENCY_MS": "5",
    }
    with served_dashboard(workdir, settings) as served:
        yield served


class Client:
    """A cookie-keeping HTTP client that does not follow redirects."""

    def __init__(self, base: str, ip: str = "192.0.2.10") -> None:
        self.base, self.ip = base, ip
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect()
        )

    def request(
        self, path: str, data: dict | None = None, headers: dict | None = None
    ) -> tuple[int, Message, bytes]:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        request = urllib.request.Request(
            self.base + path, data=body, headers={"X-Real-IP": self.ip, **(headers or {})}
        )
        try:
            with self.opener.open(request, timeout=60) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read()

    def sign_in(self, password: str = PASSWORD) -> tuple[int, Message, bytes]:
        _, _, form = self.request("/login?next=/")
        xsrf = re.search(rb'name="_xsrf" value="([^"]+)"', form).group(1).decode()
        return self.request("/login", {"username": USER, "password": password, "_xsrf": xsrf})

    def cookie_header(self) -> str:
        return "; ".join(f"{c.name}={c.value}" for c in self.jar)


def test_pages_send_anonymous_visitors_to_the_sign_in_page(app: ServedDashboard) -> None:
    status, headers, _ = Client(app.url).request("/")
    assert status == 302
    assert headers["Location"].startswith("./login?next=")
    for path in ("/autoload.js?bokeh-autoload-element=x", "/metadata"):
        status, headers, _ = Client(app.url).request(path)
        assert status in (302, 403), path
        assert status == 403 or "login" in headers["Location"], path
    status, _, body = Client(app.url).request("/login")
    assert status == 200
    page = body.decode()
    assert 'name="password"' in page and 'type="password"' in page
    assert not re.search(r"""(src|href)=["']https?://""", page), "the sign-in page loads nothing"


def test_health_tells_anonymous_visitors_only_the_status(app: ServedDashboard) -> None:
    status, _, body = Client(app.url).request("/health")
    assert status == 200
    assert json.loads(body) == {"status": "ok"}


def test_signed_in_user_sees_health_details_but_no_database_address(app: ServedDashboard) -> None:
    client = Client(app.url)
    status, headers, _ = client.sign_in()
    assert (status, headers["Location"]) == (302, "/")
    status, _, body = client.request("/health")
    report = json.loads(body)
    assert status == 200 and report["status"] == "ok"
    assert report["database"]["backend"] == "sqlite"
    assert report["database"]["reachable"] is True
    assert "app.db" not in body.decode() and "sqlite:" not in body.decode()


def test_wrong_password_is_refused_with_a_message(app: ServedDashboard) -> None:
    client = Client(app.url, ip="192.0.2.20")
    status, headers, _ = client.sign_in("not the password")
    assert status == 302 and "error=" in headers["Location"]
    assert "user" not in {c.name for c in client.jar}
    status, _, body = client.request("/" + headers["Location"].removeprefix("./"))
    assert status == 200 and b"Wrong user name or password." in body
    assert client.request("/")[0] == 302


def test_signed_in_user_gets_the_dashboard_and_can_sign_out(app: ServedDashboard) -> None:
    client = Client(app.url, ip="192.0.2.30")
    client.sign_in()
    status, _, body = client.request("/")
    assert status == 200 and b"Study Query LLM" in body
    status, _, body = client.request("/logout")
    assert status == 200 and b"You are signed out." in body
    assert client.request("/")[0] == 302


async def _first_message(app: ServedDashboard, token: str, cookie: str | None) -> str | None:
    headers = {"Origin": app.url}
    if cookie:
        headers["Cookie"] = cookie
    request = HTTPRequest(app.url.replace("http", "ws", 1) + "/ws", headers=headers)
    try:
        connection = await websocket_connect(request, subprotocols=["bokeh", token])
    except Exception:  # refused during the handshake
        return None
    try:
        return await connection.read_message()  # None: the server closed it
    finally:
        connection.close()


async def test_websocket_needs_a_signed_in_user(app: ServedDashboard) -> None:
    client = Client(app.url, ip="192.0.2.40")
    client.sign_in()
    _, _, body = client.request("/")
    token = re.search(r'"token":\s*"([^"]+)"', body.decode()).group(1)
    assert await _first_message(app, token, cookie=None) is None
    message = await _first_message(app, token, cookie=client.cookie_header())
    assert message is not None and '"msgtype":"ACK"' in message.replace(" ", "")


def test_security_headers_on_every_kind_of_response(app: ServedDashboard) -> None:
    client = Client(app.url, ip="192.0.2.50")
    client.sign_in()
    _, _, page = client.request("/")
    static = re.search(r'src="(static/[^"]+\.js[^"]*)"', page.decode()).group(1)
    ids = set()
    for path in ("/", "/login", "/health", "/" + static):
        status, headers, _ = client.request(path)
        assert status == 200, path
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Referrer-Policy"] == "same-origin"
        csp = headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
        assert "default-src 'self'" in csp
        ids.add(headers["X-Request-ID"])
    assert len(ids) == 4, "every response has its own request id"


def test_a_proxys_request_id_is_kept_and_a_bad_one_replaced(app: ServedDashboard) -> None:
    client = Client(app.url)
    _, headers, _ = client.request("/health", headers={"X-Request-ID": "proxy-id-12345678"})
    assert headers["X-Request-ID"] == "proxy-id-12345678"
    _, headers, _ = client.request("/health", headers={"X-Request-ID": "bad id\tinjected"})
    assert re.fullmatch(r"[0-9a-f]{16}", headers["X-Request-ID"])


def test_a_sign_in_post_without_the_forms_token_is_refused(app: ServedDashboard) -> None:
    client = Client(app.url, ip="192.0.2.60")
    status, _, _ = client.request("/login", {"username": USER, "password": PASSWORD})
    assert status == 403
    assert "user" not in {c.name for c in client.jar}


def test_repeated_failed_sign_ins_are_throttled(app: ServedDashboard) -> None:
    client = Client(app.url, ip="198.51.100.99")
    for _ in range(10):
        assert client.sign_in("wrong")[0] == 302
    status, headers, body = client.sign_in()  # even the right password, for a while
    assert status == 429
    assert int(headers["Retry-After"]) > 0
    assert b"Too many failed sign-ins" in body
    assert Client(app.url, ip="198.51.100.100").sign_in()[1]["Location"] == "/"


def test_access_log_has_request_ids_and_no_query_strings(app: ServedDashboard) -> None:
    Client(app.url).request("/login?next=/secret-looking-query")
    lines = [line for line in app.log_text().splitlines() if "panel_app.access" in line]
    assert any("GET /login 200" in line for line in lines)
    assert not any("secret-looking-query" in line for line in lines)
    assert all("request_id=" in line for line in lines)


def test_a_bad_auth_setting_stops_the_server_with_one_line(tmp_path: Path) -> None:
    env = clean_env({"AUTH_USERS": "bob:not-a-hash", "DATABASE_URL": "sqlite:///./x.db"})
    done = subprocess.run(
        [sys.executable, "-m", "panel_app", "--port", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: AUTH_USERS entry 1 (bob): not a pbkdf2_sha256:<iterations>:<salt>:<digest> hash"
    ]
    assert not (tmp_path / "x.db").exists(), "nothing is touched before the settings are good"
