"""UI test fixtures: the dashboard served from a seeded SQLite file, and watched Chromium pages.

The dashboard runs as a subprocess (`python -m panel_app`) on a free port, with no provider
keys, the mock provider at 20 ms and a database filled by `scripts/seed_demo_data.py`.
Pages come from pytest-playwright's browser (Debian's Chromium). Every page is watched:
a browser console error, a JavaScript dialog (an injected `alert`), a request to anywhere
but the dashboard itself (it must work offline) or "Traceback" text on the page fails the
test that used it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Dialog, Page, expect
from ui_helpers import SCREENSHOTS, open_dashboard, page_text

from study_query_llm.testing.dashboard import (
    CHROMIUM,
    CHROMIUM_ARGS,
    ServedDashboard,
    clean_env,
    served_dashboard,
)

ROOT = Path(__file__).resolve().parents[2]
SEED_SCRIPT = ROOT / "scripts" / "seed_demo_data.py"
SEED_CALLS = 200  # back-dated calls; the seed adds its live runs, batches and chat on top

# Playwright's auto-waiting assertions: generous enough for a loaded CI machine.
expect.set_options(timeout=30_000)


@dataclass
class Dashboard:
    """The served dashboard: its address, database and the log it writes."""

    served: ServedDashboard
    database_url: str

    @property
    def url(self) -> str:
        return self.served.url

    def log_tail(self, lines: int = 40) -> str:
        return self.served.log_tail(lines)

    def health(self) -> tuple[int, dict]:
        """Status and JSON body of GET /health."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="session")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    """The dashboard served from a freshly seeded SQLite file, for the whole session."""
    workdir = tmp_path_factory.mktemp("dashboard")
    database_url = f"sqlite:///{workdir / 'demo.db'}"
    settings = {"DATABASE_URL": database_url, "MOCK_LATENCY_MS": "20"}
    seeded = subprocess.run(
        [sys.executable, str(SEED_SCRIPT), "--db", database_url, "--calls", str(SEED_CALLS)],
        cwd=workdir,  # no developer .env is read from here
        env=clean_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if seeded.returncode != 0:
        pytest.fail(f"seeding failed:\n{seeded.stdout}\n{seeded.stderr}")
    try:
        with served_dashboard(workdir, settings) as served:
            yield Dashboard(served, database_url)
    except RuntimeError as error:  # it did not start: say why, with its log
        pytest.fail(str(error))


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict) -> dict:
    """Launch Debian's Chromium headless (skipped when it is missing, unless on CI)."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is not installed (apt-get install chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return {**browser_type_launch_args, "executable_path": str(CHROMIUM), "args": CHROMIUM_ARGS}


@dataclass
class Watch:
    """What went wrong on one page: console errors, dialogs, requests that left the host."""

    console_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)

    def problems(self, page: Page) -> list[str]:
        found = [f"console error: {e}" for e in self.console_errors]
        found += [f"JavaScript dialog opened: {d!r}" for d in self.dialogs]
        found += [
            f"request outside the dashboard (must work offline): {u}"
            for u in self.external_requests
        ]
        if not page.is_closed():
            text = page_text(page)
            if "Traceback" in text:
                start = text.index("Traceback")
                found.append(f"'Traceback' on the page: {text[start : start + 400]!r}")
        return found


def _watch(page: Page, base_url: str) -> Watch:
    watch = Watch()

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            where = message.location.get("url", "") if message.location else ""
            watch.console_errors.append(f"{message.text} {where}".strip())

    def on_dialog(dialog: Dialog) -> None:
        watch.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def leaves_host(url: str) -> bool:
        return url.startswith(("http://", "https://")) and not url.startswith(base_url)

    def block(route) -> None:
        watch.external_requests.append(route.request.url)
        route.abort()

    page.on("console", on_console)
    page.on("dialog", on_dialog)
    page.on("pageerror", lambda error: watch.console_errors.append(f"page error: {error}"))
    page.route(leaves_host, block)
    return watch


PageFactory = Callable[[], Page]


@pytest.fixture
def new_page(browser: Browser, dashboard: Dashboard) -> Iterator[PageFactory]:
    """Makes watched pages, each in its own browser context (its own dashboard session).

    After the test, any console error, dialog, outside request or "Traceback" text on any
    of them fails the test.
    """
    made: list[tuple[BrowserContext, Page, Watch]] = []

    def make() -> Page:
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        made.append((context, page, _watch(page, dashboard.url)))
        return page

    yield make
    problems = []
    for index, (context, page, watch) in enumerate(made):
        problems += [f"page {index + 1}: {p}" for p in watch.problems(page)]
        context.close()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def page(new_page: PageFactory, dashboard: Dashboard) -> Page:
    """A watched page with the dashboard loaded (see `new_page`)."""
    page = new_page()
    open_dashboard(page, dashboard.url)
    return page


@pytest.fixture(scope="session", autouse=True)
def _fresh_screenshots() -> None:
    """Screenshots from an earlier run are removed so none of them can be stale."""
    if SCREENSHOTS.exists():
        shutil.rmtree(SCREENSHOTS)
