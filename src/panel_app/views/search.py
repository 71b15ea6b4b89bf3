"""Search tab: full-text search of prompts and responses, with highlighted hits, details and export.

The sidebar's filters narrow the search. Snippets come from the database with `[[hit]]`
markers; they are HTML-escaped first and only then turned into <mark> (`safe.highlight`).
The result table shows plain text (Tabulator's default formatter escapes it).

CSS classes (stable hooks for UI tests):
- `sqllm-search`          the whole tab
- `sqllm-search-input`    the search text (Enter searches)
- `sqllm-search-button`   the Search button
- `sqllm-search-limit`    how many results at most
- `sqllm-search-message`  the inline message (empty query, invalid query, result count)
- `sqllm-search-results`  the result table (click a row for the full record)
- `sqllm-search-snippets` highlighted snippets (HTML with <mark> around each hit)
- `sqllm-search-detail`   the full record of the clicked result
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
import panel as pn
import param

from study_query_llm.db.errors import InvalidSearchError
from study_query_llm.db.search import HIGHLIGHT_END, HIGHLIGHT_START

from ..export import download_buttons
from ..safe import escape, highlight
from ..state import AppState, describe_error
from .analytics import (
    CALL_WIDTHS,
    DETAIL_CSS,
    QUERY_ERRORS,
    TEXT_CSS,
    FrameCache,
    call_detail_html,
    call_formatters,
    display_times,
    md_text,
    notify_text,
)

log = logging.getLogger(__name__)

SNIPPETS_SHOWN = 50
RESULT_COLUMNS = [
    "rank",
    "call_id",
    "provider",
    "model",
    "status",
    "created_at",
    "prompt_snippet",
    "response_snippet",
]
SNIPPET_CSS = (
    TEXT_CSS
    + """
.sqllm-hit { border-bottom: 1px solid #e4e4e4; padding: 6px 0; }
.sqllm-hit-head { color: #555; font-size: 90%; margin-bottom: 3px; }
.sqllm-hit-label { color: #777; font-size: 85%; margin-right: 4px; }
"""
)
DETAIL_HINT = "<p><i>Click a result to see the full record of that call.</i></p>"


def _plain(snippet: object) -> str:
    """A snippet without its hit markers (for the plain-text table)."""
    return str(snippet or "").replace(HIGHLIGHT_START, "").replace(HIGHLIGHT_END, "")


def snippets_html(hits: pd.DataFrame, limit: int = SNIPPETS_SHOWN) -> str:
    """The best hits as HTML: escaped snippets with <mark> around every match."""
    parts = []
    for hit in hits.head(limit).itertuples():
        created = pd.Timestamp(hit.created_at).strftime("%Y-%m-%d %H:%M:%S")
        head = (
            f"#{escape(hit.call_id)} · {escape(hit.provider)} / {escape(hit.model)} · "
            f"{escape(hit.status)} · {escape(created)} UTC · rank {hit.rank:.3f}"
        )
        body = ""
        for label, snippet in (("prompt", hit.prompt_snippet), ("response", hit.response_snippet)):
            if snippet:
                body += (
                    f'<div><span class="sqllm-hit-label">{label}</span>{highlight(snippet)}</div>'
                )
        parts.append(f'<div class="sqllm-hit"><div class="sqllm-hit-head">{head}</div>{body}</div>')
    more = len(hits) - limit
    if more > 0:
        parts.append(f"<p><i>… and {more:,} more in the table above.</i></p>")
    return "\n".join(parts)


class SearchView(pn.viewable.Viewer):
    """Find calls by the words in their prompt or response."""

    state = param.ClassSelector(class_=AppState, doc="The session state.")
    query = param.String(default="", doc="The text last searched for (empty: no search yet).")
    limit = param.Selector(
        default=100, objects=[50, 100, 500, 1000], doc="Most results to return, best first."
    )

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._cache = FrameCache(max_items=32)
        self._generation = 0
        self._hits = pd.DataFrame(columns=RESULT_COLUMNS)
        self._layout: pn.viewable.Viewable | None = None

        self._input = pn.widgets.TextInput(
            name="Search prompts and responses",
            placeholder='words to find (every word must occur; "a phrase" in quotes), then Enter',
            sizing_mode="stretch_width",
            css_classes=["sqllm-search-input"],
        )
        self._button = pn.widgets.Button(
            name="Search",
            button_type="primary",
            width=110,
            align="end",
            css_classes=["sqllm-search-button"],
        )
        self._limit = pn.widgets.Select.from_param(
            self.param.limit, name="At most", width=100, css_classes=["sqllm-search-limit"]
        )
        self._message = pn.pane.Alert(
            "Type a word or phrase and press Enter. The sidebar filters apply.",
            alert_type="light",
            css_classes=["sqllm-search-message"],
            sizing_mode="stretch_width",
        )
        self._table = pn.widgets.Tabulator(
            pd.DataFrame(columns=RESULT_COLUMNS),
            disabled=True,
            show_index=False,
            selectable=1,
            sizing_mode="stretch_width",
            height=360,
            layout="fit_columns",
            widths=CALL_WIDTHS | {"rank": 70, "model": 140},
            formatters=call_formatters(),
            titles={"call_id": "call", "prompt_snippet": "prompt", "response_snippet": "response"},
            css_classes=["sqllm-search-results"],
        )
        self._table.on_click(self._on_click)
        self._snippets = pn.pane.HTML(
            "",
            sizing_mode="stretch_width",
            stylesheets=[SNIPPET_CSS],
            css_classes=["sqllm-search-snippets"],
        )
        self._detail = pn.pane.HTML(
            DETAIL_HINT,
            sizing_mode="stretch_width",
            stylesheets=[DETAIL_CSS],
            css_classes=["sqllm-search-detail"],
        )
        self._button.on_click(self._on_search)
        self._input.param.watch(self._on_search, "enter_pressed")
        self.param.watch(self._on_limit, "limit")
        self.state.param.watch(
            self.state.when_shown("Search", self._on_state),
            ["start", "end", "providers", "models", "status", "group_id", "version"],
        )

    # --- actions -------------------------------------------------------------------------

    async def _on_search(self, _event: Any = None) -> None:
        text = self._input.value_input or self._input.value or ""
        if not text.strip():
            self.query = ""
            self._show_hits(pd.DataFrame(columns=RESULT_COLUMNS))
            self._say("Type at least one word to search for.", "warning")
            return
        self.query = text
        await self.search()

    async def _on_limit(self, _event: Any = None) -> None:
        if self.query:
            await self.search()

    async def _on_state(self) -> None:
        if self.query:
            await self.search()

    async def search(self) -> None:
        """Run `query` with the current filters and show the hits."""
        self._generation += 1
        generation = self._generation
        query, filters, version, limit = (
            self.query,
            self.state.filters(),
            self.state.version,
            self.limit,
        )
        study = self.state.study
        self._button.loading = True
        try:
            hits = await self._cache.fetch(
                ("search", query, filters, version, limit),
                lambda: self.state.read(study.search, query, filters, limit),
            )
        except InvalidSearchError as exc:
            if generation == self._generation:
                self._show_hits(pd.DataFrame(columns=RESULT_COLUMNS))
                self._say(md_text(describe_error(exc)), "warning")
            return
        except QUERY_ERRORS as exc:
            log.warning("search failed: %s", exc, exc_info=True)
            if generation == self._generation:
                self._say(f"Search failed: {md_text(describe_error(exc))}", "danger")
            return
        finally:
            if generation == self._generation:
                self._button.loading = False
        if generation != self._generation:
            return
        self._show_hits(hits)
        shown = md_text(" ".join(query.split()))
        if hits.empty:
            self._say(f"No calls match <b>{shown}</b> with the current filters.", "info")
        else:
            capped = " (the limit: raise it to see more)" if len(hits) >= limit else ""
            self._say(
                f"{len(hits):,} call{'s' if len(hits) != 1 else ''} match <b>{shown}</b>, "
                f"best first{capped}.",
                "success",
            )

    def _say(self, html: str, kind: str) -> None:
        self._message.param.update(object=html, alert_type=kind)

    def _show_hits(self, hits: pd.DataFrame) -> None:
        self._hits = hits
        table = display_times(hits[RESULT_COLUMNS])
        for name in ("prompt_snippet", "response_snippet"):
            table[name] = pd.Series(
                [_plain(v) for v in table[name]], index=table.index, dtype=object
            )
        self._table.param.update(value=table, selection=[])
        self._snippets.object = snippets_html(hits)
        self._detail.object = DETAIL_HINT

    async def _on_click(self, event: Any) -> None:
        if event.row is None or not 0 <= event.row < len(self._hits):
            return
        call_id = int(self._hits.iloc[event.row]["call_id"])
        try:
            record = await self.state.read(self.state.study.call, call_id)
        except QUERY_ERRORS as exc:
            notify_text(f"Could not load call {call_id}: {describe_error(exc)}", "error")
            return
        self._detail.object = call_detail_html(record)

    # --- layout --------------------------------------------------------------------------

    @param.depends()  # lazy: built when the tab is first shown
    def __panel__(self) -> pn.viewable.Viewable:
        if self._layout is None:
            self._layout = pn.Column(
                pn.Row(self._input, self._limit, self._button, sizing_mode="stretch_width"),
                self._message,
                self._table,
                download_buttons(lambda: self._hits, "search-results"),
                pn.Row(
                    pn.Column(
                        pn.pane.Markdown("#### Highlighted hits"),
                        self._snippets,
                        sizing_mode="stretch_width",
                    ),
                    pn.Column(
                        pn.pane.Markdown("#### Selected call"),
                        self._detail,
                        sizing_mode="stretch_width",
                    ),
                    sizing_mode="stretch_width",
                ),
                sizing_mode="stretch_width",
                css_classes=["sqllm-search"],
            )
        return self._layout
