"""The mock provider: deterministic, labelled, realistic tokens, streaming and injected faults."""

from __future__ import annotations

import math

import pytest

from study_query_llm.providers import (
    BadRequestError,
    ModelNotFoundError,
    ProviderResponse,
    TransientProviderError,
)
from study_query_llm.providers.mock import MockProvider


async def test_same_request_same_text_and_labelled_mock():
    provider = MockProvider(latency_ms=0)
    first = await provider.complete("What is entropy?", temperature=0.2)
    second = await MockProvider(latency_ms=0, seed=99).complete("What is entropy?", temperature=0.2)
    assert first.text == second.text
    assert first.provider == "mock"
    assert first.metadata["mock"] is True
    assert first.raw_response["mock"] is True
    other = await provider.complete("What is enthalpy?", temperature=0.2)
    assert other.text != first.text


async def test_token_counts_add_up_and_grow_with_the_prompt():
    provider = MockProvider(latency_ms=0)
    short = await provider.complete("Hi")
    long = await provider.complete("Hi " * 200)
    assert short.total_tokens == short.prompt_tokens + short.completion_tokens
    assert long.prompt_tokens > short.prompt_tokens + 150


async def test_max_tokens_truncates_with_length_finish_reason():
    response = await MockProvider(latency_ms=0).complete("Explain tides", max_tokens=5)
    assert response.finish_reason == "length"
    assert response.completion_tokens <= 5


async def test_stream_yields_chunks_then_the_final_response():
    provider = MockProvider(latency_ms=0)
    items = [item async for item in provider.stream("Explain tides")]
    *chunks, final = items
    assert isinstance(final, ProviderResponse)
    assert len(chunks) > 1
    assert all(isinstance(chunk, str) for chunk in chunks)
    assert "".join(chunks) == final.text
    assert final.text == (await provider.complete("Explain tides")).text


async def test_injected_failures_follow_the_seed():
    async def outcomes(seed: int) -> list[str]:
        provider = MockProvider(
            latency_ms=0, failure_rate=0.3, permanent_failure_rate=0.1, seed=seed
        )
        result = []
        for i in range(200):
            try:
                await provider.complete(f"q{i}")
                result.append("ok")
            except TransientProviderError:
                result.append("transient")
            except BadRequestError:
                result.append("permanent")
        return result

    first, again = await outcomes(7), await outcomes(7)
    assert first == again
    assert 30 <= first.count("transient") <= 90
    assert 5 <= first.count("permanent") <= 40


async def test_unknown_model_is_not_found():
    with pytest.raises(ModelNotFoundError, match="mock-small"):
        await MockProvider(latency_ms=0).complete("hi", model="gpt-4o")


async def test_embeddings_are_deterministic_unit_vectors():
    provider = MockProvider(latency_ms=0)
    result = await provider.embed(["alpha", "beta", "alpha"], model="mock-embed", dimensions=8)
    assert result.dimension == 8
    assert result.vectors[0] == result.vectors[2]
    assert result.vectors[0] != result.vectors[1]
    for vector in result.vectors:
        assert math.isclose(math.sqrt(sum(v * v for v in vector)), 1.0, rel_tol=1e-9)


async def test_json_mode_returns_json():
    import json

    response = await MockProvider(latency_ms=0).complete("Give JSON", json_mode=True)
    assert isinstance(json.loads(response.text), dict)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("   ", "empty"),
        ([{"role": "system", "content": "x"}], "no user message"),
        ([{"role": "wizard", "content": "x"}], "message 0"),
    ],
)
async def test_bad_messages_are_clear_errors(messages, match):
    with pytest.raises(BadRequestError, match=match):
        await MockProvider(latency_ms=0).complete(messages)


async def test_unknown_option_is_rejected_by_name():
    with pytest.raises(BadRequestError, match="frequency"):
        await MockProvider(latency_ms=0).complete("hi", frequency=3)
