"""One small error hierarchy for every provider, so services can decide what to do.

`TransientProviderError` (timeouts, dropped connections, 429, 5xx, garbled bodies) is worth
retrying; `PermanentProviderError` (bad key, bad request, unknown model) is not.
`ProviderConfigurationError` is raised before any request when a required setting is missing.
Messages never contain API keys.
"""

from __future__ import annotations

from typing import Any


class ProviderError(Exception):
    """Base of every provider failure. `kind` is a stable short name used in records."""

    kind = "provider_error"
    transient = False

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        model: str | None = None,
        status_code: int | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.model = model
        self.status_code = status_code
        self.body = body

    def __str__(self) -> str:
        prefix = f"{self.provider}: " if self.provider else ""
        return f"{prefix}{self.message}"

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe description for `raw_calls.error_json`."""
        data: dict[str, Any] = {
            "type": self.kind,
            "transient": self.transient,
            "message": self.message,
        }
        if self.status_code is not None:
            data["status_code"] = self.status_code
        if self.provider:
            data["provider"] = self.provider
        if self.model:
            data["model"] = self.model
        return data


class ProviderConfigurationError(ProviderError):
    """A provider cannot be used: a required setting is missing or invalid."""

    kind = "configuration"

    def __init__(self, message: str, *, env_var: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.env_var = env_var

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        if self.env_var:
            data["env_var"] = self.env_var
        return data


class MissingCredentialError(ProviderConfigurationError):
    """The provider needs a key or endpoint that is not set."""

    kind = "missing_credential"


# --- transient --------------------------------------------------------------------------


class TransientProviderError(ProviderError):
    """Retrying later may succeed."""

    kind = "transient"
    transient = True


class ProviderTimeoutError(TransientProviderError):
    kind = "timeout"


class ProviderConnectionError(TransientProviderError):
    kind = "connection"


class RateLimitError(TransientProviderError):
    """HTTP 429. `retry_after` is the server's Retry-After in seconds, when it sent one."""

    kind = "rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        data["retry_after"] = self.retry_after
        return data


class ProviderUnavailableError(TransientProviderError):
    """HTTP 5xx (or Anthropic's 529 overloaded)."""

    kind = "server_error"


class MalformedResponseError(TransientProviderError):
    """The server answered 2xx with a body that is not what the protocol promises."""

    kind = "malformed_response"


# --- permanent --------------------------------------------------------------------------


class PermanentProviderError(ProviderError):
    """Retrying the same request will fail the same way."""

    kind = "permanent"


class AuthenticationError(PermanentProviderError):
    """HTTP 401/403. `env_var` names the setting to fix."""

    kind = "authentication"

    def __init__(self, message: str, *, env_var: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.env_var = env_var

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        if self.env_var:
            data["env_var"] = self.env_var
        return data


class BadRequestError(PermanentProviderError):
    """HTTP 400/422: the request itself is wrong (options, message shape, too long)."""

    kind = "bad_request"


class ModelNotFoundError(PermanentProviderError):
    """HTTP 404: unknown model or deployment."""

    kind = "not_found"


class UnsupportedOperationError(PermanentProviderError):
    """The provider does not offer this operation (e.g. embeddings on Anthropic)."""

    kind = "unsupported"


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from `Retry-After` (seconds or HTTP date) or `retry-after-ms`."""
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
        value = headers.get("retry-after")
    except AttributeError:
        return None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from datetime import UTC, datetime
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_for_status(
    status: int,
    message: str,
    *,
    provider: str,
    model: str | None,
    headers: Any = None,
    body: Any = None,
    key_env_var: str | None = None,
) -> ProviderError:
    """Map an HTTP status from any provider to the hierarchy above."""
    common: dict[str, Any] = {
        "provider": provider,
        "model": model,
        "status_code": status,
        "body": body,
    }
    if status == 429:
        return RateLimitError(
            f"rate limited (429): {message}", retry_after=parse_retry_after(headers), **common
        )
    if status in (401, 403):
        hint = f"; check {key_env_var}" if key_env_var else ""
        return AuthenticationError(
            f"not authorised ({status}): {message}{hint}", env_var=key_env_var, **common
        )
    if status == 404:
        return ModelNotFoundError(
            f"not found (404): {message} — is the model or deployment {model!r} right?",
            **common,
        )
    if status == 408:
        return ProviderTimeoutError(f"request timeout (408): {message}", **common)
    if status >= 500:
        return ProviderUnavailableError(f"server error ({status}): {message}", **common)
    if status in (400, 409, 413, 422):
        return BadRequestError(f"bad request ({status}): {message}", **common)
    return PermanentProviderError(f"HTTP {status}: {message}", **common)
