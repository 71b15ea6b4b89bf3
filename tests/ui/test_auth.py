"""Sign-in in real Chromium, and no secret in any served page, websocket message or log line.

A dashboard of its own runs with everything a lab would set: sign-in (AUTH_USERS), fake
provider keys pointing at the loopback server, a PostgreSQL URL with a password, a cookie
secret, JSON logs at DEBUG, and small upload limits. The tests sign in, open every tab,
press the buttons that fetch provider data, run a prompt, and then search the rendered
HTML (shadow roots included), every websocket frame the page received and the server's
log for the secret values, the full connection string and the prompt text.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect
from test_tabs import TAB_READY
from ui_helpers import open_tab, run_prompt, screenshot, tab_header

from study_query_llm.security import hash_password
from study_query_llm.testing.dashboard import ServedDashboard, clean_env, served_dashboard

pytestmark = [pytest.mark.ui, pytest.mark.postgres]

USER, PASSWORD = "alice", "correct horse battery"
PASSWORD_HASH = hash_password(PASSWORD, iterations=1000)
DB_PASSWORD = "dbpass-SECRET000"
SECRETS = {
    "OPENAI_API_KEY": "sk-test-SECRET123",
    "ANTHROPIC_API_KEY": "sk-ant-test-SECRET456",
    "PANEL_COOKIE_SECRET": "cookie-SECRET789-for-signing",
    "database password": DB_PASSWORD,
    "AUTH_USERS hash": PASSWORD_HASH,
    "sign-in password": PASSWORD,
}
PROMPT_MARKER = "PROMPT-MARKER-7f3a91 what is in this prompt"
UPLOAD_MAX_BYTES = 4096
UPLOAD_MAX_PROMPTS = 50
DEFAULT_TEST_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
SEED_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "seed_demo_data.py"

# HTML of the document and of every shadow root under it.
_HTML_JS = """
() => {
  const parts = [document.documentElement.outerHTML];
  const walk = (root) => root.querySelectorAll("*").forEach((el) => {
    if (el.shadowRoot) { parts.push(el.shadowRoot.innerHTML); walk(el.shadowRoot); }
  });
  walk(document);
  return parts.join("\\n");
}
"""


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL database, addressed with a password in its URL."""
    from sqlalchemy.engine import make_url

    admin = make_url(os.environ.get("TEST_POSTGRES_URL", DEFAULT_TEST_POSTGRES_URL))
    libpq = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"sqllm_test_auth_{secrets.token_hex(4)}"
    try:
        import psycopg

        with psycopg.connect(libpq, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except Exception as exc:
        message = f"PostgreSQL at {admin!r} is unreachable: {exc}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (CI=true: PostgreSQL tests must run)", pytrace=False)
        pytest.skip(message)
    # The test server trusts local connections, so any password is accepted, and the app
    # holds one exactly as it would for a real server.
    yield admin.set(password=DB_PASSWORD, database=name).render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def secured(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, _loopback_session
) -> Iterator[ServedDashboard]:
    workdir = tmp_path_factory.mktemp("secured-ui")
    settings = {
        "DATABASE_URL": postgres_url,
        "OPENAI_API_KEY": SECRETS["OPENAI_API_KEY"],
        "OPENAI_BASE_URL": _loopback_session.openai_base_url,
        "ANTHROPIC_API_KEY": SECRETS["ANTHROPIC_API_KEY"],
        "ANTHROPIC_BASE_URL": _loopback_session.url,
        "AUTH_USERS": f"{USER}:{PASSWORD_HASH}",
        "PANEL_COOKIE_SECRET": SECRETS["PANEL_COOKIE_SECRET"],
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "DEBUG",
        "UPLOAD_MAX_BYTES": str(UPLOAD_MAX_BYTES),
        "UPLOAD_MAX_PROMPTS": str(UPLOAD_MAX_PROMPTS),
        "MOCK_LATENCY_MS": "20",
    }
    seeded = subprocess.run(
        [sys.executable, str(SEED_SCRIPT), "--calls", "30"],
        cwd=workdir,
        env=clean_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if seeded.returncode != 0:
        pytest.fail(f"seeding failed:\n{seeded.stdout}\n{seeded.stderr}")
    with served_dashboard(workdir, settings) as served:
        yield served


@dataclass
class Watched:
    """A page and what went wrong on it, plus every websocket frame it received."""

    page: Page
    problems: list[str] = field(default_factory=list)
    frames: list[str] = field(default_factory=list)


@pytest.fixture
def watched(browser: Browser, secured: ServedDashboard) -> Iterator[Callable[[], Watched]]:
    """Makes pages in fresh browser contexts; console errors (CSP included) fail the test."""
    made: list[tuple[BrowserContext, Watched]] = []

    def make() -> Watched:
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        w = Watched(page)
        page.on(
            "console",
            lambda m: w.problems.append(f"console error: {m.text}") if m.type == "error" else None,
        )
        page.on("pageerror", lambda e: w.problems.append(f"page error: {e}"))

        def leaves(url: str) -> bool:
            return url.startswith(("http://", "https://")) and not url.startswith(secured.url)

        def block(route) -> None:
            w.problems.append(f"request outside the dashboard: {route.request.url}")
            route.abort()

        page.route(leaves, block)
        page.on(
            "websocket",
            lambda ws: ws.on("framereceived", lambda payload: w.frames.append(str(payload))),
        )
        made.append((context, w))
        return w

    yield make
    problems = [p for _, w in made for p in w.problems]
    for context, _ in made:
        context.close()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def sign_in(page: Page, url: str, password: str = PASSWORD) -> None:
    page.goto(url + "/")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.fill("#username", USER)
    page.fill("#password", password)
    page.click("button[type=submit]")


def served_html(page: Page) -> str:
    return page.evaluate(_HTML_JS)


def leaks(text: str) -> list[str]:
    found = [name for name, value in SECRETS.items() if value in text]
    if re.search(r"postgres(ql)?(\+psycopg)?://", text):
        found.append("a PostgreSQL connection string")
    return found


def test_sign_in_wrong_then_right_then_sign_out(watched, secured: ServedDashboard) -> None:
    page = watched().page
    sign_in(page, secured.url, password="wrong password")
    expect(page.locator(".sqllm-login-error")).to_have_text("Wrong user name or password.")
    sign_in(page, secured.url)
    expect(tab_header(page, "Run")).to_be_visible()
    signed_in = page.locator(".sqllm-signed-in")
    expect(signed_in).to_contain_text(USER)
    screenshot(page, "signed-in")
    signed_in.get_by_text("Sign out").click()
    expect(page.locator(".sqllm-logged-out")).to_have_text("You are signed out.")
    page.goto(secured.url + "/")
    expect(page).to_have_url(re.compile(r"/login\?next="))


def test_no_secret_in_any_tab_or_websocket_message(watched, secured: ServedDashboard) -> None:
    w = watched()
    page = w.page
    sign_in(page, secured.url)
    expect(tab_header(page, "Run")).to_be_visible()
    html = [served_html(page)]
    for title, ready in TAB_READY.items():
        open_tab(page, title)
        expect(page.locator(ready).first).to_be_visible()
        if title == "Providers":
            page.get_by_role("button", name="Test connection").click()
            expect(page.get_by_text(re.compile(r"answered in \d+ ms"))).to_be_visible()
            page.get_by_role("button", name="List models").click()
            expect(page.get_by_text("gpt-4o-mini").first).to_be_visible()
        html.append(served_html(page))
    call_id = run_prompt(page, PROMPT_MARKER)
    assert call_id > 0
    html.append(served_html(page))
    assert not leaks("\n".join(html)), f"secrets in the page: {leaks(chr(10).join(html))}"
    assert w.frames, "the page received websocket messages"
    assert not leaks("\n".join(w.frames)), "secrets in websocket messages"


def test_log_lines_are_json_with_ids_and_hold_no_secret_or_prompt(
    watched, secured: ServedDashboard
) -> None:
    page = watched().page
    sign_in(page, secured.url)
    expect(tab_header(page, "Run")).to_be_visible()
    call_id = run_prompt(page, PROMPT_MARKER + " again")
    text = secured.log_text()
    assert not leaks(text), f"secrets in the log: {leaks(text)}"
    assert "PROMPT-MARKER" not in text, "prompt text in the log (LOG_PROMPTS is off)"
    records = [
        json.loads(line)
        for line in text.splitlines()
        if line.strip() and not line.startswith("Launching server at")
    ]
    calls = [r for r in records if r.get("event") == "provider_call" and r["call_id"] == call_id]
    assert len(calls) == 1, "one line for the recorded call"
    call = calls[0]
    assert call["status"] == "success" and call["request_id"] and call["session"]
    assert call["user"] == USER
    assert {"provider", "model", "latency_ms", "total_tokens"} <= call.keys()
    events = {r.get("event") for r in records}
    assert {"login", "session_open", "http_request", "db_commit"} <= events
    logins = [r for r in records if r.get("event") == "login"]
    assert all(r["user"] == USER and r["request_id"] for r in logins)


def _choose_file(page: Page, name: str, data: bytes) -> None:
    page.locator(".sqllm-batch-file input[type=file]").set_input_files(
        files=[{"name": name, "mimeType": "text/plain", "buffer": data}]
    )


def test_uploads_over_the_limits_are_refused_with_a_clear_message(
    watched, secured: ServedDashboard
) -> None:
    page = watched().page
    sign_in(page, secured.url)
    open_tab(page, "Batch")
    source = page.locator(".sqllm-batch-source")
    expect(page.get_by_text(f"up to 4 KB, {UPLOAD_MAX_PROMPTS} prompts")).to_be_visible()

    _choose_file(page, "big.txt", b"a long prompt line\n" * 400)  # 7.6 KB
    expect(source).to_contain_text(
        "big.txt: 7 KB is over the upload limit of 4 KB (UPLOAD_MAX_BYTES)"
    )
    _choose_file(page, "many.txt", b"".join(b"prompt %d\n" % i for i in range(60)))
    expect(source).to_contain_text(
        "many.txt: 60 prompts is over the limit of 50 per batch (UPLOAD_MAX_PROMPTS)"
    )
    _choose_file(page, "fine.txt", b"one\ntwo\nthree\n")
    expect(source).to_contain_text("Using 3 prompts from fine.txt")
