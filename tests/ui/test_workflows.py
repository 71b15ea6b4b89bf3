"""What a person does all day: run a prompt, run a batch, search, open a group, map embeddings."""

from __future__ import annotations

import re
import uuid

import pandas as pd
import pytest
from playwright.sync_api import Page, expect
from ui_helpers import choose_group, choose_mock_embeddings, open_tab, run_prompt, screenshot

pytestmark = pytest.mark.ui


def unique_word() -> str:
    return f"uitest{uuid.uuid4().hex[:10]}"


def test_run_shows_the_answer_and_call_id_then_the_row_in_analytics(page: Page) -> None:
    word = unique_word()
    call_id = run_prompt(page, f"Tell me about {word} please")

    expect(page.locator(".sqllm-answer")).to_contain_text(
        f"Mock answer about “Tell me about {word}"
    )
    expect(page.locator(".sqllm-run-meta")).to_contain_text("mock")

    open_tab(page, "Analytics")
    recent = page.locator(".sqllm-recent-calls")
    row = recent.locator(".tabulator-row", has_text=word)
    expect(row).to_have_count(1)
    expect(row).to_contain_text(str(call_id))
    screenshot(page, "analytics-after-run")


def test_batch_progress_reaches_100_percent(page: Page) -> None:
    word = unique_word()
    open_tab(page, "Batch")
    prompts = [f"Batch question {i} about {word}" for i in range(3)]
    page.locator(".sqllm-batch-prompts textarea").fill("\n".join(prompts))
    expect(page.locator(".sqllm-batch-targets")).to_contain_text("mock")
    page.locator(".sqllm-batch-start button").click()

    expect(page.locator("progress.sqllm-batch-progress")).to_have_attribute("value", "100")
    expect(page.locator(".sqllm-batch-status")).to_contain_text("3/3")
    expect(page.locator(".sqllm-batch-results .tabulator-row", has_text=word)).to_have_count(3)
    screenshot(page, "batch-finished")


def test_search_highlights_a_seeded_word(page: Page) -> None:
    open_tab(page, "Search")
    page.locator(".sqllm-search-input input").fill("photosynthesis")
    page.locator(".sqllm-search-button button").click()

    expect(page.locator(".sqllm-search-results .tabulator-row").first).to_be_visible()
    hit = page.locator(".sqllm-search-snippets mark").first
    expect(hit).to_be_visible()
    expect(hit).to_have_text(re.compile("photosynthesis", re.IGNORECASE))
    screenshot(page, "search-hit")


def test_open_a_group_shows_its_calls(page: Page) -> None:
    open_tab(page, "Groups")
    row = page.locator(".sqllm-groups-table .tabulator-row", has_text="capitals quiz").first
    expect(row).to_be_visible()
    row.locator(".tabulator-cell").nth(1).click()

    detail = page.locator(".sqllm-group-detail")
    expect(detail).to_be_visible()
    expect(detail).to_contain_text("capitals quiz")
    expect(page.locator(".sqllm-group-calls")).to_contain_text("What is the capital of")
    screenshot(page, "group-open")


def test_embeddings_map_and_find_similar(page: Page) -> None:
    open_tab(page, "Embeddings")
    choose_group(page, "science vs programming")
    choose_mock_embeddings(page)
    page.locator(".sqllm-embed-compute button").click()

    expect(page.locator("progress.sqllm-embed-progress")).to_have_attribute("value", "100")
    # The seed embedded this group's answers with mock-embed: all come from the cache.
    expect(page.locator(".sqllm-embed-status")).to_contain_text(
        re.compile(r"Embedded \d+ responses .*: \d+ from cache, 0 new")
    )
    expect(page.locator(".sqllm-embed-plot canvas").first).to_be_visible()
    screenshot(page, "embeddings-map")

    page.locator(".sqllm-similar-input input").fill("photosynthesis and sunlight")
    page.locator(".sqllm-similar-input input").press("Enter")
    results = page.locator(".sqllm-similar-results")
    expect(results).to_contain_text("Calls most similar to")
    expect(results.locator("tbody tr")).to_have_count(10)
    expect(results).to_contain_text("Mock answer about")
    screenshot(page, "embeddings-similar")

    # Both the map's points and the similar calls download as tables.
    exports = page.locator(".sqllm-export")
    expect(exports).to_have_count(2)
    with page.expect_download() as points_download:
        exports.nth(0).locator(".sqllm-export-csv button, .sqllm-export-csv a").first.click()
    points = pd.read_csv(points_download.value.path(), encoding="utf-8-sig")
    assert {"call_id", "x", "y"} <= set(points.columns) and len(points) > 10
    with page.expect_download() as similar_download:
        exports.nth(1).locator(".sqllm-export-csv button, .sqllm-export-csv a").first.click()
    similar = pd.read_csv(similar_download.value.path(), encoding="utf-8-sig")
    assert len(similar) == 10 and "similarity" in similar.columns
