"""Providers tab: what is configured, models and their capabilities, groups, health and prices."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import pandas as pd
import panel as pn
import param
from bokeh.models.widgets.tables import NumberFormatter

from study_query_llm.providers import ProviderError
from study_query_llm.providers.config_file import (
    WRITABLE_SUFFIXES,
    load_providers_config,
    providers_file,
    read_providers_file,
    write_groups,
)
from study_query_llm.providers.discovery import (
    ListingRule,
    ListingRuleError,
    ModelDiscovery,
    fetch_listing,
)
from study_query_llm.providers.group import MODES, STRATEGIES, group_status, parse_groups
from study_query_llm.providers.health import check_health
from study_query_llm.providers.registry import SPECS, configured, group_specs

from ..export import download_buttons
from ..safe import escape
from ..state import AppState, describe_error, notify

GROUP_COLUMNS = [
    "group",
    "strategy",
    "mode",
    "target",
    "breaker",
    "since",
    "last error",
    "in flight",
    "latency ms",
    "served",
    "failed",
]
HEALTH_COLUMNS = [
    "target",
    "reachable",
    "listing ms",
    "request ms",
    "breaker",
    "recent calls",
    "failure rate",
    "problem",
]
REFRESH_MS = 5000  # how often the groups table re-reads breaker state
MODEL_COLUMNS = ["provider", "model", "context", "$ in/M", "$ out/M", "capabilities", "strengths"]


def _table(columns: list[str], css: str, height: int = 220) -> pn.widgets.Tabulator:
    # Missing numbers (no request sent, nothing measured) show as a dash, not NaN.
    dash = {"nan_format": "–", "null_format": "–", "text_align": "right"}
    formatters = {
        name: NumberFormatter(format="0,0.0" if name.endswith(" ms") else "0,0.[00]", **dash)
        for name in columns
        if name.endswith(" ms") or name.startswith("$") or name in ("context", "recent calls")
    }
    return pn.widgets.Tabulator(
        pd.DataFrame(columns=columns),
        disabled=True,
        show_index=False,
        sizing_mode="stretch_width",
        height=height,
        formatters=formatters,
        css_classes=[css],
    )


class ProvidersView(pn.viewable.Viewer):
    """Lists what is configured, checks health, shows and edits provider groups."""

    state = param.ClassSelector(class_=AppState, doc="The session state.")

    def __init__(self, **params):
        super().__init__(**params)
        settings = self.state.services.settings
        self._specs = configured(settings)
        try:
            loaded = load_providers_config(settings)
            self._config_problem: str | None = None
        except ValueError as exc:
            loaded, self._config_problem = None, describe_error(exc)
        self._discovery = ModelDiscovery(
            ttl_s=settings.model_listing_ttl_s,
            rules=loaded.listing_rules if loaded else None,
            capabilities=loaded.capabilities if loaded else None,
        )
        self._build_providers(settings)
        self._build_groups()
        self._build_health()
        self._build_rule_tester()
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
        self.refresh_groups()
        if pn.state.curdoc is not None:
            # Breakers change while batches run in other tabs: keep the table live.
            pn.state.onload(lambda: pn.state.add_periodic_callback(self._tick, period=REFRESH_MS))
            self.state.param.watch(self._on_tab, "active_tab")

    # --- providers and their models ------------------------------------------------------

    def _build_providers(self, settings: Any) -> None:
        self._provider = pn.widgets.Select(
            name="Provider",
            options=[s.id for s in self._specs],
            width=220,
            css_classes=["sqllm-providers-select"],
        )
        self._test = pn.widgets.Button(name="Test connection", button_type="primary", width=160)
        self._test.on_click(self._on_test)
        self._result = pn.pane.HTML(
            "", sizing_mode="stretch_width", css_classes=["sqllm-providers-result"]
        )
        self._models = _table(MODEL_COLUMNS, "sqllm-models-table", height=260)
        self._list = pn.widgets.Button(
            name="List models", width=160, css_classes=["sqllm-models-list"]
        )
        self._list.on_click(self._on_list)
        self._relist = pn.widgets.Button(
            name="Refresh list", width=140, css_classes=["sqllm-models-refresh"]
        )
        self._relist.on_click(self._on_relist)
        self._listing_note = pn.pane.HTML("", css_classes=["sqllm-models-note"])
        rows = []
        for spec in [*SPECS.values(), *self._safe_group_specs()]:
            is_configured = spec.is_configured(settings)
            rows.append(
                {
                    "provider": spec.id,
                    "label": spec.label,
                    "configured": is_configured,
                    "default model": spec.default_model(settings) or "",
                    "capabilities": ", ".join(sorted(spec.capabilities)),
                    "to enable": "" if is_configured else " and ".join(spec.missing(settings)),
                }
            )
        self._table = pn.widgets.Tabulator(
            pd.DataFrame(rows),
            disabled=True,
            show_index=False,
            sizing_mode="stretch_width",
            css_classes=["sqllm-providers-table"],
        )

    def _safe_group_specs(self) -> list[Any]:
        try:
            return group_specs(self.state.services.settings)
        except (ProviderError, ValueError) as exc:
            self._config_problem = describe_error(exc)
            return []

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

    async def _on_list(self, _event=None, refresh: bool = False) -> None:
        provider_id = self._provider.value
        self._list.loading = True
        try:
            provider = self.state.services.inference.provider(provider_id)
            listing = await self._discovery.list_models(provider, refresh=refresh)
            rows = []
            for model in listing.models:
                caps = listing.capabilities[model.id]
                rows.append(
                    {
                        "provider": model.provider,
                        "model": model.id,
                        "context": model.context_length or caps.context_length,
                        "$ in/M": model.input_price_per_mtok,
                        "$ out/M": model.output_price_per_mtok,
                        "capabilities": ", ".join(sorted(caps.features)),
                        "strengths": ", ".join(
                            f"{task}: {level.label}"
                            for task, level in sorted(caps.strengths.items())
                        ),
                    }
                )
            self._models.value = pd.DataFrame(rows, columns=MODEL_COLUMNS)
            age = "from the cache" if listing.from_cache else "just fetched"
            self._listing_note.object = (
                f"{len(rows)} models of <b>{escape(provider_id)}</b>, {age} "
                f"({escape(listing.fetched_at.strftime('%H:%M:%S'))} UTC, kept "
                f"{self._discovery.ttl_s:g} s); capabilities are inferred from the model ids."
            )
        except (ProviderError, ListingRuleError) as exc:
            self._listing_note.object = escape(describe_error(exc))
            notify(describe_error(exc), "error")
        finally:
            self._list.loading = False

    async def _on_relist(self, _event=None) -> None:
        await self._on_list(refresh=True)

    # --- provider groups -----------------------------------------------------------------

    def _build_groups(self) -> None:
        self._groups = _table(GROUP_COLUMNS, "sqllm-provider-groups")
        self._groups_note = pn.pane.HTML("", css_classes=["sqllm-provider-groups-note"])
        self._groups_refresh = pn.widgets.Button(
            name="Refresh status", width=140, css_classes=["sqllm-provider-groups-refresh"]
        )
        self._groups_refresh.on_click(lambda _e: self.refresh_groups())
        self._group_name = pn.widgets.TextInput(
            name="Group name", width=200, css_classes=["sqllm-group-name"]
        )
        self._group_strategy = pn.widgets.Select(
            name="Strategy",
            options=list(STRATEGIES),
            width=150,
            css_classes=["sqllm-group-strategy"],
        )
        self._group_mode = pn.widgets.Select(
            name="Mode", options=list(MODES), width=120, css_classes=["sqllm-group-mode"]
        )
        self._group_targets = pn.widgets.TextAreaInput(
            name="Targets (provider:model, one per line)",
            placeholder="openai:gpt-4o-mini\nanthropic:claude-haiku-4-5",
            height=110,
            width=420,
            css_classes=["sqllm-group-targets"],
        )
        self._group_save = pn.widgets.Button(
            name="Save group", button_type="primary", width=130, css_classes=["sqllm-group-save"]
        )
        self._group_save.on_click(self._on_save_group)
        self._group_delete = pn.widgets.Button(
            name="Delete group", width=130, css_classes=["sqllm-group-delete"]
        )
        self._group_delete.on_click(self._on_delete_group)
        self._group_message = pn.pane.HTML("", css_classes=["sqllm-group-message"])
        file = providers_file(self.state.services.settings)
        writable = file is not None and file.suffix.lower() in WRITABLE_SUFFIXES
        self._group_save.disabled = self._group_delete.disabled = not writable
        if writable:
            where = f"Groups are saved to <code>{escape(file)}</code>."
        else:
            where = (
                "To define groups here, set <code>PROVIDER_GROUPS_FILE</code> to a .yaml or "
                ".json file (TOML files are edited by hand)."
            )
        self._group_where = pn.pane.HTML(where, css_classes=["sqllm-group-where"])

    def _tick(self) -> None:
        # Only while the tab is in view (a hidden pane has no page to attach styles to).
        if self.state.showing("Providers"):
            self.refresh_groups()

    def _on_tab(self, event: Any) -> None:
        if event.new == "Providers":
            self.refresh_groups()

    def refresh_groups(self) -> None:
        """Re-read the group configuration and every target's breaker and load."""
        settings = self.state.services.settings
        rows: list[dict[str, Any]] = []
        try:
            specs = {spec.id: spec for spec in group_specs(settings)}
            groups = load_providers_config(settings).groups
            problem = None
        except (ProviderError, ValueError) as exc:
            specs, groups, problem = {}, {}, describe_error(exc)
        for config in groups.values():
            spec = specs.get(config.provider_id)
            if spec is not None and not spec.is_configured(settings):
                rows.append(
                    {"group": config.name, "strategy": config.strategy, "mode": config.mode,
                     "target": "—", "breaker": "not configured",
                     "last error": " and ".join(spec.missing(settings))}
                )  # fmt: skip
                continue
            for row in group_status(config):
                breaker = row["breaker"]
                rows.append(
                    {
                        "group": row["group"],
                        "strategy": row["strategy"],
                        "mode": row["mode"],
                        "target": row["target"],
                        "breaker": breaker["state"].replace("_", "-"),
                        "since": breaker["since"] or "",
                        "last error": breaker["last_error"] or "",
                        "in flight": row["in_flight"],
                        "latency ms": row["latency_ms"],
                        "served": row["served"],
                        "failed": row["failed"],
                    }
                )
        frame = pd.DataFrame(rows, columns=GROUP_COLUMNS)
        if not frame.equals(self._groups.value):
            self._groups.value = frame
        if problem:
            self._groups_note.object = f"<b>Group configuration problem:</b> {escape(problem)}"
        elif not groups:
            self._groups_note.object = (
                "No provider groups yet: define one below, or set PROVIDER_GROUPS / "
                "PROVIDER_GROUPS_FILE. Use a group as provider <code>group:NAME</code>."
            )
        else:
            self._groups_note.object = (
                f"{len(groups)} group(s); use one as provider <code>group:NAME</code> in the "
                "Run, Batch and Chat tabs (after reloading the page)."
            )

    def _file_groups(self) -> dict[str, Any]:
        file = providers_file(self.state.services.settings)
        if file is None or not file.exists():
            return {}
        return dict(read_providers_file(file)["groups"])

    def _save(self, groups: dict[str, Any], message: str) -> None:
        settings = self.state.services.settings
        file = providers_file(settings)
        assert file is not None
        write_groups(file, groups)
        group_specs(settings)  # raises if the saved file no longer makes valid groups
        self._group_message.object = escape(message)
        notify(message, "success")
        self.refresh_groups()

    def _on_save_group(self, _event=None) -> None:
        name = (self._group_name.value or "").strip()
        lines = [line.strip() for line in (self._group_targets.value or "").splitlines()]
        spec = {
            "strategy": self._group_strategy.value,
            "mode": self._group_mode.value,
            "targets": [line for line in lines if line],
        }
        try:
            if not name:
                raise ValueError("give the group a name")
            parse_groups({name: spec}, "the group")
            for target in spec["targets"]:
                provider = target.partition(":")[0]
                if provider not in SPECS:
                    raise ValueError(f"unknown provider {provider!r} in {target!r}")
            groups = self._file_groups()
            verb = "Updated" if name in groups else "Saved"
            groups[name] = spec
            self._save(groups, f"{verb} group {name}: use it as provider group:{name}.")
        except (ValueError, ProviderError, OSError) as exc:
            self._group_message.object = escape(describe_error(exc))
            notify(describe_error(exc), "error")

    def _on_delete_group(self, _event=None) -> None:
        name = (self._group_name.value or "").strip()
        try:
            groups = self._file_groups()
            if name not in groups:
                raise ValueError(f"there is no group {name!r} in the groups file")
            del groups[name]
            self._save(groups, f"Deleted group {name}.")
        except (ValueError, ProviderError, OSError) as exc:
            self._group_message.object = escape(describe_error(exc))
            notify(describe_error(exc), "error")

    # --- health --------------------------------------------------------------------------

    def _build_health(self) -> None:
        self._health_request = pn.widgets.Checkbox(
            name="Send a tiny request to each (recorded; uses a few tokens)",
            value=True,
            css_classes=["sqllm-health-request"],
        )
        self._health_button = pn.widgets.Button(
            name="Check health",
            button_type="primary",
            width=150,
            css_classes=["sqllm-health-check"],
        )
        self._health_button.on_click(self._on_health)
        self._health = _table(HEALTH_COLUMNS, "sqllm-health-table")
        self._health_note = pn.pane.HTML("", css_classes=["sqllm-health-note"])

    async def _on_health(self, _event=None) -> None:
        self._health_button.loading = True
        request = bool(self._health_request.value)
        try:
            rows = await check_health(
                self.state.services, request=request, window=timedelta(hours=1), timeout_s=30
            )
            frame = pd.DataFrame(
                [
                    {
                        "target": row.label,
                        "reachable": {True: "yes", False: "no", None: "—"}[row.reachable],
                        "listing ms": row.listing_ms,
                        "request ms": row.request_ms,
                        "breaker": ((row.breaker or {}).get("state") or "").replace("_", "-"),
                        "recent calls": row.recent_calls,
                        "failure rate": None
                        if row.failure_rate is None
                        else f"{row.failure_rate:.1%}",
                        "problem": row.error or "",
                    }
                    for row in rows
                ],
                columns=HEALTH_COLUMNS,
            )
            self._health.value = frame
            down = sum(1 for row in rows if not row.reachable)
            self._health_note.object = (
                f"Checked {len(rows)} target(s): {len(rows) - down} reachable, {down} not. "
                "Failure rates count the last hour's recorded calls."
            )
            self.refresh_groups()
            if request:
                self.state.recorded()
        except (ProviderError, ValueError) as exc:
            self._health_note.object = escape(describe_error(exc))
            notify(describe_error(exc), "error")
        finally:
            self._health_button.loading = False

    # --- listing rules -------------------------------------------------------------------

    def _build_rule_tester(self) -> None:
        self._rule_selector = pn.widgets.TextInput(
            name="Selector (JMESPath)", value="data", width=260, css_classes=["sqllm-rule-selector"]
        )
        self._rule_fields = pn.widgets.TextInput(
            name="Fields (JSON: field → JMESPath)",
            value='{"id": "id"}',
            width=360,
            css_classes=["sqllm-rule-fields"],
        )
        self._rule_test = pn.widgets.Button(
            name="Try on the listing", width=170, css_classes=["sqllm-rule-test"]
        )
        self._rule_test.on_click(self._on_rule_test)
        self._rule_result = pn.pane.HTML("", css_classes=["sqllm-rule-result"])

    async def _on_rule_test(self, _event=None) -> None:
        provider_id = self._provider.value
        self._rule_test.loading = True
        try:
            try:
                fields = json.loads(self._rule_fields.value or "")
            except ValueError:
                raise ListingRuleError('fields must be JSON like {"id": "id"}') from None
            rule = ListingRule.parse(
                {"selector": self._rule_selector.value, "fields": fields}, "the rule"
            )
            provider = self.state.services.inference.provider(provider_id)
            sample = await fetch_listing(provider, rule.path)
            models = rule.validate_on(sample, provider_id)
            shown = ", ".join(m.id for m in models[:12])
            more = f" and {len(models) - 12} more" if len(models) > 12 else ""
            self._rule_result.object = (
                f"The rule finds {len(models)} model(s) in {escape(provider_id)}'s listing: "
                f"{escape(shown)}{escape(more)}. Put it in MODEL_LISTING_RULES to use it."
            )
        except (ProviderError, ListingRuleError) as exc:
            self._rule_result.object = f"<b>Rejected:</b> {escape(describe_error(exc))}"
        finally:
            self._rule_test.loading = False

    # --- layout --------------------------------------------------------------------------

    def __panel__(self):
        problem = (
            pn.pane.Alert(
                f"Provider configuration problem: {escape(self._config_problem)}",
                alert_type="warning",
            )
            if self._config_problem
            else None
        )
        return pn.Column(
            pn.pane.Markdown("### Providers"),
            *([problem] if problem else []),
            self._table,
            download_buttons(lambda: self._table.value, "providers"),
            pn.Row(self._provider, self._test, self._list, self._relist),
            self._result,
            self._listing_note,
            self._models,
            download_buttons(lambda: self._models.value, "models"),
            pn.pane.Markdown("### Provider groups"),
            self._groups_note,
            self._groups,
            pn.Row(
                self._groups_refresh,
                download_buttons(lambda: self._groups.value, "provider-groups"),
            ),
            pn.pane.Markdown("#### Define a group"),
            self._group_where,
            pn.Row(self._group_name, self._group_strategy, self._group_mode),
            self._group_targets,
            pn.Row(self._group_save, self._group_delete),
            self._group_message,
            pn.pane.Markdown("### Health"),
            pn.Row(self._health_button, self._health_request),
            self._health_note,
            self._health,
            download_buttons(lambda: self._health.value, "provider-health"),
            pn.pane.Markdown("### Listing rules (JMESPath)"),
            pn.pane.Markdown(
                "Try a rule on the selected provider's live listing before configuring it.",
            ),
            pn.Row(self._rule_selector, self._rule_fields, self._rule_test),
            self._rule_result,
            pn.pane.Markdown("### Prices used for cost (USD per million tokens)"),
            self._prices,
            download_buttons(lambda: self._prices.value, "prices"),
            sizing_mode="stretch_width",
        )
