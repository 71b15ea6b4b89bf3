"""The local all-MiniLM-L6-v2 provider: a real model, loaded offline from its package."""

from __future__ import annotations

import math

import pytest

from study_query_llm.providers import BadRequestError, UnsupportedOperationError, create
from study_query_llm.providers.local_minilm import DIMENSION, MODEL_ID, unavailable_reason

pytestmark = pytest.mark.skipif(
    unavailable_reason() is not None, reason="local-embeddings extra not installed"
)


@pytest.fixture(scope="module")
def minilm():
    return create("local-minilm")


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


async def test_embeds_384_dimensions_with_meaningful_similarity(minilm):
    result = await minilm.embed(
        ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell today."],
        model=MODEL_ID,
    )
    assert result.dimension == DIMENSION
    assert len(result.vectors) == 3
    similar = _cosine(result.vectors[0], result.vectors[1])
    unrelated = _cosine(result.vectors[0], result.vectors[2])
    assert similar > unrelated + 0.3


async def test_same_text_same_vector(minilm):
    first = await minilm.embed(["reproducible"], model=MODEL_ID)
    second = await minilm.embed(["reproducible"], model=MODEL_ID)
    assert first.vectors[0] == pytest.approx(second.vectors[0], abs=1e-6)


async def test_refuses_chat_and_other_sizes(minilm):
    with pytest.raises(UnsupportedOperationError, match="embedding model"):
        await minilm.complete("hello")
    with pytest.raises(BadRequestError, match="384"):
        await minilm.embed(["x"], model=MODEL_ID, dimensions=128)
    models = await minilm.list_models()
    assert [m.id for m in models] == [MODEL_ID]
