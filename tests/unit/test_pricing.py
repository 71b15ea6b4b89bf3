"""Costs come from a price table; unknown models have no cost rather than a made-up zero."""

from __future__ import annotations

import pytest

from study_query_llm.providers.pricing import PricingTable


def test_known_model_cost_is_exact():
    table = PricingTable()
    # gpt-4o-mini: $0.15 in, $0.60 out per million tokens
    assert table.cost_usd("gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(0.75)
    assert table.cost_usd("gpt-4o-mini", 1234, 567) == pytest.approx(
        (1234 * 0.15 + 567 * 0.60) / 1e6
    )


def test_unknown_model_has_no_cost():
    assert PricingTable().cost_usd("some-unknown-model", 10, 10) is None


def test_unknown_token_counts_have_no_cost():
    assert PricingTable().cost_usd("gpt-4o", None, None) is None


@pytest.mark.parametrize(
    ("model", "base"),
    [
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("openai/gpt-4o-mini", "gpt-4o-mini"),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("GPT-4o", "gpt-4o"),
    ],
)
def test_dated_and_prefixed_names_find_their_family(model, base):
    table = PricingTable()
    assert table.price(model) == table.price(base)


def test_mock_models_cost_zero():
    assert PricingTable().cost_usd("mock-small", 100, 100) == 0.0


def test_overrides_win_and_extend():
    table = PricingTable({"gpt-4o-mini": (1.0, 2.0), "lab-model": (0.5, 0.5)})
    assert table.cost_usd("gpt-4o-mini", 1_000_000, 0) == pytest.approx(1.0)
    assert table.cost_usd("lab-model", 2_000_000, 0) == pytest.approx(1.0)


def test_negative_override_is_rejected():
    with pytest.raises(ValueError, match="negative"):
        PricingTable({"x": (-1.0, 0.0)})
