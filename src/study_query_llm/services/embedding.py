"""Embeddings with a deterministic cache: the same text is never paid for twice.

The cache key is a hash of (provider, model, normalised text, dimensions, encoding format).
Each input text gets its own `raw_calls` row (modality `embedding`, that hash as
`request_hash`) and its vector in `embedding_vectors`, even when many texts travel in one
provider request; the request's token count is shared out over its texts so that sums stay
exact. A cache hit is one indexed lookup and no provider call.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
import unicodedata
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from tenacity import AsyncRetrying, retry_if_exception

from ..db.connection import UnitOfWork
from ..db.records import NewCall
from ..logging_setup import log_provider_calls
from ..providers import BaseLLMProvider, EmbeddingResponse, ProviderError
from ..providers.pricing import PricingTable
from ._common import ProviderPool, as_pool, db_io
from .inference import RetryPolicy, status_for
from .recorder import sanitise

ENCODING_FORMAT = "float"


def normalise_text(text: str) -> str:
    """NFC, collapsed whitespace, trimmed: texts that differ only in spacing share a vector."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def embedding_hash(
    provider: str,
    model: str,
    text: str,
    dimensions: int | None = None,
    encoding_format: str = ENCODING_FORMAT,
) -> str:
    payload = json.dumps(
        ["embedding", provider, model, normalise_text(text), dimensions, encoding_format],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class EmbeddingResult:
    """One text's vector and where it came from."""

    text: str
    vector: list[float]
    call_id: int
    cached: bool


def _share(total: int | None, weights: Sequence[int]) -> list[int | None]:
    """Split `total` tokens over items by weight (largest remainder): the parts sum exactly."""
    if total is None:
        return [None] * len(weights)
    weight_sum = sum(weights) or len(weights)
    weights = [w or (1 if not sum(weights) else 0) for w in weights]
    raw = [total * w / weight_sum for w in weights]
    parts = [math.floor(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - parts[i], reverse=True)
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


class EmbeddingService:
    """Embeds texts through a provider, recording every call, answering repeats from cache."""

    def __init__(
        self,
        engine: Engine,
        *,
        providers: ProviderPool | Callable[[str], BaseLLMProvider] | None = None,
        pricing: PricingTable | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.engine = engine
        self._pool = as_pool(providers)
        self.pricing = pricing or PricingTable()
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self.provider_calls = 0

    def provider(self, provider_id: str) -> BaseLLMProvider:
        return self._pool.get(provider_id)

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def _io(self, fn: Callable[[UnitOfWork], Any], *, write: bool = False) -> Any:
        return await db_io(self.engine, fn, write=write)

    async def validate(self, provider: str, model: str) -> None:
        """Probe a model/deployment (a one-word embedding) unless the provider pool already
        knows the answer: it remembers what calls learnt (an answer, or a 404) for a while."""
        remembered = self._pool.unknown_model(provider, model, "embedding")
        if remembered is not None:
            raise remembered
        if self._pool.model_answered(provider, model, "embedding"):
            return
        await self.embed(["ping"], provider=provider, model=model)

    async def embed(
        self,
        texts: Sequence[str],
        *,
        provider: str,
        model: str,
        dimensions: int | None = None,
        batch_size: int = 64,
        group_id: int | None = None,
    ) -> list[EmbeddingResult]:
        """Vectors for `texts` in order: cached ones from the database, the rest from the
        provider in batches of `batch_size`. Raises the provider's error if a batch fails."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return []
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise ValueError(f"text {empty[0] + 1} is empty")
        instance = self.provider(provider)
        hashes = [embedding_hash(provider, model, t, dimensions) for t in texts]
        cached: dict[str, tuple[int, list[float]]] = await self._io(
            lambda uow: uow.embeddings.cached(model, sorted(set(hashes)))
        )
        results: list[EmbeddingResult | None] = [
            EmbeddingResult(t, cached[h][1], cached[h][0], True) if h in cached else None
            for t, h in zip(texts, hashes, strict=True)
        ]
        # One provider request per distinct missing text, in batches.
        missing: dict[str, str] = {}
        for text, h in zip(texts, hashes, strict=True):
            if h not in cached and h not in missing:
                missing[h] = text
        fresh: dict[str, tuple[int, list[float]]] = {}
        pending = list(missing.items())
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            fresh.update(
                await self._embed_batch(instance, provider, model, dimensions, chunk, group_id)
            )
        for index, (text, h) in enumerate(zip(texts, hashes, strict=True)):
            if results[index] is None:
                call_id, vector = fresh[h]
                results[index] = EmbeddingResult(text, vector, call_id, False)
        return [r for r in results if r is not None]

    async def _embed_batch(
        self,
        instance: BaseLLMProvider,
        provider: str,
        model: str,
        dimensions: int | None,
        chunk: list[tuple[str, str]],
        group_id: int | None,
    ) -> dict[str, tuple[int, list[float]]]:
        texts = [text for _, text in chunk]
        batch_request = uuid.uuid4().hex
        last_was_final = [False]
        policy = self.retry

        async def sleep(seconds: float) -> None:
            await self._sleep(seconds)

        started = time.monotonic()
        retrying = AsyncRetrying(
            stop=lambda _state: last_was_final[0],
            wait=policy.wait_seconds,
            retry=retry_if_exception(lambda e: isinstance(e, ProviderError) and e.transient),
            sleep=sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                number = attempt.retry_state.attempt_number
                try:
                    # A model remembered as unknown (404) fails here without a request.
                    response = await self._pool.checked(
                        provider,
                        model,
                        "embedding",
                        lambda: self._provider_embed(instance, texts, model, dimensions),
                    )
                except ProviderError as error:
                    final = not (
                        error.transient
                        and number < policy.max_attempts
                        and time.monotonic() - started < policy.max_total_s
                    )
                    last_was_final[0] = final
                    await self._record_failure(
                        provider, model, dimensions, chunk, error, number, final, batch_request
                    )
                    raise
        tokens = _share(response.prompt_tokens, [len(t) for t in texts])
        calls = []
        for (h, text), vector, tok in zip(chunk, response.vectors, tokens, strict=True):
            cost = (
                self.pricing.cost_usd(response.model or model, tok, 0) if tok is not None else None
            )
            calls.append(
                (
                    NewCall(
                        provider=provider,
                        model=model,
                        modality="embedding",
                        status="success",
                        request_json={"input": text, "dimensions": dimensions},
                        response_json={"dimension": len(vector), "model": response.model},
                        latency_ms=response.latency_ms,
                        prompt_tokens=tok,
                        completion_tokens=0 if tok is not None else None,
                        total_tokens=tok,
                        cost_usd=cost,
                        request_hash=h,
                        metadata_json={
                            "attempt": number,
                            "batch_request": batch_request,
                            "batch_size": len(chunk),
                            "batch_prompt_tokens": response.prompt_tokens,
                            **response.metadata,
                        },
                    ),
                    vector,
                )
            )

        def write(uow: UnitOfWork) -> dict[str, tuple[int, list[float]]]:
            # sanitise: PostgreSQL's JSON refuses NUL; store U+FFFD rather than lose the call
            ids = uow.calls.add_many([sanitise(call) for call, _ in calls])
            log_provider_calls([call for call, _ in calls], ids)
            out: dict[str, tuple[int, list[float]]] = {}
            for call_id, (call, vector) in zip(ids, calls, strict=True):
                uow.embeddings.add(call_id, model, vector)
                out[call.request_hash or ""] = (call_id, vector)
            if group_id is not None:
                uow.groups.add_members(group_id, ids, role="embedding")
            return out

        return await self._io(write, write=True)

    async def _provider_embed(
        self, instance: BaseLLMProvider, texts: list[str], model: str, dimensions: int | None
    ) -> EmbeddingResponse:
        self.provider_calls += 1
        return await instance.embed(texts, model=model, dimensions=dimensions)

    async def _record_failure(
        self, provider, model, dimensions, chunk, error, number, final, batch_request
    ) -> None:
        calls = [
            sanitise(
                NewCall(
                    provider=provider,
                    model=model,
                    modality="embedding",
                    status=status_for(error),
                    request_json={"input": text, "dimensions": dimensions},
                    error_json=error.to_json(),
                    request_hash=h,
                    metadata_json={
                        "attempt": number,
                        "final_attempt": final,
                        "batch_request": batch_request,
                        "batch_size": len(chunk),
                    },
                )
            )
            for h, text in chunk
        ]
        ids = await self._io(lambda uow: uow.calls.add_many(calls), write=True)
        log_provider_calls(calls, ids)
