"""Embeddings tab: the chosen groups' texts embedded, mapped to 2-D, and searched by similarity.

A person picks one or more groups, an embedding provider and model, and whether to embed
the calls' responses or prompts. "Compute" reads the groups' calls (narrowed by the sidebar
filters), embeds their texts in chunks through `EmbeddingService` (texts embedded before
come from its cache, free) with a progress bar, projects the vectors to 2-D
(`StudyService.project`: PCA, or UMAP when installed) and draws a scatter coloured by
provider/model or by group, with the escaped text in the hover. "Find similar" embeds a
typed text with the same model and lists the nearest calls (`StudyService.nearest`).

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

import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import replace
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
from study_query_llm.services.study import StudyService

from ..safe import escape
from ..state import AppState, describe_error, notify

log = logging.getLogger(__name__)

# Models to offer first for providers whose default model is a chat model (or none).
EMBEDDING_MODELS = {"mock": "mock-embed", "local-minilm": MINILM_MODEL}
MAX_CALLS = 2000  # calls read per Compute (all groups together)
PAGE = 500  # calls listed per database round trip
CHUNK = 50  # calls read and embedded per step of the progress bar
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


def member_ids(
    study: StudyService,
    filters: CallFilters,
    group_ids: Sequence[int],
    limit: int = MAX_CALLS,
) -> tuple[list[tuple[int, int]], bool]:
    """(group id, call id) of the groups' calls matching `filters`, newest first per group,
    at most `limit` in all; and whether some were left out. Blocking: run off the loop."""
    found: list[tuple[int, int]] = []
    for group_id in group_ids:
        after = None
        while True:
            page = study.recent_calls(replace(filters, group_id=group_id), limit=PAGE, after=after)
            for call_id in page.frame["id"]:
                if len(found) >= limit:
                    return found, True
                found.append((group_id, int(call_id)))
            after = page.next_cursor
            if after is None:
                break
    return found, False


def call_texts(
    study: StudyService, members: Sequence[tuple[int, int]], which: str
) -> list[dict[str, Any]]:
    """The full prompt or response text of each member call (chat calls with non-empty text
    only), with its provider and model. Blocking: run off the loop."""
    rows = []
    for group_id, call_id in members:
        record = study.call(call_id)
        if record is None or record.get("modality") == "embedding":
            continue
        text = str(record.get(which) or "")
        if not text.strip():
            continue
        rows.append(
            {
                "group_id": group_id,
                "call_id": call_id,
                "provider": record["provider"],
                "model": record["model"],
                "text": text,
            }
        )
    return rows


class EmbeddingsView(pn.viewable.Viewer):
    """Embeds a group's texts, draws the 2-D map, and finds calls similar to a typed text."""

    state = param.ClassSelector(class_=AppState, doc="The session state.")

    points = param.DataFrame(
        default=None,
        allow_None=True,
        doc="The computed map: one row per embedded call (group, call, provider, model, "
        "text, x, y). None until Compute has run.",
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
        self._vectors: list[list[float]] = []
        self._embedded_with: tuple[str, str] | None = None
        self._group_names: dict[int, str] = {}
        self._loaded = False
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
        self._query = pn.widgets.TextInput(
            name="Find similar",
            placeholder="type a text and press Enter",
            css_classes=["sqllm-similar-input"],
            sizing_mode="stretch_width",
        )
        self._query.param.watch(self._on_find, "enter_pressed")
        self._k = pn.widgets.IntInput(name="Neighbours", value=10, start=1, end=100, width=100)
        self._find = pn.widgets.Button(name="Find similar", width=140)
        self._find.on_click(self._on_find)
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
            frame = await self.state.read(self.state.study.groups)
        except USER_ERRORS as exc:
            notify(f"Could not read the groups: {describe_error(exc)}", "error")
            return
        self._group_names = {int(row.id): str(row.name) for row in frame.itertuples()}
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
        filters = self.state.filters()
        members, truncated = await self.state.read(member_ids, study, filters, group_ids)
        total = len(members)
        if total == 0:
            self._show_progress(100, "No calls in the chosen groups match the filters.")
            notify("No calls in the chosen groups match the filters.", "warning")
            return
        rows: list[dict[str, Any]] = []
        vectors: list[list[float]] = []
        cached = fresh = 0
        for start in range(0, total, CHUNK):
            chunk = members[start : start + CHUNK]
            found = await self.state.read(call_texts, study, chunk, which)
            if found:
                results = await self.state.services.embeddings.embed(
                    [r["text"] for r in found], provider=provider, model=model
                )
                for row, result in zip(found, results, strict=True):
                    rows.append(row)
                    vectors.append(result.vector)
                    cached += int(result.cached)
                    fresh += int(not result.cached)
                self._new_calls = fresh
            done = min(start + CHUNK, total)
            # Embedding takes the bar to 95%; it reaches 100 when the map is drawn.
            self._show_progress(
                round(95 * done / total),
                f"Embedded {len(rows)} texts from {done} of {total} calls "
                f"({cached} from cache, {fresh} new)…",
            )
        if not rows:
            self._show_progress(100, f"None of the {total} calls has a {which} to embed.")
            notify(f"None of the chosen calls has a {which} to embed.", "warning")
            return
        coords = await self.state.read(StudyService.project, vectors, self._method.value.lower())
        frame = pd.DataFrame(rows)
        frame["x"] = [x for x, _ in coords]
        frame["y"] = [y for _, y in coords]
        frame["group"] = [self._group_names.get(g, f"group {g}") for g in frame["group_id"]]
        self._vectors = vectors
        self._embedded_with = (provider, model)
        if len(group_ids) > 1:
            self.colour_by = "group"
        self.stale = False
        self.points = frame
        note = f" (the first {MAX_CALLS} calls)" if truncated else ""
        self._show_progress(
            100,
            f"Embedded {len(rows)} {which}s with {escape(provider_label(provider))} / "
            f"{escape(model)}{note}: {cached} from cache, {fresh} new.",
        )

    async def _on_method(self, _event=None) -> None:
        if self.points is None or not self._vectors:
            return
        try:
            coords = await self.state.read(
                StudyService.project, self._vectors, self._method.value.lower()
            )
        except USER_ERRORS as exc:
            notify(describe_error(exc), "error")
            return
        frame = self.points.copy()
        frame["x"] = [x for x, _ in coords]
        frame["y"] = [y for _, y in coords]
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
        text = (self._query.value_input or self._query.value or "").strip()
        if not text:
            notify("Type a text to find similar calls.", "warning")
            return
        if self.busy:
            notify("Wait for Compute to finish, then search again.", "warning")
            return
        if self.points is None or self._embedded_with is None:
            notify("Compute the map first: similar calls are searched among its texts.", "warning")
            return
        provider, model = self._embedded_with
        self._find.loading = True
        try:
            result = await self.state.services.embeddings.embed(
                [text], provider=provider, model=model
            )
            hits = await self.state.read(
                StudyService.nearest, result[0].vector, self._vectors, int(self._k.value)
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
        self._results.object = self._results_html(text, hits)
        if not result[0].cached:
            self._recorded()

    def _results_html(self, text: str, hits: list[tuple[int, float]]) -> str:
        points = self.points
        if points is None or not hits:
            return "<p>No similar calls.</p>"
        rows = []
        for rank, (index, score) in enumerate(hits, start=1):
            row = points.iloc[index]
            rows.append(
                "<tr>"
                f'<td class="num">{rank}</td>'
                f'<td class="num">{score:.3f}</td>'
                f'<td class="num">{int(row["call_id"])}</td>'
                f"<td>{escape(row['group'])}</td>"
                f"<td>{escape(provider_label(row['provider']))} / {escape(row['model'])}</td>"
                f'<td class="text">{escape(preview(row["text"], 400))}</td>'
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
            await self._load_groups()
        return self._layout()

    def _layout(self) -> pn.Column:
        return pn.Column(
            pn.pane.Markdown("### Embeddings"),
            pn.Row(self._groups, sizing_mode="stretch_width"),
            pn.Row(self._provider, self._model, self._method, self._which),
            pn.Row(self._compute, self._colour),
            self._progress,
            self._status,
            self._map(),
            pn.pane.Markdown("### Find similar"),
            pn.Row(self._query, self._k, self._find, sizing_mode="stretch_width"),
            self._results,
            sizing_mode="stretch_width",
        )

    def __panel__(self):
        # Lazy: the groups are read when the tab is first shown, not when the page loads.
        return pn.panel(pn.bind(self._open), lazy=True, sizing_mode="stretch_width")
