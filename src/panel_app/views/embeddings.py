"""Embeddings tab: the chosen groups' texts embedded, mapped to 2-D, and searched by similarity.

A person picks one or more groups, an embedding provider and model, and whether to embed
the calls' responses or prompts. "Compute" asks `StudyService.missing_embeddings` which of
the groups' calls (narrowed by the sidebar filters) have no stored vector yet, embeds only
those in chunks through `EmbeddingService` with a progress bar, then reads the map in one
query (`StudyService.embedding_map`: stored vectors projected by PCA, or UMAP when
installed) and draws a scatter coloured by provider/model or by group, with the escaped
text in the hover. "Find similar" embeds a typed text with the same model and lists the
nearest calls of the same groups (`StudyService.neighbours`).

CSS hooks (stable, for UI tests):
- ``sqllm-embed-group``: the group picker;
- ``sqllm-embed-provider``, ``sqllm-embed-model``: the embedding provider and model;
- ``sqllm-embed-text``: which text to embed (Responses / Prompts);
- ``sqllm-embed-compute``: the Compute button;
- ``sqllm-embed-progress``: the progress bar;
- ``sqllm-embed-status``: the line saying what was embedded (and how much came from cache);
- ``sqllm-embed-plot``: the scatter (or the note shown before there is one);
- ``sqllm-similar-input``: the "find similar" text box;
- ``sqllm-similar-results``: the nearest calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import logging
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import panel as pn
import param
from sqlalchemy.exc import SQLAlchemyError

from study_query_llm.db.filters import CallFilters
from study_query_llm.providers import ProviderError
from study_query_llm.providers.local_minilm import MODEL_ID as MINILM_MODEL
from study_query_llm.providers.registry import ProviderSpec, supporting
from study_query_llm.services.recorder import RecordingError

from ..export import download_buttons
from ..safe import escape
from ..state import AppState, describe_error, notify

log = logging.getLogger(__name__)

# Models to offer first for providers whose default model is a chat model (or none).
EMBEDDING_MODELS = {"mock": "mock-embed", "local-minilm": MINILM_MODEL}
MAX_CALLS = 2000  # calls on one map (all groups together), newest first
CHUNK = 50  # texts embedded per step of the progress bar
PREVIEW_CHARS = 200
USER_ERRORS = (ProviderError, ValueError, LookupError, RecordingError, SQLAlchemyError)
COLOUR_CHOICES = ["provider / model", "group"]
# The results pane renders in its own shadow root: page-wide CSS does not reach it.
RESULTS_CSS = """
table { width: 100%; border-collapse: collapse; font-size: 0.92em; }
th, td { text-align: left; vertical-align: top; padding: 4px 8px;
         border-bottom: 1px solid #e2e2e2; }
td.num { text-align: right; white-space: nowrap; }
td.text { white-space: pre-wrap; word-break: break-word; }
"""


def embedding_model(spec: ProviderSpec, settings: Any) -> str:
    """The model to suggest for a provider: its embedding model if known, else its default."""
    return EMBEDDING_MODELS.get(spec.id) or spec.default_model(settings) or ""


def provider_label(provider: str) -> str:
    """A provider name as shown on the page: mock records are labelled as such."""
    return f"{provider} (mock)" if provider.startswith("mock") else provider


def preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    """One line of at most `limit` characters (not escaped)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class MapQuery:
    """What a computed map shows: the same arguments find its similar calls."""

    filters: CallFilters
    groups: tuple[int, ...]
    provider: str
    model: str
    text: str  # "response" or "prompt"

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments for `StudyService.embedding_map` / `neighbours`."""
        return {"groups": self.groups, "text": self.text, "provider": self.provider}


def _warm_up_projection() -> None:
    """Import scikit-learn's PCA ahead of the first map (a slow first import)."""
    with contextlib.suppress(ImportError):  # the map reports it when it is drawn
        importlib.import_module("sklearn.decomposition")


class EmbeddingsView(pn.viewable.Viewer):
    """Embeds a group's texts, draws the 2-D map, and finds calls similar to a typed text."""

    state = param.ClassSelector(class_=AppState, doc="The session state.")

    points = param.DataFrame(
        default=None,
        allow_None=True,
        doc="The computed map (`StudyService.embedding_map`): one row per embedded call "
        "and group (call_id, x, y, group, provider, model, text...). None until Compute "
        "has run.",
    )
    colour_by = param.Selector(
        default=COLOUR_CHOICES[0],
        objects=COLOUR_CHOICES,
        doc="What the scatter's colours stand for.",
    )
    stale = param.Boolean(
        default=False, doc="The filters or the record changed since the map was computed."
    )
    busy = param.Boolean(default=False, doc="A Compute is running.")

    def __init__(self, **params):
        super().__init__(**params)
        settings = self.state.services.settings
        self._specs = {spec.id: spec for spec in supporting("embeddings", settings)}
        self._query: MapQuery | None = None  # what the current map shows
        self._extra: dict[int, list[float]] = {}  # vectors computed for the current map
        self._loaded = False
        self._warm_up: asyncio.Future[None] | None = None
        self._own_version: int | None = None  # a version bump this view made itself
        self._new_calls = 0  # embedding calls recorded by the Compute under way

        self._groups = pn.widgets.MultiChoice(
            name="Groups",
            options={},
            placeholder="choose one or more groups",
            css_classes=["sqllm-embed-group"],
            sizing_mode="stretch_width",
            min_width=300,
        )
        self._provider = pn.widgets.Select(
            name="Embedding provider",
            options={provider_label(pid): pid for pid in self._specs},
            width=220,
            css_classes=["sqllm-embed-provider"],
        )
        first = next(iter(self._specs.values()))
        self._model = pn.widgets.TextInput(
            name="Model",
            value=embedding_model(first, settings),
            width=220,
            css_classes=["sqllm-embed-model"],
        )
        self._provider.param.watch(self._on_provider, "value")
        self._which = pn.widgets.RadioButtonGroup(
            name="Text to embed",
            options={"Responses": "response", "Prompts": "prompt"},
            value="response",
            button_type="primary",
            button_style="outline",
            css_classes=["sqllm-embed-text"],
        )
        methods = ["PCA"] + (["UMAP"] if importlib.util.find_spec("umap") else [])
        self._method = pn.widgets.Select(name="Projection", options=methods, width=120)
        self._method.param.watch(self._on_method, "value")
        self._compute = pn.widgets.Button(
            name="Compute", button_type="primary", width=140, css_classes=["sqllm-embed-compute"]
        )
        self._compute.on_click(self._on_compute)
        self._progress = pn.indicators.Progress(
            value=0, max=100, sizing_mode="stretch_width", css_classes=["sqllm-embed-progress"]
        )
        self._status = pn.pane.HTML(
            "Choose a group and press Compute.",
            sizing_mode="stretch_width",
            css_classes=["sqllm-embed-status"],
        )
        self._colour = pn.widgets.RadioButtonGroup.from_param(
            self.param.colour_by, name="Colour by", button_type="primary", button_style="outline"
        )
        self._query_input = pn.widgets.TextInput(
            name="Find similar",
            placeholder="type a text and press Enter",
            css_classes=["sqllm-similar-input"],
            sizing_mode="stretch_width",
        )
        self._query_input.param.watch(self._on_find, "enter_pressed")
        self._k = pn.widgets.IntInput(name="Neighbours", value=10, start=1, end=100, width=100)
        self._find = pn.widgets.Button(name="Find similar", width=140)
        self._find.on_click(self._on_find)
        self._hits = pd.DataFrame()  # the last "find similar" answer, for its export
        self._results = pn.pane.HTML(
            "",
            sizing_mode="stretch_width",
            css_classes=["sqllm-similar-results"],
            stylesheets=[RESULTS_CSS],
        )

    # --- loading and refreshing --------------------------------------------------------

    async def _load_groups(self) -> None:
        """(Re)read the groups for the picker, keeping the current choice where possible."""
        try:
            frame = await self.state.read(self.state.study.group_choices, members=True)
        except USER_ERRORS as exc:
            notify(f"Could not read the groups: {describe_error(exc)}", "error")
            return
        # Labels are escaped: the picker renders option labels as HTML.
        options = {
            escape(f"{row.group_type}: {row.name} ({row.members})"): int(row.id)
            for row in frame.itertuples()
        }
        chosen = [g for g in self._groups.value if g in options.values()]
        if not chosen and self.state.group_id in options.values():
            chosen = [self.state.group_id]
        self._groups.param.update(options=options, value=chosen)

    def _recorded(self) -> None:
        """Tell the other tabs about new embedding calls, without staling this map: those
        calls are not members of the groups it shows."""
        self._own_version = self.state.version + 1
        self.state.recorded()

    @param.depends("state.version", watch=True)
    async def _on_version(self) -> None:
        if not self._loaded:
            return
        if self.points is not None and self.state.version != self._own_version:
            self.stale = True
        await self._load_groups()

    @param.depends(
        "state.start",
        "state.end",
        "state.providers",
        "state.models",
        "state.status",
        "state.group_id",
        watch=True,
    )
    def _on_filters(self) -> None:
        if self.points is not None:
            self.stale = True
        group_id = self.state.group_id
        if not self._groups.value and group_id in self._groups.options.values():
            self._groups.value = [group_id]

    def _on_provider(self, event) -> None:
        spec = self._specs.get(event.new)
        if spec is not None:
            self._model.value = embedding_model(spec, self.state.services.settings)

    # --- compute -----------------------------------------------------------------------

    def _show_progress(self, percent: int, message: str) -> None:
        """Set the bar (0..100) and the status line (HTML: escape what goes in it)."""
        self._progress.value = percent
        self._status.object = message

    async def _on_compute(self, _event=None) -> None:
        if self.busy:
            return
        group_ids = [int(g) for g in self._groups.value]
        provider = self._provider.value
        model = (self._model.value_input or self._model.value or "").strip()
        which = self._which.value
        if not group_ids:
            notify("Choose at least one group to embed.", "warning")
            return
        if not provider or not model:
            notify("Choose an embedding provider and model.", "warning")
            return
        self.busy = True
        self._new_calls = 0
        self._compute.loading = True
        self._show_progress(0, "Reading the groups' calls…")
        try:
            await self._compute_map(group_ids, provider, model, which)
        except USER_ERRORS as exc:
            self._status.object = f"Stopped: {escape(describe_error(exc))}"
            notify(describe_error(exc), "error")
        except Exception as exc:  # never a traceback on the page
            log.exception("embedding the groups failed")
            self._status.object = f"Stopped: {escape(describe_error(exc))}"
            notify(f"Embedding failed: {describe_error(exc)}", "error")
        finally:
            self._compute.loading = False
            self.busy = False
            if self._new_calls:  # last: the other tabs re-query after this callback's work
                self._recorded()

    async def _compute_map(
        self, group_ids: list[int], provider: str, model: str, which: str
    ) -> None:
        study = self.state.study
        # The chosen groups take the place of the sidebar's group.
        query = MapQuery(
            replace(self.state.filters(), group_id=None), tuple(group_ids), provider, model, which
        )
        missing = await self.state.read(
            study.missing_embeddings,
            query.filters,
            model,
            limit=MAX_CALLS,
            **query.arguments(),
        )
        todo = [(int(c), str(t)) for c, t in zip(missing["call_id"], missing["text"], strict=True)]
        todo = [(call_id, text) for call_id, text in todo if text.strip()]
        extra: dict[int, list[float]] = {}
        fresh = 0
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start : start + CHUNK]
            results = await self.state.services.embeddings.embed(
                [text for _, text in chunk], provider=provider, model=model
            )
            for (call_id, _), result in zip(chunk, results, strict=True):
                extra[call_id] = result.vector
                fresh += int(not result.cached)
            self._new_calls = fresh
            done = start + len(chunk)
            # Embedding takes the bar to 90%; it reaches 100 when the map is drawn.
            self._show_progress(
                round(90 * done / len(todo)),
                f"Embedded {done} of {len(todo)} {which}s without a stored vector ({fresh} new)…",
            )
        self._show_progress(95, "Drawing the map…")
        frame = await self.state.read(
            study.embedding_map,
            query.filters,
            model,
            self._method.value.lower(),
            limit=MAX_CALLS,
            vectors=extra,
            **query.arguments(),
        )
        if frame.empty:
            message = f"No calls with a {which} in the chosen groups match the filters."
            self._show_progress(100, escape(message))
            notify(message, "warning")
            return
        calls = frame["call_id"].nunique()
        cached = max(calls - fresh, 0)
        self._query, self._extra = query, extra
        if len(group_ids) > 1:
            self.colour_by = "group"
        self.stale = False
        self.points = frame
        notes = ""
        if frame.attrs.get("truncated"):
            notes += f" (the newest {MAX_CALLS} calls)"
        left_out = int(frame.attrs.get("missing", 0))
        self._show_progress(
            100,
            f"Embedded {calls} {which}s with {escape(provider_label(provider))} / "
            f"{escape(model)}{notes}: {cached} from cache, {fresh} new."
            + (f" {left_out} calls without a usable {which} are left out." if left_out else ""),
        )

    async def _on_method(self, _event=None) -> None:
        query = self._query
        if self.points is None or query is None:
            return
        try:
            frame = await self.state.read(
                self.state.study.embedding_map,
                query.filters,
                query.model,
                self._method.value.lower(),
                limit=MAX_CALLS,
                vectors=self._extra,
                **query.arguments(),
            )
        except USER_ERRORS as exc:
            notify(describe_error(exc), "error")
            return
        self.points = frame

    # --- the map -----------------------------------------------------------------------

    @staticmethod
    def _has_map(points: pd.DataFrame | None) -> bool:
        return points is not None and not points.empty

    def _figure(self, points: pd.DataFrame | None, colour: str):
        """The scatter of the computed map (None before there is one). Hover text is the
        escaped preview of each call's text."""
        if not self._has_map(points):
            return None
        import hvplot.pandas  # noqa: F401  (registers .hvplot on frames)

        frame = pd.DataFrame(
            {
                "x": points["x"],
                "y": points["y"],
                "call": points["call_id"],
                "group": [escape(g) for g in points["group"]],
                "provider / model": [
                    escape(f"{provider_label(p)} / {m}")
                    for p, m in zip(points["provider"], points["model"], strict=True)
                ],
                "text": [escape(preview(t)) for t in points["text"]],
            }
        )
        hover = [c for c in ("call", "group", "provider / model", "text") if c != colour]
        return frame.hvplot.scatter(
            x="x",
            y="y",
            by=colour,
            hover_cols=hover,
            responsive=True,
            height=520,
            size=60,
            alpha=0.75,
            legend="right",
            xaxis=None,
            yaxis=None,
            title=f"{len(frame)} calls, coloured by {colour}",
        )

    def _map(self) -> pn.Column:
        """The map area. Its panes are made once and only updated: nothing new is built
        while the tab is hidden (a filter change only shows the "out of date" note)."""
        has_map = pn.bind(self._has_map, self.param.points)
        return pn.Column(
            pn.pane.Markdown(
                "No map yet: choose one or more groups, a model and press **Compute**.",
                visible=pn.bind(lambda points: not self._has_map(points), self.param.points),
                sizing_mode="stretch_width",
            ),
            pn.pane.Alert(
                "The filters or the record changed since this map was computed: "
                "press Compute to bring it up to date.",
                alert_type="info",
                visible=self.param.stale,
                sizing_mode="stretch_width",
            ),
            pn.pane.HoloViews(
                pn.bind(self._figure, self.param.points, self.param.colour_by),
                visible=has_map,
                sizing_mode="stretch_width",
                height=540,
            ),
            sizing_mode="stretch_width",
            css_classes=["sqllm-embed-plot"],
        )

    # --- find similar ------------------------------------------------------------------

    async def _on_find(self, _event=None) -> None:
        text = (self._query_input.value_input or self._query_input.value or "").strip()
        if not text:
            notify("Type a text to find similar calls.", "warning")
            return
        if self.busy:
            notify("Wait for Compute to finish, then search again.", "warning")
            return
        query = self._query
        if self.points is None or query is None:
            notify("Compute the map first: similar calls are searched in its groups.", "warning")
            return
        self._find.loading = True
        try:
            result = await self.state.services.embeddings.embed(
                [text], provider=query.provider, model=query.model
            )
            hits = await self.state.read(
                self.state.study.neighbours,
                query.filters,
                query.model,
                vector=result[0].vector,
                k=int(self._k.value),
                **query.arguments(),
            )
        except USER_ERRORS as exc:
            notify(describe_error(exc), "error")
            return
        except Exception as exc:  # never a traceback on the page
            log.exception("find similar failed")
            notify(f"Find similar failed: {describe_error(exc)}", "error")
            return
        finally:
            self._find.loading = False
        self._hits = hits
        self._results.object = self._results_html(text, hits)
        if not result[0].cached:
            self._recorded()

    @staticmethod
    def _results_html(text: str, hits: pd.DataFrame) -> str:
        if hits.empty:
            return "<p>No similar calls.</p>"
        rows = []
        for row in hits.itertuples():
            rows.append(
                "<tr>"
                f'<td class="num">{int(row.rank)}</td>'
                f'<td class="num">{float(row.similarity):.3f}</td>'
                f'<td class="num">{int(row.call_id)}</td>'
                f"<td>{escape(row.group or '')}</td>"
                f"<td>{escape(provider_label(row.provider))} / {escape(row.model)}</td>"
                f'<td class="text">{escape(preview(row.text, 400))}</td>'
                "</tr>"
            )
        return (
            f"<p>Calls most similar to <q>{escape(preview(text, 120))}</q>:</p>"
            "<table><thead><tr><th>#</th><th>similarity</th><th>call</th>"
            '<th style="width:18%">group</th><th style="width:16%">provider / model</th>'
            "<th>text</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
        )

    # --- layout ------------------------------------------------------------------------

    async def _open(self):
        """First render of the tab: read the groups, then show the layout."""
        if not self._loaded:
            self._loaded = True
            self._warm_up = asyncio.ensure_future(asyncio.to_thread(_warm_up_projection))
            await self._load_groups()
        return self._layout()

    def _points_frame(self) -> pd.DataFrame:
        """The map's points (coordinates, call, group, target, text) for export."""
        return self.points if self.points is not None else pd.DataFrame()

    def _layout(self) -> pn.Column:
        return pn.Column(
            pn.pane.Markdown("### Embeddings"),
            pn.Row(self._groups, sizing_mode="stretch_width"),
            pn.Row(self._provider, self._model, self._method, self._which),
            pn.Row(self._compute, self._colour),
            self._progress,
            self._status,
            self._map(),
            download_buttons(self._points_frame, "embedding-map"),
            pn.pane.Markdown("### Find similar"),
            pn.Row(self._query_input, self._k, self._find, sizing_mode="stretch_width"),
            self._results,
            download_buttons(lambda: self._hits, "similar-calls"),
            sizing_mode="stretch_width",
        )

    def __panel__(self):
        # Lazy: the groups are read when the tab is first shown, not when the page loads.
        return pn.panel(pn.bind(self._open), lazy=True, sizing_mode="stretch_width")
