"""A mock provider for offline work: deterministic answers, realistic tokens, injectable faults.

Every response carries `metadata["mock"] = True` and the provider id `mock`, so a record made
with it can never be mistaken for a real model's answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
from collections.abc import AsyncIterator
from typing import ClassVar

from .base import (
    BaseLLMProvider,
    CompletionOptions,
    EmbeddingResponse,
    Message,
    ModelInfo,
    ProviderResponse,
    Stopwatch,
    approx_token_count,
)
from .errors import BadRequestError, ModelNotFoundError, ProviderUnavailableError

MOCK_MODELS = ("mock-small", "mock-large", "mock-embed")
EMBEDDING_DIMENSION = 32

_VOCABULARY = (
    "the model considers the question and answers with a short study of evidence, "
    "latency, tokens and cost across providers; results vary with temperature, prompt "
    "wording and sampling, so every answer is recorded for later comparison and search"
).split()


def _digest(*parts: object) -> bytes:
    payload = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).digest()


class MockProvider(BaseLLMProvider):
    """Same request, same text. Latency and failures come from a seeded random generator."""

    provider_id: ClassVar[str] = "mock"
    supports_embeddings: ClassVar[bool] = True
    supports_json_mode: ClassVar[bool] = True
    is_mock: ClassVar[bool] = True

    def __init__(
        self,
        *,
        model: str | None = "mock-small",
        latency_ms: float = 50.0,
        failure_rate: float = 0.0,
        permanent_failure_rate: float = 0.0,
        seed: int = 0,
        stream_chunk_words: int = 3,
        name: str | None = None,
    ) -> None:
        super().__init__(model=model, name=name)
        if not 0.0 <= failure_rate <= 1.0 or not 0.0 <= permanent_failure_rate <= 1.0:
            raise ValueError("mock failure rates must be between 0 and 1")
        self.latency_ms = latency_ms
        self.failure_rate = failure_rate
        self.permanent_failure_rate = permanent_failure_rate
        self.stream_chunk_words = max(1, stream_chunk_words)
        self._rng = random.Random(seed)

    # --- helpers -------------------------------------------------------------------------

    def _check_model(self, model: str) -> None:
        if not model.startswith("mock"):
            raise ModelNotFoundError(
                f"unknown mock model {model!r}; use one of {', '.join(MOCK_MODELS)}",
                provider=self.name,
                model=model,
                status_code=404,
            )

    async def _wait_and_maybe_fail(self, model: str) -> None:
        delay = self.latency_ms * self._rng.uniform(0.5, 1.5) / 1000.0 if self.latency_ms else 0
        draw = self._rng.random()
        if delay:
            await asyncio.sleep(delay)
        if draw < self.permanent_failure_rate:
            raise BadRequestError(
                "injected permanent failure (mock)",
                provider=self.name,
                model=model,
                status_code=400,
            )
        if draw < self.permanent_failure_rate + self.failure_rate:
            raise ProviderUnavailableError(
                "injected transient failure (mock)",
                provider=self.name,
                model=model,
                status_code=503,
            )

    def _answer(self, messages: list[Message], model: str, options: CompletionOptions) -> str:
        digest = _digest(model, [m.model_dump() for m in messages], options.temperature)
        rng = random.Random(digest)
        last_user = next(m.content for m in reversed(messages) if m.role == "user")
        topic = " ".join(last_user.split()[:8])
        if options.json_mode:
            return json.dumps({"answer": topic, "confidence": round(rng.random(), 3)})
        words = [rng.choice(_VOCABULARY) for _ in range(rng.randint(12, 48))]
        return f"Mock answer about “{topic}”: " + " ".join(words) + "."

    def _response(
        self,
        text: str,
        messages: list[Message],
        model: str,
        options: CompletionOptions,
        clock: Stopwatch,
        streamed: bool,
    ) -> ProviderResponse:
        finish = "stop"
        if options.max_tokens is not None and approx_token_count(text) > options.max_tokens:
            words = text.split()[: options.max_tokens]
            while len(words) > 1 and approx_token_count(" ".join(words)) > options.max_tokens:
                words.pop()
            text = " ".join(words)
            finish = "length"
        prompt_tokens = sum(approx_token_count(m.content) + 3 for m in messages)
        completion_tokens = approx_token_count(text)
        return ProviderResponse(
            text=text,
            provider=self.name,
            model=model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            latency_ms=clock.ms(),
            finish_reason=finish,
            metadata={"mock": True, "streamed": streamed},
            raw_response={
                "mock": True,
                "model": model,
                "choices": [{"message": {"content": text}, "finish_reason": finish}],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                },
            },
        )

    # --- provider API --------------------------------------------------------------------

    async def _complete(
        self, messages: list[Message], model: str, options: CompletionOptions
    ) -> ProviderResponse:
        clock = Stopwatch()
        self._check_model(model)
        await self._wait_and_maybe_fail(model)
        text = self._answer(messages, model, options)
        return self._response(text, messages, model, options, clock, streamed=False)

    async def _stream(
        self, messages: list[Message], model: str, options: CompletionOptions
    ) -> AsyncIterator[str | ProviderResponse]:
        clock = Stopwatch()
        self._check_model(model)
        await self._wait_and_maybe_fail(model)
        final = self._response(
            self._answer(messages, model, options), messages, model, options, clock, True
        )
        words = final.text.split(" ")
        step = self.stream_chunk_words
        for start in range(0, len(words), step):
            chunk = " ".join(words[start : start + step])
            yield chunk if start == 0 else " " + chunk
            await asyncio.sleep(0)
        yield final.model_copy(update={"latency_ms": clock.ms()})

    async def _embed(
        self, texts: list[str], model: str, dimensions: int | None
    ) -> EmbeddingResponse:
        clock = Stopwatch()
        self._check_model(model)
        await self._wait_and_maybe_fail(model)
        dim = dimensions or EMBEDDING_DIMENSION
        vectors = []
        for text in texts:
            rng = random.Random(_digest(model, text, dim))
            raw = [rng.gauss(0.0, 1.0) for _ in range(dim)]
            norm = math.sqrt(sum(v * v for v in raw)) or 1.0
            vectors.append([v / norm for v in raw])
        return EmbeddingResponse(
            vectors=vectors,
            provider=self.name,
            model=model,
            prompt_tokens=sum(approx_token_count(t) for t in texts),
            latency_ms=clock.ms(),
            metadata={"mock": True},
        )

    async def list_models(self) -> list[ModelInfo]:
        return [
            ModelInfo(id=model_id, provider=self.name, owned_by="mock", metadata={"mock": True})
            for model_id in MOCK_MODELS
        ]
