"""Dashboard on a big database: the Analytics tab's first complete render, and server memory.

    .venv/bin/python bench/dashboard_bench.py              # the default SQLite and PostgreSQL DBs
    .venv/bin/python bench/dashboard_bench.py --db sqlite --runs 5

Serves the dashboard (``python -m panel_app`` on a free port, ``DATABASE_URL`` = the big
database, nothing else from the environment) and drives it with Chromium through
Playwright. Each run opens a fresh page (a new browser session), waits until the page
and its sidebar choices (providers, models, groups) are loaded ("page ready", polled by
Playwright, so coarse), clicks the Analytics tab and measures, from the moment the click
reaches the page (the pointer going down), until the summary cards show
numbers, the provider/model chart, the time-series charts and the latency chart are
drawn, and the first row of recent calls is visible; that part is timed in the page
itself (see `READY_JS`). The first run is also the first time the server reads the
database; the median is over every run.

The server's resident memory (RSS, from /proc) is read with the first session open (one
session on a fresh server) and with the last one open (earlier sessions are closed but
Panel drops a closed session only after its unused-session lifetime; the server hands
freed heap back after big reads and each Analytics render, `study_query_llm.memory`), and
its peak (VmHWM) at the end.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    add_db_argument,
    chosen_urls,
    load_average,
    markdown_table,
    print_header,
    show_url,
)
from playwright.sync_api import Page, expect, sync_playwright

from study_query_llm.testing.dashboard import CHROMIUM, CHROMIUM_ARGS, served_dashboard

TIMEOUT_MS = 120_000
# What "complete" means: every part of the tab shows data. (container class, what must be
# visible inside it, text it must contain); Panel puts components in shadow roots, so the
# page-side check below looks through them.
READY = [
    ("sqllm-summary", ".sqllm-card-calls", r"\d"),
    ("sqllm-compare-charts", "canvas", ""),
    ("sqllm-timeseries", "canvas", ""),
    ("sqllm-latency", "canvas", ""),
    ("sqllm-recent-calls", ".tabulator-row", ""),
]
# Checked in the page every 25 ms; records (performance.now()) when each part first shows.
# Measured in the page rather than by polling from Playwright: its web-first assertions
# back off to polls 0.5-1 s apart, and a failing one builds an ARIA snapshot of the page
# on each retry (~0.7 s of the page's main thread per render in a Chromium trace).
READY_JS = """
(ready) => {
  const seen = (window.__sqllmSeen = window.__sqllmSeen || {});
  const visible = (el) => el.getClientRects().length > 0;
  function* below(node) {
    const stack = [node];
    while (stack.length) {
      const n = stack.pop();
      const kids = [...(n.children || []), ...(n.shadowRoot ? n.shadowRoot.children : [])];
      for (const k of kids) { yield k; stack.push(k); }
    }
  }
  const deepText = (el) =>
    [el, ...below(el)].map((n) => (n.shadowRoot ? n.shadowRoot.textContent : "")).join(" ")
    + el.textContent;
  const containers = {};
  for (const el of below(document.documentElement)) {
    for (const [cls] of ready) {
      if (el.classList && el.classList.contains(cls)) (containers[cls] ||= []).push(el);
    }
  }
  ready.forEach(([cls, inner, text], i) => {
    if (seen[i] !== undefined) return;
    for (const box of containers[cls] || []) {
      for (const el of below(box)) {
        if (el.matches(inner) && visible(el) && (!text || new RegExp(text).test(deepText(el)))) {
          seen[i] = performance.now();
          return;
        }
      }
    }
  });
  return ready.every((_, i) => seen[i] !== undefined);
}
"""


CLICK_JS = """
() => {
  window.__sqllmSeen = {};
  window.__sqllmClicked = undefined;
  document.addEventListener(
    "pointerdown", () => { window.__sqllmClicked = performance.now(); },
    { capture: true, once: true },
  );
}
"""


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


def tab(page: Page, title: str) -> Any:
    return page.locator(".bk-tab", has_text=re.compile(rf"^\s*{re.escape(title)}\s*$"))


def one_run(page: Page, url: str) -> tuple[float, float]:
    """(page ready s, Analytics complete s) for a fresh page."""
    start = time.perf_counter()
    page.goto(url + "/")
    expect(tab(page, "Analytics")).to_be_visible(timeout=TIMEOUT_MS)
    # the sidebar's choices have loaded once the group list has more than "(all)"
    expect(page.locator(".sqllm-f-group select option")).not_to_have_count(1, timeout=TIMEOUT_MS)
    loaded = time.perf_counter() - start
    # The clock starts when the click reaches the page (the pointer going down), not when
    # Playwright is asked to click: it first checks that the tab is visible, stable and
    # not covered, which is the driver's time, not the dashboard's.
    page.evaluate(CLICK_JS)
    tab(page, "Analytics").click()
    page.wait_for_function(READY_JS, arg=READY, polling=25, timeout=TIMEOUT_MS)
    clicked = page.evaluate("() => window.__sqllmClicked")
    times = page.evaluate("() => window.__sqllmSeen")
    seen = [
        f"{cls[6:]} {(times[str(i)] - clicked) / 1000:.2f}" for i, (cls, _, _) in enumerate(READY)
    ]
    print("  visible after (s): " + ", ".join(seen), flush=True)
    return loaded, (max(times.values()) - clicked) / 1000


def bench(url: str, runs: int) -> list[Any]:
    print(f"### {show_url(url)}\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="dashboard-bench-") as workdir:
        served = served_dashboard(Path(workdir), {"DATABASE_URL": url}, startup_timeout_s=300)
        with served as dashboard, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            errors: list[str] = []
            loads, renders = [], []
            rss_open = rss_first = 0
            load = load_average()
            page = None
            for _ in range(runs):
                if page is not None:
                    page.close()
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                loaded, rendered = one_run(page, dashboard.url)
                loads.append(loaded)
                renders.append(rendered)
                rss_open = memory_kib(dashboard.process.pid)["VmRSS"]
                rss_first = rss_first or rss_open
                print(
                    f"page ready {loaded:.2f} s, Analytics complete {rendered:.2f} s, "
                    f"server RSS {rss_open / 1024:.0f} MiB",
                    flush=True,
                )
            peak = memory_kib(dashboard.process.pid)["VmHWM"]
            browser.close()
    return [
        f"{renders[0]:.2f}",
        f"**{statistics.median(renders):.2f}**",
        f"{statistics.median(loads):.2f}",
        f"**{rss_first / 1024:.0f}**",
        f"{rss_open / 1024:.0f}",
        f"{peak / 1024:.0f}",
        str(len(errors)),
        load,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_db_argument(parser)
    parser.add_argument("--runs", type=int, default=5, help="page loads (fresh sessions)")
    args = parser.parse_args(argv)
    urls = chosen_urls(args.db)
    if not urls:
        print("error: no benchmark database yet: run bench/generate.py first", file=sys.stderr)
        return 2
    print_header(
        "dashboard_bench.py", f"{args.runs} fresh sessions per database; Chromium {CHROMIUM}"
    )
    rows = []
    for url in urls:
        rows.append([show_url(url), *bench(url, args.runs)])
    print()
    print(
        markdown_table(
            [
                "database",
                "first Analytics render s",
                "median render s",
                "page ready s (median)",
                "server RSS, first session open (MiB)",
                "server RSS, last session open (MiB)",
                "server peak RSS (MiB)",
                "page errors",
                "load avg",
            ],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
