"""Prompt text is data, never markup; and two browser sessions never see each other's work."""

from __future__ import annotations

import re
import uuid

import pytest
from playwright.sync_api import Dialog, Page, expect
from ui_helpers import choose_group, choose_mock_embeddings, open_dashboard, open_tab, run_prompt

pytestmark = pytest.mark.ui

XSS = "<img src=x onerror=alert(1)>"


def test_html_prompt_shows_as_text_and_never_runs(page: Page) -> None:
    dialogs: list[str] = []

    def record(dialog: Dialog) -> None:  # the page fixture dismisses it and fails too
        dialogs.append(dialog.message)

    page.on("dialog", record)
    injected = page.locator("img[src='x']")

    run_prompt(page, XSS)
    expect(page.locator(".sqllm-answer")).to_contain_text(f"Mock answer about “{XSS}”")
    expect(injected).to_have_count(0)

    # The seeded record holds the same prompt: it shows as text wherever it appears.
    open_tab(page, "Search")
    page.locator(".sqllm-search-input input").fill("onerror")
    page.locator(".sqllm-search-button button").click()
    expect(page.locator(".sqllm-search-snippets")).to_contain_text(XSS)
    expect(page.locator(".sqllm-search-snippets mark").first).to_have_text("onerror")

    open_tab(page, "Analytics")
    expect(page.locator(".sqllm-recent-calls .tabulator-row", has_text=XSS).first).to_be_visible()

    open_tab(page, "Embeddings")
    choose_group(page, "odd inputs")
    choose_mock_embeddings(page)
    page.locator(".sqllm-embed-text button", has_text="Prompts").click()
    page.locator(".sqllm-embed-compute button").click()
    expect(page.locator("progress.sqllm-embed-progress")).to_have_attribute("value", "100")
    page.locator(".sqllm-similar-input input").fill(XSS)
    page.locator(".sqllm-similar-input input").press("Enter")
    expect(page.locator(".sqllm-similar-results tbody tr").first).to_contain_text(XSS)

    expect(injected).to_have_count(0)
    assert dialogs == []


def test_two_sessions_do_not_share_inputs_or_results(page: Page, new_page, dashboard) -> None:
    other = new_page()
    open_dashboard(other, dashboard.url)
    word_a, word_b = (f"session{uuid.uuid4().hex[:8]}" for _ in range(2))
    prompt_a, prompt_b = f"First session asks about {word_a}", f"Second asks about {word_b}"

    open_tab(other, "Run")
    other.locator(".sqllm-run-prompt textarea").fill(prompt_b)
    run_prompt(page, prompt_a)
    expect(page.locator(".sqllm-answer")).to_contain_text(word_a)

    # The other session keeps its own unsaved prompt and has no answer of ours.
    expect(other.locator(".sqllm-run-prompt textarea")).to_have_value(prompt_b)
    expect(other.locator("body")).not_to_contain_text(word_a)
    expect(other.locator(".sqllm-answer")).to_have_count(0)

    other.locator(".sqllm-run-button button").click()
    expect(other.locator(".sqllm-answer")).to_contain_text(word_b)
    expect(other.locator(".sqllm-run-meta")).to_contain_text(re.compile(r"call \d+"))

    # And ours is untouched by theirs.
    expect(page.locator(".sqllm-run-prompt textarea")).to_have_value(prompt_a)
    expect(page.locator(".sqllm-answer")).to_contain_text(word_a)
    expect(page.locator("body")).not_to_contain_text(word_b)
