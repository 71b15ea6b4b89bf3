"""Anthropic's Messages API through the official `anthropic` SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import anthropic
import httpx2

from ._sdk import ClientPerLoop, call_sdk, http_client_for
from .base import (
    BaseLLMProvider,
    CompletionOptions,
    Message,
    ModelInfo,
    ProviderResponse,
    Stopwatch,
)
from .errors import (
    MalformedResponseError,
    ProviderUnavailableError,
)

KEY_ENV_VAR = "ANTHROPIC_API_KEY"


class AnthropicProvider(BaseLLMProvider):
    """Claude models. System messages become the `system` parameter; usage comes from the API."""

    provider_id: ClassVar[str] = "anthropic"
    supports_embeddings: ClassVar[bool] = False
    supports_json_mode: ClassVar[bool] = False

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        model: str | None = None,
        timeout_s: float = 60.0,
        default_max_tokens: int = 1024,
        name: str | None = None,
        http_client: httpx2.AsyncClient | None = None,
    ) -> None:
        super().__init__(model=model, name=name)
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.default_max_tokens = default_max_tokens
        client = anthropic.AsyncAnthropic(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout_s,
            max_retries=0,  # InferenceService owns retries
            http_client=http_client_for(anthropic, http_client),
        )
        self._clients = ClientPerLoop(anthropic, client, given=http_client is not None)

    @property
    def _client(self) -> anthropic.AsyncAnthropic:
        return self._clients.get()

    async def aclose(self) -> None:
        await self._clients.aclose()

    def _request(
        self, messages: list[Message], model: str, options: CompletionOptions
    ) -> tuple[dict[str, Any], list[str]]:
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": options.max_tokens or self.default_max_tokens,
            "messages": [
                {"role": m.role, "content": m.content} for m in messages if m.role != "system"
            ],
        }
        if system:
            body["system"] = system
        # Sampling options are not in the SDK's typed signature; send them in the body.
        sampling: dict[str, Any] = {}
        if options.temperature is not None:
            sampling["temperature"] = min(options.temperature, 1.0)
        if options.top_p is not None:
            sampling["top_p"] = options.top_p
        if sampling:
            body["extra_body"] = sampling
        if options.stop:
            body["stop_sequences"] = options.stop
        if options.timeout_s is not None:
            body["timeout"] = options.timeout_s
        ignored = ["seed"] if options.seed is not None else []
        return body, ignored

    async def _complete(
        self, messages: list[Message], model: str, options: CompletionOptions
    ) -> ProviderResponse:
        clock = Stopwatch()
        body, ignored = self._request(messages, model, options)
        message = await self._call(model, lambda: self._client.messages.create(**body))
        if not isinstance(message, anthropic.types.Message):
            raise MalformedResponseError(
                f"unexpected response body: {str(message)[:120]!r}",
                provider=self.name,
                model=model,
            )
        text = "".join(block.text for block in message.content if block.type == "text")
        usage = message.usage
        metadata: dict[str, Any] = {"response_id": message.id, "requested_model": model}
        if ignored:
            metadata["ignored_options"] = ignored
        return ProviderResponse(
            text=text,
            provider=self.name,
            model=message.model or model,
            prompt_tokens=usage.input_tokens,
            completion_tokens=usage.output_tokens,
            total_tokens=usage.input_tokens + usage.output_tokens,
            latency_ms=clock.ms(),
            finish_reason=message.stop_reason,
            metadata=metadata,
            raw_response=message.model_dump(mode="json", exclude_none=True),
        )

    async def _stream(
        self, messages: list[Message], model: str, options: CompletionOptions
    ) -> AsyncIterator[str | ProviderResponse]:
        clock = Stopwatch()
        body, ignored = self._request(messages, model, options)
        body["stream"] = True
        stream = await self._call(model, lambda: self._client.messages.create(**body))
        if not isinstance(stream, anthropic.AsyncStream):
            raise MalformedResponseError(
                "expected an event stream", provider=self.name, model=model
            )
        parts: list[str] = []
        input_tokens: int | None = None
        output_tokens: int | None = None
        stop_reason: str | None = None
        message_id: str | None = None
        served_model = model
        first_token_ms: float | None = None
        iterator = stream.__aiter__()
        try:
            while True:
                event = await self._call(model, iterator.__anext__)
                if event.type == "message_start":
                    message_id = event.message.id
                    served_model = event.message.model or model
                    input_tokens = event.message.usage.input_tokens
                    output_tokens = event.message.usage.output_tokens
                elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                    if first_token_ms is None:
                        first_token_ms = clock.ms()
                    parts.append(event.delta.text)
                    yield event.delta.text
                elif event.type == "message_delta":
                    stop_reason = event.delta.stop_reason or stop_reason
                    if event.usage and event.usage.output_tokens is not None:
                        output_tokens = event.usage.output_tokens
                elif event.type == "error":  # pragma: no cover - server-sent error event
                    raise ProviderUnavailableError(
                        f"stream error: {event}", provider=self.name, model=model
                    )
        except StopAsyncIteration:
            pass
        finally:
            await stream.close()
        text = "".join(parts)
        total = (input_tokens or 0) + (output_tokens or 0) if input_tokens is not None else None
        metadata: dict[str, Any] = {
            "response_id": message_id,
            "requested_model": model,
            "streamed": True,
            "time_to_first_token_ms": first_token_ms,
        }
        if ignored:
            metadata["ignored_options"] = ignored
        yield ProviderResponse(
            text=text,
            provider=self.name,
            model=served_model,
            prompt_tokens=input_tokens,
            completion_tokens=output_tokens,
            total_tokens=total,
            latency_ms=clock.ms(),
            finish_reason=stop_reason,
            metadata=metadata,
            raw_response={
                "id": message_id,
                "model": served_model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": stop_reason,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
            },
        )

    async def list_models(self) -> list[ModelInfo]:
        page = await self._call(None, self._client.models.list)
        models: list[ModelInfo] = []
        async for item in page:
            models.append(
                ModelInfo(
                    id=item.id,
                    provider=self.name,
                    owned_by="anthropic",
                    metadata={"display_name": getattr(item, "display_name", None)},
                )
            )
        return models

    async def _call(self, model: str | None, fn: Callable[[], Any]) -> Any:
        return await call_sdk(
            anthropic,
            fn,
            provider=self.name,
            model=model,
            timeout_s=self.timeout_s,
            base_url=self.base_url,
            key_env_var=KEY_ENV_VAR,
        )
