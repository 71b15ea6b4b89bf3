"""The provider contract: one abstract base, the response shape, options and message helpers."""

from __future__ import annotations

import abc
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import BadRequestError, UnsupportedOperationError

Role = Literal["system", "user", "assistant"]
MessagesOrPrompt = str | Sequence[dict[str, Any]]

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def approx_token_count(text: str) -> int:
    """A rough, deterministic token count (words and punctuation) for providers without usage."""
    return len(_TOKEN_RE.findall(text))


class Message(BaseModel):
    """One chat message. Content is plain text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    content: str


class CompletionOptions(BaseModel):
    """Generation options shared by every provider. Unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: list[str] | None = None
    seed: int | None = None
    json_mode: bool = False
    timeout_s: float | None = Field(None, gt=0)

    @classmethod
    def parse(cls, provider: str, options: dict[str, Any]) -> CompletionOptions:
        """Validate keyword options; an unknown or invalid option is a `BadRequestError`."""
        try:
            return cls(**options)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'options'}: {err['msg']}"
                for err in exc.errors()
            )
            raise BadRequestError(f"invalid options: {problems}", provider=provider) from None


def normalise_messages(provider: str, messages: MessagesOrPrompt) -> list[Message]:
    """Turn a prompt string or a list of role/content dicts into validated messages."""
    if isinstance(messages, str):
        if not messages.strip():
            raise BadRequestError("the prompt is empty", provider=provider)
        return [Message(role="user", content=messages)]
    result: list[Message] = []
    for index, item in enumerate(messages):
        try:
            message = item if isinstance(item, Message) else Message.model_validate(item)
        except ValidationError:
            raise BadRequestError(
                f"message {index} must be {{'role': 'system'|'user'|'assistant', "
                f"'content': str}}, got {item!r:.80}",
                provider=provider,
            ) from None
        result.append(message)
    if not any(m.role == "user" for m in result):
        raise BadRequestError("the conversation has no user message", provider=provider)
    return result


class ProviderResponse(BaseModel):
    """What every provider returns for a completion. `raw_response` is JSON-safe."""

    text: str
    provider: str
    model: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    latency_ms: float
    finish_reason: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    raw_response: dict[str, Any] | None = None


class EmbeddingResponse(BaseModel):
    """Vectors for a list of input texts, in input order."""

    vectors: list[list[float]]
    provider: str
    model: str
    prompt_tokens: int | None = None
    latency_ms: float
    metadata: dict[str, Any] = Field(default_factory=dict)

    @property
    def dimension(self) -> int:
        return len(self.vectors[0]) if self.vectors else 0


class ModelInfo(BaseModel):
    """One model (or deployment) a provider offers."""

    id: str
    provider: str
    owned_by: str | None = None
    context_length: int | None = None
    input_price_per_mtok: float | None = None
    output_price_per_mtok: float | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class Stopwatch:
    """Milliseconds since creation, with a monotonic clock."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    def ms(self) -> float:
        return round((time.perf_counter() - self._start) * 1000.0, 3)


class BaseLLMProvider(abc.ABC):
    """A language-model provider. Subclasses implement `_complete` and usually `_stream`.

    Capability flags are class attributes so registries can answer "who can embed?" without
    building a client.
    """

    provider_id: ClassVar[str] = "base"
    supports_chat: ClassVar[bool] = True
    supports_stream: ClassVar[bool] = True
    supports_embeddings: ClassVar[bool] = False
    supports_json_mode: ClassVar[bool] = False
    is_mock: ClassVar[bool] = False

    def __init__(self, *, model: str | None = None, name: str | None = None) -> None:
        self.default_model = model
        self.name = name or self.provider_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, model={self.default_model!r})"

    def resolve_model(self, model: str | None) -> str:
        chosen = model or self.default_model
        if not chosen:
            raise BadRequestError(
                "no model given and no default model configured", provider=self.name
            )
        return chosen

    async def complete(
        self, messages: MessagesOrPrompt, *, model: str | None = None, **options: Any
    ) -> ProviderResponse:
        """One completion for a prompt or a list of messages."""
        msgs = normalise_messages(self.name, messages)
        opts = CompletionOptions.parse(self.name, options)
        if opts.json_mode and not self.supports_json_mode:
            raise UnsupportedOperationError("json_mode is not supported", provider=self.name)
        return await self._complete(msgs, self.resolve_model(model), opts)

    async def stream(
        self, messages: MessagesOrPrompt, *, model: str | None = None, **options: Any
    ) -> AsyncIterator[str | ProviderResponse]:
        """Yield text chunks as they arrive, then one final `ProviderResponse`."""
        msgs = normalise_messages(self.name, messages)
        opts = CompletionOptions.parse(self.name, options)
        if opts.json_mode and not self.supports_json_mode:
            raise UnsupportedOperationError("json_mode is not supported", provider=self.name)
        resolved = self.resolve_model(model)
        if not self.supports_stream:
            response = await self._complete(msgs, resolved, opts)
            yield response.text
            yield response
            return
        async for item in self._stream(msgs, resolved, opts):
            yield item

    async def embed(
        self,
        texts: Sequence[str],
        *,
        model: str | None = None,
        dimensions: int | None = None,
    ) -> EmbeddingResponse:
        """Embedding vectors for `texts`, in order."""
        if not self.embeddings_enabled():
            raise UnsupportedOperationError("embeddings are not supported", provider=self.name)
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise BadRequestError("no texts to embed", provider=self.name)
        return await self._embed(list(texts), self.resolve_model(model), dimensions)

    def embeddings_enabled(self) -> bool:
        """Whether this instance can embed (presets may narrow the class flag)."""
        return self.supports_embeddings

    async def list_models(self) -> list[ModelInfo]:
        """Models this provider offers; the default model only when it has no listing."""
        return [ModelInfo(id=self.default_model, provider=self.name)] if self.default_model else []

    async def aclose(self) -> None:
        """Release the SDK client and its connections (nothing to release by default)."""
        return None

    async def __aenter__(self) -> BaseLLMProvider:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @abc.abstractmethod
    async def _complete(
        self, messages: list[Message], model: str, options: CompletionOptions
    ) -> ProviderResponse: ...

    async def _stream(
        self, messages: list[Message], model: str, options: CompletionOptions
    ) -> AsyncIterator[str | ProviderResponse]:
        response = await self._complete(messages, model, options)
        yield response.text
        yield response

    async def _embed(
        self, texts: list[str], model: str, dimensions: int | None
    ) -> EmbeddingResponse:
        raise UnsupportedOperationError("embeddings are not supported", provider=self.name)
