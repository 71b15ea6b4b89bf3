"""JMESPath listing rules: built-in shapes, a custom nested shape, and rules that must fail."""

from __future__ import annotations

import pytest

from study_query_llm.providers.discovery import (
    BUILTIN_RULES,
    ListingRule,
    ListingRuleError,
    parse_rules,
)

OPENAI = {
    "object": "list",
    "data": [
        {"id": "gpt-4o-mini", "object": "model", "owned_by": "system"},
        {"id": "text-embedding-3-small", "object": "model", "owned_by": "system"},
    ],
}
OPENROUTER = {
    "data": [
        {
            "id": "openai/gpt-4o-mini",
            "name": "OpenAI: GPT-4o-mini",
            "context_length": 128000,
            "pricing": {"prompt": "0.00000015", "completion": "0.0000006"},
        }
    ]
}
ANTHROPIC = {
    "data": [
        {"type": "model", "id": "claude-haiku-4-5", "display_name": "Claude Haiku 4.5"},
        {"type": "model", "id": "claude-sonnet-4-5", "display_name": "Claude Sonnet 4.5"},
    ],
    "has_more": False,
}
OLLAMA = {
    "models": [
        {
            "name": "llama3.1:8b",
            "size": 4920753328,
            "details": {"family": "llama", "parameter_size": "8B", "quantization_level": "Q4_K_M"},
        },
        {"model": "nomic-embed-text:latest", "details": {"family": "nomic-bert"}},
    ]
}
NESTED = {
    "result": {
        "catalog": [
            {"spec": {"name": "acme-large", "limits": {"context": 32000}}, "enabled": True,
             "price": {"in": 1.5, "out": 3}},
            {"spec": {"name": "acme-old", "limits": {"context": 4096}}, "enabled": False},
            {"spec": {"name": "acme-small"}, "enabled": True},
        ]
    }
}  # fmt: skip


def test_openai_listing():
    models = BUILTIN_RULES["openai"].validate_on(OPENAI, "openai")
    assert [(m.id, m.owned_by, m.provider) for m in models] == [
        ("gpt-4o-mini", "system", "openai"),
        ("text-embedding-3-small", "system", "openai"),
    ]


def test_openrouter_prices_per_token_become_per_million():
    (model,) = BUILTIN_RULES["openrouter"].validate_on(OPENROUTER, "openrouter")
    assert model.context_length == 128000
    assert model.input_price_per_mtok == pytest.approx(0.15)
    assert model.output_price_per_mtok == pytest.approx(0.6)
    assert model.metadata == {"name": "OpenAI: GPT-4o-mini"}


def test_anthropic_listing():
    models = BUILTIN_RULES["anthropic"].validate_on(ANTHROPIC, "anthropic")
    assert [m.id for m in models] == ["claude-haiku-4-5", "claude-sonnet-4-5"]
    assert models[0].metadata["display_name"] == "Claude Haiku 4.5"


def test_ollama_listing_takes_name_or_model_and_details():
    models = BUILTIN_RULES["ollama"].validate_on(OLLAMA, "ollama")
    assert [m.id for m in models] == ["llama3.1:8b", "nomic-embed-text:latest"]
    assert models[0].metadata == {
        "size": 4920753328,
        "family": "llama",
        "parameter_size": "8B",
        "quantization": "Q4_K_M",
    }


def test_a_custom_nested_shape_with_a_filter():
    rule = ListingRule(
        selector="result.catalog[?enabled]",
        fields={
            "id": "spec.name",
            "context_length": "spec.limits.context",
            "input_price": "price.in",
            "output_price": "price.out",
        },
    )
    models = rule.validate_on(NESTED, "acme")
    assert [(m.id, m.context_length) for m in models] == [
        ("acme-large", 32000),
        ("acme-small", None),
    ]
    assert (models[0].input_price_per_mtok, models[0].output_price_per_mtok) == (1.5, 3.0)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"selector": "data[", "fields": {"id": "id"}}, "selector 'data[' is not valid JMESPath"),
        ({"selector": "data", "fields": {"id": "id]"}}, "field 'id': 'id]' is not valid JMESPath"),
        ({"selector": "data", "fields": {"name": "id"}}, 'fields must map "id"'),
        (
            {"selector": "data", "fields": {"id": "id"}, "color": 1},
            "Extra inputs are not permitted",
        ),
        ("llama-hub", "unknown built-in rule 'llama-hub'"),
    ],
)
def test_invalid_rules_are_rejected_when_configured(rule, message):
    with pytest.raises(ListingRuleError) as info:
        parse_rules({"vllm": rule}, "MODEL_LISTING_RULES")
    assert str(info.value).startswith("MODEL_LISTING_RULES: vllm: ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (ListingRule(selector="models", fields={"id": "id"}), "selector 'models' matched nothing"),
        (ListingRule(selector="object", fields={"id": "id"}), "gave a str, not a list of models"),
        (ListingRule(selector="data", fields={"id": "name"}), "id expression 'name' gave no value"),
        (ListingRule(selector="data[?owned_by=='me']", fields={"id": "id"}), "an empty list"),
    ],
)
def test_a_rule_that_extracts_nothing_is_rejected_with_the_reason(rule, message):
    with pytest.raises(ListingRuleError) as info:
        rule.validate_on(OPENAI, "vllm")
    assert message in str(info.value)
    assert str(info.value).startswith("listing rule for vllm: ")


def test_rules_parse_from_json_and_by_built_in_name():
    rules = parse_rules(
        '{"vllm": "ollama", "custom": {"selector": "items", "fields": {"id": "key"}}}', "X"
    )
    assert rules["vllm"] is BUILTIN_RULES["ollama"]
    assert rules["custom"].extract({"items": [{"key": "a"}, {"key": "a"}, {}]}, "c")[0].id == "a"
    with pytest.raises(ListingRuleError, match="X is not valid JSON"):
        parse_rules("{nope", "X")
