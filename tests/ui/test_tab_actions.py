"""What each tab does after a click: chat, groups, analytics detail, search detail, exports.

Each test drives one tab the way a person would and checks what appears on the page (and,
for exports, the downloaded file itself). Prompt text that looks like HTML must show as
text everywhere it appears.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from playwright.sync_api import Locator, Page, expect
from sqlalchemy import create_engine, insert, select
from ui_helpers import open_tab, run_prompt, screenshot, text_of

from study_query_llm.config import Settings
from study_query_llm.db.models_v2 import Group, RawCall
from study_query_llm.services.context import open_services
from study_query_llm.services.jobs import Target

pytestmark = pytest.mark.ui

XSS = "<img src=x onerror=alert(1)>"


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def paste(box: Locator, text: str) -> None:
    """Put a long text in a text box at once, as a paste does (typing it is far slower)."""
    box.evaluate(
        """(el, text) => {
            el.value = text;
            el.dispatchEvent(new Event("input", {bubbles: true}));
            el.dispatchEvent(new Event("change", {bubbles: true}));
        }""",
        text,
    )


def send_chat(page: Page, text: str) -> None:
    # While an answer streams the Send button gives way to a Stop button.
    expect(page.locator(".sqllm-chat button", has_text="Send")).to_be_visible()
    box = page.locator(".sqllm-chat textarea").first
    box.fill(text)
    box.press("Enter")


def test_chat_streams_an_answer_and_stores_the_conversation(page: Page) -> None:
    word = unique("chat")
    open_tab(page, "Chat")
    send_chat(page, f"Tell me about {word} {XSS}")

    answer = page.locator(".sqllm-chat-text", has_text=f"Mock answer about “Tell me about {word}")
    expect(answer.first).to_be_visible()
    expect(page.locator(".sqllm-chat-text", has_text=XSS).first).to_be_visible()
    expect(page.locator(".sqllm-chat img[src='x']")).to_have_count(0)
    expect(page.locator(".sqllm-chat-info")).to_contain_text("mock")
    screenshot(page, "chat-answered")

    # A second turn continues the same conversation, which Groups lists with both calls.
    send_chat(page, f"And more about {word}?")
    expect(
        page.locator(".sqllm-chat-text", has_text=f"Mock answer about “And more about {word}")
    ).to_have_count(1)
    open_tab(page, "Groups")
    page.locator(".sqllm-groups-type select").select_option("conversation")
    rows = page.locator(".sqllm-groups-table .tabulator-row")
    expect(rows.first).to_be_visible()
    rows.first.locator(".tabulator-cell").nth(1).click()
    calls = page.locator(".sqllm-group-calls")
    expect(calls).to_contain_text(f"Tell me about {word}")
    expect(calls).to_contain_text(f"And more about {word}")


def test_analytics_row_click_shows_the_full_record(page: Page) -> None:
    word = unique("detail")
    call_id = run_prompt(page, f"Detail for {word} {XSS}")
    open_tab(page, "Analytics")
    row = page.locator(".sqllm-recent-calls .tabulator-row", has_text=word)
    expect(row).to_have_count(1)
    row.locator(".tabulator-cell").nth(2).click()

    detail = page.locator(".sqllm-call-detail")
    expect(detail).to_contain_text(f"Call {call_id}")
    expect(detail).to_contain_text(f"Detail for {word} {XSS}")
    expect(detail).to_contain_text("Request JSON")
    expect(page.locator(".sqllm-call-detail img[src='x']")).to_have_count(0)
    screenshot(page, "analytics-call-detail")


def test_analytics_bucket_change_redraws_the_series(page: Page) -> None:
    open_tab(page, "Analytics")
    note = page.locator(".sqllm-series-note")
    expect(note).to_contain_text("One point per hour (UTC), one line per provider")
    expect(page.locator(".sqllm-timeseries canvas").first).to_be_visible()
    page.locator(".sqllm-bucket select").select_option("day")
    expect(note).to_contain_text("One point per day (UTC)")
    page.locator(".sqllm-by select").select_option("model")
    expect(note).to_contain_text("one line per model")


def test_sidebar_group_filter_narrows_analytics(page: Page) -> None:
    open_tab(page, "Analytics")
    label = page.locator(".sqllm-recent-page")
    expect(label).to_contain_text(re.compile(r"of \d[\d,]*"))
    everything = int(re.search(r"of ([\d,]+)", text_of(label)).group(1).replace(",", ""))

    group = page.locator(".sqllm-f-group select")
    expect(group).to_have_value("(all)")  # shown as such, not as a blank box
    option = group.locator("option", has_text="capitals quiz").first
    group.select_option(option.get_attribute("value"))
    expect(label).not_to_contain_text(f"of {everything:,}")
    narrowed = int(re.search(r"of ([\d,]+)", text_of(label)).group(1).replace(",", ""))
    assert 0 < narrowed < everything


def test_search_result_click_shows_the_record(page: Page) -> None:
    open_tab(page, "Search")
    page.locator(".sqllm-search-input input").fill("photosynthesis")
    page.locator(".sqllm-search-button button").click()
    first = page.locator(".sqllm-search-results .tabulator-row").first
    expect(first).to_be_visible()
    first.locator(".tabulator-cell").nth(2).click()
    detail = page.locator(".sqllm-search-detail")
    expect(detail).to_contain_text(re.compile("photosynthesis", re.IGNORECASE))
    expect(detail).to_contain_text("Request JSON")


def test_search_export_downloads_csv_and_parquet(page: Page) -> None:
    open_tab(page, "Search")
    page.locator(".sqllm-search-input input").fill("photosynthesis")
    page.locator(".sqllm-search-button button").click()
    expect(page.locator(".sqllm-search-results .tabulator-row").first).to_be_visible()
    export = page.locator(".sqllm-search .sqllm-export").first

    with page.expect_download() as csv_download:
        export.locator(".sqllm-export-csv button, .sqllm-export-csv a").first.click()
    csv_path = csv_download.value.path()
    frame = pd.read_csv(csv_path, encoding="utf-8-sig")
    assert len(frame) > 0
    assert (
        frame.astype(str).apply(lambda c: c.str.contains("photosynthesis", case=False)).any().any()
    )

    with page.expect_download() as parquet_download:
        export.locator(".sqllm-export-parquet button, .sqllm-export-parquet a").first.click()
    with open(parquet_download.value.path(), "rb") as handle:
        table = pd.read_parquet(io.BytesIO(handle.read()))
    assert len(table) == len(frame)


def test_groups_rename_label_and_compare(page: Page) -> None:
    open_tab(page, "Groups")
    # The first list (every type) is in before a type is chosen.
    expect(page.locator(".sqllm-groups-page")).to_contain_text("Groups 1")
    page.locator(".sqllm-groups-type select").select_option("label")
    expect(page.locator(".sqllm-groups-type select")).to_have_value("label")
    # The list has reloaded with labels only before a row is clicked.
    expect(
        page.locator(".sqllm-groups-table .tabulator-row", has_text="capitals quiz")
    ).to_have_count(0)
    row = page.locator(".sqllm-groups-table .tabulator-row", has_text="interesting answers")
    expect(row.first).to_be_visible()
    row.first.locator(".tabulator-cell", has_text="interesting answers").click()
    expect(page.locator(".sqllm-group-header", has_text="interesting answers")).to_be_visible()

    # Rename: the list and the header show the new name (HTML-looking text stays text).
    new_name = f"renamed {unique('g')} <b>bold</b>"
    name_box = page.locator(".sqllm-group-name input")
    name_box.fill(new_name)
    page.locator(".sqllm-group-save button").click()
    expect(page.locator(".sqllm-group-header", has_text=new_name)).to_be_visible()
    expect(page.locator(".sqllm-groups-table .tabulator-row", has_text=new_name)).to_have_count(1)
    expect(page.locator(".sqllm-group-header b")).to_have_count(0)

    # Label: tick two calls of the opened group and add them to a new label.
    label = unique("label")
    calls = page.locator(".sqllm-group-calls .tabulator-row")
    expect(calls.first).to_be_visible()
    for index in (0, 1):
        calls.nth(index).locator("input[type=checkbox]").check()
    page.locator(".sqllm-label-name input").fill(label)
    page.locator(".sqllm-label-button button").click()
    expect(page.locator(".sqllm-groups")).to_contain_text(
        re.compile(rf"Added [12] calls? to label {label}")
    )
    expect(page.locator(".sqllm-groups-table .tabulator-row", has_text=label)).to_have_count(1)

    # Compare the renamed label with another label (the list shows labels only), side by side.
    a, b = page.locator(".sqllm-compare-a select"), page.locator(".sqllm-compare-b select")
    a.select_option(a.locator("option", has_text="renamed").first.get_attribute("value"))
    b.select_option(b.locator("option", has_text="odd inputs").first.get_attribute("value"))
    page.locator(".sqllm-compare-button button").click()
    compare = page.locator(".sqllm-group-compare")
    expect(compare).to_be_visible()
    expect(compare).to_contain_text("odd inputs")
    expect(compare).to_contain_text(new_name)
    expect(compare.locator(".tabulator-row", has_text="calls")).not_to_have_count(0)
    screenshot(page, "groups-compare")


def plan_interrupted_batch(database_url: str, prompts: list[str], name: str) -> int:
    """A batch persisted with its items but never run, as a crashed process leaves it."""

    async def plan() -> int:
        settings = Settings(_env_file=None, database_url=database_url)
        async with open_services(settings) as services:
            return await services.batches.create_job(
                prompts, [Target("mock", "mock-small")], name=name
            )

    # The browser driver runs an event loop in this thread: plan in a thread of its own.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, plan()).result(timeout=60)


def test_batch_cancel_stops_a_running_batch(page: Page) -> None:
    word = unique("cancel")
    open_tab(page, "Batch")
    # 2,000 calls one at a time take far longer than the click below.
    prompts = [f"Long batch question {i} about {word}" for i in range(2000)]
    paste(page.locator(".sqllm-batch-prompts textarea"), "\n".join(prompts))
    page.locator(".sqllm-batch-concurrency input").fill("1")
    page.locator(".sqllm-batch-concurrency input").press("Tab")
    page.locator(".sqllm-batch-start button").click()
    cancel = page.locator(".sqllm-batch-cancel button")
    expect(cancel).to_be_enabled()
    cancel.click()
    status = page.locator(".sqllm-batch-status")
    expect(status).to_contain_text(re.compile(r"Batch #\d+ cancelled: "))
    expect(page.locator(".sqllm-batch-start button")).to_be_enabled()
    # The cancelled batch is offered for resuming.
    expect(
        page.locator(".sqllm-batch-resumable select option", has_text="cancelled").first
    ).to_be_attached()


def test_interrupted_batch_resumes_to_a_matrix(page: Page, dashboard) -> None:
    word = unique("resume")
    prompts = [f"Interrupted question {i} about {word}" for i in range(5)]
    job_id = plan_interrupted_batch(dashboard.database_url, prompts, f"interrupted {word}")

    open_tab(page, "Batch")
    page.locator(".sqllm-batch-refresh button").click()
    resumable = page.locator(".sqllm-batch-resumable select")
    option = resumable.locator("option", has_text=f"#{job_id}")
    expect(option).to_be_attached()
    resumable.select_option(option.get_attribute("value"))
    page.locator(".sqllm-batch-resume button").click()

    expect(page.locator("progress.sqllm-batch-progress")).to_have_attribute("value", "100")
    expect(page.locator(".sqllm-batch-status")).to_contain_text("5/5")
    matrix = page.locator(".sqllm-batch-matrix")
    expect(matrix).to_contain_text(f"Interrupted question 0 about {word}")
    expect(matrix).to_contain_text("Mock answer about")
    screenshot(page, "batch-resumed")


def test_a_long_prompt_is_recorded_whole(page: Page, dashboard) -> None:
    word = unique("long")
    prompt = f"{word} " + "lorem ipsum dolor sit amet " * 600  # ~16,000 characters
    call_id = run_prompt(page, prompt.strip())
    engine = create_engine(dashboard.database_url)
    try:
        with engine.connect() as connection:
            request = connection.execute(
                select(RawCall.request_json).where(RawCall.id == call_id)
            ).scalar_one()
    finally:
        engine.dispose()
    assert prompt.strip() in json.dumps(request, ensure_ascii=False)


def test_batch_shows_html_prompts_as_text(page: Page) -> None:
    word = unique("xss")
    open_tab(page, "Batch")
    page.locator(".sqllm-batch-prompts textarea").fill(f"{XSS} {word}")
    page.locator(".sqllm-batch-start button").click()
    expect(page.locator("progress.sqllm-batch-progress")).to_have_attribute("value", "100")
    expect(page.locator(".sqllm-batch-results .tabulator-row", has_text=XSS)).to_have_count(1)
    expect(page.locator(".sqllm-batch-matrix")).to_contain_text(f"{XSS} {word}")
    expect(page.locator("img[src='x']")).to_have_count(0)


def test_groups_list_pages_through_many_groups(page: Page, dashboard) -> None:
    """The list shows 50 groups a page, newest first; Older and Newer move between pages."""
    kind = unique("paging")
    engine = create_engine(dashboard.database_url)
    try:
        with engine.begin() as conn:
            for i in range(55):  # back-dated: other tests' lists of all types keep their page
                conn.execute(
                    insert(Group).values(
                        group_type=kind,
                        name=f"page group {i:02d}",
                        created_at=datetime(2001, 1, 1, tzinfo=UTC) + timedelta(minutes=i),
                    )
                )
    finally:
        engine.dispose()

    open_tab(page, "Groups")
    page.locator(".sqllm-groups-type select").select_option(kind)
    label = page.locator(".sqllm-groups-page")
    rows = page.locator(".sqllm-groups-table .tabulator-row")
    expect(label).to_contain_text("Groups 1–50 of 55 (newest first)")
    expect(rows.first).to_contain_text("page group 54")
    newer = page.locator(".sqllm-groups-prev button")
    older = page.locator(".sqllm-groups-next button")
    expect(newer).to_be_disabled()

    older.click()
    expect(label).to_contain_text("Groups 51–55 of 55")
    expect(rows).to_have_count(5)
    expect(rows.last).to_contain_text("page group 00")
    expect(older).to_be_disabled()

    newer.click()
    expect(label).to_contain_text("Groups 1–50 of 55")
    expect(rows.first).to_contain_text("page group 54")
    screenshot(page, "groups-paged")
