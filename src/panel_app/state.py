"""Per-session state: the services, the global filters and a refresh signal for every tab."""

from __future__ import annotations

import asyncio
import html
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import panel as pn
import param

from study_query_llm.db.filters import CallFilters
from study_query_llm.services.study import StudyService

log = logging.getLogger(__name__)
T = TypeVar("T")

STATUSES = ["(any)", "success", "failed", "timeout", "cancelled"]


class AppState(param.Parameterized):
    """What one browser session shares between its tabs. Never shared between sessions."""

    services = param.Parameter(doc="The session's Services (inference, batches, ...).")
    study = param.ClassSelector(class_=StudyService, doc="Read-side queries as frames.")

    start = param.Date(default=None, allow_None=True, doc="Only calls at or after this time.")
    end = param.Date(default=None, allow_None=True, doc="Only calls before this time.")
    providers = param.List(default=[], item_type=str, doc="Only these providers (empty: all).")
    models = param.List(default=[], item_type=str, doc="Only these models (empty: all).")
    status = param.Selector(default="(any)", objects=STATUSES, doc="Only calls in this state.")
    group_id = param.Integer(default=None, allow_None=True, doc="Only calls of this group.")

    version = param.Integer(default=0, doc="Bumped whenever new calls are recorded.")
    active_tab = param.String(default="", doc="Title of the dashboard tab in view.")

    def showing(self, title: str) -> bool:
        """Whether the tab `title` is in view (tabs redraw only then; see `when_shown`)."""
        return self.active_tab == title

    def when_shown(self, title: str, refresh: Callable[[], Any]) -> Callable[[], Any]:
        """A trigger for `refresh` that waits until the tab `title` is in view.

        A pane changed while its tab is hidden has no page to attach its stylesheets to
        (Panel then points them at a CDN), and nobody sees the change anyway: a hidden tab
        only remembers that it is stale and refreshes when it is shown again.
        """
        stale = [False]

        async def trigger(*_events: Any) -> None:
            if self.showing(title):
                stale[0] = False
                result = refresh()
                if asyncio.iscoroutine(result):
                    await result
            else:
                stale[0] = True

        async def on_tab(event: Any) -> None:
            if event.new == title and stale[0]:
                await trigger()

        self.param.watch(on_tab, "active_tab")
        return trigger

    @param.depends("start", "end", "providers", "models", "status", "group_id")
    def filters(self) -> CallFilters:
        """The global filters as the library's filter object."""
        return CallFilters(
            start=self.start if isinstance(self.start, datetime) else None,
            end=self.end if isinstance(self.end, datetime) else None,
            providers=tuple(self.providers),
            models=tuple(self.models),
            status=None if self.status == "(any)" else self.status,
            group_id=self.group_id,
        )

    def recorded(self) -> None:
        """Tell every tab that the record changed (a run, a batch item, a label...)."""
        self.version += 1

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking database work off the server's event loop."""
        return await asyncio.to_thread(fn, *args, **kwargs)


def notify(message: str, level: str = "info", duration: int = 6000) -> None:
    """A toast notification (no traceback, ever)."""
    notifications = pn.state.notifications
    if notifications is None:
        log.info("%s: %s", level, message)
        return
    # Toasts render HTML: the message may quote a provider's error (and so user text).
    getattr(notifications, level if level in ("info", "success", "warning", "error") else "info")(
        html.escape(message, quote=True), duration=duration
    )


def describe_error(exc: BaseException) -> str:
    """One human line for an error shown in the UI (never a traceback)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
