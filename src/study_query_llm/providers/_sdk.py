"""Translate the official SDKs' exceptions (openai and anthropic share their shape) into ours."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any, Generic, TypeVar

import aiohttp
import httpx2
import pydantic

from .errors import (
    MalformedResponseError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeoutError,
    error_for_status,
)

T = TypeVar("T")
C = TypeVar("C")


def http_client_for(sdk: ModuleType, given: httpx2.AsyncClient | None) -> httpx2.AsyncClient:
    """The HTTP client an SDK client sends through: `given`, else the SDK's aiohttp transport.

    Both official SDKs ship `DefaultAioHttpClient` (their `aiohttp` extra, a dependency of this
    project): the same httpx interface, timeouts and error types, with aiohttp doing the I/O.
    It costs about 40% less CPU per call than the default httpx transport, which matters when
    a batch keeps dozens of calls in flight on one event loop (bench/inference_bench.py).
    """
    return given if given is not None else sdk.DefaultAioHttpClient()


class ClientPerLoop(Generic[C]):
    """An SDK client for whichever event loop is running.

    The aiohttp session under an SDK client belongs to the event loop that opened it, so
    a provider used from a second loop (a second `asyncio.run`, a new notebook kernel
    loop) gets a copy of its client with a transport of its own:
    `with_options(http_client=...)` keeps the key, URL, headers and timeout. A client
    the caller gave is theirs to manage and is never replaced.
    """

    def __init__(self, sdk: ModuleType, client: C, *, given: bool) -> None:
        self._sdk = sdk
        self._client = client
        self._given = given
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> C:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside any loop: nothing is sent from here
            return self._client
        if self._loop is None or self._given:
            self._loop = loop
        elif loop is not self._loop:
            self._loop = loop
            self._client = self._client.with_options(  # type: ignore[attr-defined]
                http_client=self._sdk.DefaultAioHttpClient()
            )
        return self._client

    async def aclose(self) -> None:
        """Close the client of this loop (one left on a loop that is gone cannot be)."""
        if self._given or self._loop in (None, asyncio.get_running_loop()):
            await self._client.close()  # type: ignore[attr-defined]


async def call_sdk(
    sdk: ModuleType,
    fn: Callable[[], Awaitable[T]],
    *,
    provider: str,
    model: str | None,
    timeout_s: float,
    base_url: str | None,
    key_env_var: str | None,
) -> T:
    """Await one SDK call; any failure leaves as a `ProviderError` subclass, keys never shown."""
    try:
        return await fn()
    except (StopAsyncIteration, ProviderError):
        raise
    except sdk.APITimeoutError as exc:
        if (dropped := _connection_dropped(exc)) is not None:
            raise ProviderConnectionError(
                f"cannot reach {base_url or 'the API'}: {_reason(dropped)}",
                provider=provider,
                model=model,
            ) from None
        raise ProviderTimeoutError(
            f"no answer within {timeout_s:g} s", provider=provider, model=model
        ) from None
    except sdk.APIConnectionError as exc:
        raise ProviderConnectionError(
            f"cannot reach {base_url or 'the API'}: {exc.__cause__ or exc}",
            provider=provider,
            model=model,
        ) from None
    except sdk.APIStatusError as exc:
        raise error_for_status(
            exc.status_code,
            status_message(exc),
            provider=provider,
            model=model,
            headers=exc.response.headers,
            body=exc.body if _json_safe(exc.body) else None,
            key_env_var=key_env_var,
        ) from None
    except sdk.APIResponseValidationError as exc:
        raise MalformedResponseError(
            f"response failed validation: {exc.message}", provider=provider, model=model
        ) from None
    except (json.JSONDecodeError, pydantic.ValidationError) as exc:
        raise MalformedResponseError(
            f"response body is not valid JSON: {str(exc)[:200]}", provider=provider, model=model
        ) from None
    except httpx2.TimeoutException:
        raise ProviderTimeoutError(
            f"no answer within {timeout_s:g} s", provider=provider, model=model
        ) from None
    except httpx2.TransportError as exc:
        raise ProviderConnectionError(
            f"connection failed: {exc}", provider=provider, model=model
        ) from None


def _connection_dropped(exc: BaseException) -> aiohttp.ClientConnectionError | None:
    """The refused, reset or closed connection behind an SDK "timeout", if that is what it was.

    The SDKs' aiohttp transport reports every aiohttp connection error as httpx's
    `ConnectTimeout` (so the SDK raises `APITimeoutError`), keeping the original as the cause.
    A refused or dropped connection is not a timeout: it fails at once and says so.
    """
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, aiohttp.ClientConnectionError):
            return None if isinstance(cause, TimeoutError) else cause
        cause = cause.__cause__
    return None


def _reason(error: aiohttp.ClientConnectionError) -> str:
    """Why a connection failed, in plain words where aiohttp's text is about its internals."""
    os_error = getattr(error, "os_error", None) or error.__cause__
    if isinstance(os_error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without answering"
    if isinstance(os_error, ConnectionResetError):
        return "the connection was reset"
    return str(error)


def status_message(exc: Any) -> str:
    """The human message inside an error body (`{"error": {"message": ...}}`), else the SDK's."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if body.get("message"):
            return str(body["message"])
    return str(exc.message)


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
