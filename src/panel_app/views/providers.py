"""Providers tab: configured providers, their models, a connection test, and the prices used."""

from __future__ import annotations

import time

import pandas as pd
import panel as pn
import param

from study_query_llm.providers import ProviderError
from study_query_llm.providers.registry import SPECS, configured

from ..safe import escape
from ..state import AppState, describe_error, notify


class ProvidersView(pn.viewable.Viewer):
    """Lists what is configured and lets a person check a provider answers."""

    state = param.ClassSelector(class_=AppState, doc="The session state.")

    def __init__(self, **params):
        super().__init__(**params)
        settings = self.state.services.settings
        self._specs = configured(settings)
        self._provider = pn.widgets.Select(
            name="Provider", options=[s.id for s in self._specs], width=220
        )
        self._test = pn.widgets.Button(name="Test connection", button_type="primary", width=160)
        self._test.on_click(self._on_test)
        self._result = pn.pane.HTML("", sizing_mode="stretch_width")
        self._models = pn.widgets.Tabulator(
            pd.DataFrame(columns=["provider", "model"]),
            disabled=True,
            show_index=False,
            sizing_mode="stretch_width",
            height=260,
        )
        self._list = pn.widgets.Button(name="List models", width=160)
        self._list.on_click(self._on_list)
        rows = [
            {
                "provider": spec.id,
                "label": spec.label,
                "configured": spec.is_configured(settings),
                "default model": spec.default_model(settings) or "",
                "capabilities": ", ".join(sorted(spec.capabilities)),
                "to enable": ""
                if spec.is_configured(settings)
                else " and ".join(spec.missing(settings)),
            }
            for spec in SPECS.values()
        ]
        self._table = pn.widgets.Tabulator(
            pd.DataFrame(rows), disabled=True, show_index=False, sizing_mode="stretch_width"
        )
        pricing = self.state.services.inference.pricing
        self._prices = pn.widgets.Tabulator(
            pd.DataFrame(
                [
                    {
                        "model": m,
                        "input $/M tokens": p.input_per_mtok,
                        "output $/M tokens": p.output_per_mtok,
                    }
                    for m, p in pricing.items()
                ]
            ),
            disabled=True,
            show_index=False,
            sizing_mode="stretch_width",
            height=300,
        )

    async def _on_test(self, _event=None) -> None:
        provider_id = self._provider.value
        self._test.loading = True
        try:
            provider = self.state.services.inference.provider(provider_id)
            started = time.perf_counter()
            models = await provider.list_models()
            ms = (time.perf_counter() - started) * 1000
            self._result.object = (
                f"<b>{escape(provider_id)}</b> answered in {ms:.0f} ms "
                f"({len(models)} models listed)."
            )
            notify(f"{provider_id}: reachable ({ms:.0f} ms)", "success")
        except ProviderError as exc:
            self._result.object = f"<b>{escape(provider_id)}</b>: {escape(describe_error(exc))}"
            notify(describe_error(exc), "error")
        finally:
            self._test.loading = False

    async def _on_list(self, _event=None) -> None:
        provider_id = self._provider.value
        self._list.loading = True
        try:
            models = await self.state.services.inference.provider(provider_id).list_models()
            self._models.value = pd.DataFrame(
                [
                    {"provider": m.provider, "model": m.id, "context": m.context_length}
                    for m in models
                ]
            )
        except ProviderError as exc:
            notify(describe_error(exc), "error")
        finally:
            self._list.loading = False

    def __panel__(self):
        return pn.Column(
            pn.pane.Markdown("### Providers"),
            self._table,
            pn.Row(self._provider, self._test, self._list),
            self._result,
            self._models,
            pn.pane.Markdown("### Prices used for cost (USD per million tokens)"),
            self._prices,
            sizing_mode="stretch_width",
        )
