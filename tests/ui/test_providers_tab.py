"""Providers tab: groups with breaker state, a health check, inferred capabilities, group editing.

This module serves its own dashboard (no keys, mock at 20 ms) with a providers file that
defines two groups: ``duo`` over two mock models, and ``edge`` whose first target is a
loopback address nobody listens on, so its breaker opens when the health check probes it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd
import pytest
from playwright.sync_api import Page, expect
from ui_helpers import open_tab, screenshot, text_of

from study_query_llm.testing.dashboard import ServedDashboard, free_port, served_dashboard

pytestmark = pytest.mark.ui

GROUPS_YAML = """
groups:
  duo:
    strategy: round_robin
    targets: ["mock:mock-small", "mock:mock-large"]
  edge:
    strategy: failover
    breaker: {{failures: 1, cooldown_s: 600}}
    targets:
      - {{provider: vllm, model: llama, name: dead, base_url: "{dead}"}}
      - mock:mock-small
"""


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedDashboard]:
    """The dashboard with a providers file (overrides the shared seeded one here)."""
    workdir = tmp_path_factory.mktemp("providers-tab")
    groups = workdir / "providers.yaml"
    groups.write_text(GROUPS_YAML.format(dead=f"http://127.0.0.1:{free_port()}/v1"))
    settings = {
        "DATABASE_URL": f"sqlite:///{workdir / 'providers.db'}",
        "PROVIDER_GROUPS_FILE": str(groups),
        "MOCK_LATENCY_MS": "20",
    }
    try:
        with served_dashboard(workdir, settings) as served:
            yield served
    except RuntimeError as error:
        pytest.fail(str(error))


def test_groups_health_and_breaker_state_are_shown(page: Page) -> None:
    open_tab(page, "Providers")
    groups = page.locator(".sqllm-provider-groups")
    expect(groups).to_contain_text("mock/mock-small")
    expect(groups).to_contain_text("dead")
    assert "2 group(s)" in text_of(page.locator(".sqllm-provider-groups-note"))
    expect(page.locator(".sqllm-providers-table")).to_contain_text("group:edge")

    page.locator(".sqllm-health-check button").click()
    health = page.locator(".sqllm-health-table")
    expect(health).to_contain_text("group:edge → dead")
    expect(page.locator(".sqllm-health-note")).to_contain_text("reachable, 1 not")
    health_text = text_of(health)
    assert "group:duo → mock/mock-large" in health_text and "connection refused" in health_text
    # The probe opened the dead target's breaker; the groups table says since when and why.
    expect(groups).to_contain_text("open")
    groups_text = text_of(groups)
    assert "cannot reach" in groups_text and "closed" in groups_text
    screenshot(page, "providers-health")


def test_listed_models_show_inferred_capabilities(page: Page) -> None:
    open_tab(page, "Providers")
    page.locator(".sqllm-providers-select select").select_option("mock")
    page.locator(".sqllm-models-list button").click()
    models = page.locator(".sqllm-models-table")
    expect(models).to_contain_text("mock-embed")
    expect(models).to_contain_text("embeddings")
    expect(page.locator(".sqllm-models-note")).to_contain_text("inferred from the model ids")
    page.locator(".sqllm-rule-test button").click()
    expect(page.locator(".sqllm-rule-result")).to_contain_text("Rejected")
    expect(page.locator(".sqllm-rule-result")).to_contain_text("no listing endpoint")


def test_a_group_is_defined_in_the_dashboard_and_bad_ones_are_refused(page: Page) -> None:
    open_tab(page, "Providers")
    page.locator(".sqllm-group-name input").fill("trio")
    page.locator(".sqllm-group-targets textarea").fill("mock:mock-small\nmock:mock-large")
    page.locator(".sqllm-group-strategy select").select_option("weighted")
    page.locator(".sqllm-group-save button").click()
    expect(page.locator(".sqllm-group-message")).to_contain_text("Saved group trio")
    expect(page.locator(".sqllm-provider-groups")).to_contain_text("trio")
    expect(page.locator(".sqllm-provider-groups")).to_contain_text("weighted")

    page.locator(".sqllm-group-name input").fill("<b>x</b>")
    page.locator(".sqllm-group-targets textarea").fill("teleport:q")
    page.locator(".sqllm-group-save button").click()
    message = page.locator(".sqllm-group-message")
    expect(message).to_contain_text("group '<b>x</b>'")  # shown as text, not markup
    expect(message.locator("b")).to_have_count(0)

    page.locator(".sqllm-group-name input").fill("trio")
    page.locator(".sqllm-group-delete button").click()
    expect(page.locator(".sqllm-group-message")).to_contain_text("Deleted group trio")
    expect(page.locator(".sqllm-provider-groups")).not_to_contain_text("trio")


def test_provider_tables_download_as_csv(page: Page) -> None:
    open_tab(page, "Providers")
    expect(page.locator(".sqllm-providers-table")).to_contain_text("group:edge")
    exports = page.locator(".sqllm-export")
    expect(exports).to_have_count(5)  # providers, models, groups, health, prices
    with page.expect_download() as download:
        exports.first.locator(".sqllm-export-csv button, .sqllm-export-csv a").first.click()
    frame = pd.read_csv(download.value.path(), encoding="utf-8-sig")
    assert "group:edge" in set(frame.astype(str).stack())
    assert download.value.suggested_filename.startswith("providers")
