"""One contract, nine providers: the same assertions against each, over real HTTP on loopback.

The eight HTTP providers talk through their official SDKs to the loopback server, which
speaks OpenAI, Azure OpenAI, Anthropic and Ollama wire formats; `mock` needs no server.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import pytest

from study_query_llm.config import Settings
from study_query_llm.providers import (
    AuthenticationError,
    BadRequestError,
    BaseLLMProvider,
    MalformedResponseError,
    ModelNotFoundError,
    ProviderConnectionError,
    ProviderResponse,
    ProviderTimeoutError,
    ProviderUnavailableError,
    RateLimitError,
    UnsupportedOperationError,
    create,
)
from study_query_llm.testing.server import Fault, LoopbackServer

KEY = "test-key-not-secret-but-never-shown"


@dataclass(frozen=True)
class Case:
    provider_id: str
    model: str
    wire: str  # "openai" | "azure" | "anthropic" | "mock"
    key_env_var: str | None
    embeds: bool


CASES = [
    Case("openai", "gpt-4o-mini", "openai", "OPENAI_API_KEY", True),
    Case("azure", "gpt-4o", "azure", "AZURE_OPENAI_API_KEY", True),
    Case("hyperbolic", "meta-llama/Llama-3.1-8B-Instruct", "openai", "HYPERBOLIC_API_KEY", False),
    Case("openrouter", "openai/gpt-4o-mini", "openai", "OPENROUTER_API_KEY", False),
    Case("vllm", "meta-llama/Llama-3.1-8B-Instruct", "openai", "VLLM_API_KEY", True),
    Case("lmstudio", "gpt-4o-mini", "openai", "LMSTUDIO_API_KEY", True),
    Case("ollama", "llama3.1:8b", "openai", "OLLAMA_API_KEY", True),
    Case("anthropic", "claude-haiku-4-5", "anthropic", "ANTHROPIC_API_KEY", False),
    Case("mock", "mock-small", "mock", None, True),
]
HTTP_CASES = [case for case in CASES if case.wire != "mock"]


def _ids(cases: list[Case]) -> list[str]:
    return [case.provider_id for case in cases]


def build(
    case: Case, server: LoopbackServer | None, *, timeout_s: float = 10.0, key: str = KEY
) -> BaseLLMProvider:
    settings = Settings(_env_file=None)
    if case.wire == "mock":
        return create("mock", settings, latency_ms=0)
    base_url = server.openai_base_url if case.wire == "openai" else server.url
    return create(
        case.provider_id,
        settings,
        api_key=key,
        base_url=base_url,
        model=case.model,
        timeout_s=timeout_s,
    )


@pytest.fixture
async def provider(request, loopback):
    case: Case = request.param
    instance = build(case, loopback)
    yield case, instance
    await instance.aclose()


def _last_call(server: LoopbackServer) -> object:
    posts = [r for r in server.requests if r.method == "POST"]
    return posts[-1]


# --- completions -------------------------------------------------------------------------


@pytest.mark.parametrize("provider", CASES, ids=_ids(CASES), indirect=True)
async def test_complete_fills_every_response_field(provider):
    case, instance = provider
    response = await instance.complete("What is the capital of France?", temperature=0.0)
    assert isinstance(response, ProviderResponse)
    assert response.text.strip()
    assert response.provider == case.provider_id
    assert response.model
    assert response.prompt_tokens and response.prompt_tokens > 0
    assert response.completion_tokens and response.completion_tokens > 0
    assert response.total_tokens == response.prompt_tokens + response.completion_tokens
    assert response.latency_ms >= 0
    assert response.finish_reason in ("stop", "end_turn")
    json.dumps(response.raw_response)  # JSON-safe, ready for the record
    json.dumps(response.metadata)
    if case.wire != "mock":
        assert "France" in response.text  # the loopback server echoes the prompt


@pytest.mark.parametrize("provider", CASES, ids=_ids(CASES), indirect=True)
async def test_stream_chunks_join_into_the_final_response(provider):
    case, instance = provider
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name three primary colours please"},
    ]
    items = [item async for item in instance.stream(messages)]
    *chunks, final = items
    assert isinstance(final, ProviderResponse)
    assert chunks and all(isinstance(chunk, str) for chunk in chunks)
    assert "".join(chunks) == final.text
    assert final.provider == case.provider_id
    assert final.completion_tokens and final.completion_tokens > 0
    assert final.metadata["streamed"] is True
    plain = await instance.complete(messages)
    assert plain.text == final.text


@pytest.mark.parametrize("provider", HTTP_CASES, ids=_ids(HTTP_CASES), indirect=True)
async def test_request_on_the_wire(provider, loopback):
    """System prompt, options and credentials reach the server in the provider's format."""
    case, instance = provider
    await instance.complete(
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
        temperature=0.5,
        max_tokens=50,
    )
    request = _last_call(loopback)
    body = request.json
    assert body["max_tokens"] == 50
    assert body["temperature"] == 0.5
    if case.wire == "anthropic":
        assert body["system"] == "Be terse."
        assert [m["role"] for m in body["messages"]] == ["user"]
        # Older SDKs send x-api-key, newer ones a bearer token: either carries the key.
        sent = request.headers.get("x-api-key") or request.headers["authorization"]
        assert sent in (KEY, f"Bearer {KEY}")
    else:
        assert body["messages"][0] == {"role": "system", "content": "Be terse."}
        if case.wire == "azure":
            assert request.headers["api-key"] == KEY
            assert "api-version" in request.query
            assert request.path.startswith(f"/openai/deployments/{case.model}/")
        else:
            assert request.headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("provider", CASES, ids=_ids(CASES), indirect=True)
async def test_max_tokens_cuts_the_answer(provider):
    _case, instance = provider
    response = await instance.complete("Tell me a long story about the sea", max_tokens=3)
    assert response.finish_reason in ("length", "max_tokens")
    assert response.completion_tokens <= 3


# --- model listing and embeddings --------------------------------------------------------


@pytest.mark.parametrize("provider", CASES, ids=_ids(CASES), indirect=True)
async def test_list_models_includes_the_default_model(provider, loopback):
    case, instance = provider
    models = await instance.list_models()
    ids = [m.id for m in models]
    assert case.model in ids
    assert all(m.provider == case.provider_id for m in models)
    if case.provider_id == "ollama":
        assert loopback.count("/api/tags") == 1
    if case.provider_id == "azure":
        assert loopback.count("/openai/deployments") == 1
    if case.provider_id == "openrouter":
        priced = next(m for m in models if m.id == case.model)
        assert priced.input_price_per_mtok == pytest.approx(0.15)
        assert priced.output_price_per_mtok == pytest.approx(0.60)


@pytest.mark.parametrize("provider", CASES, ids=_ids(CASES), indirect=True)
async def test_embeddings_or_a_clear_refusal(provider):
    case, instance = provider
    model = {"mock": "mock-embed", "azure": "text-embedding-3-small"}.get(
        case.wire, "text-embedding-3-small"
    )
    if not case.embeds:
        with pytest.raises(UnsupportedOperationError, match="embeddings"):
            await instance.embed(["a"], model=model)
        return
    result = await instance.embed(["alpha", "beta", "alpha"], model=model, dimensions=12)
    assert len(result.vectors) == 3
    assert result.dimension == 12
    assert result.vectors[0] == pytest.approx(result.vectors[2])
    assert result.vectors[0] != pytest.approx(result.vectors[1])


# --- error mapping -----------------------------------------------------------------------


FAULTS = [
    pytest.param(Fault(status=429, retry_after=3), RateLimitError, id="429"),
    pytest.param(Fault(status=500), ProviderUnavailableError, id="500"),
    pytest.param(Fault(status=502), ProviderUnavailableError, id="502"),
    pytest.param(Fault(status=503), ProviderUnavailableError, id="503"),
    pytest.param(Fault(status=400), BadRequestError, id="400"),
    pytest.param(Fault(kind="malformed"), MalformedResponseError, id="malformed"),
    pytest.param(Fault(kind="wrong_content_type"), MalformedResponseError, id="content-type"),
    pytest.param(Fault(kind="reset"), ProviderConnectionError, id="reset"),
]


@pytest.mark.parametrize(("fault", "error"), FAULTS)
@pytest.mark.parametrize("provider", HTTP_CASES, ids=_ids(HTTP_CASES), indirect=True)
async def test_faults_map_to_the_error_hierarchy(provider, loopback, fault, error):
    case, instance = provider
    loopback.script(fault)
    with pytest.raises(error) as info:
        await instance.complete("hello")
    assert info.value.provider == case.provider_id
    assert info.value.transient is (error is not BadRequestError)
    assert KEY not in str(info.value)
    if error is RateLimitError:
        assert info.value.retry_after == 3.0


OPENAI_WIRE = [case for case in HTTP_CASES if case.wire in ("openai", "azure")]
UNUSUAL_REPLY = {
    "id": "chatcmpl-unusual",
    "object": "chat.completion",
    "created": 1764400000,
    "model": "served-model",
    "system_fingerprint": None,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Paris.", "refusal": None},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ],
    "usage": {"prompt_tokens": 12.0, "completion_tokens": "2", "total_tokens": 14},
    "x_vendor": {"queue_ms": 3, "region": "eu"},
}


@pytest.mark.parametrize("provider", OPENAI_WIRE, ids=_ids(OPENAI_WIRE), indirect=True)
async def test_an_openai_wire_reply_is_kept_exactly_as_sent(provider, loopback):
    """The record gets the body as the server sent it (nulls and vendor fields included);
    token counts sent as 12.0 or "2" still count."""
    _case, instance = provider
    loopback.script(Fault(kind="malformed", body=json.dumps(UNUSUAL_REPLY)))
    response = await instance.complete("What is the capital of France?")
    assert response.raw_response == UNUSUAL_REPLY
    assert (response.text, response.model, response.finish_reason) == (
        "Paris.",
        "served-model",
        "stop",
    )
    assert (response.prompt_tokens, response.completion_tokens, response.total_tokens) == (
        12,
        2,
        14,
    )
    assert response.metadata["response_id"] == "chatcmpl-unusual"


NOT_COMPLETIONS = [
    pytest.param([], id="a-list"),
    pytest.param({"error": None}, id="no-choices"),
    pytest.param({"choices": []}, id="empty-choices"),
    pytest.param({"choices": [{"message": "Paris."}]}, id="message-not-an-object"),
    pytest.param({"choices": [{"message": {"content": 5}}]}, id="content-not-text"),
    pytest.param({"model": 7, "choices": [{"message": {"content": "x"}}]}, id="model-not-text"),
]


@pytest.mark.parametrize("body", NOT_COMPLETIONS)
@pytest.mark.parametrize("provider", OPENAI_WIRE, ids=_ids(OPENAI_WIRE), indirect=True)
async def test_json_that_is_not_a_completion_is_a_malformed_response(provider, loopback, body):
    case, instance = provider
    loopback.script(Fault(kind="malformed", body=json.dumps(body)))
    with pytest.raises(MalformedResponseError) as info:
        await instance.complete("hello")
    assert info.value.provider == case.provider_id and info.value.transient


@pytest.mark.parametrize("provider", HTTP_CASES, ids=_ids(HTTP_CASES), indirect=True)
async def test_faults_while_streaming_map_the_same_way(provider, loopback):
    _case, instance = provider
    loopback.script(Fault(status=429, retry_after=1))
    with pytest.raises(RateLimitError):
        async for _ in instance.stream("hello"):
            pass


@pytest.mark.parametrize("case", HTTP_CASES, ids=_ids(HTTP_CASES))
async def test_timeout_is_transient(case, loopback):
    instance = build(case, loopback, timeout_s=0.3)
    loopback.script(Fault(kind="timeout", hang_s=5.0))
    try:
        with pytest.raises(ProviderTimeoutError):
            await instance.complete("hello")
    finally:
        await instance.aclose()


@pytest.mark.parametrize("provider", HTTP_CASES, ids=_ids(HTTP_CASES), indirect=True)
async def test_unknown_model_is_not_found(provider):
    _case, instance = provider
    with pytest.raises(ModelNotFoundError) as info:
        await instance.complete("hello", model="no-such-model")
    assert info.value.transient is False
    assert "no-such-model" in str(info.value)


@pytest.mark.parametrize("case", HTTP_CASES, ids=_ids(HTTP_CASES))
async def test_wrong_key_names_the_variable_to_fix(case):
    with LoopbackServer(api_key="the-right-key") as server:
        instance = build(case, server, key="a-wrong-key")
        try:
            with pytest.raises(AuthenticationError) as info:
                await instance.complete("hello")
        finally:
            await instance.aclose()
    assert info.value.env_var == case.key_env_var
    assert case.key_env_var in str(info.value)
    assert "a-wrong-key" not in str(info.value)
    assert "the-right-key" not in str(info.value)


TWO_SDKS = [c for c in HTTP_CASES if c.provider_id in ("openai", "anthropic")]


@pytest.mark.parametrize("case", TWO_SDKS, ids=_ids(TWO_SDKS))
def test_a_provider_answers_from_one_event_loop_after_another(loopback, case):
    """Each `asyncio.run` is a new event loop, and an aiohttp session belongs to the loop
    that opened it: the provider sends through a transport of the running loop's own."""
    instance = build(case, loopback)
    for _ in range(3):
        assert asyncio.run(instance.complete("hello")).text
    asyncio.run(instance.aclose())
    assert len([r for r in loopback.requests if r.method == "POST"]) == 3


async def test_unreachable_server_is_a_connection_error():
    instance = create(
        "openai",
        Settings(_env_file=None),
        api_key=KEY,
        base_url="http://127.0.0.1:9/v1",
        timeout_s=5,
    )
    try:
        # Refused at once: a connection error saying so, not a timeout.
        with pytest.raises(ProviderConnectionError, match=r"127\.0\.0\.1:9/v1: connection refused"):
            await instance.complete("hello")
    finally:
        await instance.aclose()


async def test_mock_faults_map_to_the_same_hierarchy():
    settings = Settings(_env_file=None)
    transient = create("mock", settings, latency_ms=0, failure_rate=1.0)
    with pytest.raises(ProviderUnavailableError) as info:
        await transient.complete("hello")
    assert info.value.transient is True
    permanent = create("mock", settings, latency_ms=0, permanent_failure_rate=1.0)
    with pytest.raises(BadRequestError):
        await permanent.complete("hello")
    with pytest.raises(ModelNotFoundError):
        await transient.complete("hello", model="no-such-model")
