"""Helpers the UI tests share: finding and opening tabs, common actions, screenshots."""

from __future__ import annotations

import re
from pathlib import Path

from playwright.sync_api import Locator, Page, expect

SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"

# Text of an element and of every shadow root below it (Panel renders panes in shadow
# roots, which `inner_text()` does not enter); script and style contents are left out.
_TEXT_JS = """
(root) => {
  const parts = [];
  const walk = (node) => {
    for (const child of node.childNodes) {
      if (child.nodeType === Node.TEXT_NODE) parts.push(child.textContent);
      else if (child.nodeType === Node.ELEMENT_NODE
               && !["SCRIPT", "STYLE", "TEMPLATE"].includes(child.tagName)) walk(child);
    }
    if (node.shadowRoot) walk(node.shadowRoot);
  };
  walk(root);
  return parts.join(" ");
}
"""


def open_dashboard(page: Page, url: str) -> None:
    """Load the dashboard at `url` and wait until its tabs are shown."""
    page.goto(url + "/")
    expect(tab_header(page, "Run")).to_be_visible()


def text_of(locator: Locator) -> str:
    """All text inside the (single) element, shadow roots included."""
    return locator.evaluate(_TEXT_JS)


def page_text(page: Page) -> str:
    """All text on the page, shadow roots included."""
    return page.locator("body").evaluate(_TEXT_JS)


def tab_header(page: Page, title: str) -> Locator:
    """The clickable header of a dashboard tab."""
    return page.locator(".bk-tab", has_text=re.compile(rf"^\s*{re.escape(title)}\s*$"))


def open_tab(page: Page, title: str) -> None:
    """Click a tab's header and wait until it is the active one."""
    header = tab_header(page, title)
    header.click()
    expect(header).to_have_class(re.compile(r"\bbk-active\b"))


def screenshot(page: Page, name: str) -> Path:
    """Save a screenshot under tests/ui/screenshots/ (git-ignored) for a reviewer."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def run_prompt(page: Page, prompt: str) -> int:
    """Run `prompt` in the Run tab with the default (mock) provider; returns the call id."""
    open_tab(page, "Run")
    page.locator(".sqllm-run-prompt textarea").fill(prompt)
    page.locator(".sqllm-run-button button").click()
    meta = page.locator(".sqllm-run-meta")
    expect(meta).to_contain_text(re.compile(r"call \d+"))
    text = text_of(meta)
    match = re.search(r"call (\d+)", text)
    assert match, text
    return int(match.group(1))


def choose_group(page: Page, name: str) -> None:
    """Pick a group in the Embeddings tab's group picker."""
    picker = page.locator(".sqllm-embed-group")
    picker.locator("input").click()
    page.locator(".choices__item--choice", has_text=name).first.click()
    page.keyboard.press("Escape")
    expect(picker).to_contain_text(name)


def choose_mock_embeddings(page: Page) -> None:
    """Pick the mock provider (model mock-embed) in the Embeddings tab."""
    page.locator(".sqllm-embed-provider select").select_option(label="mock (mock)")
    expect(page.locator(".sqllm-embed-model input")).to_have_value("mock-embed")
