"""Run tab: send one prompt (n samples) to a chosen provider and model, streaming the answer.

Stable CSS classes (hooks for UI tests):
- ``sqllm-run-provider``  provider picker (configured chat providers; mock shows "(mock)")
- ``sqllm-run-models``    the provider's listed models (choosing one fills the model box)
- ``sqllm-run-model``     model text box (free text; this is the model used)
- ``sqllm-run-system``    system prompt
- ``sqllm-run-prompt``    prompt text area
- ``sqllm-run-template``  optional template (must contain ``{user_input}``)
- ``sqllm-run-temperature``, ``sqllm-run-max-tokens``, ``sqllm-run-samples``  options
- ``sqllm-run-button``    Run (disabled while a run is in progress)
- ``sqllm-run-stop``      Stop (cancels the calls in progress; they are recorded as cancelled)
- ``sqllm-run-error``     inline error message (hidden when there is none)
- ``sqllm-run-sample``    one block per sample, holding:
- ``sqllm-answer``        the streamed answer (escaped text)
- ``sqllm-run-meta``      "call <id> · tokens in/out · latency · cost · finish reason"
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import panel as pn
import param
from sqlalchemy.exc import SQLAlchemyError

from study_query_llm.config import Settings
from study_query_llm.providers import ProviderError
from study_query_llm.providers.registry import SPECS, supporting
from study_query_llm.services.inference import InferenceService, RunResult
from study_query_llm.services.preprocessing import PLACEHOLDER
from study_query_llm.services.recorder import RecordingError

from ..safe import TEXT_MAX_CHARS, escape, pre
from ..state import AppState, describe_error, notify

log = logging.getLogger(__name__)

# Errors a user action can run into; each becomes a notification, never a traceback.
USER_ERRORS = (ProviderError, ValueError, LookupError, RecordingError, SQLAlchemyError)
MAX_SAMPLES = 10
LIST_MODELS_TIMEOUT_S = 15.0
STREAM_REFRESH_S = 0.05  # at most ~20 repaints a second per answer
BAD_NAME_CHARS = "<>&\"'"

# Panes render in a shadow root, so the page-level CSS does not reach them: every pane that
# shows `safe.pre()` text carries this stylesheet (wraps long lines, keeps line breaks).
TEXT_CSS = """
.sqllm-text { white-space: pre-wrap; overflow-wrap: anywhere; font-family: inherit;
              margin: 0; background: transparent; }
"""


# --- helpers shared by the Run, Batch and Chat tabs ----------------------------------------


def is_mock(provider_id: str) -> bool:
    """Whether a provider id is the offline mock (its answers are not a real model's)."""
    spec = SPECS.get(provider_id)
    return bool(spec and spec.is_mock)


def provider_label(provider_id: str) -> str:
    """A provider id as shown to a person: the mock one carries "(mock)"."""
    return f"{provider_id} (mock)" if is_mock(provider_id) else provider_id


def chat_providers(settings: Settings) -> dict[str, str]:
    """Label → id of the configured providers that can chat (mock always, last)."""
    return {provider_label(spec.id): spec.id for spec in supporting("chat", settings)}


def check_model_name(model: str | None) -> str | None:
    """The model name, or None for the provider default; ValueError if it looks like markup.

    No provider names a model with these characters, and a name is stored with every call
    and shown in many places (some widgets render option labels as HTML).
    """
    model = (model or "").strip() or None
    if model is not None and any(ch in model for ch in BAD_NAME_CHARS):
        raise ValueError("A model name cannot contain <, >, &, or quotes.")
    return model


def default_model(settings: Settings, provider_id: str) -> str:
    """The provider's configured default model, or "" when it has none."""
    spec = SPECS.get(provider_id)
    return (spec.default_model(settings) if spec else None) or ""


async def list_model_ids(
    inference: InferenceService, settings: Settings, provider_id: str
) -> tuple[list[str], str | None]:
    """The provider's model ids (default first), and why listing failed (None when it worked)."""
    fallback = default_model(settings, provider_id)
    ids: list[str] = [fallback] if fallback else []
    problem: str | None = None
    try:
        models = await asyncio.wait_for(
            inference.provider(provider_id).list_models(), LIST_MODELS_TIMEOUT_S
        )
        ids += [
            m.id
            for m in models
            if m.id and m.id not in ids and not any(ch in m.id for ch in BAD_NAME_CHARS)
        ]
    except TimeoutError:
        problem = f"{provider_id}: listing models timed out; type a model name"
    except ProviderError as exc:
        problem = describe_error(exc)
    return ids, problem


def format_cost(cost: float | None) -> str:
    """Cost in USD, or "unknown price" when the model has no price."""
    if cost is None:
        return "unknown price"
    return "cost $0" if cost == 0 else f"cost ${cost:.6f}"


def format_meta(result: RunResult) -> str:
    """One escaped HTML line about a recorded run: call id(s), tokens, latency, cost, finish."""
    ids = ", ".join(str(i) for i in result.call_ids)
    label = "call" if len(result.call_ids) == 1 else "calls"
    parts = [f"{label} {escape(ids)}" if ids else "not recorded"]
    if result.ok and result.response is not None:
        r = result.response
        tokens_in = "?" if r.prompt_tokens is None else str(r.prompt_tokens)
        tokens_out = "?" if r.completion_tokens is None else str(r.completion_tokens)
        parts.append(f"tokens in/out {tokens_in}/{tokens_out}")
        parts.append(f"latency {r.latency_ms:,.0f} ms")
        parts.append(format_cost(result.cost_usd))
        parts.append(f"finish reason {escape(r.finish_reason or 'unknown')}")
        parts.append(f"model {escape(r.model)}")
        if is_mock(r.provider) or r.metadata.get("mock"):
            parts.append("<b>mock answer, not a real model</b>")
    else:
        reason = describe_error(result.error) if result.error else "no answer"
        parts.append(f"<b>{escape(result.status)}</b>: {escape(reason)}")
    if len(result.attempts) > 1:
        parts.append(f"{len(result.attempts)} attempts")
    return " · ".join(parts)


class ModelPicker(pn.viewable.Viewer):
    """Provider and model: configured chat providers, the provider's listed models, or free text.

    The model text box is what is used; choosing a listed model fills it. Listing runs
    asynchronously when the page loads and when the provider changes (cached per picker).
    CSS classes: ``sqllm-<prefix>-provider``, ``sqllm-<prefix>-model`` (text box),
    ``sqllm-<prefix>-models`` (listed models).
    """

    state = param.ClassSelector(class_=AppState, doc="The session state.")
    prefix = param.String(default="run", doc="CSS class prefix (run, chat...).")
    disabled = param.Boolean(default=False, doc="Whether the choice is locked.")

    def __init__(self, **params):
        super().__init__(**params)
        settings = self.state.services.settings
        providers = chat_providers(settings)
        first = next(iter(providers.values()))
        fallback = default_model(settings, first)
        self._cache: dict[str, list[str]] = {}
        self._wanted_model: str | None = None  # set() while the provider change is pending
        self.provider = pn.widgets.Select(
            name="Provider",
            options=providers,
            value=first,
            width=200,
            css_classes=[f"sqllm-{self.prefix}-provider"],
        )
        self.model = pn.widgets.TextInput(
            name="Model (free text)",
            value=fallback,
            placeholder="provider default",
            width=220,
            css_classes=[f"sqllm-{self.prefix}-model"],
        )
        self.listed = pn.widgets.Select(
            name="Listed models",
            options=[fallback] if fallback else [],
            value=fallback or None,
            width=220,
            css_classes=[f"sqllm-{self.prefix}-models"],
        )
        self.provider.param.watch(self._on_provider, "value")
        self.listed.param.watch(self._on_listed, "value")
        if pn.state.curdoc is not None:
            pn.state.onload(self.load_models)

    @property
    def provider_id(self) -> str:
        """The chosen provider id."""
        return self.provider.value

    @property
    def model_id(self) -> str | None:
        """The model to ask for (None: the provider's default); ValueError if not a name."""
        return check_model_name(self.model.value)

    def set(self, provider_id: str, model: str | None) -> None:
        """Show a given provider and model (e.g. those of a resumed conversation)."""
        self.model.value = model or ""
        if provider_id != self.provider.value and provider_id in self.provider.options.values():
            self._wanted_model = model or ""
            self.provider.value = provider_id

    @param.depends("disabled", watch=True)
    def _lock(self) -> None:
        for widget in (self.provider, self.model, self.listed):
            widget.disabled = self.disabled

    def _on_listed(self, event) -> None:
        if event.new:
            self.model.value = event.new

    async def _on_provider(self, event) -> None:
        fallback = default_model(self.state.services.settings, event.new)
        wanted, self._wanted_model = self._wanted_model, None
        self.listed.param.update(options=[fallback] if fallback else [], value=fallback or None)
        self.model.value = fallback if wanted is None else wanted
        await self.load_models()

    async def load_models(self) -> None:
        """List the chosen provider's models into the suggestions (once per provider)."""
        provider_id = self.provider.value
        if provider_id not in self._cache:
            ids, problem = await list_model_ids(
                self.state.services.inference, self.state.services.settings, provider_id
            )
            if problem:
                notify(f"Could not list models: {problem}", "warning")
            self._cache[provider_id] = ids
        if self.provider.value == provider_id:  # the choice may have changed meanwhile
            current = self.listed.value
            self.listed.options = self._cache[provider_id]
            if current in self._cache[provider_id]:
                self.listed.value = current

    def __panel__(self):
        return pn.Row(self.provider, self.listed, self.model)


# --- the tab -------------------------------------------------------------------------------


class RunView(pn.viewable.Viewer):
    """One prompt, one provider and model, n samples, streamed and recorded."""

    state = param.ClassSelector(class_=AppState, doc="The session state.")
    running = param.Boolean(default=False, doc="Whether a run is in progress.")

    def __init__(self, **params):
        super().__init__(**params)
        self._picker = ModelPicker(state=self.state, prefix="run")
        self._task: asyncio.Future | None = None
        self._stopping = False

        self._system = pn.widgets.TextAreaInput(
            name="System prompt (optional)",
            placeholder="You are a careful assistant.",
            rows=2,
            sizing_mode="stretch_width",
            max_length=TEXT_MAX_CHARS,
            css_classes=["sqllm-run-system"],
        )
        self._prompt = pn.widgets.TextAreaInput(
            name="Prompt",
            placeholder="Ask something…",
            rows=5,
            sizing_mode="stretch_width",
            max_length=TEXT_MAX_CHARS,
            css_classes=["sqllm-run-prompt"],
        )
        self._template = pn.widgets.TextInput(
            name="Template (optional, must contain {user_input})",
            placeholder="Answer in one sentence: {user_input}",
            sizing_mode="stretch_width",
            max_length=TEXT_MAX_CHARS,
            css_classes=["sqllm-run-template"],
        )
        self._temperature = pn.widgets.FloatInput(
            name="Temperature",
            value=None,
            start=0.0,
            end=2.0,
            step=0.1,
            placeholder="default",
            width=120,
            css_classes=["sqllm-run-temperature"],
        )
        self._max_tokens = pn.widgets.IntInput(
            name="Max tokens",
            value=None,
            start=1,
            step=64,
            placeholder="default",
            width=120,
            css_classes=["sqllm-run-max-tokens"],
        )
        self._samples = pn.widgets.IntInput(
            name="Samples",
            value=1,
            start=1,
            end=MAX_SAMPLES,
            width=100,
            css_classes=["sqllm-run-samples"],
        )
        self._run = pn.widgets.Button(
            name="Run", button_type="primary", width=120, css_classes=["sqllm-run-button"]
        )
        self._stop = pn.widgets.Button(
            name="Stop",
            button_type="warning",
            width=100,
            disabled=True,
            css_classes=["sqllm-run-stop"],
        )
        self._error = pn.pane.HTML(
            "",
            visible=False,
            styles={
                "background": "#f8d7da",
                "color": "#842029",
                "border": "1px solid #f5c2c7",
                "border-radius": "4px",
                "padding": "0 12px",
            },
            sizing_mode="stretch_width",
            css_classes=["sqllm-run-error"],
        )
        self._output = pn.Column(sizing_mode="stretch_width")

        self._run.on_click(self._on_run)
        self._stop.on_click(self._on_stop)

    # --- running ---------------------------------------------------------------------------

    @param.depends("running", watch=True)
    def _sync_buttons(self) -> None:
        self._run.disabled = self.running
        self._run.loading = self.running
        self._picker.disabled = self.running
        self._stop.disabled = not self.running

    def _show_error(self, message: str) -> None:
        self._error.object = f"<p>{escape(message)}</p>"
        self._error.visible = True
        notify(message, "error")

    def _request(self) -> tuple[str | list[dict[str, str]], dict[str, Any], str | None] | None:
        """The prompt, options and template from the inputs, or None after showing why not."""
        prompt = (self._prompt.value or "").strip()
        if not prompt:
            self._show_error("Type a prompt first.")
            return None
        template = (self._template.value or "").strip() or None
        if template is not None and PLACEHOLDER not in template:
            self._show_error(f"The template must contain {PLACEHOLDER}.")
            return None
        options: dict[str, Any] = {}
        if self._temperature.value is not None:
            options["temperature"] = float(self._temperature.value)
        if self._max_tokens.value is not None:
            options["max_tokens"] = int(self._max_tokens.value)
        system = (self._system.value or "").strip()
        messages: str | list[dict[str, str]] = (
            [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
            if system
            else prompt
        )
        return messages, options, template

    async def _on_run(self, _event=None) -> None:
        if self.running:
            return
        self._error.visible = False
        request = self._request()
        if request is None:
            return
        messages, options, template = request
        provider = self._picker.provider_id
        try:
            model = self._picker.model_id
        except ValueError as exc:
            self._show_error(describe_error(exc))
            return
        n = max(1, min(MAX_SAMPLES, int(self._samples.value or 1)))
        blocks = [self._sample_block(i, n) for i in range(n)]
        self._output.objects = [b for b, _, _ in blocks]
        self._stopping = False
        self.running = True
        try:
            self._task = asyncio.gather(
                *(
                    self._run_sample(i, messages, provider, model, options, template, a, m)
                    for i, (_, a, m) in enumerate(blocks)
                )
            )
            outcomes = await self._task
            failures = [o for o in outcomes if o]
            if failures:
                self._show_error(
                    failures[0]
                    if len(failures) == 1
                    else f"{len(failures)} of {n} samples failed: {failures[0]}"
                )
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            notify("Stopped; the calls in progress are recorded as cancelled.", "warning")
        finally:
            self._task = None
            self.running = False
            self.state.recorded()

    async def _on_stop(self, _event=None) -> None:
        if self._task is not None and not self._task.done():
            self._stopping = True
            self._task.cancel()

    def _sample_block(self, index: int, n: int) -> tuple[pn.Column, pn.pane.HTML, pn.pane.HTML]:
        answer = pn.pane.HTML(
            pre("…"),
            sizing_mode="stretch_width",
            stylesheets=[TEXT_CSS],
            css_classes=["sqllm-answer"],
        )
        meta = pn.pane.HTML(
            "waiting for the answer…",
            sizing_mode="stretch_width",
            css_classes=["sqllm-run-meta"],
            styles={"color": "#555", "font-size": "0.9em"},
        )
        title = pn.pane.HTML(f"<b>Sample {index + 1} of {n}</b>") if n > 1 else None
        block = pn.Column(
            *([title] if title else []),
            answer,
            meta,
            sizing_mode="stretch_width",
            css_classes=["sqllm-run-sample"],
            styles={"border-left": "3px solid #2f4f6f", "padding-left": "8px"},
        )
        return block, answer, meta

    async def _run_sample(
        self,
        index: int,
        messages: str | Sequence[dict[str, str]],
        provider: str,
        model: str | None,
        options: dict[str, Any],
        template: str | None,
        answer: pn.pane.HTML,
        meta: pn.pane.HTML,
    ) -> str | None:
        """Stream one sample into its panes; returns the failure reason, or None on success."""
        text = ""
        shown_at = 0.0
        result: RunResult | None = None
        try:
            async for item in self.state.services.inference.stream(
                messages,
                provider=provider,
                model=model,
                options=options,
                template=template,
                metadata={"source": "dashboard", "sample_index": index},
            ):
                if isinstance(item, RunResult):
                    result = item
                    continue
                text += item
                now = time.monotonic()
                if now - shown_at >= STREAM_REFRESH_S:
                    answer.object = pre(text)
                    shown_at = now
        except USER_ERRORS as exc:
            reason = describe_error(exc)
            answer.object = pre(text) if text else ""
            meta.object = f"<b>not run</b>: {escape(reason)}"
            return reason
        except asyncio.CancelledError:
            answer.object = pre(text)
            meta.object = "<b>stopped</b> (recorded as cancelled)"
            raise
        except Exception as exc:  # never a traceback in the page
            log.exception("run failed")
            reason = f"unexpected error: {describe_error(exc)}"
            meta.object = escape(reason)
            return reason
        if result is None:
            meta.object = "<b>no result</b>"
            return "the provider returned nothing"
        if result.ok and result.response is not None:
            answer.object = pre(result.response.text)
        else:
            answer.object = pre(text) if text else ""
        meta.object = format_meta(result)
        if result.ok:
            return None
        return describe_error(result.error) if result.error else result.status

    def __panel__(self):
        return pn.Column(
            pn.pane.Markdown("### Run a prompt"),
            self._picker,
            self._system,
            self._prompt,
            self._template,
            pn.Row(self._temperature, self._max_tokens, self._samples),
            pn.Row(self._run, self._stop),
            self._error,
            self._output,
            sizing_mode="stretch_width",
        )
