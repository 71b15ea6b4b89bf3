"""Analytics tab: summary cards, provider/model comparisons, time series, latency and every call.

Every number comes from `StudyService` (computed by the database over all matching calls);
the latency distribution is the one sample, and says so. Results are cached per view,
keyed by (global filters, `state.version`, chart options), so changing the time bucket
re-queries only the time series. Queries run off the event loop.

CSS classes (stable hooks for UI tests):
- `sqllm-analytics`        the whole tab
- `sqllm-analytics-status` the status / empty-database message
- `sqllm-summary`          the row of summary cards (`sqllm-card-<name>` on each card)
- `sqllm-bucket`, `sqllm-by`, `sqllm-latency-kind`  chart option widgets
- `sqllm-refresh`          re-query now (ignores the cache)
- `sqllm-compare-charts`, `sqllm-compare-table`     provider/model comparison
- `sqllm-timeseries`       the time-series charts (`sqllm-series-note`: bucket and split)
- `sqllm-latency`          the latency distribution chart
- `sqllm-recent-calls`     the recent-calls table (one keyset page at a time)
- `sqllm-recent-prev`, `sqllm-recent-next`, `sqllm-recent-page`  paging controls
- `sqllm-call-detail`      the full record of the clicked call
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import pandas as pd
import panel as pn
import param
from bokeh.models.widgets.tables import NumberFormatter
from sqlalchemy.exc import SQLAlchemyError

from study_query_llm import memory
from study_query_llm.db.aggregates import BUCKETS
from study_query_llm.db.errors import StorageError
from study_query_llm.db.filters import CallFilters

from .. import charts
from ..charts import Bar
from ..export import download_buttons
from ..safe import escape, pre
from ..state import AppState, describe_error, notify

if TYPE_CHECKING:
    from study_query_llm.services.study import StudyService

log = logging.getLogger(__name__)
T = TypeVar("T")

PAGE_SIZE = 50
CHART_HEIGHT = 280
# Errors a query can raise that a person should see as one line (never a traceback).
QUERY_ERRORS = (SQLAlchemyError, StorageError, ValueError, LookupError, OSError)


class FrameCache:
    """A small least-recently-used cache of query results with a time-to-live.

    Keys include the filters and `state.version`, so a new recording or another filter
    misses; the TTL picks up calls recorded by other processes (the CLI, other workers).
    Values are plain frames and dicts and are never mutated after they are stored.
    """

    def __init__(self, max_items: int = 64, ttl_s: float = 60.0) -> None:
        self.max_items = max_items
        self.ttl_s = ttl_s
        self._items: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()

    def clear(self) -> None:
        self._items.clear()

    async def fetch(self, key: Hashable, load: Callable[[], Awaitable[T]]) -> T:
        """The cached value of `key`, or `await load()` (stored for next time)."""
        now = time.monotonic()
        hit = self._items.get(key)
        if hit is not None and now - hit[0] < self.ttl_s:
            self._items.move_to_end(key)
            return hit[1]
        value = await load()
        self._items[key] = (time.monotonic(), value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return value


def pager(
    css_prefix: str,
    on_back: Callable[[Any], Any],
    on_forward: Callable[[Any], Any],
    *,
    back: str = "◀ Newer",
    forward: str = "Older ▶",
) -> tuple[pn.widgets.Button, pn.widgets.Button, pn.pane.Markdown]:
    """Back and forward buttons (disabled until a page is shown) and a page label, with
    the CSS hooks `{css_prefix}-prev`, `-next` and `-page`."""
    buttons = []
    for name, suffix, handler in ((back, "prev", on_back), (forward, "next", on_forward)):
        button = pn.widgets.Button(
            name=name, width=110, disabled=True, css_classes=[f"{css_prefix}-{suffix}"]
        )
        button.on_click(handler)
        buttons.append(button)
    label = pn.pane.Markdown("", css_classes=[f"{css_prefix}-page"], margin=(8, 10))
    return buttons[0], buttons[1], label


def md_text(text: object) -> str:
    """Plain text for a Markdown pane: HTML-escaped, Markdown punctuation neutralised.

    (Like `safe.escape_markdown`, but quotes stay as they are: escaping them makes
    `&#x27;`, whose `#` the Markdown escaping would then break into visible text.)
    """
    out = html.escape("" if text is None else str(text), quote=False)
    for ch in ("\\", "`", "*", "_", "[", "]", "#", "|", "~", "!"):
        out = out.replace(ch, "\\" + ch)
    return out


def _consume(future: asyncio.Future) -> None:
    """Retrieve a dropped future's error, so asyncio does not log it as never retrieved
    (when it matters, the same error is raised where the future is awaited)."""
    if not future.cancelled():
        future.exception()


def notify_text(text: str, level: str = "info") -> None:
    """A toast with plain text (`notify` escapes it: notifications render HTML)."""
    notify(text, level)


def escaped(frame: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """A copy of `frame` with these text columns HTML-escaped (for plot tooltips)."""
    frame = frame.copy()
    for name in columns:
        if name in frame.columns:
            frame[name] = [escape(v) for v in frame[name]]
    return frame


def display_times(frame: pd.DataFrame, columns: Iterable[str] = ("created_at",)) -> pd.DataFrame:
    """A copy with datetime columns as 'YYYY-MM-DD HH:MM:SS' UTC text (for tables)."""
    frame = frame.copy()
    for name in columns:
        if name in frame.columns:
            # A string dtype even when empty, so a table never types the column as numbers
            # (Tabulator shows no rows at all for an object column of timestamp text).
            frame[name] = pd.Series(
                [
                    "" if pd.isna(v) else pd.Timestamp(v).strftime("%Y-%m-%d %H:%M:%S")
                    for v in frame[name]
                ],
                index=frame.index,
                dtype="string",
            )
    return frame


def call_formatters() -> dict[str, NumberFormatter]:
    """Number formats for the usual call columns (fresh models for each table)."""
    dash = {"nan_format": "–", "null_format": "–", "text_align": "right"}
    return {
        "latency_ms": NumberFormatter(format="0,0.0", **dash),
        "total_tokens": NumberFormatter(format="0,0", **dash),
        "cost_usd": NumberFormatter(format="0.000000", **dash),
        "rank": NumberFormatter(format="0.000", **dash),
        "latency_mean_ms": NumberFormatter(format="0,0.0", **dash),
    }


def percent_formatter() -> NumberFormatter:
    """A 0–1 rate shown as a percentage."""
    return NumberFormatter(format="0.0%", nan_format="–", null_format="–", text_align="right")


# Tab titles of the comparison and time-series charts, in the order they are built.
COMPARE_CHARTS = ("Calls", "Failure rate", "Latency", "Cost", "Tokens")
SERIES_CHARTS = ("Calls", "Failure rate", "Tokens", "Cost", "Latency p50")


def prepare_default_view(study: StudyService) -> None:
    """Compute what the tab first asks for with the default filters and options (the
    answers are kept with the rollup cache): run in the background when the server reads
    its database, so the first visitor does not wait for the percentiles over every call."""
    filters = CallFilters()
    study.summary(filters)
    study.compare(filters)
    study.time_series(filters, AnalyticsView.param.bucket.default, AnalyticsView.param.by.default)


class ChartTabs:
    """Charts in tabs that are built when first shown: new data builds only the chart in
    view; another tab's chart is built (from the data it was given) when it is opened."""

    def __init__(self, titles: Iterable[str], css_class: str) -> None:
        self.panes = {
            title: pn.pane.Bokeh(None, sizing_mode="stretch_width", height=CHART_HEIGHT + 20)
            for title in titles
        }
        self.tabs = pn.Tabs(
            *self.panes.items(),
            dynamic=True,
            sizing_mode="stretch_width",
            css_classes=[css_class],
        )
        self._pending: dict[str, Callable[[], Any]] = {}
        self.tabs.param.watch(lambda event: self._build(event.new), "active")

    def show(self, builders: dict[str, Callable[[], Any]], height: int | None = None) -> None:
        """Charts from these builders (one per title): the one in view now, others later."""
        self._pending = dict(builders)
        if height is not None:
            for pane in self.panes.values():
                pane.height = height
        self._build(self.tabs.active)

    def _build(self, index: int) -> None:
        titles = list(self.panes)
        if not 0 <= index < len(titles):
            return
        build = self._pending.pop(titles[index], None)
        if build is not None:
            self.panes[titles[index]].object = build()


COMPARE_TITLES = {
    "count": "calls",
    "failure_rate": "failed",
    "prompt_tokens_sum": "tokens in",
    "completion_tokens_sum": "tokens out",
    "total_tokens_sum": "tokens",
    "prompt_tokens_mean": "mean in",
    "completion_tokens_mean": "mean out",
    "latency_mean_ms": "mean ms",
    "latency_p50_ms": "p50 ms",
    "latency_p90_ms": "p90 ms",
    "latency_p99_ms": "p99 ms",
    "cost_usd_sum": "cost (USD)",
}
CALL_TITLES = {"total_tokens": "tokens", "latency_ms": "latency (ms)", "cost_usd": "cost (USD)"}
CALL_WIDTHS = {
    "id": 60,
    "call_id": 70,
    "created_at": 150,
    "provider": 100,
    "status": 80,
    "latency_ms": 100,
    "total_tokens": 80,
    "cost_usd": 95,
    "position": 75,
    "role": 80,
}


def _json(value: Any, limit: int = 200_000) -> str:
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    if len(text) > limit:
        return text[:limit] + f"\n… ({len(text) - limit:,} more characters)"
    return text


def _number(value: Any, fmt: str) -> str:
    return "–" if value is None or (isinstance(value, float) and pd.isna(value)) else fmt % value


def call_detail_html(record: dict[str, Any] | None) -> str:
    """The full record of one call as HTML; every value from the record is escaped."""
    if record is None:
        return "<p>That call is not in the record.</p>"
    groups = ", ".join(f"{escape(g['type'])}: {escape(g['name'])}" for g in record["groups"])
    created = record.get("created_at")
    facts = [
        ("Created (UTC)", escape(pd.Timestamp(created).strftime("%Y-%m-%d %H:%M:%S.%f"))),
        ("Status", escape(record.get("status"))),
        ("Modality", escape(record.get("modality"))),
        ("Latency", escape(_number(record.get("latency_ms"), "%.1f ms"))),
        (
            "Tokens (in / out / total)",
            " / ".join(
                escape(_number(record.get(k), "%d"))
                for k in ("prompt_tokens", "completion_tokens", "total_tokens")
            ),
        ),
        ("Cost", escape(_number(record.get("cost_usd"), "$%.6f"))),
        ("Request hash", escape(record.get("request_hash") or "–")),
        ("Groups", groups or "–"),
    ]
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    parts = [
        f"<h4>Call {escape(record['id'])} · {escape(record['provider'])} / "
        f"{escape(record['model'])}</h4>",
        f'<table class="sqllm-facts">{rows}</table>',
        "<h5>Prompt</h5>",
        pre(record.get("prompt") or ""),
        "<h5>Response</h5>",
        pre(record.get("response") or "(no response)"),
    ]
    if record.get("error_json"):
        parts += ["<h5>Error</h5>", pre(_json(record["error_json"]))]
    parts += [
        "<h5>Metadata</h5>",
        pre(_json(record.get("metadata_json") or {})),
        "<details><summary>Request JSON</summary>",
        pre(_json(record.get("request_json"))),
        "</details><details><summary>Response JSON</summary>",
        pre(_json(record.get("response_json"))),
        "</details>",
    ]
    return "\n".join(parts)


TEXT_CSS = """
.sqllm-text { white-space: pre-wrap; word-break: break-word; font-family: inherit;
              margin: 0 0 6px 0; background: #f6f8fa; padding: 6px 8px; border-radius: 4px; }
mark { background: #ffe58a; padding: 0 1px; }
"""
DETAIL_CSS = (
    TEXT_CSS
    + """
.sqllm-facts th { text-align: left; padding-right: 1em; font-weight: 600; }
.sqllm-facts td, .sqllm-facts th { padding: 1px 6px 1px 0; vertical-align: top; }
"""
)
DETAIL_HINT = "<p><i>Click a row to see the full record of that call.</i></p>"


def _card(name: str, label: str, value: Any, fmt: str, colors=None) -> pn.indicators.Number:
    missing = value is None or (isinstance(value, float) and pd.isna(value))
    return pn.indicators.Number(
        name=label,
        value=0 if missing else value,
        format="–" if missing else fmt,
        font_size="26pt",
        title_size="11pt",
        colors=colors,
        css_classes=[f"sqllm-card-{name}"],
        margin=(5, 16),
    )


def summary_cards(s: dict[str, Any], *, distinct: bool = True) -> list[pn.indicators.Number]:
    """Number cards for a `StudyService.summary` dict (calls, failure rate, tokens...)."""
    rate_colors = [(0.05, "#2e7d32"), (0.2, "#ef6c00"), (1.01, "#c62828")]
    cards = [
        _card("calls", "Calls", s["calls"], "{value:,.0f}"),
        _card("failure-rate", "Failure rate", s["failure_rate"], "{value:.1%}", rate_colors),
        _card("tokens", "Total tokens", s["total_tokens"], "{value:,.0f}"),
        _card("cost", "Cost (USD)", s["cost_usd"], "${value:,.4f}"),
        _card("latency-p50", "Latency p50", s["latency_p50_ms"], "{value:,.0f} ms"),
        _card("latency-p90", "Latency p90", s["latency_p90_ms"], "{value:,.0f} ms"),
    ]
    if distinct:
        cards += [
            _card("providers", "Providers", s["providers"], "{value:d}"),
            _card("models", "Models", s["models"], "{value:d}"),
        ]
    return cards


class AnalyticsView(pn.viewable.Viewer):
    """Charts and tables over the whole record, narrowed by the sidebar's filters."""

    state = param.ClassSelector(class_=AppState, doc="The session state.")
    bucket = param.Selector(
        default="hour", objects=list(BUCKETS), doc="Time-series bucket size (UTC)."
    )
    by = param.Selector(
        default="provider",
        objects=["provider", "model"],
        doc="Split the time series per provider or per model.",
    )
    latency_kind = param.Selector(
        default="box", objects=["box", "violin"], doc="How to draw the latency distribution."
    )
    samples_per_model = param.Integer(
        default=500,
        bounds=(10, 5000),
        doc="Latency distribution: the newest N successful calls per provider/model.",
    )

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._cache = FrameCache()
        self._generation = 0
        self._started = False
        self._layout: pn.viewable.Viewable | None = None
        self._compare = pd.DataFrame()
        self._filters_seen: CallFilters | None = None
        self._cursors: list[str | None] = [None]  # cursor of page i (page 0: newest)
        self._next_cursor: str | None = None
        self._page = pd.DataFrame()
        self._series = pd.DataFrame()
        self._sections: list[pn.viewable.Viewable] = []
        self._drawn: dict[str, tuple[Any, ...]] = {}  # what each section shows now

        self._status = pn.pane.Alert(
            "Loading…", alert_type="light", css_classes=["sqllm-analytics-status"]
        )
        self._cards = pn.FlexBox(css_classes=["sqllm-summary"], sizing_mode="stretch_width")
        # Charts sit in tabs that render when first shown: building a chart is the slow
        # part of a refresh, so only the charts in view are built.
        self._compare_charts = ChartTabs(COMPARE_CHARTS, "sqllm-compare-charts")
        self._compare_table = pn.widgets.Tabulator(
            pd.DataFrame(),
            disabled=True,
            show_index=False,
            sizing_mode="stretch_width",
            height=220,
            formatters={"failure_rate": percent_formatter()},
            titles=COMPARE_TITLES,
            css_classes=["sqllm-compare-table"],
        )
        self._series_note = pn.pane.Markdown("", css_classes=["sqllm-series-note"])
        self._timeseries = ChartTabs(SERIES_CHARTS, "sqllm-timeseries")
        self._latency = pn.pane.Bokeh(
            None,
            sizing_mode="stretch_width",
            height=CHART_HEIGHT + 40,
            css_classes=["sqllm-latency"],
        )
        self._latency_note = pn.pane.Markdown("", sizing_mode="stretch_width")

        self._recent = pn.widgets.Tabulator(
            pd.DataFrame(),
            disabled=True,
            show_index=False,
            selectable=1,
            sizing_mode="stretch_width",
            height=460,
            layout="fit_data_fill",
            widths=CALL_WIDTHS | {"prompt": 300, "response": 340},
            formatters=call_formatters(),
            titles=CALL_TITLES,
            css_classes=["sqllm-recent-calls"],
        )
        self._recent.on_click(self._on_recent_click)
        self._prev, self._next, self._page_label = pager(
            "sqllm-recent", self._on_prev, self._on_next
        )
        self._detail = pn.pane.HTML(
            DETAIL_HINT,
            sizing_mode="stretch_width",
            css_classes=["sqllm-call-detail"],
            stylesheets=[DETAIL_CSS],
        )
        self._refresh_button = pn.widgets.Button(
            name="Refresh", width=100, css_classes=["sqllm-refresh"]
        )
        self._refresh_button.on_click(self._on_refresh)

        refresh = self.state.when_shown("Analytics", self._refresh_if_started)
        self.state.param.watch(
            refresh, ["start", "end", "providers", "models", "status", "group_id", "version"]
        )
        self.param.watch(refresh, ["bucket", "by", "latency_kind", "samples_per_model"])

    # --- loading -------------------------------------------------------------------------

    async def _read(self, key: tuple[Any, ...], fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` off the loop, cached under (key, filters..., version)."""
        return await self._cache.fetch(key, lambda: self.state.read(fn, *args))

    async def _refresh_if_started(self) -> None:
        if self._started:
            await self.refresh()

    async def _on_refresh(self, _event: Any = None) -> None:
        self._cache.clear()
        await self.refresh()

    async def refresh(self) -> None:
        """Re-read what changed and redraw (stale results of older refreshes are dropped)."""
        self._generation += 1
        generation = self._generation
        filters = self.state.filters()
        version = self.state.version
        study = self.state.study
        if filters != self._filters_seen:  # new filters: back to the newest page
            self._filters_seen = filters
            self._cursors = [None]
        # Everything is asked for at once (the queries run in threads, side by side); the
        # charts' data is dropped if the summary says there is nothing to chart.
        charts_data = asyncio.gather(
            self._read(("compare", filters, version), study.compare, filters),
            self._read(
                ("series", filters, version, self.bucket, self.by),
                study.time_series,
                filters,
                self.bucket,
                self.by,
            ),
            self._read(
                ("latency", filters, version, self.samples_per_model),
                study.latency_samples,
                filters,
                self.samples_per_model,
            ),
            self._load_page(filters, version),
        )
        charts_data.add_done_callback(_consume)
        try:
            summary = await self._read(("summary", filters, version), study.summary, filters)
            if summary["calls"] == 0:
                charts_data.cancel()
                total = await self._read(("count", version), study.count)
                if generation == self._generation:
                    self._show_empty(total)
                return
            # The cards (and the calls table, below) show while the charts' data loads.
            if generation == self._generation:
                self._show_sections()
                self._draw("summary", self._show_summary, summary)
            compare, series, samples, page = await charts_data
        except QUERY_ERRORS as exc:
            log.warning("analytics query failed: %s", exc, exc_info=True)
            if generation == self._generation:
                self._status.param.update(
                    object=f"Could not load analytics: {md_text(describe_error(exc))}",
                    alert_type="danger",
                    visible=True,
                )
            return
        if generation != self._generation:
            return  # a newer refresh is under way
        # Redraw only what changed: a cache hit returns the very same object. The calls
        # table first (cheap); the page gets it before the charts are built.
        self._show_page(*page)
        await asyncio.sleep(0)
        if generation != self._generation:
            return
        # One message and one walk of the page's model graph for all the charts, instead
        # of one per chart (Bokeh re-walks the whole document after each change).
        with pn.io.hold(freeze=True):
            self._draw("compare", self._show_compare, compare)
            self._draw("series", self._show_series, series, self.by)
            self._draw("latency", self._show_latency, samples, self.latency_kind)
        # The queries' frames and the old charts are garbage now; malloc keeps what they
        # held unless asked (off the event loop: a heap walk can take tens of ms).
        memory.trim_in_background()

    def _show_sections(self) -> None:
        self._status.visible = False
        for section in self._sections:
            section.visible = True

    def _draw(self, name: str, show: Callable[[Any], None], data: Any, *options: Any) -> None:
        last = self._drawn.get(name)
        if last is not None and last[0] is data and last[1:] == options:
            return
        show(data)
        self._drawn[name] = (data, *options)

    async def _load_page(
        self, filters: CallFilters, version: int
    ) -> tuple[pd.DataFrame, str | None, int]:
        after = self._cursors[-1]
        study = self.state.study
        page = await self._read(
            ("page", filters, version, after), study.recent_calls, filters, PAGE_SIZE, after
        )
        total = await self._read(("count", filters, version), study.count, filters)
        return page.frame, page.next_cursor, total

    # --- drawing -------------------------------------------------------------------------

    def _show_empty(self, total_calls: int) -> None:
        if total_calls == 0:
            message = (
                "**No calls yet.** Run a prompt in the Run tab (the mock provider works "
                "offline), a batch in the Batch tab, or seed demo data with "
                "`scripts/seed_demo_data.py`; the charts appear here as calls are recorded."
            )
        else:
            message = (
                f"**No calls match these filters** ({total_calls:,} calls in the record). "
                "Widen the time range or clear the provider, model, status or group filter."
            )
        self._status.param.update(object=message, alert_type="info", visible=True)
        for section in self._sections:
            section.visible = False
        self._drawn.clear()
        self._recent.value = pd.DataFrame()
        self._page_label.object = ""
        self._prev.disabled = self._next.disabled = True

    def _show_summary(self, s: dict[str, Any]) -> None:
        self._cards.objects = summary_cards(s)

    def _show_compare(self, compare: pd.DataFrame) -> None:
        self._compare = compare
        data = compare.copy()
        data["failure %"] = data["failure_rate"].astype(float) * 100
        # Horizontal bars: "provider / model" labels can be long and stay readable.
        height = max(200, 90 + 26 * len(data))

        def bars(title: str, xlabel: str, *bars: Bar, tooltips=(), stacked=False):
            return lambda: charts.hbar_chart(
                data,
                "target",
                bars,
                title=title,
                xlabel=xlabel,
                height=height,
                tooltips=tooltips,
                stacked=stacked,
            )

        calls = [("calls", "@count{0,0}")]
        self._compare_charts.show(
            {
                "Calls": bars(
                    "Calls",
                    "calls",
                    Bar("count"),
                    tooltips=[
                        *calls,
                        ("successes", "@successes{0,0}"),
                        ("failures", "@failures{0,0}"),
                    ],
                ),
                "Failure rate": bars(
                    "Failure rate (%)",
                    "% failed",
                    Bar("failure %", color="#c62828"),
                    tooltips=[
                        ("failed", "@{failure %}{0.[00]}%"),
                        ("failures", "@failures{0,0}"),
                        *calls,
                    ],
                ),
                "Latency": bars(
                    "Latency p50 / p90",
                    "ms",
                    Bar("latency_p90_ms", "p90", "#ffab91", 0.8),
                    Bar("latency_p50_ms", "p50", "#d84315", 0.4),
                    tooltips=[
                        ("p50 ms", "@latency_p50_ms{0,0.0}"),
                        ("p90 ms", "@latency_p90_ms{0,0.0}"),
                        ("p99 ms", "@latency_p99_ms{0,0.0}"),
                        *calls,
                    ],
                ),
                "Cost": bars(
                    "Cost (USD)",
                    "USD",
                    Bar("cost_usd_sum", color="#6a1b9a"),
                    tooltips=[
                        ("USD", "@cost_usd_sum{0,0.[000000]}"),
                        ("tokens", "@total_tokens_sum{0,0}"),
                        *calls,
                    ],
                ),
                "Tokens": bars(
                    "Tokens in / out",
                    "tokens",
                    Bar("prompt_tokens_sum", "in (prompt)", "#1f77b4"),
                    Bar("completion_tokens_sum", "out (completion)", "#ff7f0e"),
                    tooltips=[
                        ("in", "@prompt_tokens_sum{0,0}"),
                        ("out", "@completion_tokens_sum{0,0}"),
                        *calls,
                    ],
                    stacked=True,
                ),
            },
            height=height + 10,
        )
        table = compare.drop(columns=["target"]).copy()
        table["failure_rate"] = table["failure_rate"].astype(float).round(4)
        for name in table.columns:
            if name.startswith("latency") or name.endswith("_mean"):
                table[name] = table[name].astype(float).round(1)
        self._compare_table.value = table

    def _show_series(self, series: pd.DataFrame) -> None:
        self._series = series
        by = self.by
        data = series.copy()
        data["bucket"] = data["bucket"].dt.tz_convert("UTC").dt.tz_localize(None)
        data["failure %"] = data["failure_rate"].astype(float) * 100
        label = {"minute": "minute", "hour": "hour", "day": "day", "week": "week"}[self.bucket]
        self._series_note.object = (
            f"One point per {label} (UTC), one line per {by}; hover a line for its values."
        )

        def chart(y: str, title: str, ylabel: str, tooltips: list[tuple[str, str]]):
            return lambda: charts.line_chart(
                data,
                "bucket",
                y,
                by,
                title=title,
                xlabel=f"time (UTC, per {label})",
                ylabel=ylabel,
                height=CHART_HEIGHT,
                tooltips=tooltips,
            )

        calls = ("calls", "@count{0,0}")
        failures = ("failures", "@failures{0,0}")
        self._timeseries.show(
            {
                "Calls": chart("count", "Calls over time", "calls", [failures]),
                "Failure rate": chart(
                    "failure %", "Failure rate over time (%)", "% failed", [failures, calls]
                ),
                "Tokens": chart("total_tokens_sum", "Tokens over time", "tokens", [calls]),
                "Cost": chart("cost_usd_sum", "Cost over time (USD)", "USD", [calls]),
                "Latency p50": chart("latency_p50_ms", "Latency p50 over time (ms)", "ms", [calls]),
            }
        )

    def _show_latency(self, samples: pd.DataFrame) -> None:
        n = self.samples_per_model
        self._latency_note.object = (
            f"A sample: the newest {n:,} successful calls per provider/model "
            "(percentiles in the cards and comparison are over all calls)."
        )
        if samples.empty:
            self._latency.object = None
            self._latency_note.object += " No successful calls with a latency match."
            return
        self._latency.object = charts.distribution_chart(
            samples,
            "target",
            "latency_ms",
            kind=self.latency_kind,
            title=f"Latency distribution (newest {n:,} per model)",
            ylabel="latency (ms)",
            height=CHART_HEIGHT + 20,
        )

    def _show_page(self, frame: pd.DataFrame, next_cursor: str | None, total: int) -> None:
        self._page = frame
        self._next_cursor = next_cursor
        number = len(self._cursors)
        first = (number - 1) * PAGE_SIZE + 1
        last = first + len(frame) - 1
        self._recent.param.update(value=display_times(frame), selection=[])
        self._prev.disabled = number == 1
        self._next.disabled = next_cursor is None
        shown = f"calls {first:,}–{last:,} of {total:,}" if len(frame) else "no calls"
        self._page_label.object = f"Page {number} · {shown} (newest first)"

    # --- recent calls --------------------------------------------------------------------

    async def _show_current_page(self) -> None:
        filters, version = self.state.filters(), self.state.version
        try:
            page = await self._load_page(filters, version)
        except QUERY_ERRORS as exc:
            notify_text(f"Could not load calls: {describe_error(exc)}", "error")
            return
        self._show_page(*page)

    async def _on_next(self, _event: Any = None) -> None:
        if self._next_cursor is None:
            return
        self._cursors.append(self._next_cursor)
        await self._show_current_page()

    async def _on_prev(self, _event: Any = None) -> None:
        if len(self._cursors) > 1:
            self._cursors.pop()
            await self._show_current_page()

    async def _on_recent_click(self, event: Any) -> None:
        if event.row is None or not 0 <= event.row < len(self._page):
            return
        await self.show_call(int(self._page.iloc[event.row]["id"]))

    async def show_call(self, call_id: int) -> None:
        """Show the full record of one call in the detail pane."""
        try:
            record = await self.state.read(self.state.study.call, call_id)
        except QUERY_ERRORS as exc:
            notify_text(f"Could not load call {call_id}: {describe_error(exc)}", "error")
            return
        self._detail.object = call_detail_html(record)

    # --- layout --------------------------------------------------------------------------

    async def _page_frame(self) -> pd.DataFrame:
        return await self.state.read(self.state.study.calls_table, self.state.filters())

    @param.depends()  # lazy: built (and first queried) when the tab is first shown
    def __panel__(self) -> pn.viewable.Viewable:
        if self._layout is None:
            self._layout = self._build()
        if not self._started:
            self._started = True
            pn.state.execute(self.refresh)
        return self._layout

    def _build(self) -> pn.viewable.Viewable:
        options = pn.Row(
            pn.widgets.Select.from_param(
                self.param.bucket, name="Time bucket", width=130, css_classes=["sqllm-bucket"]
            ),
            pn.widgets.Select.from_param(
                self.param.by, name="Series per", width=130, css_classes=["sqllm-by"]
            ),
            pn.widgets.Select.from_param(
                self.param.latency_kind,
                name="Latency plot",
                width=130,
                css_classes=["sqllm-latency-kind"],
            ),
            pn.widgets.IntInput.from_param(
                self.param.samples_per_model, name="Latency sample per model", width=180
            ),
            pn.Column(pn.Spacer(height=18), self._refresh_button),
        )
        compare = pn.Column(
            pn.pane.Markdown("### Providers and models"),
            self._compare_charts.tabs,
            self._compare_table,
            download_buttons(lambda: self._compare, "provider-model-comparison"),
            sizing_mode="stretch_width",
        )
        series = pn.Column(
            pn.pane.Markdown("### Over time"),
            self._series_note,
            self._timeseries.tabs,
            download_buttons(lambda: self._series, "time-series"),
            sizing_mode="stretch_width",
        )
        latency = pn.Column(
            pn.pane.Markdown("### Latency distribution"),
            self._latency_note,
            self._latency,
            sizing_mode="stretch_width",
        )
        recent = pn.Column(
            pn.pane.Markdown("### Calls"),
            pn.Row(self._prev, self._next, self._page_label),
            self._recent,
            pn.Row(
                pn.pane.Markdown("Export every matching call (up to 100,000):", margin=(12, 10)),
                download_buttons(self._page_frame, "calls"),
            ),
            pn.pane.Markdown("#### Selected call"),
            self._detail,
            sizing_mode="stretch_width",
        )
        self._sections = [self._cards, compare, series, latency, recent]
        return pn.Column(
            options,
            self._status,
            *self._sections,
            sizing_mode="stretch_width",
            css_classes=["sqllm-analytics"],
        )
