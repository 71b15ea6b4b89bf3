"""The OpenAI-compatible family, through the official `openai` SDK, with one preset per provider.

OpenAI, Azure OpenAI, Hyperbolic, OpenRouter, vLLM, LM Studio and Ollama all speak the chat
completions protocol; they differ only in base URL, authentication, headers and how models are
listed. Those differences live in `PRESETS`; the code below is written once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import httpx2
import openai

from ._sdk import ClientPerLoop, call_sdk, http_client_for
from .base import (
    BaseLLMProvider,
    CompletionOptions,
    EmbeddingResponse,
    Message,
    ModelInfo,
    ProviderResponse,
    Stopwatch,
)
from .errors import (
    MalformedResponseError,
    ProviderConnectionError,
    ProviderTimeoutError,
    error_for_status,
)
from .presets import PRESETS, ListingStyle, Preset

__all__ = ["PRESETS", "ListingStyle", "OpenAICompatibleProvider", "Preset"]


class OpenAICompatibleProvider(BaseLLMProvider):
    """Any provider speaking the OpenAI chat-completions protocol. One SDK client per instance."""

    provider_id: ClassVar[str] = "openai-compatible"
    supports_embeddings: ClassVar[bool] = True
    supports_json_mode: ClassVar[bool] = True

    def __init__(
        self,
        preset: Preset,
        *,
        api_key: str | None,
        base_url: str | None,
        model: str | None,
        timeout_s: float = 60.0,
        api_version: str | None = None,
        name: str | None = None,
        http_client: httpx2.AsyncClient | None = None,
    ) -> None:
        super().__init__(model=model, name=name or preset.provider_id)
        self.preset = preset
        self.base_url = base_url or preset.default_base_url
        self.timeout_s = timeout_s
        key = api_key or preset.placeholder_key
        common: dict[str, Any] = {
            "api_key": key,
            "timeout": timeout_s,
            "max_retries": 0,  # InferenceService owns retries
            "default_headers": preset.default_headers or None,
            "http_client": http_client_for(openai, http_client),
        }
        client: openai.AsyncOpenAI
        if preset.provider_id == "azure":
            client = openai.AsyncAzureOpenAI(
                azure_endpoint=self.base_url, api_version=api_version, **common
            )
        else:
            client = openai.AsyncOpenAI(base_url=self.base_url, **common)
        self._clients = ClientPerLoop(openai, client, given=http_client is not None)

    @property
    def _client(self) -> openai.AsyncOpenAI:
        return self._clients.get()

    def embeddings_enabled(self) -> bool:
        return self.preset.supports_embeddings

    async def aclose(self) -> None:
        await self._clients.aclose()

    # --- completions ---------------------------------------------------------------------

    def _request(
        self, messages: list[Message], model: str, options: CompletionOptions
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "messages": [m.model_dump() for m in messages],
        }
        if options.temperature is not None:
            body["temperature"] = options.temperature
        if options.max_tokens is not None:
            body["max_tokens"] = options.max_tokens
        if options.top_p is not None:
            body["top_p"] = options.top_p
        if options.stop:
            body["stop"] = options.stop
        if options.seed is not None:
            body["seed"] = options.seed
        if options.json_mode:
            body["response_format"] = {"type": "json_object"}
        return body

    def _request_options(self, options: CompletionOptions) -> dict[str, Any]:
        """The SDK's per-request options (not part of the body)."""
        return {} if options.timeout_s is None else {"timeout": options.timeout_s}

    async def _complete(
        self, messages: list[Message], model: str, options: CompletionOptions
    ) -> ProviderResponse:
        clock = Stopwatch()
        body = self._request(messages, model, options)
        request_options = self._request_options(options)
        # The SDK's own request path (base URL, auth, Azure deployment routing, error
        # types), given a body that is already plain JSON: `create()` would walk it again
        # through its typed-parameter transform, and build a typed model from the reply
        # that would only be dumped back to JSON for the record. The record keeps the
        # body exactly as the provider sent it.
        raw = await self._call(
            model,
            lambda: self._client.post(
                "/chat/completions", body=body, options=request_options, cast_to=object
            ),
        )
        fields = _completion_fields(raw)
        if fields is None:
            raise self._malformed(model, raw)
        text, served_model, finish_reason, response_id, usage = fields
        return ProviderResponse(
            text=text,
            provider=self.name,
            model=served_model or model,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            total_tokens=usage.get("total_tokens"),
            latency_ms=clock.ms(),
            finish_reason=finish_reason,
            metadata={"response_id": response_id, "requested_model": model},
            raw_response=raw,
        )

    async def _stream(
        self, messages: list[Message], model: str, options: CompletionOptions
    ) -> AsyncIterator[str | ProviderResponse]:
        clock = Stopwatch()
        body = self._request(messages, model, options)
        body["stream"] = True
        body.update(self._request_options(options))
        if self.preset.stream_usage:
            body["stream_options"] = {"include_usage": True}
        stream = await self._call(model, lambda: self._client.chat.completions.create(**body))
        if not isinstance(stream, openai.AsyncStream):
            raise self._malformed(model, stream)
        parts: list[str] = []
        finish_reason: str | None = None
        usage: Any = None
        response_id: str | None = None
        served_model = model
        first_token_ms: float | None = None
        try:
            while True:
                chunk = await self._call(model, stream.__anext__)
                response_id = chunk.id or response_id
                served_model = chunk.model or served_model
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.finish_reason:
                        finish_reason = choice.finish_reason
                    text = choice.delta.content if choice.delta else None
                    if text:
                        if first_token_ms is None:
                            first_token_ms = clock.ms()
                        parts.append(text)
                        yield text
        except StopAsyncIteration:
            pass
        finally:
            # Close the SDK's generator chain here, in this task, when the reader stops
            # early: left to the garbage collector it is finalised at an arbitrary point,
            # possibly in another thread, and the closing fails there.
            sdk_iterator = getattr(stream, "_iterator", None)
            if sdk_iterator is not None and hasattr(sdk_iterator, "aclose"):
                await sdk_iterator.aclose()
            await stream.close()
        text = "".join(parts)
        yield ProviderResponse(
            text=text,
            provider=self.name,
            model=served_model,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            total_tokens=usage.total_tokens if usage else None,
            latency_ms=clock.ms(),
            finish_reason=finish_reason,
            metadata={
                "response_id": response_id,
                "requested_model": model,
                "streamed": True,
                "time_to_first_token_ms": first_token_ms,
            },
            raw_response={
                "id": response_id,
                "model": served_model,
                "choices": [{"message": {"content": text}, "finish_reason": finish_reason}],
                "usage": usage.model_dump(mode="json") if usage else None,
            },
        )

    # --- embeddings ----------------------------------------------------------------------

    async def _embed(
        self, texts: list[str], model: str, dimensions: int | None
    ) -> EmbeddingResponse:
        clock = Stopwatch()
        kwargs: dict[str, Any] = {"model": model, "input": texts}
        if dimensions is not None:
            kwargs["dimensions"] = dimensions
        result = await self._call(model, lambda: self._client.embeddings.create(**kwargs))
        if not isinstance(result, openai.types.CreateEmbeddingResponse):
            raise self._malformed(model, result)
        ordered = sorted(result.data, key=lambda item: item.index)
        if len(ordered) != len(texts):
            raise MalformedResponseError(
                f"asked for {len(texts)} embeddings, got {len(ordered)}",
                provider=self.name,
                model=model,
            )
        return EmbeddingResponse(
            vectors=[list(item.embedding) for item in ordered],
            provider=self.name,
            model=result.model or model,
            prompt_tokens=result.usage.prompt_tokens if result.usage else None,
            latency_ms=clock.ms(),
        )

    # --- model listing -------------------------------------------------------------------

    async def list_models(self) -> list[ModelInfo]:
        if self.preset.listing == "azure_deployments":
            data = await self._call(None, lambda: self._client.get("/deployments", cast_to=object))
            items = data.get("data", []) if isinstance(data, dict) else []
            return [
                ModelInfo(
                    id=str(item["id"]),
                    provider=self.name,
                    metadata={"model": item.get("model"), "status": item.get("status")},
                )
                for item in items
                if isinstance(item, dict) and "id" in item
            ]
        if self.preset.listing == "ollama_tags":
            return await self._ollama_tags()
        page = await self._call(None, self._client.models.list)
        models: list[ModelInfo] = []
        async for item in page:
            extra = item.model_extra or {}
            pricing = extra.get("pricing") or {}
            models.append(
                ModelInfo(
                    id=item.id,
                    provider=self.name,
                    owned_by=getattr(item, "owned_by", None),
                    context_length=_int_or_none(extra.get("context_length")),
                    input_price_per_mtok=_per_mtok(pricing.get("prompt")),
                    output_price_per_mtok=_per_mtok(pricing.get("completion")),
                )
            )
        return models

    async def _ollama_tags(self) -> list[ModelInfo]:
        root = str(self._client.base_url).rstrip("/")
        if root.endswith("/v1"):
            root = root[: -len("/v1")]
        try:
            async with httpx2.AsyncClient(timeout=self.timeout_s) as client:
                response = await client.get(f"{root}/api/tags")
        except httpx2.TimeoutException as exc:
            raise ProviderTimeoutError(
                f"listing models timed out: {exc}", provider=self.name
            ) from None
        except httpx2.TransportError as exc:
            raise ProviderConnectionError(
                f"cannot reach {root}: {exc}", provider=self.name
            ) from None
        if response.status_code >= 400:
            raise error_for_status(
                response.status_code,
                response.text[:200],
                provider=self.name,
                model=None,
                headers=response.headers,
            )
        try:
            tags = response.json().get("models", [])
        except (ValueError, AttributeError):
            raise MalformedResponseError(
                "the /api/tags listing is not JSON", provider=self.name
            ) from None
        return [
            ModelInfo(
                id=str(tag.get("name") or tag.get("model")),
                provider=self.name,
                metadata={"size": tag.get("size"), "details": tag.get("details")},
            )
            for tag in tags
            if isinstance(tag, dict) and (tag.get("name") or tag.get("model"))
        ]

    # --- error mapping -------------------------------------------------------------------

    def _malformed(self, model: str | None, got: Any) -> MalformedResponseError:
        preview = got if isinstance(got, str) else type(got).__name__
        return MalformedResponseError(
            f"unexpected response body (not a JSON completion): {str(preview)[:120]!r}",
            provider=self.name,
            model=model,
        )

    async def _call(self, model: str | None, fn: Callable[[], Any]) -> Any:
        return await call_sdk(
            openai,
            fn,
            provider=self.name,
            model=model,
            timeout_s=self.timeout_s,
            base_url=self.base_url,
            key_env_var=self.preset.key_env_var,
        )


def _completion_fields(
    raw: Any,
) -> tuple[str, str | None, str | None, str | None, dict[str, int | None]] | None:
    """(text, model, finish reason, response id, usage) of a chat completion body.

    None when the body is not a completion: not an object, no choices, a first choice
    without a message, or fields of the wrong type.
    """
    if not isinstance(raw, dict):
        return None
    choices = raw.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        return None
    text = message.get("content")
    served_model, finish_reason, response_id = (
        raw.get("model"),
        choice.get("finish_reason"),
        raw.get("id"),
    )
    if not all(v is None or isinstance(v, str) for v in (text, served_model, finish_reason)):
        return None
    usage_body = raw.get("usage")
    usage = (
        {name: _token_count(usage_body.get(name)) for name in _USAGE_FIELDS}
        if isinstance(usage_body, dict)
        else {}
    )
    return (
        text or "",
        served_model,
        finish_reason,
        None if response_id is None else str(response_id),
        usage,
    )


_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


def _token_count(value: Any) -> int | None:
    """A token count as reported (some servers send 12.0 or "12"); None if it is not one.
    An odd usage block does not sink an answer that is otherwise fine."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _per_mtok(value: Any) -> float | None:
    """OpenRouter prices are USD per token as strings; convert to USD per million tokens."""
    try:
        return round(float(value) * 1_000_000, 6) if value is not None else None
    except (TypeError, ValueError):
        return None
