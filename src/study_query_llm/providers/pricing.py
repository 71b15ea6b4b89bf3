"""Per-million-token prices (USD) for common models, and the cost of one response.

Prices are list prices at the time of writing; set `PRICING_OVERRIDES` to correct or extend
them. An unknown model has no cost (None), never a made-up 0. Mock models cost exactly 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal


@dataclass(frozen=True)
class Price:
    """USD per one million input (prompt) and output (completion) tokens."""

    input_per_mtok: float
    output_per_mtok: float


DEFAULT_PRICES: dict[str, Price] = {
    # OpenAI
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-4-turbo": Price(10.00, 30.00),
    "gpt-3.5-turbo": Price(0.50, 1.50),
    "o1": Price(15.00, 60.00),
    "o1-mini": Price(1.10, 4.40),
    "o3-mini": Price(1.10, 4.40),
    "text-embedding-3-small": Price(0.02, 0.0),
    "text-embedding-3-large": Price(0.13, 0.0),
    "text-embedding-ada-002": Price(0.10, 0.0),
    # Anthropic
    "claude-haiku-4-5": Price(1.00, 5.00),
    "claude-opus-4-5": Price(5.00, 25.00),
    "claude-opus-4-1": Price(15.00, 75.00),
    "claude-3-5-haiku": Price(0.80, 4.00),
    "claude-3-5-sonnet": Price(3.00, 15.00),
    "claude-3-7-sonnet": Price(3.00, 15.00),
    "claude-sonnet-4": Price(3.00, 15.00),
    "claude-sonnet-4-5": Price(3.00, 15.00),
    "claude-opus-4": Price(15.00, 75.00),
    "claude-3-haiku": Price(0.25, 1.25),
    "claude-3-opus": Price(15.00, 75.00),
    # Open-weight models on hosted providers (typical prices)
    "meta-llama/llama-3.3-70b-instruct": Price(0.40, 0.40),
    "meta-llama/meta-llama-3.1-8b-instruct": Price(0.10, 0.10),
    "meta-llama/llama-3.1-8b-instruct": Price(0.10, 0.10),
    "deepseek-ai/deepseek-v3": Price(0.25, 0.25),
    # Mock models are free by definition
    "mock-small": Price(0.0, 0.0),
    "mock-large": Price(0.0, 0.0),
    "mock-embed": Price(0.0, 0.0),
}

_DATE_SUFFIXES = ("-latest",)


def _candidates(model: str) -> list[str]:
    """Names to look up, most specific first: exact, without provider prefix, without dates."""
    name = model.strip().lower()
    names = [name]
    if "/" in name and not name.startswith("meta-llama/") and not name.startswith("deepseek"):
        names.append(name.split("/", 1)[1])  # "openai/gpt-4o-mini" on OpenRouter
    result: list[str] = []
    for candidate in names:
        result.append(candidate)
        trimmed = candidate
        for suffix in _DATE_SUFFIXES:
            if trimmed.endswith(suffix):
                trimmed = trimmed[: -len(suffix)]
        # "gpt-4o-mini-2024-07-18", "claude-3-5-haiku-20241022"
        parts = trimmed.split("-")
        while parts and parts[-1].isdigit() and len(parts[-1]) >= 2 and len(parts) > 1:
            parts.pop()
            result.append("-".join(parts))
        if trimmed != candidate:
            result.append(trimmed)
    return result


class PricingTable:
    """Looks up prices with overrides taking precedence over the defaults."""

    def __init__(self, overrides: Mapping[str, tuple[float, float] | Price] | None = None) -> None:
        self._prices: dict[str, Price] = dict(DEFAULT_PRICES)
        for model, value in (overrides or {}).items():
            price = value if isinstance(value, Price) else Price(float(value[0]), float(value[1]))
            if price.input_per_mtok < 0 or price.output_per_mtok < 0:
                raise ValueError(f"price for {model!r} must not be negative")
            self._prices[model.strip().lower()] = price

    def price(self, model: str) -> Price | None:
        for candidate in _candidates(model):
            if candidate in self._prices:
                return self._prices[candidate]
        return None

    def cost_usd(
        self, model: str, prompt_tokens: int | None, completion_tokens: int | None
    ) -> float | None:
        """Exact cost of one call, or None when the model or its token counts are unknown."""
        price = self.price(model)
        if price is None or prompt_tokens is None:
            return None
        cost = Decimal(prompt_tokens) * Decimal(str(price.input_per_mtok)) + Decimal(
            completion_tokens or 0
        ) * Decimal(str(price.output_per_mtok))
        return float(cost / Decimal(1_000_000))

    def items(self) -> list[tuple[str, Price]]:
        return sorted(self._prices.items())
