"""Model discovery: provider listings cached with a TTL, and JMESPath rules for unusual shapes.

A `ListingRule` reads any JSON listing: a `selector` (JMESPath) picks the list of models,
and `fields` maps each model to `ModelInfo` fields (``id`` is required; ``owned_by``,
``context_length``, ``input_price`` and ``output_price`` fill the matching fields; any
other name lands in `ModelInfo.metadata`)::

    {"selector": "result.catalog[?enabled]", "fields": {"id": "spec.name",
     "context_length": "spec.limits.context"}}

Rules are compiled when configured (a syntax error names the expression) and checked on
a sample before use: a rule that extracts nothing is rejected with a message saying which
part found nothing, and a listing is never replaced by an empty one.
`ModelDiscovery` lists a provider's models (through its configured rule, or the
provider's own `list_models()`), caches them per provider for `ttl_s`, and infers each
model's capabilities from its id.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import jmespath
import jmespath.exceptions
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .base import BaseLLMProvider, ModelInfo
from .capabilities import CapabilityRegistry, ModelCapabilities, default_registry
from .errors import MalformedResponseError, UnsupportedOperationError

MODEL_FIELDS = ("id", "owned_by", "context_length", "input_price", "output_price")


class ListingRuleError(ValueError):
    """A listing rule that cannot be compiled, or that extracts nothing from a listing."""


def _compile(expression: str, what: str) -> Any:
    try:
        return jmespath.compile(expression)
    except jmespath.exceptions.JMESPathError as exc:
        detail = " ".join(str(exc).split())
        raise ListingRuleError(f"{what} {expression!r} is not valid JMESPath: {detail}") from None


class ListingRule(BaseModel):
    """How to read one provider's model listing: a selector and a field map (JMESPath)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    selector: str = Field(min_length=1, description="JMESPath to the list of models.")
    fields: dict[str, str] = Field(description="ModelInfo field or metadata key → JMESPath.")
    path: str | None = Field(
        None, description="Where to GET the listing: a path under the provider's base URL."
    )
    price_unit: Literal["per_mtok", "per_token"] = Field(
        "per_mtok", description="Unit of input_price/output_price in the listing (USD)."
    )

    @field_validator("selector")
    @classmethod
    def _selector_compiles(cls, value: str) -> str:
        _compile(value, "selector")
        return value

    @field_validator("fields")
    @classmethod
    def _fields_compile(cls, value: dict[str, str]) -> dict[str, str]:
        if "id" not in value:
            raise ListingRuleError('fields must map "id" to an expression for the model id')
        for name, expression in value.items():
            if not isinstance(expression, str) or not expression.strip():
                raise ListingRuleError(f"field {name!r} needs a JMESPath expression")
            _compile(expression, f"field {name!r}:")
        return value

    @classmethod
    def parse(cls, value: Any, source: str) -> ListingRule:
        """A rule from configuration: an object, or the name of a built-in rule."""
        if isinstance(value, str):
            if value in BUILTIN_RULES:
                return BUILTIN_RULES[value]
            raise ListingRuleError(
                f"{source}: unknown built-in rule {value!r}; use one of {', '.join(BUILTIN_RULES)}"
                " or an object with selector and fields"
            )
        try:
            return cls.model_validate(value)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            message = str(err.get("ctx", {}).get("error") or err["msg"])
            message = message.removeprefix("Value error, ")
            raise ListingRuleError(f"{source}: {where + ': ' if where else ''}{message}") from None

    def extract(self, payload: Any, provider: str) -> list[ModelInfo]:
        """The models the rule finds in `payload` (possibly none; see `validate_on`)."""
        items = jmespath.search(self.selector, payload)
        if isinstance(items, Mapping):
            items = list(items.values())
        if not isinstance(items, list):
            return []
        compiled = {name: jmespath.compile(expr) for name, expr in self.fields.items()}
        models: list[ModelInfo] = []
        seen: set[str] = set()
        for item in items:
            values = {name: expr.search(item) for name, expr in compiled.items()}
            model_id = values.pop("id")
            if model_id is None or isinstance(model_id, dict | list) or str(model_id) == "":
                continue
            model_id = str(model_id)
            if model_id in seen:
                continue
            seen.add(model_id)
            metadata = {k: v for k, v in values.items() if k not in MODEL_FIELDS and v is not None}
            models.append(
                ModelInfo(
                    id=model_id,
                    provider=provider,
                    owned_by=_str_or_none(values.get("owned_by")),
                    context_length=_int_or_none(values.get("context_length")),
                    input_price_per_mtok=self._price(values.get("input_price")),
                    output_price_per_mtok=self._price(values.get("output_price")),
                    metadata=_json_safe(metadata),
                )
            )
        return models

    def validate_on(self, sample: Any, provider: str = "sample") -> list[ModelInfo]:
        """Extract from a sample listing; a rule that finds no model is a `ListingRuleError`."""
        models = self.extract(sample, provider)
        if models:
            return models
        items = jmespath.search(self.selector, sample)
        if items is None:
            keys = list(sample)[:8] if isinstance(sample, Mapping) else type(sample).__name__
            raise ListingRuleError(
                f"listing rule for {provider}: selector {self.selector!r} matched nothing "
                f"(the listing's top level has {keys})"
            )
        if isinstance(items, Mapping):
            items = list(items.values())
        if not isinstance(items, list):
            raise ListingRuleError(
                f"listing rule for {provider}: selector {self.selector!r} gave a "
                f"{type(items).__name__}, not a list of models"
            )
        if not items:
            raise ListingRuleError(
                f"listing rule for {provider}: selector {self.selector!r} gave an empty list"
            )
        first = items[0]
        keys = list(first)[:8] if isinstance(first, Mapping) else type(first).__name__
        raise ListingRuleError(
            f"listing rule for {provider}: id expression {self.fields['id']!r} gave no value "
            f"for any of the {len(items)} items (the first has {keys})"
        )

    def _price(self, value: Any) -> float | None:
        try:
            price = float(value) if value is not None and value != "" else None
        except (TypeError, ValueError):
            return None
        if price is None or price < 0:
            return None
        return round(price * 1_000_000, 6) if self.price_unit == "per_token" else price


BUILTIN_RULES: dict[str, ListingRule] = {
    "openai": ListingRule(
        selector="data",
        fields={"id": "id", "owned_by": "owned_by", "context_length": "context_length"},
    ),
    "openrouter": ListingRule(
        selector="data",
        fields={
            "id": "id",
            "context_length": "context_length",
            "input_price": "pricing.prompt",
            "output_price": "pricing.completion",
            "name": "name",
        },
        price_unit="per_token",
    ),
    "anthropic": ListingRule(
        selector="data",
        fields={"id": "id", "display_name": "display_name", "created_at": "created_at"},
    ),
    "ollama": ListingRule(
        selector="models",
        path="/api/tags",
        fields={
            "id": "name || model",
            "size": "size",
            "family": "details.family",
            "parameter_size": "details.parameter_size",
            "quantization": "details.quantization_level",
        },
    ),
    "azure": ListingRule(
        selector="data",
        path="/deployments",
        fields={"id": "id", "model": "model", "status": "status"},
    ),
}


def parse_rules(raw: Mapping[str, Any] | str | None, source: str) -> dict[str, ListingRule]:
    """Rules by provider id from JSON text or a mapping; every error names `source`."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise ListingRuleError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ListingRuleError(f"{source} must map provider ids to rules")
    return {
        str(provider): ListingRule.parse(rule, f"{source}: {provider}")
        for provider, rule in raw.items()
    }


# --- fetching a raw listing ---------------------------------------------------------------


async def fetch_listing(provider: BaseLLMProvider, path: str | None) -> Any:
    """The provider's raw listing JSON (GET through its own SDK client, so auth applies)."""
    from .anthropic import AnthropicProvider
    from .openai_compatible import OpenAICompatibleProvider

    if isinstance(provider, OpenAICompatibleProvider):
        default = {"azure_deployments": "/deployments", "ollama_tags": "/api/tags"}.get(
            provider.preset.listing, "/models"
        )
        where = path or default
        if where.startswith("/api/") and provider.preset.listing == "ollama_tags":
            # Ollama's native API lives beside its OpenAI-compatible /v1.
            root = str(provider._client.base_url).rstrip("/").removesuffix("/v1")
            where = root + where
    elif isinstance(provider, AnthropicProvider):
        where = path or "/v1/models"
    else:
        raise UnsupportedOperationError(
            "has no listing endpoint a rule could read", provider=provider.name
        )
    client = provider._client
    data = await provider._call(None, lambda: client.get(where, cast_to=object))
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except ValueError:
            raise MalformedResponseError(
                f"the listing at {where} is not JSON", provider=provider.name
            ) from None
    return data


# --- the cache ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listing:
    """A provider's models, when they were fetched, how, and what each can do."""

    provider: str
    models: list[ModelInfo]
    capabilities: dict[str, ModelCapabilities]
    fetched_at: datetime
    source: str  # "rule" or "provider"
    from_cache: bool = False


class ModelDiscovery:
    """Lists models per provider, cached for `ttl_s`; configured rules read raw listings."""

    def __init__(
        self,
        *,
        ttl_s: float = 300.0,
        rules: Mapping[str, ListingRule] | None = None,
        capabilities: CapabilityRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.rules = dict(rules or {})
        self.capabilities = capabilities or default_registry()
        self._clock = clock
        self._cache: dict[str, tuple[float, Listing]] = {}

    def _key(self, provider: BaseLLMProvider) -> str:
        return f"{provider.name}|{getattr(provider, 'base_url', '') or ''}"

    async def list_models(self, provider: BaseLLMProvider, *, refresh: bool = False) -> Listing:
        """The provider's models; from the cache when fresher than `ttl_s` (unless `refresh`).

        A failed or empty rule-based listing raises and leaves the cached listing as it was.
        """
        key = self._key(provider)
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and not refresh and now - cached[0] < self.ttl_s:
            return Listing(**{**cached[1].__dict__, "from_cache": True})
        rule = self.rules.get(provider.name)
        if rule is not None:
            payload = await fetch_listing(provider, rule.path)
            models = rule.validate_on(payload, provider.name)
            source = "rule"
        else:
            models = await provider.list_models()
            source = "provider"
        listing = Listing(
            provider=provider.name,
            models=models,
            capabilities={m.id: self.capabilities.for_model(m.id) for m in models},
            fetched_at=datetime.now(UTC),
            source=source,
        )
        self._cache[key] = (now, listing)
        return listing

    def forget(self, provider: BaseLLMProvider | None = None) -> None:
        """Drop one provider's cached listing, or all of them."""
        if provider is None:
            self._cache.clear()
        else:
            self._cache.pop(self._key(provider), None)


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _json_safe(value: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(value, default=str))
