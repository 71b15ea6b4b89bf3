"""Every tab opens on the seeded record and shows its content; /health answers JSON."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect
from ui_helpers import open_tab, screenshot

from panel_app.app import TABS

pytestmark = pytest.mark.ui

# What a person sees once each tab has loaded (on the seeded record).
TAB_READY = {
    "Run": ".sqllm-run-prompt textarea",
    "Batch": ".sqllm-batch-prompts textarea",
    "Chat": ".sqllm-chat",
    "Analytics": ".sqllm-recent-calls .tabulator-row",
    "Search": ".sqllm-search-input input",
    "Groups": ".sqllm-groups-table .tabulator-row",
    "Embeddings": ".sqllm-embed-group",
    "Providers": "text=Prices used for cost",
}


def test_every_tab_has_a_check() -> None:
    assert set(TAB_READY) == {title for title, _module, _cls in TABS}


@pytest.mark.parametrize("title", list(TAB_READY))
def test_tab_opens_without_errors(page: Page, title: str) -> None:
    open_tab(page, title)
    expect(page.locator(TAB_READY[title]).first).to_be_visible()
    expect(page.get_by_text("This tab could not be shown")).to_have_count(0)
    expect(page.get_by_text("Traceback")).to_have_count(0)
    screenshot(page, title.lower())


def test_health_returns_json_with_a_reachable_database(dashboard) -> None:
    status, body = dashboard.health()
    assert status == 200
    assert body["status"] == "ok"
    assert body["database"]["reachable"] is True
    assert body["database"]["up_to_date"] is True
    assert body["database"]["schema"]
