"""What a model can do, inferred from its id by ordered regex rules, and task-aware selection.

Features are yes/no (chat, streaming, embeddings, vision, json_mode, tools, long_context);
tasks have a strength level (basic < good < strong < excellent). The built-in rules cover
common model families; `CAPABILITY_OVERRIDES` (JSON) or the `[capabilities]` table of the
providers file add rules that win over them::

    {"my-finetune-.*": {"features": ["json_mode"], "strengths": {"extraction": "strong"},
                        "context_length": 32000}}

Every rule whose pattern is found in the model id (case-insensitive `re.search`) applies,
in order: features are added (or removed with "remove"), strengths and the context length
are replaced. `select()` keeps the candidates that have every required feature (and the
minimum strength for the task, when asked) and orders them by strength, then by price.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, TypeVar

from .pricing import PricingTable

FEATURES = ("chat", "streaming", "embeddings", "vision", "json_mode", "tools", "long_context")
TASKS = (
    "code",
    "reasoning",
    "math",
    "creative",
    "extraction",
    "summarization",
    "multilingual",
)
LONG_CONTEXT_TOKENS = 100_000
# Completion tokens assumed when estimating the cost of a request without max_tokens.
DEFAULT_COMPLETION_TOKENS = 256

_ALIASES = {
    "stream": "streaming",
    "json": "json_mode",
    "embedding": "embeddings",
    "function_calling": "tools",
    "images": "vision",
}

T = TypeVar("T")


class Strength(IntEnum):
    """How good a model is at a task."""

    BASIC = 1
    GOOD = 2
    STRONG = 3
    EXCELLENT = 4

    @classmethod
    def parse(cls, value: str | int | Strength) -> Strength:
        if isinstance(value, Strength):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[str(value).strip().upper()]
        except KeyError:
            names = ", ".join(s.name.lower() for s in cls)
            raise ValueError(f"unknown strength {value!r}; use one of {names}") from None

    @property
    def label(self) -> str:
        return self.name.lower()


def feature_name(name: str) -> str:
    """The canonical feature name ("stream" → "streaming"); ValueError when unknown."""
    canonical = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if canonical not in FEATURES:
        raise ValueError(f"unknown capability {name!r}; use one of {', '.join(FEATURES)}")
    return canonical


def task_name(name: str) -> str:
    """A known task name; ValueError when unknown."""
    canonical = name.strip().lower()
    if canonical not in TASKS:
        raise ValueError(f"unknown task {name!r}; use one of {', '.join(TASKS)}")
    return canonical


@dataclass(frozen=True)
class CapabilityRule:
    """One inference rule: a regex on the model id and what it implies."""

    pattern: str
    features: frozenset[str] = frozenset()
    remove: frozenset[str] = frozenset()
    strengths: Mapping[str, Strength] = field(default_factory=dict)
    context_length: int | None = None
    source: str = "built-in"

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "_regex", re.compile(self.pattern, re.IGNORECASE))
        except re.error as exc:
            raise ValueError(f"capability rule {self.pattern!r}: bad regex: {exc}") from None

    def matches(self, model_id: str) -> bool:
        return self._regex.search(model_id) is not None  # type: ignore[attr-defined]

    @classmethod
    def from_json(cls, pattern: str, spec: Mapping[str, Any], source: str) -> CapabilityRule:
        """A rule from configuration; a bad name or value is a one-line `ValueError`."""
        where = f"{source}: rule {pattern!r}"
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: must be an object with features/strengths/...")
        unknown = set(spec) - {"features", "remove", "strengths", "context_length"}
        if unknown:
            raise ValueError(
                f"{where}: unknown key {sorted(unknown)[0]!r}; "
                "use features, remove, strengths, context_length"
            )
        try:
            features = frozenset(feature_name(f) for f in _names(spec.get("features", [])))
            remove = frozenset(feature_name(f) for f in _names(spec.get("remove", [])))
            strengths_raw = spec.get("strengths", {})
            if not isinstance(strengths_raw, Mapping):
                raise ValueError('strengths must be an object like {"code": "strong"}')
            strengths = {task_name(t): Strength.parse(s) for t, s in strengths_raw.items()}
            context = spec.get("context_length")
            if context is not None and (not isinstance(context, int) or context <= 0):
                raise ValueError("context_length must be a positive whole number")
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        return cls(pattern, features, remove, strengths, context, source)


def _names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError("features must be a list of names")
    return list(value)


def _rule(
    pattern: str,
    features: str = "",
    *,
    remove: str = "",
    context: int | None = None,
    **strengths: str,
) -> CapabilityRule:
    return CapabilityRule(
        pattern,
        frozenset(features.split()),
        frozenset(remove.split()),
        {task: Strength.parse(level) for task, level in strengths.items()},
        context,
    )


_ALL = dict.fromkeys(TASKS)


def _levels(level: str, **overrides: str) -> dict[str, str]:
    return {**{t: level for t in _ALL}, **overrides}


# Ordered: later rules refine earlier ones. Patterns are searched in the full model id,
# so "openai/gpt-4o-mini" (OpenRouter) matches the same rules as "gpt-4o-mini".
DEFAULT_RULES: tuple[CapabilityRule, ...] = (
    _rule(r".", "chat streaming"),
    # OpenAI
    _rule(r"(^|/)gpt-3\.5", "json_mode tools", context=16_385, **_levels("basic", code="good")),
    _rule(r"(^|/)gpt-4(-turbo|-\d{4})?", "json_mode tools", context=128_000, **_levels("strong")),
    _rule(
        r"(^|/)gpt-4o",
        "vision json_mode tools",
        context=128_000,
        **_levels("strong", extraction="excellent"),
    ),
    _rule(r"(^|/)gpt-4o-mini", **_levels("good", extraction="strong")),
    _rule(
        r"(^|/)gpt-4\.1",
        "vision json_mode tools",
        context=1_047_576,
        **_levels("strong", code="excellent", extraction="excellent"),
    ),
    _rule(r"(^|/)gpt-4\.1-(mini|nano)", **_levels("good", code="strong")),
    _rule(r"(^|/)gpt-5", "vision json_mode tools", context=400_000, **_levels("excellent")),
    _rule(
        r"(^|/)o[134](-|$)",
        "json_mode tools",
        context=200_000,
        **_levels("strong", reasoning="excellent", math="excellent", code="excellent"),
    ),
    _rule(
        r"(^|/)o[134]-mini", **_levels("good", reasoning="strong", math="excellent", code="strong")
    ),
    # Anthropic
    _rule(r"claude", "vision tools", context=200_000, **_levels("strong")),
    _rule(r"claude.*haiku", **_levels("good", extraction="strong")),
    _rule(r"claude.*sonnet", **_levels("strong", code="excellent", reasoning="excellent")),
    _rule(r"claude.*opus", **_levels("excellent")),
    # Open-weight families
    _rule(r"llama", "json_mode", context=8_192, **_levels("basic", creative="good")),
    _rule(r"llama[-_ ]?3\.[1-3]", "tools", context=128_000),
    _rule(r"llama.*(70|90|405)b", **_levels("strong", math="good")),
    _rule(r"llama.*(8|11)b", **_levels("basic", summarization="good", extraction="good")),
    _rule(r"mistral|mixtral|ministral", "json_mode tools", context=32_768, **_levels("good")),
    _rule(r"mistral-large|mistral-medium", context=128_000, **_levels("strong")),
    _rule(r"qwen", "json_mode tools", context=32_768, **_levels("good", multilingual="strong")),
    _rule(r"qwen.*coder", code="strong"),
    _rule(r"qwen.*(72b|235b|max)", context=131_072, **_levels("strong")),
    _rule(r"deepseek", "json_mode", context=64_000, **_levels("strong")),
    _rule(r"deepseek.*(coder|v3)", code="excellent"),
    _rule(r"deepseek.*(r1|reasoner)", reasoning="excellent", math="excellent"),
    _rule(r"gemma", context=8_192, **_levels("basic")),
    _rule(r"phi-?[34]", context=128_000, **_levels("basic", reasoning="good", math="good")),
    _rule(r"gemini", "vision json_mode tools", context=1_000_000, **_levels("strong")),
    _rule(r"llava|pixtral|-vl\b|vision", "vision"),
    # Embedding models answer no chat at all.
    _rule(
        r"embed|minilm|(^|/)(bge|e5|gte)-",
        "embeddings",
        remove="chat streaming json_mode tools vision",
    ),
    # The offline mock: every feature the mock provider offers, weak at everything.
    _rule(r"^mock", "json_mode embeddings", **_levels("basic")),
    _rule(r"^mock-embed", "embeddings", remove="chat streaming json_mode"),
)


@dataclass(frozen=True)
class ModelCapabilities:
    """What the rules say about one model id, and which rules said it."""

    model: str
    features: frozenset[str]
    strengths: Mapping[str, Strength]
    context_length: int | None
    matched: tuple[str, ...]

    def has(self, *features: str) -> bool:
        return all(feature_name(f) in self.features for f in features)

    def strength(self, task: str) -> Strength | None:
        return self.strengths.get(task_name(task))

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "features": sorted(self.features),
            "strengths": {task: s.label for task, s in sorted(self.strengths.items())},
            "context_length": self.context_length,
            "matched": list(self.matched),
        }

    def summary(self) -> str:
        """One line for tables: features, then strengths."""
        parts = [", ".join(f for f in FEATURES if f in self.features)]
        if self.strengths:
            parts.append(" ".join(f"{t}:{s.label}" for t, s in sorted(self.strengths.items())))
        return " | ".join(p for p in parts if p)


class CapabilityRegistry:
    """Capabilities by model id: built-in rules, then configured overrides (which win)."""

    def __init__(
        self,
        overrides: Iterable[CapabilityRule] = (),
        *,
        rules: Sequence[CapabilityRule] = DEFAULT_RULES,
    ) -> None:
        self.rules: tuple[CapabilityRule, ...] = (*rules, *overrides)
        self._cache: dict[str, ModelCapabilities] = {}

    @classmethod
    def from_config(
        cls, *sources: tuple[str, Mapping[str, Any] | str | None]
    ) -> CapabilityRegistry:
        """A registry from (source name, JSON text or mapping) pairs, applied in order."""
        overrides: list[CapabilityRule] = []
        for source, value in sources:
            if value is None or value == "":
                continue
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as exc:
                    raise ValueError(f"{source} is not valid JSON: {exc}") from None
            if not isinstance(value, Mapping):
                raise ValueError(f'{source} must map patterns to rules, like {{"my-.*": {{...}}}}')
            overrides += [
                CapabilityRule.from_json(str(pattern), spec, source)
                for pattern, spec in value.items()
            ]
        return cls(overrides)

    def for_model(self, model_id: str) -> ModelCapabilities:
        """The capabilities the rules give `model_id` (cached)."""
        cached = self._cache.get(model_id)
        if cached is not None:
            return cached
        features: set[str] = set()
        strengths: dict[str, Strength] = {}
        context: int | None = None
        matched: list[str] = []
        for rule in self.rules:
            if not rule.matches(model_id):
                continue
            features |= rule.features
            features -= rule.remove
            strengths.update(rule.strengths)
            if rule.context_length is not None:
                context = rule.context_length
            if rule.pattern != ".":
                matched.append(
                    rule.pattern if rule.source == "built-in" else f"{rule.pattern} ({rule.source})"
                )
        if "embeddings" in features and "chat" not in features:
            strengths = {}
        if context is not None and context >= LONG_CONTEXT_TOKENS:
            features.add("long_context")
        result = ModelCapabilities(
            model_id, frozenset(features), dict(strengths), context, tuple(matched)
        )
        self._cache[model_id] = result
        return result

    def select(
        self,
        candidates: Iterable[T],
        *,
        task: str | None = None,
        required: Iterable[str] = (),
        min_strength: str | Strength | None = None,
        pricing: PricingTable | None = None,
        model_of: Callable[[T], str] | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = DEFAULT_COMPLETION_TOKENS,
    ) -> list[T]:
        """Candidates with every required feature, strongest for `task` first, then cheapest.

        Candidates are model ids or objects with a `.model` attribute (or pass `model_of`).
        A candidate with no known strength for the task sorts after those with one; with
        no known price, after those with one. Ties keep the given order.
        """
        needed = [feature_name(f) for f in required]
        task = task_name(task) if task else None
        floor = Strength.parse(min_strength) if min_strength is not None else None
        if floor is not None and task is None:
            raise ValueError("min_strength needs a task")
        pricing = pricing or PricingTable()
        get_model = model_of or _model_of
        ranked: list[tuple[tuple[float, float, int], T]] = []
        for index, candidate in enumerate(candidates):
            caps = self.for_model(get_model(candidate))
            if not caps.has(*needed):
                continue
            strength = caps.strengths.get(task) if task else None
            if floor is not None and (strength is None or strength < floor):
                continue
            cost = estimated_cost(pricing, caps.model, prompt_tokens, completion_tokens)
            ranked.append(((-(strength or 0), cost, index), candidate))
        ranked.sort(key=lambda pair: pair[0])
        return [candidate for _key, candidate in ranked]


def estimated_cost(
    pricing: PricingTable, model: str, prompt_tokens: int, completion_tokens: int
) -> float:
    """USD for a request of this size, or infinity when the model has no known price."""
    price = pricing.price(model)
    if price is None:
        return math.inf
    # Per million tokens; with no size given, compare a typical 1:1 mix of the two prices.
    if prompt_tokens == 0 and completion_tokens == 0:
        return price.input_per_mtok + price.output_per_mtok
    return (
        prompt_tokens * price.input_per_mtok + completion_tokens * price.output_per_mtok
    ) / 1_000_000


def _model_of(candidate: Any) -> str:
    if isinstance(candidate, str):
        return candidate
    return str(candidate.model)


_default: CapabilityRegistry | None = None


def default_registry() -> CapabilityRegistry:
    """The built-in rules only (configured overrides: `CapabilityRegistry.from_config`)."""
    global _default
    if _default is None:
        _default = CapabilityRegistry()
    return _default


def select(
    candidates: Iterable[T],
    *,
    task: str | None = None,
    required: Iterable[str] = (),
    min_strength: str | Strength | None = None,
    registry: CapabilityRegistry | None = None,
    pricing: PricingTable | None = None,
) -> list[T]:
    """`CapabilityRegistry.select` with the default (or a given) registry."""
    return (registry or default_registry()).select(
        candidates, task=task, required=required, min_strength=min_strength, pricing=pricing
    )
