"""InferenceService: every provider call goes through here, so every call is recorded.

One `run()` preprocesses the prompt, calls the provider with tenacity retries on transient
errors (honouring Retry-After), records every attempt in `raw_calls` (failures with their
error and attempt number) and each success also in the v1 `inference_runs` table, and
returns the recorded call ids. Identical concurrent requests can share one provider call.
A model or deployment that answered 404 fails fast for a while (the provider pool remembers
it), each such call still recorded as failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
)

from ..db.records import NewCall, NewRun
from ..providers import (
    BaseLLMProvider,
    ProviderError,
    ProviderResponse,
    ProviderTimeoutError,
    RateLimitError,
)
from ..providers.base import CompletionOptions, normalise_messages
from ..providers.pricing import PricingTable
from ._common import ProviderPool, as_pool
from .preprocessing import PreprocessConfig, PreprocessResult, preprocess
from .recorder import AfterWrite, CallRecorder

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class RetryPolicy:
    """When to try again. Only transient errors are retried; Retry-After wins when given."""

    max_attempts: int = 4
    max_total_s: float = 120.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    jitter_s: float = 0.5
    max_retry_after_s: float = 300.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def delay_for(self, error: BaseException | None, attempt_number: int) -> float:
        """Seconds to wait after failed attempt `attempt_number` (1-based)."""
        if isinstance(error, RateLimitError) and error.retry_after is not None:
            return min(error.retry_after, self.max_retry_after_s)
        # Exponential backoff with jitter, as tenacity's wait_exponential_jitter computes it
        # (whose parameter names differ between tenacity versions).
        exponential = self.initial_backoff_s * 2 ** (max(1, attempt_number) - 1)
        return max(0.0, min(exponential + random.uniform(0, self.jitter_s), self.max_backoff_s))

    def wait_seconds(self, state: RetryCallState) -> float:
        """tenacity `wait=` hook: Retry-After when the server sent one, else backoff."""
        error = state.outcome.exception() if state.outcome else None
        return self.delay_for(error, state.attempt_number)


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass
class Attempt:
    """One try at a request, as recorded."""

    number: int
    call_id: int
    status: str
    error: dict[str, Any] | None = None
    waited_s: float = 0.0


@dataclass
class RunResult:
    """What `run()` returns: the final response (or error) and every recorded call id."""

    status: str
    call_ids: list[int]
    response: ProviderResponse | None = None
    error: ProviderError | None = None
    attempts: list[Attempt] = field(default_factory=list)
    cost_usd: float | None = None
    preprocessing: PreprocessResult | None = None
    deduplicated: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "success"

    @property
    def call_id(self) -> int:
        """The id of the final attempt's record."""
        return self.call_ids[-1]

    @property
    def text(self) -> str | None:
        return self.response.text if self.response else None


def request_hash(
    provider: str, model: str, messages: Sequence[dict[str, Any]], options: dict
) -> str:
    """A stable hash of what was asked: same provider, model, messages and options."""
    payload = json.dumps(
        {"provider": provider, "model": model, "messages": list(messages), "options": options},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def status_for(error: ProviderError) -> str:
    return "timeout" if isinstance(error, ProviderTimeoutError) else "failed"


class InferenceService:
    """Runs prompts against providers and records every attempt."""

    def __init__(
        self,
        recorder: CallRecorder,
        *,
        providers: ProviderPool | Callable[[str], BaseLLMProvider] | None = None,
        pricing: PricingTable | None = None,
        retry: RetryPolicy | None = None,
        preprocess_config: PreprocessConfig | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.recorder = recorder
        self._pool = as_pool(providers)
        self.pricing = pricing or PricingTable()
        self.retry = retry or RetryPolicy()
        self.preprocess_config = preprocess_config or PreprocessConfig()
        self._sleep = sleep
        self._in_flight: dict[str, asyncio.Future[RunResult]] = {}

    def provider(self, provider_id: str) -> BaseLLMProvider:
        """The provider instance for an id, built once and reused (one SDK client each)."""
        return self._pool.get(provider_id)

    async def aclose(self) -> None:
        """Close provider clients and flush pending records."""
        await self._pool.aclose()
        await self.recorder.aclose()

    # --- preparing a request -------------------------------------------------------------

    def _prepare(
        self,
        prompt: str | Sequence[dict[str, Any]],
        provider: str,
        model: str | None,
        options: dict[str, Any] | None,
        template: str | None,
        preprocess_config: PreprocessConfig | None,
    ) -> _Prepared:
        options = dict(options or {})
        instance = self.provider(provider)
        CompletionOptions.parse(instance.name, options)  # reject bad options before any call
        config = preprocess_config or self.preprocess_config
        if template is not None:
            config = PreprocessConfig.model_validate({**config.model_dump(), "template": template})
        original = normalise_messages(instance.name, prompt)
        last_user = max(i for i, m in enumerate(original) if m.role == "user")
        prep = preprocess(original[last_user].content, config)
        sent = [m.model_dump() for m in original]
        sent[last_user]["content"] = prep.sent
        resolved_model = instance.resolve_model(model)
        key = request_hash(provider, resolved_model, sent, options)
        return _Prepared(
            instance, resolved_model, sent, [m.model_dump() for m in original], options, prep, key
        )

    def _request_json(self, prepared: _Prepared) -> dict[str, Any]:
        request_json: dict[str, Any] = {"messages": prepared.sent, "options": prepared.options}
        if prepared.prep.changed:
            request_json["original_messages"] = prepared.original
            request_json["preprocessing"] = prepared.prep.to_json()
        return request_json

    # --- streaming -----------------------------------------------------------------------

    async def stream(
        self,
        prompt: str | Sequence[dict[str, Any]],
        *,
        provider: str,
        model: str | None = None,
        options: dict[str, Any] | None = None,
        template: str | None = None,
        group_id: int | None = None,
        position: int | None = None,
        role: str | None = None,
        preprocess_config: PreprocessConfig | None = None,
        metadata: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
    ) -> AsyncIterator[str | RunResult]:
        """Yield text chunks as they arrive, then the recorded `RunResult`.

        A transient failure before the first chunk is retried like `run()`; once text has
        been shown, a failure is final (the partial text is kept in the failure record).
        """
        prepared = self._prepare(prompt, provider, model, options, template, preprocess_config)
        policy = retry or self.retry
        request_json = self._request_json(prepared)
        metadata = dict(metadata or {})
        result = RunResult(status="failed", call_ids=[], preprocessing=prepared.prep)
        started = time.monotonic()
        number = 0
        while True:
            number += 1
            parts: list[str] = []
            response: ProviderResponse | None = None
            try:
                remembered = self._pool.unknown_model(provider, prepared.model, "chat")
                if remembered is not None:
                    raise remembered  # got a 404 before: not sent again (until it expires)
                # aclosing: a reader that stops early also closes the provider's stream.
                async with contextlib.aclosing(
                    prepared.instance.stream(
                        prepared.sent, model=prepared.model, **prepared.options
                    )
                ) as items:
                    async for item in items:
                        if isinstance(item, ProviderResponse):
                            response = item
                        else:
                            parts.append(item)
                            yield item
            except (asyncio.CancelledError, GeneratorExit):
                # Cancelled, or the reader stopped reading (the generator was closed at a
                # `yield`): the attempt still gets its row, with the text shown so far.
                cancelled = ProviderError("cancelled by the caller", provider=provider)
                cancelled.kind = "cancelled"
                await asyncio.shield(
                    self._record_failure(
                        provider,
                        prepared.model,
                        request_json,
                        cancelled,
                        prepared.key,
                        number,
                        True,
                        {**metadata, "partial_text": "".join(parts), "streamed": True},
                        group_id,
                        position,
                        role,
                        None,
                        status="cancelled",
                    )
                )
                raise
            except ProviderError as error:
                self._pool.learn(provider, prepared.model, "chat", error)
                final = bool(parts) or not (
                    error.transient
                    and number < policy.max_attempts
                    and time.monotonic() - started < policy.max_total_s
                )
                extra = {"partial_text": "".join(parts)} if parts else {}
                call_id = await self._record_failure(
                    provider,
                    prepared.model,
                    request_json,
                    error,
                    prepared.key,
                    number,
                    final,
                    {**metadata, **extra, "streamed": True},
                    group_id,
                    position,
                    role,
                    None,
                )
                result.call_ids.append(call_id)
                result.attempts.append(Attempt(number, call_id, status_for(error), error.to_json()))
                if final:
                    result.status = status_for(error)
                    result.error = error
                    yield result
                    return
                await self._sleep(policy.delay_for(error, number))
                continue
            assert response is not None
            self._pool.learn(provider, prepared.model, "chat", None)
            cost = self.pricing.cost_usd(
                response.model, response.prompt_tokens, response.completion_tokens
            )
            call_id = await self._record_success(
                provider,
                prepared.model,
                request_json,
                response,
                cost,
                prepared.key,
                number,
                metadata,
                prepared.prep,
                group_id,
                position,
                role,
                None,
            )
            result.call_ids.append(call_id)
            result.attempts.append(Attempt(number, call_id, "success"))
            result.status = "success"
            result.response = response
            result.cost_usd = cost
            yield result
            return

    # --- the one entry point -------------------------------------------------------------

    async def run(
        self,
        prompt: str | Sequence[dict[str, Any]],
        *,
        provider: str,
        model: str | None = None,
        options: dict[str, Any] | None = None,
        template: str | None = None,
        group_id: int | None = None,
        position: int | None = None,
        role: str | None = None,
        preprocess_config: PreprocessConfig | None = None,
        dedup: bool = False,
        metadata: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        on_final: AfterWrite | None = None,
        on_retry: Callable[[ProviderError, int], None] | None = None,
    ) -> RunResult:
        """Call `provider` once (with retries) and record every attempt.

        `prompt` is a string or a list of role/content messages; preprocessing applies to
        the last user message. `on_final(uow, call_id)` runs in the same transaction that
        records the final attempt (used by resumable batches to mark an item done).
        """
        prepared = self._prepare(prompt, provider, model, options, template, preprocess_config)
        instance, key = prepared.instance, prepared.key
        if dedup:
            while (shared := self._in_flight.get(key)) is not None:
                try:
                    return _as_shared(await asyncio.shield(shared))
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if not shared.cancelled() or (task is not None and task.cancelling()):
                        raise  # this caller was cancelled
                    # The call being shared was cancelled, not this caller: make or share
                    # a new one (the first follower to get here becomes the leader).
            future: asyncio.Future[RunResult] = asyncio.get_running_loop().create_future()
            self._in_flight[key] = future
        try:
            result = await self._run_with_retries(
                instance,
                provider_id=provider,
                model=prepared.model,
                sent=prepared.sent,
                original=prepared.original,
                options=prepared.options,
                prep=prepared.prep,
                key=key,
                group_id=group_id,
                position=position,
                role=role,
                metadata=metadata or {},
                retry=retry or self.retry,
                on_final=on_final,
                on_retry=on_retry,
            )
        except BaseException as exc:
            if dedup:
                self._in_flight.pop(key, None)
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                elif not future.done():
                    future.set_exception(exc)
                    future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        if dedup:
            self._in_flight.pop(key, None)
            future.set_result(result)
        return result

    async def _run_with_retries(
        self,
        instance: BaseLLMProvider,
        *,
        provider_id: str,
        model: str,
        sent: list[dict[str, Any]],
        original: list[dict[str, Any]],
        options: dict[str, Any],
        prep: PreprocessResult,
        key: str,
        group_id: int | None,
        position: int | None,
        role: str | None,
        metadata: dict[str, Any],
        retry: RetryPolicy,
        on_final: AfterWrite | None,
        on_retry: Callable[[ProviderError, int], None] | None,
    ) -> RunResult:
        request_json: dict[str, Any] = {"messages": sent, "options": options}
        if prep.changed:
            request_json["original_messages"] = original
            request_json["preprocessing"] = prep.to_json()
        result = RunResult(status="failed", call_ids=[], preprocessing=prep)
        started = time.monotonic()
        waits: list[float] = []

        async def sleep(seconds: float) -> None:
            waits.append(seconds)
            await self._sleep(seconds)

        def will_retry(error: BaseException) -> bool:
            return isinstance(error, ProviderError) and error.transient

        # Whether the last failure was final is decided once, where it is recorded, and
        # tenacity's stop condition reads that decision: the record and the loop agree.
        last_was_final = [False]
        retrying = AsyncRetrying(
            stop=lambda _state: last_was_final[0],
            wait=retry.wait_seconds,
            retry=retry_if_exception(will_retry),
            sleep=sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    number = attempt.retry_state.attempt_number
                    try:
                        # A model remembered as unknown (404) fails here without a request.
                        response = await self._pool.checked(
                            provider_id,
                            model,
                            "chat",
                            lambda: instance.complete(sent, model=model, **options),
                        )
                    except asyncio.CancelledError:
                        # The caller gave up (batch cancelled): the attempt still gets a row.
                        cancelled = ProviderError("cancelled by the caller", provider=provider_id)
                        cancelled.kind = "cancelled"
                        await asyncio.shield(
                            self._record_failure(
                                provider_id,
                                model,
                                request_json,
                                cancelled,
                                key,
                                number,
                                True,
                                metadata,
                                group_id,
                                position,
                                role,
                                None,
                                status="cancelled",
                            )
                        )
                        raise
                    except ProviderError as error:
                        final = not (
                            error.transient
                            and number < retry.max_attempts
                            and time.monotonic() - started < retry.max_total_s
                        )
                        last_was_final[0] = final
                        call_id = await self._record_failure(
                            provider_id,
                            model,
                            request_json,
                            error,
                            key,
                            number,
                            final,
                            metadata,
                            group_id,
                            position,
                            role,
                            on_final if final else None,
                        )
                        result.call_ids.append(call_id)
                        result.attempts.append(
                            Attempt(
                                number,
                                call_id,
                                status_for(error),
                                error.to_json(),
                                waits[-1] if waits and number > 1 else 0.0,
                            )
                        )
                        if not final and on_retry is not None:
                            on_retry(error, number)
                        raise
                    cost = self.pricing.cost_usd(
                        response.model, response.prompt_tokens, response.completion_tokens
                    )
                    call_id = await self._record_success(
                        provider_id,
                        model,
                        request_json,
                        response,
                        cost,
                        key,
                        number,
                        metadata,
                        prep,
                        group_id,
                        position,
                        role,
                        on_final,
                    )
                    result.call_ids.append(call_id)
                    result.attempts.append(
                        Attempt(
                            number,
                            call_id,
                            "success",
                            None,
                            waits[-1] if waits and number > 1 else 0.0,
                        )
                    )
                    result.status = "success"
                    result.response = response
                    result.cost_usd = cost
        except ProviderError as error:
            result.status = status_for(error)
            result.error = error
        return result

    # --- records -------------------------------------------------------------------------

    async def _record_success(
        self,
        provider_id,
        model,
        request_json,
        response,
        cost,
        key,
        number,
        metadata,
        prep,
        group_id,
        position,
        role,
        on_final,
    ) -> int:
        meta = {**metadata, **response.metadata, "attempt": number}
        routing = response.metadata.get("routing")
        # Through a provider group: the targets that failed first are calls of their own,
        # and the answer is recorded under the provider that gave it.
        await self._record_group_tries(
            routing, request_json, key, number, metadata, group_id, position
        )
        served_by = response.metadata.get("target_provider") if routing else None
        provider_id = served_by or provider_id
        call = NewCall(
            provider=provider_id,
            model=response.model or model,
            modality="chat",
            status="success",
            request_json=request_json,
            response_json={
                "text": response.text,
                "finish_reason": response.finish_reason,
                "raw": response.raw_response,
            },
            latency_ms=response.latency_ms,
            prompt_tokens=response.prompt_tokens,
            completion_tokens=response.completion_tokens,
            total_tokens=response.total_tokens,
            cost_usd=cost,
            request_hash=key,
            metadata_json={**meta, "requested_model": model},
        )
        run = NewRun(
            prompt=prep.sent,
            response=response.text,
            provider=provider_id,
            model=response.model or model,
            tokens=response.total_tokens,
            latency_ms=response.latency_ms,
            metadata_json={"attempt": number, **metadata},
            batch_id=str(metadata["batch_id"]) if metadata.get("batch_id") else None,
        )
        return await self.recorder.record(
            call,
            run=run,
            group_id=group_id,
            position=position,
            role=role or "final",
            after=on_final,
        )

    async def _record_failure(
        self,
        provider_id,
        model,
        request_json,
        error,
        key,
        number,
        final,
        metadata,
        group_id,
        position,
        role,
        on_final,
        status: str | None = None,
    ) -> int:
        routing = getattr(error, "routing", None)
        tries = await self._record_group_tries(
            routing, request_json, key, number, metadata, group_id, position, skip_last=True
        )
        if tries.last is not None:  # the last target tried is this row's provider and model
            provider_id, model = tries.last["provider"], tries.last["model"]
        call = NewCall(
            provider=provider_id,
            model=model,
            modality="chat",
            status=status or status_for(error),
            request_json=request_json,
            error_json=error.to_json(),
            request_hash=key,
            metadata_json={**metadata, "attempt": number, "final_attempt": final},
        )
        return await self.recorder.record(
            call,
            group_id=group_id,
            position=position,
            role=(role or "final") if final else "retry",
            after=on_final,
        )

    async def _record_group_tries(
        self,
        routing: dict[str, Any] | None,
        request_json: dict[str, Any],
        key: str,
        number: int,
        metadata: dict[str, Any],
        group_id: int | None,
        position: int | None,
        *,
        skip_last: bool = False,
    ) -> _GroupTries:
        """Record each target a provider group tried and that failed, as a failed call.

        `skip_last`: the last target tried is recorded by the caller (as the final failure).
        """
        tried = [t for t in (routing or {}).get("tried", []) if t.get("provider")]
        if not tried:
            return _GroupTries([], None)
        last = tried[-1] if skip_last else None
        ids = []
        for index, entry in enumerate(tried if last is None else tried[:-1]):
            if entry.get("outcome") != "failed":
                continue
            call = NewCall(
                provider=entry["provider"],
                model=entry["model"],
                modality="chat",
                status="timeout" if entry.get("error") == "timeout" else "failed",
                request_json=request_json,
                error_json={
                    "type": entry.get("error"),
                    "message": entry.get("message"),
                    "transient": entry.get("transient"),
                    "status_code": entry.get("status_code"),
                    "failed_over": True,
                },
                request_hash=key,
                metadata_json={
                    **metadata,
                    "attempt": number,
                    "final_attempt": False,
                    "routing": {
                        "group": routing["group"],
                        "strategy": routing.get("strategy"),
                        "target": entry["target"],
                        "try": index + 1,
                        "failed_over": True,
                    },
                },
            )
            ids.append(
                await self.recorder.record(call, group_id=group_id, position=position, role="retry")
            )
        return _GroupTries(ids, last)


@dataclass(frozen=True)
class _GroupTries:
    call_ids: list[int]
    last: dict[str, Any] | None


@dataclass(frozen=True)
class _Prepared:
    instance: BaseLLMProvider
    model: str
    sent: list[dict[str, Any]]
    original: list[dict[str, Any]]
    options: dict[str, Any]
    prep: PreprocessResult
    key: str


def _as_shared(result: RunResult) -> RunResult:
    return RunResult(
        status=result.status,
        call_ids=list(result.call_ids),
        response=result.response,
        error=result.error,
        attempts=list(result.attempts),
        cost_usd=result.cost_usd,
        preprocessing=result.preprocessing,
        deduplicated=True,
    )
