"""Batch targets are written `provider:model`; provider groups have a colon in their id."""

from __future__ import annotations

import pytest

from study_query_llm.services.jobs import Target


@pytest.mark.parametrize(
    ("text", "provider", "model"),
    [
        ("mock:mock-small", "mock", "mock-small"),
        ("ollama:llama3.1:8b", "ollama", "llama3.1:8b"),
        (" openai : gpt-4o-mini ", "openai", "gpt-4o-mini"),
        ("group:fast:auto", "group:fast", "auto"),
        ("group:fast", "group:fast", "auto"),
        ("group:fast:openai/gpt-4o-mini", "group:fast", "openai/gpt-4o-mini"),
        ("group:local:ollama:llama3.1:8b", "group:local", "ollama:llama3.1:8b"),
    ],
)
def test_targets_parse(text: str, provider: str, model: str) -> None:
    assert Target.parse(text) == Target(provider, model)


@pytest.mark.parametrize("text", ["", "mock", "mock:", ":model", "group:", "group::auto"])
def test_malformed_targets_are_refused_by_name(text: str) -> None:
    with pytest.raises(ValueError, match="must look like"):
        Target.parse(text)
