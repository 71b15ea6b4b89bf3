"""Providers: one contract (`BaseLLMProvider`), the OpenAI-compatible family, Anthropic, mock."""

from .base import (
    BaseLLMProvider,
    CompletionOptions,
    EmbeddingResponse,
    Message,
    ModelInfo,
    ProviderResponse,
)
from .errors import (
    AuthenticationError,
    BadRequestError,
    MalformedResponseError,
    MissingCredentialError,
    ModelNotFoundError,
    PermanentProviderError,
    ProviderConfigurationError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeoutError,
    ProviderUnavailableError,
    RateLimitError,
    TransientProviderError,
    UnsupportedOperationError,
)
from .pricing import PricingTable
from .registry import SPECS, configured, create, get_spec, supporting

__all__ = [
    "SPECS",
    "AuthenticationError",
    "BadRequestError",
    "BaseLLMProvider",
    "CompletionOptions",
    "EmbeddingResponse",
    "MalformedResponseError",
    "Message",
    "MissingCredentialError",
    "ModelInfo",
    "ModelNotFoundError",
    "PermanentProviderError",
    "PricingTable",
    "ProviderConfigurationError",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderResponse",
    "ProviderTimeoutError",
    "ProviderUnavailableError",
    "RateLimitError",
    "TransientProviderError",
    "UnsupportedOperationError",
    "configured",
    "create",
    "get_spec",
    "supporting",
]
