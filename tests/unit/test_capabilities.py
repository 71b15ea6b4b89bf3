"""Capabilities inferred from model ids, configured overrides, and task-aware selection."""

from __future__ import annotations

import pytest

from study_query_llm.providers import PricingTable
from study_query_llm.providers.capabilities import (
    CapabilityRegistry,
    Strength,
    default_registry,
    select,
)


@pytest.mark.parametrize(
    ("model", "has", "lacks"),
    [
        ("text-embedding-3-small", {"embeddings"}, {"chat", "streaming"}),
        ("nomic-embed-text:latest", {"embeddings"}, {"chat"}),
        ("all-MiniLM-L6-v2", {"embeddings"}, {"chat"}),
        ("gpt-4o-mini", {"chat", "vision", "json_mode", "tools", "long_context"}, {"embeddings"}),
        ("openai/gpt-4o-mini", {"vision", "json_mode"}, set()),  # OpenRouter-style prefix
        ("claude-3-5-haiku-latest", {"chat", "vision", "tools", "long_context"}, {"json_mode"}),
        ("llama3.1:8b", {"chat", "json_mode", "tools", "long_context"}, {"vision"}),
        ("llava:13b", {"chat", "vision"}, set()),
        ("some-unknown-model", {"chat", "streaming"}, {"vision", "embeddings", "long_context"}),
    ],
)
def test_capabilities_are_inferred_from_the_model_id(model, has, lacks):
    caps = default_registry().for_model(model)
    assert has <= caps.features
    assert not (lacks & caps.features)


def test_strengths_follow_the_model_family():
    registry = default_registry()
    assert registry.for_model("o3-mini").strength("math") == Strength.EXCELLENT
    assert registry.for_model("claude-sonnet-4-5").strength("code") == Strength.EXCELLENT
    assert registry.for_model("gpt-4o-mini").strength("code") == Strength.GOOD
    assert registry.for_model("some-unknown-model").strength("code") is None
    assert registry.for_model("text-embedding-3-small").strengths == {}


def test_the_rules_that_matched_are_reported():
    caps = default_registry().for_model("gpt-4o-mini")
    assert caps.matched[-1] == "(^|/)gpt-4o-mini"
    assert caps.to_json()["strengths"]["extraction"] == "strong"
    assert "vision" in caps.summary() and "code:good" in caps.summary()


def test_configured_overrides_win_over_the_defaults():
    registry = CapabilityRegistry.from_config(
        (
            "CAPABILITY_OVERRIDES",
            '{"^gpt-4o-mini$": {"remove": ["vision"], "strengths": {"code": "excellent"},'
            ' "context_length": 64000}, "my-finetune": {"features": ["json_mode"]}}',
        )
    )
    caps = registry.for_model("gpt-4o-mini")
    assert "vision" not in caps.features
    assert caps.strength("code") == Strength.EXCELLENT
    assert caps.context_length == 64000 and "long_context" not in caps.features
    assert caps.matched[-1] == "^gpt-4o-mini$ (CAPABILITY_OVERRIDES)"
    assert registry.for_model("my-finetune-v2").has("json_mode", "chat")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{not json", "CAPABILITY_OVERRIDES is not valid JSON"),
        ('{"x": {"features": ["teleport"]}}', "rule 'x': unknown capability 'teleport'"),
        ('{"x": {"strengths": {"poetry": "good"}}}', "rule 'x': unknown task 'poetry'"),
        ('{"x": {"strengths": {"code": "great"}}}', "rule 'x': unknown strength 'great'"),
        ('{"x": {"colour": "red"}}', "rule 'x': unknown key 'colour'"),
        ('{"(": {"features": []}}', "capability rule '(': bad regex"),
        ('{"x": {"context_length": -1}}', "context_length must be a positive whole number"),
    ],
)
def test_bad_overrides_are_one_clear_line(value, message):
    with pytest.raises(ValueError, match=None) as info:
        CapabilityRegistry.from_config(("CAPABILITY_OVERRIDES", value))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_select_keeps_what_fits_strongest_first_then_cheapest():
    pricing = PricingTable({"cheap-strong": (0.1, 0.1), "pricey-strong": (5, 5)})
    registry = CapabilityRegistry.from_config(
        (
            "test",
            {
                "strong": {"strengths": {"code": "strong"}, "features": ["json_mode"]},
                "weak": {"strengths": {"code": "basic"}, "features": ["json_mode"]},
            },
        )
    )
    models = ["weak-one", "pricey-strong", "cheap-strong", "no-json"]
    ranked = registry.select(models, task="code", required=["json"], pricing=pricing)
    assert ranked == ["cheap-strong", "pricey-strong", "weak-one"]
    floor = registry.select(models, task="code", min_strength="strong", pricing=pricing)
    assert floor == ["cheap-strong", "pricey-strong"]


def test_select_orders_by_price_without_a_task_and_rejects_unknown_names():
    assert select(["gpt-4o", "unknown-x", "gpt-4o-mini"]) == ["gpt-4o-mini", "gpt-4o", "unknown-x"]
    with pytest.raises(ValueError, match="unknown capability 'wings'"):
        select(["gpt-4o"], required=["wings"])
    with pytest.raises(ValueError, match="min_strength needs a task"):
        select(["gpt-4o"], min_strength="good")
