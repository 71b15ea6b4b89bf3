"""Groups tab: batches, sweeps, labels, chats with statistics; open, compare, rename, label.

The list's statistics cover the member calls that match the sidebar's filters (`members`
counts all of them). The list comes a page of groups at a time, newest first, and only
that page's statistics are computed: a record with millions of group members lists
quickly. An opened group lists every member call in position order. Renames,
descriptions and labels are written through `GroupService` off the event loop, and
`state.recorded()` tells the other tabs (and the sidebar's group choice) afterwards.

CSS classes (stable hooks for UI tests):
- `sqllm-groups`             the whole tab
- `sqllm-groups-type`        the group-type filter
- `sqllm-groups-message`     status line of the list (empty record, errors)
- `sqllm-groups-table`       the list of groups (click a row to open the group)
- `sqllm-groups-prev`, `sqllm-groups-next`, `sqllm-groups-page`  paging of the list
- `sqllm-group-detail`       the opened group: header, statistics, calls, forms
- `sqllm-group-header`       its type, name and description
- `sqllm-group-stats`        its summary cards
- `sqllm-group-calls`        its calls in order (tick rows to label them; click for detail)
- `sqllm-group-prev`, `sqllm-group-next`, `sqllm-group-page`  paging of those calls
- `sqllm-group-call-detail`  the full record of the clicked call
- `sqllm-group-name`, `sqllm-group-description`, `sqllm-group-save`  rename / describe
- `sqllm-label-name`, `sqllm-label-ids`, `sqllm-label-button`        label calls
- `sqllm-compare-a`, `sqllm-compare-b`, `sqllm-compare-button`       pick two groups
- `sqllm-group-compare`      the side-by-side table and charts
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

import pandas as pd
import panel as pn
import param

from study_query_llm.db.errors import GroupExistsError, GroupNotFoundError
from study_query_llm.services.groups import GroupService, parse_ids

from ..export import download_buttons
from ..safe import escape
from ..state import AppState, describe_error
from .analytics import (
    CALL_TITLES,
    CALL_WIDTHS,
    CHART_HEIGHT,
    DETAIL_CSS,
    QUERY_ERRORS,
    FrameCache,
    call_detail_html,
    call_formatters,
    display_times,
    escaped,
    md_text,
    notify_text,
    pager,
    percent_formatter,
    summary_cards,
)

log = logging.getLogger(__name__)

ALL_TYPES = "(all types)"
PAGE_SIZE = 200
GROUPS_PAGE = 50
GROUP_COLUMNS = [
    "id",
    "group_type",
    "name",
    "description",
    "members",
    "calls",
    "failure_rate",
    "total_tokens",
    "cost_usd",
    "latency_mean_ms",
    "created_at",
]
COMPARE_METRICS = [
    ("calls", "Calls", 1.0),
    ("failure_rate", "Failure rate (%)", 100.0),
    ("latency_p50_ms", "Latency p50 (ms)", 1.0),
    ("latency_p90_ms", "Latency p90 (ms)", 1.0),
    ("total_tokens", "Tokens", 1.0),
    ("cost_usd", "Cost (USD)", 1.0),
]
COMPARE_ROWS = [
    ("calls", "calls", "int"),
    ("successes", "successes", "int"),
    ("failures", "failures", "int"),
    ("failure_rate", "failure rate", "pct"),
    ("prompt_tokens", "tokens in", "int"),
    ("completion_tokens", "tokens out", "int"),
    ("total_tokens", "tokens total", "int"),
    ("cost_usd", "cost (USD)", "usd"),
    ("latency_mean_ms", "latency mean (ms)", "ms"),
    ("latency_p50_ms", "latency p50 (ms)", "ms"),
    ("latency_p90_ms", "latency p90 (ms)", "ms"),
    ("latency_p99_ms", "latency p99 (ms)", "ms"),
    ("providers", "providers", "int"),
    ("models", "models", "int"),
]
DETAIL_HINT = "<p><i>Click a call to see its full record.</i></p>"


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    return {
        "int": lambda v: f"{int(v):,}",
        "pct": lambda v: f"{v:.1%}",
        "usd": lambda v: f"${v:,.6f}",
        "ms": lambda v: f"{v:,.1f}",
    }[kind](value)


class GroupsView(pn.viewable.Viewer):
    """Browse groups of calls and the calls in them."""

    state = param.ClassSelector(class_=AppState, doc="The session state.")
    group_type = param.Selector(
        default=ALL_TYPES, objects=[ALL_TYPES], doc="Only list groups of this type."
    )
    group_id = param.Integer(default=None, allow_None=True, doc="The opened group (None: none).")
    offset = param.Integer(default=0, bounds=(0, None), doc="First call shown of the group.")
    groups_offset = param.Integer(default=0, bounds=(0, None), doc="First group listed.")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._cache = FrameCache(max_items=32)
        self._generation = 0
        self._started = False
        self._layout: pn.viewable.Viewable | None = None
        self._service = GroupService(self.state.services.engine)
        self._groups = pd.DataFrame(columns=GROUP_COLUMNS)
        self._group_total = 0
        self._listed_for: tuple[Any, ...] | None = None  # (type, filters) of the list shown
        self._calls = pd.DataFrame()
        self._size = 0
        self._compared = pd.DataFrame()
        self._opened: dict[str, Any] | None = None

        self._type = pn.widgets.Select.from_param(
            self.param.group_type, name="Type", width=200, css_classes=["sqllm-groups-type"]
        )
        self._message = pn.pane.Alert(
            "Loading…",
            alert_type="light",
            css_classes=["sqllm-groups-message"],
            sizing_mode="stretch_width",
        )
        self._table = pn.widgets.Tabulator(
            pd.DataFrame(columns=GROUP_COLUMNS),
            disabled=True,
            show_index=False,
            selectable=1,
            sizing_mode="stretch_width",
            height=300,
            layout="fit_data_fill",
            widths={
                "id": 60,
                "group_type": 100,
                "name": 220,
                "description": 240,
                "members": 90,
                "calls": 70,
                "failure_rate": 90,
                "total_tokens": 100,
                "cost_usd": 100,
                "latency_mean_ms": 130,
                "created_at": 150,
            },
            formatters=call_formatters() | {"failure_rate": percent_formatter()},
            titles={
                "group_type": "type",
                "failure_rate": "failed",
                "total_tokens": "tokens",
                "cost_usd": "cost (USD)",
                "latency_mean_ms": "mean latency",
            },
            css_classes=["sqllm-groups-table"],
        )
        self._table.on_click(self._on_group_click)
        self._groups_prev, self._groups_next, self._groups_label = pager(
            "sqllm-groups", self._on_groups_prev, self._on_groups_next
        )

        # The opened group
        self._header = pn.pane.HTML(
            "", sizing_mode="stretch_width", css_classes=["sqllm-group-header"]
        )
        self._stats = pn.FlexBox(css_classes=["sqllm-group-stats"], sizing_mode="stretch_width")
        self._calls_table = pn.widgets.Tabulator(
            pd.DataFrame(),
            disabled=True,
            show_index=False,
            selectable="checkbox",
            sizing_mode="stretch_width",
            height=380,
            layout="fit_data_fill",
            widths=CALL_WIDTHS | {"prompt": 300, "response": 340},
            formatters=call_formatters(),
            titles=CALL_TITLES,
            css_classes=["sqllm-group-calls"],
        )
        self._calls_table.on_click(self._on_call_click)
        self._prev, self._next, self._page_label = pager(
            "sqllm-group", self._on_prev, self._on_next, back="◀ Previous", forward="Next ▶"
        )
        self._call_detail = pn.pane.HTML(
            DETAIL_HINT,
            sizing_mode="stretch_width",
            stylesheets=[DETAIL_CSS],
            css_classes=["sqllm-group-call-detail"],
        )

        # Rename / describe
        self._name = pn.widgets.TextInput(
            name="Name", width=320, max_length=200, css_classes=["sqllm-group-name"]
        )
        self._description = pn.widgets.TextAreaInput(
            name="Description",
            height=80,
            sizing_mode="stretch_width",
            css_classes=["sqllm-group-description"],
        )
        self._save = pn.widgets.Button(
            name="Save name and description",
            button_type="primary",
            width=220,
            css_classes=["sqllm-group-save"],
        )
        self._save.on_click(self._on_save)
        self._edit_message = pn.pane.Markdown("", sizing_mode="stretch_width")

        # Label calls
        self._label_name = pn.widgets.TextInput(
            name="Label",
            placeholder="e.g. good answers",
            width=260,
            max_length=200,
            css_classes=["sqllm-label-name"],
        )
        self._label_ids = pn.widgets.TextInput(
            name="…and/or call ids",
            placeholder="e.g. 12, 15, 40",
            width=260,
            css_classes=["sqllm-label-ids"],
        )
        self._label_button = pn.widgets.Button(
            name="Add ticked calls to label",
            button_type="success",
            width=220,
            align="end",
            css_classes=["sqllm-label-button"],
        )
        self._label_button.on_click(self._on_label)
        self._label_message = pn.pane.Markdown("", sizing_mode="stretch_width")

        # Compare
        self._compare_a = pn.widgets.Select(
            name="Group A", width=300, css_classes=["sqllm-compare-a"]
        )
        self._compare_b = pn.widgets.Select(
            name="Group B", width=300, css_classes=["sqllm-compare-b"]
        )
        self._compare_button = pn.widgets.Button(
            name="Compare",
            button_type="primary",
            width=120,
            align="end",
            css_classes=["sqllm-compare-button"],
        )
        self._compare_button.on_click(self._on_compare)
        self._compare_table = pn.widgets.Tabulator(
            pd.DataFrame(), disabled=True, show_index=False, sizing_mode="stretch_width"
        )
        self._compare_charts = pn.FlexBox(sizing_mode="stretch_width")
        self._compare_box = pn.Column(
            self._compare_table,
            self._compare_charts,
            download_buttons(lambda: self._compared, "group-comparison"),
            visible=False,
            sizing_mode="stretch_width",
            css_classes=["sqllm-group-compare"],
        )

        self._detail = pn.Column(
            self._header,
            self._stats,
            pn.Row(self._prev, self._next, self._page_label),
            self._calls_table,
            download_buttons(self._group_calls_frame, "group-calls"),
            pn.Card(
                pn.Row(self._name, pn.Column(pn.Spacer(height=20), self._save)),
                self._description,
                self._edit_message,
                title="Rename / describe",
                collapsed=False,
                sizing_mode="stretch_width",
            ),
            pn.pane.Markdown("#### Selected call"),
            self._call_detail,
            visible=False,
            sizing_mode="stretch_width",
            css_classes=["sqllm-group-detail"],
        )

        refresh = self.state.when_shown("Groups", self._on_state)
        self.state.param.watch(
            refresh, ["start", "end", "providers", "models", "status", "group_id", "version"]
        )
        self.param.watch(refresh, ["group_type"])

    # --- the list ------------------------------------------------------------------------

    async def _on_state(self) -> None:
        if self._started:
            await self.refresh()

    async def refresh(self) -> None:
        """Reload the list (and the opened group) for the current filters and type."""
        self._generation += 1
        generation = self._generation
        filters, version = self.state.filters(), self.state.version
        group_type = None if self.group_type == ALL_TYPES else self.group_type
        if self._listed_for != (group_type, filters):
            self.groups_offset = 0  # another type or filters: from the newest group again
        offset = self.groups_offset
        study = self.state.study
        try:
            groups, total, types, choices = await asyncio.gather(
                self._cache.fetch(
                    ("groups", group_type, filters, offset, version),
                    lambda: self.state.read(
                        study.groups, group_type, filters, limit=GROUPS_PAGE, offset=offset
                    ),
                ),
                self._cache.fetch(
                    ("count", group_type, filters, version),
                    lambda: self.state.read(study.group_count, group_type, filters),
                ),
                self._cache.fetch(("types", version), lambda: self.state.read(study.group_types)),
                self._cache.fetch(
                    ("choices", version), lambda: self.state.read(study.group_choices)
                ),
            )
        except QUERY_ERRORS as exc:
            log.warning("groups query failed: %s", exc, exc_info=True)
            if generation == self._generation:
                self._message.param.update(
                    object=f"Could not load groups: {md_text(describe_error(exc))}",
                    alert_type="danger",
                    visible=True,
                )
            return
        if generation != self._generation:
            return
        self._listed_for = (group_type, filters)
        choices_of_type = [ALL_TYPES, *types]
        if list(self._type.options) != choices_of_type:
            # Only when they change: replacing a select's options redraws it in the page,
            # which can swallow a choice the user is making at that moment.
            self.param.group_type.objects = choices_of_type
            self._type.options = choices_of_type
        self._groups = groups
        self._group_total = total
        table = display_times(groups[GROUP_COLUMNS])
        self._table.param.update(
            value=table, selection=[], height=min(320, 42 + 31 * max(len(table), 1))
        )
        last = offset + len(groups)
        self._groups_label.object = (
            f"Groups {offset + 1:,}–{last:,} of {total:,} (newest first)" if len(groups) else ""
        )
        self._groups_prev.disabled = offset == 0
        self._groups_next.disabled = last >= total
        if groups.empty:
            self._message.param.update(
                object=(
                    "**No groups yet.** Batches, sweeps and chats make groups as they run; "
                    "you can also label calls by id below."
                    if group_type is None and filters.group_id is None
                    else "No groups of this type (or in the chosen group filter)."
                ),
                alert_type="info",
                visible=True,
            )
        else:
            self._message.visible = False
        options = {f"{r.group_type}: {r.name} (#{r.id})": int(r.id) for r in choices.itertuples()}
        for select, pick in ((self._compare_a, 0), (self._compare_b, 1)):
            keep = select.value if select.value in options.values() else None
            select.options = options
            if keep is None and len(options) > pick:
                keep = list(options.values())[pick]
            select.value = keep
        if self.group_id is not None:
            await self._load_group()

    async def _on_groups_prev(self, _event: Any = None) -> None:
        self.groups_offset = max(0, self.groups_offset - GROUPS_PAGE)
        await self.refresh()

    async def _on_groups_next(self, _event: Any = None) -> None:
        if self.groups_offset + GROUPS_PAGE < self._group_total:
            self.groups_offset += GROUPS_PAGE
            await self.refresh()

    async def _on_group_click(self, event: Any) -> None:
        if event.row is None or not 0 <= event.row < len(self._groups):
            return
        await self.open_group(int(self._groups.iloc[event.row]["id"]))

    async def open_group(self, group_id: int) -> None:
        """Show one group: header, statistics and its calls from the start."""
        self.group_id = group_id
        self.offset = 0
        self._call_detail.object = DETAIL_HINT
        self._edit_message.object = ""
        await self._load_group(reset_form=True)

    # --- the opened group ----------------------------------------------------------------

    async def _load_group(self, reset_form: bool = False) -> None:
        group_id, offset = self.group_id, self.offset
        if group_id is None:
            return
        filters, version = self.state.filters(), self.state.version
        stats_filters = replace(filters, group_id=group_id)
        study = self.state.study
        try:
            listed = await self.state.read(study.groups, None, replace(filters, group_id=group_id))
            if listed.empty:
                self.group_id = None
                self._detail.visible = False
                notify_text("That group no longer exists.", "warning")
                return
            summary, calls, size = await asyncio.gather(
                self._cache.fetch(
                    ("summary", stats_filters, version),
                    lambda: self.state.read(study.summary, stats_filters),
                ),
                self._cache.fetch(
                    ("calls", group_id, offset, version),
                    lambda: self.state.read(study.group_calls, group_id, PAGE_SIZE, offset),
                ),
                self._cache.fetch(
                    ("size", group_id, version), lambda: self.state.read(study.group_size, group_id)
                ),
            )
        except QUERY_ERRORS as exc:
            notify_text(f"Could not open the group: {describe_error(exc)}", "error")
            return
        if (group_id, offset) != (self.group_id, self.offset):
            return  # another group or page was asked for meanwhile
        group = listed.iloc[0].to_dict()
        self._opened = group
        description = group.get("description")
        narrowed = "" if filters == type(filters)() else " (statistics: calls matching the filters)"
        self._header.object = (
            f"<h3>{escape(group['group_type'])}: {escape(group['name'])}</h3>"
            f"<p>{escape(description) if description else '<i>no description</i>'}</p>"
            f"<p>{group['members']:,} calls{escape(narrowed)} · created "
            f"{escape(pd.Timestamp(group['created_at']).strftime('%Y-%m-%d %H:%M'))} UTC</p>"
        )
        self._stats.objects = summary_cards(summary)
        self._calls = calls
        self._size = size
        self._calls_table.param.update(
            value=display_times(calls),
            selection=[],
            height=min(420, 42 + 31 * max(len(calls), 1)),
        )
        last = offset + len(calls)
        self._page_label.object = (
            f"Calls {offset + 1:,}–{last:,} of {size:,} (in order)" if len(calls) else "No calls"
        )
        self._prev.disabled = offset == 0
        self._next.disabled = last >= size
        if reset_form:
            self._name.value = group["name"]
            self._description.value = description or ""
        self._detail.visible = True

    async def _on_prev(self, _event: Any = None) -> None:
        self.offset = max(0, self.offset - PAGE_SIZE)
        await self._load_group()

    async def _on_next(self, _event: Any = None) -> None:
        if self.offset + PAGE_SIZE < self._size:
            self.offset += PAGE_SIZE
            await self._load_group()

    async def _on_call_click(self, event: Any) -> None:
        if event.column == "_selection" or event.row is None:
            return
        if not 0 <= event.row < len(self._calls):
            return
        call_id = int(self._calls.iloc[event.row]["id"])
        try:
            record = await self.state.read(self.state.study.call, call_id)
        except QUERY_ERRORS as exc:
            notify_text(f"Could not load call {call_id}: {describe_error(exc)}", "error")
            return
        self._call_detail.object = call_detail_html(record)

    async def _group_calls_frame(self) -> pd.DataFrame:
        if self.group_id is None:
            return pd.DataFrame()
        return await self.state.read(self.state.study.group_calls, self.group_id, 1_000_000)

    # --- writes --------------------------------------------------------------------------

    async def _on_save(self, _event: Any = None) -> None:
        group = self._opened
        if group is None:
            return
        name = self._name.value_input or self._name.value or ""
        description = self._description.value_input
        if description is None:
            description = self._description.value or ""
        self._save.loading = True
        try:
            if " ".join(name.split()) != group["name"]:
                await asyncio.to_thread(self._service.rename, group["id"], name)
            if (description.strip() or None) != (group.get("description") or None):
                await asyncio.to_thread(self._service.describe, group["id"], description)
        except (GroupExistsError, GroupNotFoundError, ValueError, LookupError) as exc:
            self._edit_message.object = f"⚠ {md_text(describe_error(exc))}"
            notify_text(describe_error(exc), "error")
            return
        except QUERY_ERRORS as exc:
            notify_text(f"Could not save: {describe_error(exc)}", "error")
            return
        finally:
            self._save.loading = False
        self._edit_message.object = "Saved."
        notify_text("Group saved.", "success")
        self._opened = None
        await self._after_write(reset_form=True)

    async def _on_label(self, _event: Any = None) -> None:
        ticked = [
            int(self._calls.iloc[i]["id"])
            for i in (self._calls_table.selection or [])
            if 0 <= i < len(self._calls)
        ]
        try:
            typed = parse_ids(self._label_ids.value_input or self._label_ids.value or "")
        except ValueError as exc:
            self._label_message.object = f"⚠ {md_text(describe_error(exc))}"
            return
        ids = list(dict.fromkeys(ticked + typed))
        name = self._label_name.value_input or self._label_name.value or ""
        if not ids:
            self._label_message.object = (
                "⚠ Tick calls in the opened group's table, or type call ids, first."
            )
            return
        self._label_button.loading = True
        try:
            done = await asyncio.to_thread(self._service.label, name, ids)
        except (ValueError, LookupError) as exc:
            self._label_message.object = f"⚠ {md_text(describe_error(exc))}"
            notify_text(describe_error(exc), "error")
            return
        except QUERY_ERRORS as exc:
            notify_text(f"Could not label: {describe_error(exc)}", "error")
            return
        finally:
            self._label_button.loading = False
        already = f" ({done.already} already had it)" if done.already else ""
        self._label_message.object = (
            f"Added {done.added} call{'s' if done.added != 1 else ''} to label "
            f"**{md_text(done.name)}**{already}."
        )
        notify_text(f"Labelled {done.added} call(s) '{done.name}'.", "success")
        self._label_ids.value = ""
        await self._after_write()

    async def _after_write(self, reset_form: bool = False) -> None:
        self._cache.clear()
        self.state.recorded()  # other tabs and the sidebar re-read; our watcher refreshes
        if reset_form and self.group_id is not None:
            await self._load_group(reset_form=True)

    # --- compare -------------------------------------------------------------------------

    async def _on_compare(self, _event: Any = None) -> None:
        a, b = self._compare_a.value, self._compare_b.value
        if a is None or b is None:
            notify_text("Choose two groups to compare.", "warning")
            return
        if a == b:
            notify_text("Choose two different groups.", "warning")
            return
        filters = self.state.filters()
        self._compare_button.loading = True
        try:
            frame = await self.state.read(self.state.study.compare_groups, [a, b], filters)
        except QUERY_ERRORS as exc:
            notify_text(f"Could not compare: {describe_error(exc)}", "error")
            return
        finally:
            self._compare_button.loading = False
        self._show_compare(frame)

    def _show_compare(self, frame: pd.DataFrame) -> None:
        self._compared = frame
        if len(frame) < 2:
            notify_text("One of those groups no longer exists.", "warning")
            return
        letters = [f"{letter} (#{i})" for letter, i in zip("AB", frame["group_id"], strict=False)]
        names = [f"{t}: {n}" for t, n in zip(frame["group_type"], frame["group"], strict=True)]
        # Column titles of a Tabulator are HTML: escape the user's group names.
        columns = [escape(f"{letter} {name}") for letter, name in zip(letters, names, strict=True)]
        rows = []
        for key, label, fmt in COMPARE_ROWS:
            rows.append(
                {"statistic": label}
                | {c: _fmt(v, fmt) for c, v in zip(columns, frame[key], strict=True)}
            )
        self._compare_table.value = pd.DataFrame(rows, columns=["statistic", *columns])
        import hvplot.pandas  # noqa: F401  (registers .hvplot on frames; loaded on first use)

        data = escaped(frame.assign(group_label=letters, name=names), ["name"])
        charts = []
        for column, title, scale in COMPARE_METRICS:
            chart = data.assign(value=data[column].astype(float) * scale).hvplot.bar(
                x="group_label",
                y="value",
                title=title,
                height=CHART_HEIGHT - 40,
                width=220,
                xlabel="",
                ylabel="",
                color="group_label",
                cmap=["#1f77b4", "#ff7f0e"],
                hover_cols=["name", "calls"],
                legend=False,
            )
            charts.append(pn.pane.HoloViews(chart, height=CHART_HEIGHT - 20, width=230))
        self._compare_charts.objects = charts
        self._compare_box.visible = True

    # --- layout --------------------------------------------------------------------------

    @param.depends()  # lazy: built (and first queried) when the tab is first shown
    def __panel__(self) -> pn.viewable.Viewable:
        if self._layout is None:
            self._layout = pn.Column(
                pn.Row(
                    self._type,
                    pn.pane.Markdown(
                        "Statistics cover the calls that match the sidebar filters; "
                        "*members* counts every call. Click a group to open it.",
                        margin=(22, 10),
                    ),
                ),
                self._message,
                self._table,
                pn.Row(self._groups_prev, self._groups_next, self._groups_label),
                download_buttons(lambda: self._groups, "groups"),
                self._detail,
                pn.pane.Markdown("### Label calls"),
                pn.pane.Markdown(
                    "Tick calls in the opened group's table and/or type call ids; they are "
                    "added to the `label` group of that name (created if new)."
                ),
                pn.Row(self._label_name, self._label_ids, self._label_button),
                self._label_message,
                pn.pane.Markdown("### Compare two groups"),
                pn.Row(self._compare_a, self._compare_b, self._compare_button),
                self._compare_box,
                sizing_mode="stretch_width",
                css_classes=["sqllm-groups"],
            )
        if not self._started:
            self._started = True
            pn.state.execute(self.refresh)
        return self._layout
