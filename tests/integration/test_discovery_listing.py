"""Model discovery over real HTTP: listing rules on live listings, a TTL cache, bad rules.

The loopback server answers the OpenAI, Anthropic, Azure and Ollama listing endpoints;
a custom nested listing is served by scripting a 200 answer with that body.
"""

from __future__ import annotations

import json

import pytest

from study_query_llm.config import Settings
from study_query_llm.providers import UnsupportedOperationError, create
from study_query_llm.providers.discovery import (
    BUILTIN_RULES,
    ListingRule,
    ListingRuleError,
    ModelDiscovery,
)
from study_query_llm.testing.server import DEFAULT_MODELS, Fault

SETTINGS = Settings(_env_file=None)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def provider(provider_id: str, server, **extra):
    base = server.url if provider_id in ("anthropic", "azure") else server.openai_base_url
    return create(provider_id, SETTINGS, api_key="k", base_url=base, model="gpt-4o", **extra)


@pytest.mark.parametrize(
    ("provider_id", "path"),
    [
        ("openai", "/v1/models"),
        ("anthropic", "/v1/models"),
        ("ollama", "/api/tags"),
        ("azure", "/openai/deployments"),
    ],
)
async def test_built_in_rules_read_each_providers_live_listing(loopback, provider_id, path):
    instance = provider(provider_id, loopback)
    discovery = ModelDiscovery(rules={provider_id: BUILTIN_RULES[provider_id]})
    listing = await discovery.list_models(instance)
    await instance.aclose()
    assert [m.id for m in listing.models] == list(DEFAULT_MODELS)
    assert listing.source == "rule" and loopback.count(path) == 1
    assert listing.capabilities["text-embedding-3-small"].has("embeddings")
    assert not listing.capabilities["text-embedding-3-small"].has("chat")


async def test_a_custom_nested_listing_is_read_by_its_rule(loopback):
    body = {
        "result": {
            "catalog": [
                {"spec": {"name": "acme-chat-large", "limits": {"context": 32000}}, "on": True},
                {"spec": {"name": "acme-embed-v1"}, "on": True},
                {"spec": {"name": "acme-retired"}, "on": False},
            ]
        }
    }
    loopback.script(Fault(status=200, body=json.dumps(body)), path="/v1/models")
    rule = ListingRule(
        selector="result.catalog[?on]",
        fields={"id": "spec.name", "context_length": "spec.limits.context"},
    )
    instance = provider("vllm", loopback)
    listing = await ModelDiscovery(rules={"vllm": rule}).list_models(instance)
    await instance.aclose()
    assert [(m.id, m.context_length) for m in listing.models] == [
        ("acme-chat-large", 32000),
        ("acme-embed-v1", None),
    ]
    assert listing.capabilities["acme-embed-v1"].has("embeddings")


async def test_listings_are_cached_for_the_ttl(loopback):
    clock = Clock()
    instance = provider("openai", loopback)
    discovery = ModelDiscovery(ttl_s=300, clock=clock)
    first = await discovery.list_models(instance)
    clock.now = 299
    second = await discovery.list_models(instance)
    assert loopback.count("/v1/models") == 1
    assert not first.from_cache and second.from_cache
    assert second.models == first.models
    clock.now = 300
    await discovery.list_models(instance)
    assert loopback.count("/v1/models") == 2
    await discovery.list_models(instance, refresh=True)
    assert loopback.count("/v1/models") == 3
    await instance.aclose()


async def test_a_rule_that_finds_nothing_is_rejected_and_the_cached_listing_kept(loopback):
    clock = Clock()
    instance = provider("openai", loopback)
    discovery = ModelDiscovery(ttl_s=60, clock=clock)
    good = await discovery.list_models(instance)
    discovery.rules["openai"] = ListingRule(selector="models", fields={"id": "name"})
    with pytest.raises(ListingRuleError, match="selector 'models' matched nothing"):
        await discovery.list_models(instance, refresh=True)
    kept = await discovery.list_models(instance)
    assert kept.from_cache and [m.id for m in kept.models] == [m.id for m in good.models]
    clock.now = 61  # expired: the broken rule still raises rather than listing nothing
    with pytest.raises(ListingRuleError):
        await discovery.list_models(instance)
    await instance.aclose()


async def test_openrouter_listing_keeps_prices_and_context_without_a_rule(loopback):
    instance = provider("openrouter", loopback)
    listing = await ModelDiscovery().list_models(instance)
    await instance.aclose()
    model = next(m for m in listing.models if m.id == "openai/gpt-4o-mini")
    assert listing.source == "provider"
    assert model.context_length == 128_000
    assert model.input_price_per_mtok == pytest.approx(0.15)
    assert model.output_price_per_mtok == pytest.approx(0.6)


async def test_a_rule_for_a_provider_without_a_listing_endpoint_is_refused():
    discovery = ModelDiscovery(rules={"mock": BUILTIN_RULES["openai"]})
    with pytest.raises(UnsupportedOperationError, match="no listing endpoint"):
        await discovery.list_models(create("mock", SETTINGS))
