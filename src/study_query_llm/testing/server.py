"""A loopback HTTP server that speaks LLM provider wire formats, for tests and benchmarks.

`LoopbackServer` answers on 127.0.0.1 the way the real services do, so the official
`openai` and `anthropic` SDKs talk to it unchanged:

- OpenAI style (also Hyperbolic, OpenRouter, vLLM, LM Studio, Ollama's /v1):
  ``GET /v1/models``, ``POST /v1/chat/completions`` (plain and SSE), ``POST /v1/embeddings``.
- Azure OpenAI: ``/openai/deployments/{deployment}/chat/completions|embeddings``,
  ``GET /openai/deployments`` and ``GET /openai/models``, all requiring ``?api-version=``.
- Anthropic: ``POST /v1/messages`` (plain and SSE), and ``GET /v1/models`` when the request
  carries an ``anthropic-version`` header.
- Ollama native: ``GET /api/tags``.

Answers are deterministic: the reply is ``"Loopback reply to: "`` plus the start of the last
user message, embeddings are unit vectors seeded from a hash of the text. Failures are
injected on demand: scripted `Fault`s (status codes with Retry-After, delays, hangs,
malformed JSON, wrong content type, connection resets) consumed first-in first-out, or a
seeded random failure rate. Every request is recorded.

Run it by hand for benchmarks or an offline demo::

    python -m study_query_llm.testing.server --port 8000 --delay-ms 50
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import math
import random
import re
import socket
import socketserver
import struct
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = [
    "DEFAULT_MODELS",
    "FAULT_KINDS",
    "Fault",
    "LoopbackServer",
    "RecordedRequest",
    "count_tokens",
    "embedding_vector",
    "reply_text",
]

DEFAULT_MODELS: tuple[str, ...] = (
    "gpt-4o-mini",
    "gpt-4o",
    "text-embedding-3-small",
    "claude-haiku-4-5",
    "claude-3-5-haiku-latest",
    "claude-sonnet-4-5",
    "llama3.1:8b",
    "meta-llama/Llama-3.1-8B-Instruct",
    "openai/gpt-4o-mini",
    "mock-model",
)

FAULT_KINDS = frozenset({"status", "delay", "timeout", "malformed", "wrong_content_type", "reset"})

REPLY_PREFIX = "Loopback reply to: "
DEFAULT_EMBEDDING_DIMENSIONS = 16
_MAX_EMBEDDING_DIMENSIONS = 8192
_MAX_CHOICES = 128
_CONTEXT_LENGTH = 128_000
_CREATED = 1_735_689_600  # 2025-01-01T00:00:00Z
_TOKENS_PER_STREAM_PIECE = 3
_STOP_WAIT_S = 5.0

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")

Style = Literal["openai", "azure", "anthropic", "ollama"]


# --------------------------------------------------------------------------------------
# Public records
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour, consumed by the next matching request.

    kind:
        ``"status"``: answer `status` with an error body in the endpoint's wire format.
        ``"delay"``: answer normally after `delay_s` (instead of the server's delay).
        ``"timeout"``: hold the request unanswered for `hang_s` (or until the server stops
        or is reset), then drop the connection.
        ``"malformed"``: 200, ``application/json``, truncated JSON.
        ``"wrong_content_type"``: 200, ``text/html`` body.
        ``"reset"``: close the connection without any response.
    retry_after: sent as the ``Retry-After`` header (seconds) with "status" faults.
    body: replaces the body of "status", "malformed" and "wrong_content_type" answers.
    """

    kind: str = "status"
    status: int = 500
    retry_after: float | None = None
    delay_s: float = 0.0
    body: str | None = None
    hang_s: float = 30.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(
                f"unknown fault kind {self.kind!r}; expected one of {sorted(FAULT_KINDS)}"
            )
        if not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status code, got {self.status}")


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    model: str | None


# --------------------------------------------------------------------------------------
# Deterministic content
# --------------------------------------------------------------------------------------


def count_tokens(text: str) -> int:
    """The server's token count: words and single punctuation marks."""
    return len(_TOKEN_RE.findall(text))


def reply_text(user_text: str) -> str:
    """The full (untruncated) reply the server gives to a last user message."""
    return REPLY_PREFIX + user_text[:200]


def embedding_vector(text: str, dimensions: int = DEFAULT_EMBEDDING_DIMENSIONS) -> list[float]:
    """The unit-norm vector the server returns for `text` (float32 precision)."""
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    rng = random.Random(seed)
    raw = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(x / norm for x in raw))
    return list(struct.unpack(f"<{dimensions}f", packed))


def _truncate(text: str, max_tokens: int | None) -> tuple[str, bool]:
    """Cut `text` after `max_tokens` tokens; say whether anything was cut."""
    if max_tokens is None:
        return text, False
    matches = list(_TOKEN_RE.finditer(text))
    if max_tokens >= len(matches):
        return text, False
    if max_tokens <= 0:
        return "", True
    return text[: matches[max_tokens - 1].end()], True


def _pieces(text: str, tokens_per_piece: int = _TOKENS_PER_STREAM_PIECE) -> list[str]:
    """Split `text` into contiguous slices of a few tokens each (they join back to `text`)."""
    matches = list(_TOKEN_RE.finditer(text))
    cuts = [m.end() for m in matches[tokens_per_piece - 1 :: tokens_per_piece]]
    pieces: list[str] = []
    start = 0
    for cut in cuts:
        pieces.append(text[start:cut])
        start = cut
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _content_text(content: Any) -> str:
    """The text of a message's content: a string or a list of text blocks/parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]
        return "\n".join(texts)
    return ""


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def _prompt_tokens(messages: list[Any], system: Any = None) -> int:
    total = count_tokens(_content_text(system))
    for message in messages:
        if isinstance(message, dict):
            total += count_tokens(_content_text(message.get("content")))
    return total


def _embedding_text(item: Any) -> str | None:
    """One embedding input as text: a string, or a token list rendered as JSON."""
    if isinstance(item, str):
        return item or None
    if isinstance(item, list) and item and all(isinstance(t, int) for t in item):
        return json.dumps(item)
    return None


def _embedding_inputs(raw: Any) -> list[str] | None:
    if isinstance(raw, str) or (
        isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw)
    ):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        return None
    texts = [_embedding_text(item) for item in raw]
    if any(text is None for text in texts):
        return None
    return [text for text in texts if text is not None]


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def _format_seconds(value: float) -> str:
    return f"{value:g}"


# --------------------------------------------------------------------------------------
# Replies and error bodies
# --------------------------------------------------------------------------------------


@dataclass
class _Reply:
    """What to send: a whole body, or (when `events` is set) a chunked SSE stream."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    events: list[bytes] | None = None


def _json_reply(status: int, obj: Any, headers: dict[str, str] | None = None) -> _Reply:
    return _Reply(status, json.dumps(obj).encode("utf-8"), headers=headers or {})


def _sse_reply(events: list[bytes]) -> _Reply:
    return _Reply(200, content_type="text/event-stream; charset=utf-8", events=events)


def _sse_data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode("utf-8") + b"\n\n"


def _sse_event(event: str, obj: Any) -> bytes:
    return f"event: {event}\n".encode() + _sse_data(obj)


_OPENAI_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    408: ("timeout", "timeout"),
    409: ("invalid_request_error", "conflict"),
    422: ("invalid_request_error", "unprocessable_entity"),
    429: ("requests", "rate_limit_exceeded"),
}

_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def _error_reply(
    style: Style,
    status: int,
    message: str,
    *,
    code: str | None = None,
    retry_after: float | None = None,
    param: str | None = None,
    body: str | None = None,
) -> _Reply:
    """An error answer shaped like the endpoint's own API (OpenAI, Anthropic, Ollama)."""
    headers = {} if retry_after is None else {"Retry-After": _format_seconds(retry_after)}
    if body is not None:
        return _Reply(status, body.encode("utf-8"), headers=headers)
    payload: dict[str, Any]
    if style == "anthropic":
        default_type = "api_error" if status >= 500 else "invalid_request_error"
        err_type = _ANTHROPIC_ERROR_TYPES.get(status, default_type)
        payload = {"type": "error", "error": {"type": err_type, "message": message}}
    elif style == "ollama":
        payload = {"error": message}
    else:
        err_type, default_code = _OPENAI_ERROR_TYPES.get(
            status,
            ("server_error", "server_error") if status >= 500 else ("invalid_request_error", None),
        )
        payload = {
            "error": {
                "message": message,
                "type": err_type,
                "param": param,
                "code": code if code is not None else default_code,
            }
        }
    return _json_reply(status, payload, headers)


# --------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Route:
    endpoint: str  # chat | embeddings | messages | models | model | deployments | tags
    style: Style
    deployment: str | None = None
    model_id: str | None = None

    @property
    def generates(self) -> bool:
        """Whether the endpoint is a completion/message/embedding call (failure-rate target)."""
        return self.endpoint in ("chat", "embeddings", "messages")


_AZURE_DEPLOYMENT_RE = re.compile(r"^/openai/deployments/([^/]+)/(chat/completions|embeddings)$")


def _route(method: str, path: str, headers: dict[str, str]) -> _Route | None:
    if method == "POST":
        if path == "/v1/chat/completions":
            return _Route("chat", "openai")
        if path == "/v1/embeddings":
            return _Route("embeddings", "openai")
        if path == "/v1/messages":
            return _Route("messages", "anthropic")
        match = _AZURE_DEPLOYMENT_RE.match(path)
        if match:
            endpoint = "chat" if match.group(2) == "chat/completions" else "embeddings"
            return _Route(endpoint, "azure", deployment=unquote(match.group(1)))
        return None
    if method == "GET":
        models_style: Style = "anthropic" if "anthropic-version" in headers else "openai"
        if path == "/v1/models":
            return _Route("models", models_style)
        if path.startswith("/v1/models/"):
            return _Route("model", models_style, model_id=unquote(path[len("/v1/models/") :]))
        if path == "/openai/models":
            return _Route("models", "azure")
        if path == "/openai/deployments":
            return _Route("deployments", "azure")
        if path == "/api/tags":
            return _Route("tags", "ollama")
    return None


# --------------------------------------------------------------------------------------
# Endpoint bodies
# --------------------------------------------------------------------------------------


def _openai_model(model_id: str) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": _CREATED,
        "owned_by": "loopback",
        "name": model_id,
        "context_length": _CONTEXT_LENGTH,
        "pricing": {"prompt": "0.00000015", "completion": "0.0000006"},
    }


def _anthropic_model(model_id: str) -> dict[str, Any]:
    return {
        "type": "model",
        "id": model_id,
        "display_name": model_id,
        "created_at": "2025-01-01T00:00:00Z",
        "lifecycle": "active",
    }


def _ollama_model(model_id: str) -> dict[str, Any]:
    return {
        "name": model_id,
        "model": model_id,
        "modified_at": "2025-01-01T00:00:00Z",
        "size": 4_920_753_328,
        "digest": hashlib.sha256(model_id.encode("utf-8")).hexdigest(),
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "8B",
            "quantization_level": "Q4_K_M",
        },
    }


def _listing(route: _Route, models: Sequence[str]) -> _Reply:
    if route.endpoint == "tags":
        return _json_reply(200, {"models": [_ollama_model(m) for m in models]})
    if route.endpoint == "deployments":
        data = [
            {"id": m, "model": m, "object": "deployment", "status": "succeeded"} for m in models
        ]
        return _json_reply(200, {"object": "list", "data": data})
    if route.endpoint == "model":
        model_id = route.model_id or ""
        if model_id not in models:
            return _error_reply(
                route.style,
                404,
                f"The model `{model_id}` does not exist",
                code="model_not_found",
            )
        if route.style == "anthropic":
            return _json_reply(200, _anthropic_model(model_id))
        return _json_reply(200, _openai_model(model_id))
    if route.style == "anthropic":
        body = {
            "data": [_anthropic_model(m) for m in models],
            "has_more": False,
            "first_id": models[0] if models else None,
            "last_id": models[-1] if models else None,
        }
        return _json_reply(200, body)
    return _json_reply(200, {"object": "list", "data": [_openai_model(m) for m in models]})


def _optional_int(body: dict[str, Any], *names: str) -> tuple[int | None, str | None]:
    """The first of `names` present in `body` as an int; the bad name if it is not one."""
    for name in names:
        if name in body and body[name] is not None:
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                return None, name
            return value, None
    return None, None


def _chat_completion(route: _Route, body: dict[str, Any], model: str) -> _Reply:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return _error_reply(
            route.style, 400, "Missing required parameter: 'messages'.", param="messages"
        )
    max_tokens, bad = _optional_int(body, "max_completion_tokens", "max_tokens")
    if bad:
        return _error_reply(
            route.style, 400, f"Invalid '{bad}': expected an integer >= 0.", param=bad
        )
    n, bad_n = _optional_int(body, "n")
    n = 1 if n is None else n
    if bad_n or not 1 <= n <= _MAX_CHOICES:
        return _error_reply(route.style, 400, f"Invalid 'n': must be 1..{_MAX_CHOICES}.", param="n")

    text, cut = _truncate(reply_text(_last_user_text(messages)), max_tokens)
    finish_reason = "length" if cut else "stop"
    prompt_tokens = _prompt_tokens(messages)
    completion_tokens = count_tokens(text) * n
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    completion_id = _new_id("chatcmpl-")
    created = int(time.time())
    common = {
        "id": completion_id,
        "created": created,
        "model": model,
        "system_fingerprint": "fp_loopback",
    }

    if not body.get("stream"):
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            for i in range(n)
        ]
        return _json_reply(
            200, {**common, "object": "chat.completion", "choices": choices, "usage": usage}
        )

    stream_options = body.get("stream_options")
    include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))

    def chunk(choices: list[dict[str, Any]], chunk_usage: dict[str, int] | None = None) -> bytes:
        obj: dict[str, Any] = {**common, "object": "chat.completion.chunk", "choices": choices}
        if include_usage:
            obj["usage"] = chunk_usage
        return _sse_data(obj)

    def choice(index: int, delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}

    events: list[bytes] = []
    for i in range(n):
        events.append(chunk([choice(i, {"role": "assistant", "content": "", "refusal": None})]))
        events.extend(chunk([choice(i, {"content": piece})]) for piece in _pieces(text))
        events.append(chunk([choice(i, {}, finish_reason)]))
    if include_usage:
        events.append(chunk([], usage))
    events.append(b"data: [DONE]\n\n")
    return _sse_reply(events)


def _embeddings(route: _Route, body: dict[str, Any], model: str) -> _Reply:
    texts = _embedding_inputs(body.get("input"))
    if texts is None:
        return _error_reply(
            route.style,
            400,
            "'input' must be a non-empty string, a list of non-empty strings, or token lists.",
            param="input",
        )
    dimensions, bad = _optional_int(body, "dimensions")
    dimensions = DEFAULT_EMBEDDING_DIMENSIONS if dimensions is None else dimensions
    if bad or not 1 <= dimensions <= _MAX_EMBEDDING_DIMENSIONS:
        return _error_reply(
            route.style,
            400,
            f"Invalid 'dimensions': must be 1..{_MAX_EMBEDDING_DIMENSIONS}.",
            param="dimensions",
        )
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        return _error_reply(
            route.style,
            400,
            "Invalid 'encoding_format': expected 'float' or 'base64'.",
            param="encoding_format",
        )
    data = []
    for index, text in enumerate(texts):
        vector = embedding_vector(text, dimensions)
        embedding: list[float] | str = vector
        if encoding == "base64":
            packed = struct.pack(f"<{dimensions}f", *vector)
            embedding = base64.b64encode(packed).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = sum(count_tokens(text) for text in texts)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return _json_reply(200, {"object": "list", "data": data, "model": model, "usage": usage})


def _anthropic_message(body: dict[str, Any], model: str) -> _Reply:
    max_tokens, bad = _optional_int(body, "max_tokens")
    if max_tokens is None:
        message = "max_tokens: Field required" if not bad else "max_tokens: must be an integer"
        return _error_reply("anthropic", 400, message)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return _error_reply("anthropic", 400, "messages: Field required")
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        return _error_reply("anthropic", 400, "system: Input should be a string or a list")

    text, cut = _truncate(reply_text(_last_user_text(messages)), max_tokens)
    stop_reason = "max_tokens" if cut else "end_turn"
    input_tokens = _prompt_tokens(messages, system)
    output_tokens = count_tokens(text)
    message_id = _new_id("msg_loopback_")
    common = {"id": message_id, "type": "message", "role": "assistant", "model": model}

    if not body.get("stream"):
        return _json_reply(
            200,
            {
                **common,
                "content": [{"type": "text", "text": text}],
                "stop_reason": stop_reason,
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
            },
        )

    start = {
        **common,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 1},
    }
    events = [
        _sse_event("message_start", {"type": "message_start", "message": start}),
        _sse_event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        _sse_event("ping", {"type": "ping"}),
    ]
    events.extend(
        _sse_event(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": piece},
            },
        )
        for piece in _pieces(text)
    )
    events += [
        _sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _sse_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
        ),
        _sse_event("message_stop", {"type": "message_stop"}),
    ]
    return _sse_reply(events)


def _malformed_reply(style: Style, stream: bool, body: str | None) -> _Reply:
    if body is None:
        if style == "anthropic":
            body = '{"id": "msg_x", "type": "message", "content": ['
        else:
            body = '{"id": "x", "choices": ['
    if stream:
        return _sse_reply([b"data: " + body.encode("utf-8") + b"\n\n"])
    return _Reply(200, body.encode("utf-8"))


def _wrong_content_type_reply(body: str | None) -> _Reply:
    text = body if body is not None else "<html><body>Bad gateway</body></html>"
    return _Reply(200, text.encode("utf-8"), content_type="text/html; charset=utf-8")


# --------------------------------------------------------------------------------------
# Server state
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Incoming:
    """A parsed request: its record, its route (None if unknown) and its raw body."""

    record: RecordedRequest
    route: _Route | None
    raw_body: bytes


@dataclass(frozen=True)
class _ScriptedFault:
    fault: Fault
    path: str | None
    model: str | None

    def matches(self, path: str, model: str | None) -> bool:
        return (self.path is None or self.path in path) and (
            self.model is None or self.model == model
        )


@dataclass(frozen=True)
class _FailureRate:
    transient: float
    permanent: float
    seed: int


def _unit_interval(*parts: object) -> float:
    """A number in [0, 1) fixed by `parts`."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 speaking OpenAI, Azure, Anthropic and Ollama APIs.

    Use it as a context manager (or `start()` / `stop()`). All methods are thread-safe.
    """

    def __init__(
        self,
        delay_s: float = 0.0,
        models: Sequence[str] | None = None,
        api_key: str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.delay_s = delay_s
        """Default delay before every answer, in seconds; settable at any time."""
        self.models: list[str] = list(DEFAULT_MODELS if models is None else models)
        """Known model (and Azure deployment) names; others get 404."""
        self.api_key = api_key
        """When set, requests must carry it (Bearer, ``api-key`` or ``x-api-key``)."""
        self._address = (host, port)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._interrupt = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._script: list[_ScriptedFault] = []
        self._requests: list[RecordedRequest] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._active = 0
        self._failure: _FailureRate | None = None
        self._occurrences: Counter[str] = Counter()
        self._connections: set[socket.socket] = set()
        self._limit: tuple[int, float] | None = None
        self._admitted: deque[float] = deque()
        self._rate_limited = 0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> LoopbackServer:
        """Bind and serve in a daemon thread; returns self."""
        if self._httpd is not None:
            raise RuntimeError("LoopbackServer is already running")
        self._interrupt = threading.Event()
        httpd = _HTTPServer(self._address, self)
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"loopback-server-{httpd.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: wake held requests, close connections, wait briefly for handlers."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._interrupt.set()
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join(_STOP_WAIT_S)
        with self._changed:
            self._changed.wait_for(lambda: self._active == 0, timeout=_STOP_WAIT_S)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("LoopbackServer is not running; call start() first")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (the Anthropic and Azure base URL)."""
        return f"http://{self._address[0]}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """The base URL for OpenAI-compatible clients: `url` + ``/v1``."""
        return self.url + "/v1"

    # -- fault injection ---------------------------------------------------------------

    def script(self, *faults: Fault, path: str | None = None, model: str | None = None) -> None:
        """Queue faults; each matching request consumes the next matching one, FIFO.

        `path` is a substring the request path must contain; `model` must equal the
        request's model (JSON ``model`` or the Azure deployment). None matches anything.
        """
        with self._lock:
            self._script.extend(_ScriptedFault(f, path, model) for f in faults)

    def set_failure_rate(
        self, transient: float = 0.0, permanent: float = 0.0, seed: int = 0
    ) -> None:
        """Fail a share of completion/message/embedding calls, deterministically per seed.

        Transient failures are 503, or 429 with ``Retry-After: 0`` half the time; permanent
        ones are 400. The draw depends on the seed, the path, the request body and how many
        identical requests came before, so retries get fresh draws and the outcome does not
        depend on how concurrent requests interleave.
        """
        if transient < 0 or permanent < 0 or transient + permanent > 1:
            raise ValueError("failure rates must be >= 0 and sum to at most 1")
        with self._lock:
            self._failure = _FailureRate(transient, permanent, seed)
            self._occurrences.clear()

    def set_request_limit(self, max_requests: int | None, window_s: float = 1.0) -> None:
        """Answer 429 (with Retry-After) to completion/message/embedding calls beyond
        `max_requests` within any sliding `window_s` seconds; None removes the limit.

        Like a real API's requests-per-window limit; rejected calls do not use the budget.
        `rate_limited` counts the 429s sent.
        """
        if max_requests is not None and (max_requests < 1 or window_s <= 0):
            raise ValueError("max_requests must be >= 1 and window_s > 0")
        with self._lock:
            self._limit = None if max_requests is None else (max_requests, window_s)
            self._admitted.clear()

    @property
    def rate_limited(self) -> int:
        """How many 429s the request limit sent since start or the last reset."""
        with self._lock:
            return self._rate_limited

    def _over_limit(self, style: Style) -> _Reply | None:
        with self._lock:
            if self._limit is None:
                return None
            max_requests, window_s = self._limit
            now = time.monotonic()
            while self._admitted and self._admitted[0] <= now - window_s:
                self._admitted.popleft()
            if len(self._admitted) < max_requests:
                self._admitted.append(now)
                return None
            self._rate_limited += 1
            retry_after = max(0.001, self._admitted[0] + window_s - now)
        return _error_reply(
            style, 429, f"Rate limit: {max_requests} requests per {window_s:g} s.",
            retry_after=round(retry_after, 3),
        )  # fmt: skip

    def reset(self) -> None:
        """Forget faults, failure rate, recorded requests and counters; release held requests."""
        with self._lock:
            self._limit = None
            self._admitted.clear()
            self._rate_limited = 0
            self._script.clear()
            self._requests.clear()
            self._failure = None
            self._occurrences.clear()
            self._max_in_flight = self._in_flight
            self._interrupt.set()
            self._interrupt = threading.Event()

    # -- observations ------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request received since start or the last reset."""
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    def count(self, path_substring: str) -> int:
        """How many recorded requests have `path_substring` in their path."""
        with self._lock:
            return sum(1 for r in self._requests if path_substring in r.path)

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> bool:
        """Block until at least `count` requests were received; False if `timeout` passed."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._requests) >= count, timeout)

    def wait_until_idle(self, timeout: float = 5.0) -> bool:
        """Block until no request is being handled (a reply reaches the client just before
        its handler finishes, so a client may see the answer while it still counts as in
        flight); False if that takes longer than `timeout`."""
        with self._changed:
            return self._changed.wait_for(lambda: self._active == 0, timeout)

    @property
    def in_flight(self) -> int:
        """POST requests being handled right now."""
        with self._lock:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """The most POST requests handled at once since start or the last reset."""
        with self._lock:
            return self._max_in_flight

    # -- used by the request handler ---------------------------------------------------

    def _admit(
        self, request: RecordedRequest, may_fault: bool
    ) -> tuple[threading.Event, Fault | None]:
        """Record a request and count it as active; take its scripted fault, if any.

        Both happen under one lock, so a request that has been recorded has also taken
        its fault. Returns the event that interrupts this request's waits, and the fault.
        """
        with self._changed:
            self._requests.append(request)
            self._active += 1
            if request.method == "POST":
                self._in_flight += 1
                self._max_in_flight = max(self._max_in_flight, self._in_flight)
            fault = self._take_fault(request.path, request.model) if may_fault else None
            self._changed.notify_all()
            return self._interrupt, fault

    def _done(self, method: str) -> None:
        with self._changed:
            self._active -= 1
            if method == "POST":
                self._in_flight -= 1
            self._changed.notify_all()

    def _take_fault(self, path: str, model: str | None) -> Fault | None:
        """Remove and return the first scripted fault matching the request (lock held)."""
        for index, scripted in enumerate(self._script):
            if scripted.matches(path, model):
                del self._script[index]
                return scripted.fault
        return None

    def _injected_failure(self, path: str, body: bytes, style: Style) -> _Reply | None:
        with self._lock:
            rate = self._failure
            if rate is None or (rate.transient == 0 and rate.permanent == 0):
                return None
            key = path + "\n" + hashlib.sha256(body).hexdigest()
            occurrence = self._occurrences[key]
            self._occurrences[key] += 1
        draw = _unit_interval(rate.seed, key, occurrence)
        if draw < rate.permanent:
            return _error_reply(style, 400, "Injected permanent failure.")
        if draw < rate.permanent + rate.transient:
            if _unit_interval(rate.seed, key, occurrence, "kind") < 0.5:
                return _error_reply(style, 429, "Injected rate limit.", retry_after=0)
            return _error_reply(style, 503, "Injected transient failure.")
        return None

    def _authorized(self, headers: dict[str, str]) -> bool:
        key = self.api_key
        if key is None:
            return True
        return (
            headers.get("authorization") == f"Bearer {key}"
            or headers.get("api-key") == key
            or headers.get("x-api-key") == key
        )

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _rejection(self, incoming: _Incoming) -> _Reply | None:
        """The answer to a request that never reaches an endpoint: bad URL or bad key."""
        route, record = incoming.route, incoming.record
        if route is None:
            return _error_reply(
                "openai",
                404,
                f"Unknown request URL: {record.method} {record.path}.",
                code="unknown_url",
            )
        if route.style == "azure" and "api-version" not in record.query:
            return _error_reply("azure", 404, "Resource not found", code="404")
        if route.style != "ollama" and not self._authorized(record.headers):
            return _error_reply(
                route.style, 401, "Incorrect API key provided.", code="invalid_api_key"
            )
        return None

    def _answer(
        self, incoming: _Incoming, fault: Fault | None, interrupt: threading.Event
    ) -> _Reply | Fault:
        """Decide the answer to an admitted request; a returned Fault means hang or reset."""
        route, record = incoming.route, incoming.record
        assert route is not None  # admitted requests have a route
        if fault is not None and fault.kind in ("timeout", "reset"):
            return fault
        if fault is None and route.generates:
            limited = self._over_limit(route.style)
            if limited is not None:
                return limited
        interrupt.wait(
            fault.delay_s if fault is not None and fault.kind == "delay" else self.delay_s
        )
        if fault is not None and fault.kind == "status":
            return _error_reply(
                route.style,
                fault.status,
                f"Injected fault: HTTP {fault.status}.",
                retry_after=fault.retry_after,
                body=fault.body,
            )
        if fault is not None and fault.kind == "malformed":
            stream = isinstance(record.json, dict) and bool(record.json.get("stream"))
            return _malformed_reply(route.style, stream and route.generates, fault.body)
        if fault is not None and fault.kind == "wrong_content_type":
            return _wrong_content_type_reply(fault.body)

        if route.generates:
            failure = self._injected_failure(record.path, incoming.raw_body, route.style)
            if failure is not None:
                return failure
            return self._generate(route, record.json, record.model)
        return _listing(route, list(self.models))

    def _generate(self, route: _Route, body: Any, model: str | None) -> _Reply:
        if not isinstance(body, dict):
            return _error_reply(
                route.style, 400, "We could not parse the JSON body of your request."
            )
        if not model:
            return _error_reply(
                route.style, 400, "you must provide a model parameter", param="model"
            )
        if model not in self.models:
            if route.style == "anthropic":
                return _error_reply("anthropic", 404, f"model: {model}")
            if route.style == "azure":
                return _error_reply(
                    "azure",
                    404,
                    f"The API deployment {model} does not exist.",
                    code="DeploymentNotFound",
                )
            return _error_reply(
                route.style,
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
        if route.endpoint == "messages":
            return _anthropic_message(body, model)
        if route.endpoint == "embeddings":
            return _embeddings(route, body, model)
        return _chat_completion(route, body, model)


# --------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], loopback: LoopbackServer) -> None:
        self.loopback = loopback
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall; skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the client went away; nothing to report
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _HTTPServer
    server_version = "LoopbackLLM/1.0"

    def setup(self) -> None:
        super().setup()
        self.server.loopback._track(self.connection, add=True)

    def finish(self) -> None:
        self.server.loopback._track(self.connection, add=False)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet."""

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        loopback = self.server.loopback
        incoming = self._parse(method)
        rejection = loopback._rejection(incoming)
        interrupt, fault = loopback._admit(incoming.record, may_fault=rejection is None)
        try:
            answer = rejection or loopback._answer(incoming, fault, interrupt)
            if isinstance(answer, Fault):
                if answer.kind == "timeout":
                    interrupt.wait(answer.hang_s)
                self._drop_connection()
            else:
                self._send(answer)
        except OSError:
            self.close_connection = True
        finally:
            loopback._done(method)

    def _parse(self, method: str) -> _Incoming:
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/") or "/"
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        headers = {name.lower(): value for name, value in self.headers.items()}
        raw_body = self._read_body()
        body: Any = None
        if raw_body:
            try:
                body = json.loads(raw_body)
            except ValueError:
                body = None
        route = _route(method, path, headers)
        model = route.deployment if route is not None else None
        if model is None and isinstance(body, dict) and isinstance(body.get("model"), str):
            model = body["model"]
        record = RecordedRequest(method, path, query, headers, body, model)
        return _Incoming(record, route, raw_body)

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        return self.rfile.read(length) if length > 0 else b""

    def _drop_connection(self) -> None:
        """Close the socket without answering (RST where the platform allows)."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def _send(self, reply: _Reply) -> None:
        self.send_response(reply.status)
        request_id = _new_id("req_")
        self.send_header("x-request-id", request_id)
        self.send_header("request-id", request_id)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if reply.events is None:
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
            return
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in reply.events:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        self.wfile.write(b"0\r\n\r\n")


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def main(argv: Iterable[str] | None = None) -> int:
    """Serve until Ctrl-C, printing the base URL first."""
    parser = argparse.ArgumentParser(
        prog="python -m study_query_llm.testing.server",
        description="Loopback server speaking OpenAI, Azure OpenAI, Anthropic and Ollama APIs.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="delay before each answer")
    parser.add_argument("--api-key", default=None, help="require this key on every request")
    parser.add_argument("--transient", type=float, default=0.0, help="transient failure rate")
    parser.add_argument("--permanent", type=float, default=0.0, help="permanent failure rate")
    parser.add_argument("--seed", type=int, default=0, help="seed for injected failures")
    args = parser.parse_args(None if argv is None else list(argv))

    server = LoopbackServer(
        delay_s=args.delay_ms / 1000, api_key=args.api_key, host=args.host, port=args.port
    )
    if args.transient or args.permanent:
        server.set_failure_rate(args.transient, args.permanent, args.seed)
    with server:
        print(server.url, flush=True)
        print(f"OpenAI base URL: {server.openai_base_url}", file=sys.stderr, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
