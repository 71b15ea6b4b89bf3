"""Builds one dashboard page per browser session: sidebar filters shared by every tab."""

from __future__ import annotations

import importlib
import logging
from datetime import datetime

import panel as pn
from panel.theme import fast as fast_theme

from study_query_llm.config import Settings, get_settings
from study_query_llm.services.context import build_services
from study_query_llm.services.study import StudyService

from .safe import escape
from .state import STATUSES, AppState, describe_error, notify

log = logging.getLogger(__name__)


class OfflineFast(fast_theme.Fast):
    """Panel's Fast design without its web-font download (every resource is served locally).

    Resource paths are derived from the class name, so the subclass keeps the name "Fast".
    """

    _resources = {k: v for k, v in fast_theme.Fast._resources.items() if k != "font"}


OfflineFast.__name__ = OfflineFast.__qualname__ = "Fast"


# (tab title, module under panel_app.views, Viewer class). Tabs load when first opened.
TABS: list[tuple[str, str, str]] = [
    ("Run", "inference", "RunView"),
    ("Batch", "batch", "BatchView"),
    ("Chat", "chat", "ChatView"),
    ("Analytics", "analytics", "AnalyticsView"),
    ("Search", "search", "SearchView"),
    ("Groups", "groups", "GroupsView"),
    ("Embeddings", "embeddings", "EmbeddingsView"),
    ("Providers", "providers", "ProvidersView"),
]

CSS = """
.sqllm-text { white-space: pre-wrap; word-break: break-word; font-family: inherit;
              margin: 0; background: transparent; }
mark { background: #ffe58a; padding: 0 1px; }
"""


def _build_view(state: AppState, module: str, cls: str):
    try:
        view_cls = getattr(importlib.import_module(f"panel_app.views.{module}"), cls)
        return view_cls(state=state)
    except Exception as exc:
        log.exception("tab %s failed to build", cls)
        return pn.pane.Alert(
            f"This tab could not be shown: {escape(describe_error(exc))}", alert_type="danger"
        )


def _prepare_analytics(study: StudyService) -> None:
    """The Analytics tab's default view, computed once per process when the rollup cache
    is read (a broken view module is reported when its tab is built, not here)."""
    from .views.analytics import prepare_default_view

    prepare_default_view(study)


def _choices(values: list[str]) -> dict[str, str]:
    """Widget options whose labels are escaped: the choices widget renders labels as HTML."""
    return {escape(value): value for value in values}


ALL_GROUPS = 0  # the Group filter's "(all)" choice; group ids start at 1


def _group_choices(groups) -> dict[str, int]:
    # A Select shows labels as plain text (no escaping needed, unlike MultiChoice). Its
    # "(all)" value is 0, not None: a Select shows a None value as a blank box.
    return {"(all)": ALL_GROUPS} | {
        f"{row.group_type}: {row.name}": int(row.id) for row in groups.itertuples()
    }


def _sidebar(state: AppState) -> pn.Column:
    """The global filters. Their choices load off the event loop once the page is open."""
    dates = pn.widgets.DatetimeRangeInput(name="Time range (UTC)", value=(None, None), width=260)
    providers = pn.widgets.MultiChoice(
        name="Providers", options={}, placeholder="all", width=260, css_classes=["sqllm-f-prov"]
    )
    models = pn.widgets.MultiChoice(
        name="Models", options={}, placeholder="all", width=260, css_classes=["sqllm-f-models"]
    )
    status = pn.widgets.Select(name="Status", options=STATUSES, width=260)
    group = pn.widgets.Select(
        name="Group",
        options={"(all)": ALL_GROUPS},
        value=ALL_GROUPS,
        width=260,
        css_classes=["sqllm-f-group"],
    )
    refresh = pn.widgets.Button(name="Refresh choices", width=260)

    def apply_dates(event) -> None:
        start, end = event.new if event.new else (None, None)
        state.param.update(
            start=start if isinstance(start, datetime) else None,
            end=end if isinstance(end, datetime) else None,
        )

    def apply_group(event) -> None:
        state.group_id = event.new or None

    dates.param.watch(apply_dates, "value")
    providers.link(state, value="providers")
    models.link(state, value="models")
    status.link(state, value="status")
    group.param.watch(apply_group, "value")

    async def reload(_event=None) -> None:
        try:
            new_facets = await state.read(state.study.facets)
            new_groups = await state.read(state.study.group_choices)
        except Exception as exc:  # the filters stay usable with the choices they have
            log.warning("could not load filter choices: %s", exc)
            notify(f"Could not load filter choices: {describe_error(exc)}", "error")
            return
        providers.options = _choices(new_facets["providers"])
        models.options = _choices(new_facets["models"])
        chosen = group.value
        group.options = _group_choices(new_groups)
        if chosen not in group.options.values():
            group.value = ALL_GROUPS

    refresh.on_click(reload)
    state.param.watch(lambda _e: pn.state.execute(reload), "version")
    if pn.state.curdoc is not None:
        pn.state.onload(reload)
    return pn.Column(
        pn.pane.Markdown("### Filters\nApplied to every tab."),
        dates,
        providers,
        models,
        status,
        group,
        refresh,
    )


def create_app(settings: Settings | None = None) -> pn.template.FastListTemplate:
    """A fresh page with its own state and services (one per browser session)."""
    settings = settings or get_settings()
    services = build_services(settings, migrate_first=False)
    study = StudyService(services.engine, prepare=_prepare_analytics)
    state = AppState(services=services, study=study)

    def close(_context) -> None:
        pn.state.execute(services.aclose)

    if pn.state.curdoc is not None:
        pn.state.on_session_destroyed(close)

    tabs = pn.Tabs(dynamic=True, sizing_mode="stretch_width")
    for title, module, cls in TABS:
        tabs.append((title, _build_view(state, module, cls)))
    state.active_tab = TABS[0][0]

    def on_active(event) -> None:
        state.active_tab = TABS[event.new][0]

    tabs.param.watch(on_active, "active")

    template = pn.template.FastListTemplate(
        title="Study Query LLM",
        sidebar=[_sidebar(state)],
        main=[tabs],
        header_background="#2f4f6f",
        raw_css=[CSS],
        sidebar_width=300,
        # System fonts: the page must not fetch anything from the internet (offline labs).
        design=OfflineFast,
        font="-apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif",
        font_url="",
    )
    return template
