"""The loopback provider server, exercised through the official SDKs and plain HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import anthropic
import httpx
import openai
import pytest

from study_query_llm.testing.server import (
    DEFAULT_MODELS,
    Fault,
    LoopbackServer,
    count_tokens,
    embedding_vector,
    reply_text,
)

pytestmark = pytest.mark.filterwarnings(
    # The anthropic SDK warns about retired model names; the default list uses two.
    "ignore:The model .* is deprecated:DeprecationWarning"
)

USER = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def srv() -> Iterator[LoopbackServer]:
    with LoopbackServer() as server:
        yield server


@pytest.fixture
async def oai(srv: LoopbackServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=srv.openai_base_url, api_key="sk-test", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def azure(srv: LoopbackServer) -> AsyncIterator[openai.AsyncAzureOpenAI]:
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=srv.url, api_version="2024-10-21", api_key="az-test", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def claude(srv: LoopbackServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=srv.url, api_key="sk-ant-test", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def raw(srv: LoopbackServer) -> AsyncIterator[httpx.AsyncClient]:
    """Plain HTTP against the server root, for wire-format checks the SDKs hide."""
    async with httpx.AsyncClient(base_url=srv.url) as client:
        yield client


def _sse_lines(response: httpx.Response) -> list[str]:
    return [line for line in response.text.splitlines() if line]


# -- OpenAI chat ---------------------------------------------------------------------------


async def test_openai_chat_reply_usage_and_record(
    srv: LoopbackServer, oai: openai.AsyncOpenAI
) -> None:
    messages = [{"role": "system", "content": "Be terse."}, *USER]
    completion = await oai.chat.completions.create(model="gpt-4o-mini", messages=messages)

    expected = reply_text("What is the capital of France?")
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "gpt-4o-mini"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == count_tokens("Be terse.") + count_tokens(
        USER[0]["content"]
    )
    assert completion.usage.completion_tokens == count_tokens(expected)
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )

    (request,) = srv.requests
    assert request.method == "POST"
    assert request.path == "/v1/chat/completions"
    assert request.model == "gpt-4o-mini"
    assert request.json["messages"] == messages
    assert request.headers["authorization"] == "Bearer sk-test"
    assert srv.request_count == 1
    assert srv.count("/chat/completions") == 1
    assert srv.count("/embeddings") == 0


async def test_openai_chat_max_tokens_truncates_with_length(oai: openai.AsyncOpenAI) -> None:
    completion = await oai.chat.completions.create(model="gpt-4o-mini", messages=USER, max_tokens=4)
    assert completion.choices[0].message.content == "Loopback reply to:"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 4

    newer = await oai.chat.completions.create(
        model="gpt-4o-mini", messages=USER, max_completion_tokens=2
    )
    assert newer.choices[0].message.content == "Loopback reply"


async def test_openai_chat_reply_uses_last_user_message_first_200_chars(
    oai: openai.AsyncOpenAI,
) -> None:
    long_text = "x" * 300
    messages = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": [{"type": "text", "text": long_text}]},
    ]
    completion = await oai.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert completion.choices[0].message.content == "Loopback reply to: " + "x" * 200


async def test_openai_chat_stream_with_usage(srv: LoopbackServer, oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply_text(USER[0]["content"])
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishing[-1] == "stop"
    assert all(reason is None for reason in finishing[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == count_tokens(text)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert srv.requests[0].json["stream"] is True


def test_openai_chat_stream_wire_format_without_usage(srv: LoopbackServer) -> None:
    body = {"model": "gpt-4o-mini", "messages": USER, "stream": True, "max_tokens": 3}
    response = httpx.post(srv.openai_base_url + "/chat/completions", json=body)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = _sse_lines(response)
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Loopback reply to"
    )


async def test_openai_chat_stream_keeps_connection_usable(oai: openai.AsyncOpenAI) -> None:
    for _ in range(3):
        stream = await oai.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True)
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces) == reply_text(USER[0]["content"])
    completion = await oai.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert completion.choices[0].message.content == reply_text(USER[0]["content"])


def test_openai_chat_missing_messages_is_400(srv: LoopbackServer) -> None:
    response = httpx.post(srv.openai_base_url + "/chat/completions", json={"model": "gpt-4o"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"


async def test_unknown_model_is_not_found(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await oai.chat.completions.create(model="no-such-model", messages=USER)
    assert caught.value.body["code"] == "model_not_found"


async def test_custom_model_list_replaces_defaults() -> None:
    with LoopbackServer(models=["only-model"]) as server:
        async with openai.AsyncOpenAI(
            base_url=server.openai_base_url, api_key="k", max_retries=0
        ) as client:
            listed = [m.id async for m in client.models.list()]
            assert listed == ["only-model"]
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
            ok = await client.chat.completions.create(model="only-model", messages=USER)
            assert ok.model == "only-model"


# -- embeddings ----------------------------------------------------------------------------


async def test_embeddings_base64_default_and_float_agree(
    srv: LoopbackServer, oai: openai.AsyncOpenAI
) -> None:
    texts = ["alpha", "beta"]
    default = await oai.embeddings.create(model="text-embedding-3-small", input=texts)
    floats = await oai.embeddings.create(
        model="text-embedding-3-small", input=texts, encoding_format="float"
    )

    assert srv.requests[0].json["encoding_format"] == "base64"
    assert srv.requests[1].json["encoding_format"] == "float"
    for text, a, b in zip(texts, default.data, floats.data, strict=True):
        assert a.embedding == b.embedding == embedding_vector(text, 16)
        assert len(a.embedding) == 16
        assert math.isclose(math.sqrt(sum(x * x for x in a.embedding)), 1.0, rel_tol=1e-5)
    assert default.data[0].embedding != default.data[1].embedding
    assert [d.index for d in default.data] == [0, 1]
    assert default.usage.prompt_tokens == default.usage.total_tokens == 2


async def test_embeddings_base64_is_little_endian_float32(raw: httpx.AsyncClient) -> None:
    response = await raw.post(
        "/v1/embeddings",
        json={"model": "text-embedding-3-small", "input": "gamma", "encoding_format": "base64"},
    )
    packed = base64.b64decode(response.json()["data"][0]["embedding"])
    assert list(struct.unpack("<16f", packed)) == embedding_vector("gamma", 16)


async def test_embeddings_dimensions_and_determinism(oai: openai.AsyncOpenAI) -> None:
    first = await oai.embeddings.create(
        model="text-embedding-3-small", input="same text", dimensions=64
    )
    second = await oai.embeddings.create(
        model="text-embedding-3-small", input="same text", dimensions=64
    )
    assert len(first.data) == 1
    assert len(first.data[0].embedding) == 64
    assert first.data[0].embedding == second.data[0].embedding


def test_embeddings_reject_empty_input(srv: LoopbackServer) -> None:
    response = httpx.post(
        srv.openai_base_url + "/embeddings", json={"model": "text-embedding-3-small", "input": []}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "input"


# -- model listings ------------------------------------------------------------------------


async def test_openai_models_list(oai: openai.AsyncOpenAI, raw: httpx.AsyncClient) -> None:
    listed = [m.id async for m in oai.models.list()]
    assert listed == list(DEFAULT_MODELS)

    listing = (await raw.get("/v1/models")).json()
    assert listing["object"] == "list"
    entry = listing["data"][0]
    assert entry["object"] == "model"
    assert entry["owned_by"] == "loopback"
    assert entry["context_length"] > 0
    assert entry["pricing"] == {"prompt": "0.00000015", "completion": "0.0000006"}


async def test_anthropic_models_list(claude: anthropic.AsyncAnthropic) -> None:
    page = await claude.models.list()
    assert [m.id for m in page.data] == list(DEFAULT_MODELS)
    assert page.data[0].display_name == DEFAULT_MODELS[0]
    assert page.data[0].type == "model"
    assert page.has_more is False
    assert page.first_id == DEFAULT_MODELS[0]
    assert page.last_id == DEFAULT_MODELS[-1]


def test_ollama_tags(srv: LoopbackServer) -> None:
    models = httpx.get(srv.url + "/api/tags").json()["models"]
    assert [m["name"] for m in models] == list(DEFAULT_MODELS)
    assert models[0]["model"] == DEFAULT_MODELS[0]
    assert models[0]["details"]["family"] == "llama"
    assert models[0]["details"]["parameter_size"] == "8B"
    assert len(models[0]["digest"]) == 64


def test_unknown_path_is_404_json(srv: LoopbackServer) -> None:
    response = httpx.post(srv.url + "/v2/nothing", json={})
    assert response.status_code == 404
    assert "error" in response.json()
    assert srv.count("/v2/nothing") == 1


# -- Azure OpenAI --------------------------------------------------------------------------


async def test_azure_chat_and_embeddings(
    srv: LoopbackServer, azure: openai.AsyncAzureOpenAI
) -> None:
    completion = await azure.chat.completions.create(model="gpt-4o", messages=USER)
    assert completion.choices[0].message.content == reply_text(USER[0]["content"])
    vectors = await azure.embeddings.create(model="text-embedding-3-small", input="delta")
    assert vectors.data[0].embedding == embedding_vector("delta", 16)

    chat_request, embed_request = srv.requests
    assert chat_request.path == "/openai/deployments/gpt-4o/chat/completions"
    assert chat_request.query["api-version"] == "2024-10-21"
    assert chat_request.headers["api-key"] == "az-test"
    assert chat_request.model == "gpt-4o"
    assert embed_request.path == "/openai/deployments/text-embedding-3-small/embeddings"
    assert embed_request.model == "text-embedding-3-small"


async def test_azure_stream(azure: openai.AsyncAzureOpenAI) -> None:
    stream = await azure.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == reply_text(USER[0]["content"])


async def test_azure_unknown_deployment_is_not_found(azure: openai.AsyncAzureOpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        await azure.chat.completions.create(model="no-such-deployment", messages=USER)


def test_azure_requires_api_version(srv: LoopbackServer) -> None:
    path = "/openai/deployments/gpt-4o/chat/completions"
    response = httpx.post(srv.url + path, json={"messages": USER})
    assert response.status_code == 404
    ok = httpx.post(srv.url + path, params={"api-version": "2024-10-21"}, json={"messages": USER})
    assert ok.status_code == 200
    assert ok.json()["model"] == "gpt-4o"


async def test_azure_listings(
    srv: LoopbackServer, azure: openai.AsyncAzureOpenAI, raw: httpx.AsyncClient
) -> None:
    listed = [m.id async for m in azure.models.list()]
    assert listed == list(DEFAULT_MODELS)
    assert srv.requests[-1].path == "/openai/models"

    deployments = await raw.get("/openai/deployments", params={"api-version": "2024-10-21"})
    data = deployments.json()["data"]
    assert [d["id"] for d in data] == list(DEFAULT_MODELS)
    assert data[0] == {
        "id": DEFAULT_MODELS[0],
        "model": DEFAULT_MODELS[0],
        "object": "deployment",
        "status": "succeeded",
    }
    assert (await raw.get("/openai/deployments")).status_code == 404


# -- Anthropic -----------------------------------------------------------------------------


async def test_anthropic_message(srv: LoopbackServer, claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=100,
        system=[{"type": "text", "text": "You answer briefly."}],
        messages=USER,
    )
    expected = reply_text(USER[0]["content"])
    assert message.content[0].type == "text"
    assert message.content[0].text == expected
    assert message.stop_reason == "end_turn"
    assert message.id.startswith("msg_")
    assert message.usage.input_tokens == count_tokens("You answer briefly.") + count_tokens(
        USER[0]["content"]
    )
    assert message.usage.output_tokens == count_tokens(expected)
    request = srv.requests[0]
    assert request.path == "/v1/messages"
    # Depending on the SDK version the key travels as x-api-key or as a Bearer token.
    sent_key = request.headers.get("x-api-key") or request.headers["authorization"]
    assert sent_key.removeprefix("Bearer ") == "sk-ant-test"
    assert "anthropic-version" in request.headers


async def test_anthropic_max_tokens_stop_reason(claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(model="claude-sonnet-4-5", max_tokens=3, messages=USER)
    assert message.content[0].text == "Loopback reply to"
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 3


async def test_anthropic_stream_helper(claude: anthropic.AsyncAnthropic) -> None:
    async with claude.messages.stream(
        model="claude-3-5-haiku-latest", max_tokens=200, system="Be brief.", messages=USER
    ) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()

    expected = reply_text(USER[0]["content"])
    assert len(pieces) > 1
    assert "".join(pieces) == expected
    assert final.content[0].text == expected
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == count_tokens(expected)
    assert final.usage.input_tokens == count_tokens("Be brief.") + count_tokens(USER[0]["content"])


async def test_anthropic_raw_stream_event_order(claude: anthropic.AsyncAnthropic) -> None:
    stream = await claude.messages.create(
        model="claude-sonnet-4-5", max_tokens=5, messages=USER, stream=True
    )
    types = [event.type async for event in stream]
    assert types[:2] == ["message_start", "content_block_start"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(types[2:-3]) == {"content_block_delta"}


def test_anthropic_stream_wire_format(srv: LoopbackServer) -> None:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 50, "messages": USER, "stream": True}
    response = httpx.post(
        srv.url + "/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"}
    )
    lines = _sse_lines(response)
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert events[:3] == ["message_start", "content_block_start", "ping"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert [d["type"] for d in datas] == events
    deltas = [d["delta"] for d in datas if d["type"] == "content_block_delta"]
    assert all(delta["type"] == "text_delta" for delta in deltas)
    message_delta = datas[-2]
    assert message_delta["delta"]["stop_reason"] == "end_turn"
    assert message_delta["usage"]["output_tokens"] == count_tokens(reply_text(USER[0]["content"]))


def test_anthropic_requires_max_tokens(srv: LoopbackServer) -> None:
    response = httpx.post(
        srv.url + "/v1/messages",
        json={"model": "claude-sonnet-4-5", "messages": USER},
        headers={"anthropic-version": "2023-06-01"},
    )
    assert response.status_code == 400
    assert response.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }


async def test_anthropic_unknown_model_is_not_found(claude: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        await claude.messages.create(model="claude-nope", max_tokens=10, messages=USER)
    assert caught.value.body["error"]["type"] == "not_found_error"


# -- authentication ------------------------------------------------------------------------


async def test_api_key_is_enforced_for_every_wire_format() -> None:
    with LoopbackServer(api_key="right-key") as server:
        async with (
            openai.AsyncOpenAI(
                base_url=server.openai_base_url, api_key="wrong", max_retries=0
            ) as bad_oai,
            openai.AsyncOpenAI(
                base_url=server.openai_base_url, api_key="right-key", max_retries=0
            ) as good_oai,
            openai.AsyncAzureOpenAI(
                azure_endpoint=server.url,
                api_version="2024-10-21",
                api_key="wrong",
                max_retries=0,
            ) as bad_azure,
            openai.AsyncAzureOpenAI(
                azure_endpoint=server.url,
                api_version="2024-10-21",
                api_key="right-key",
                max_retries=0,
            ) as good_azure,
            anthropic.AsyncAnthropic(base_url=server.url, api_key="wrong", max_retries=0) as bad,
            anthropic.AsyncAnthropic(
                base_url=server.url, api_key="right-key", max_retries=0
            ) as good,
        ):
            with pytest.raises(openai.AuthenticationError):
                await bad_oai.chat.completions.create(model="gpt-4o", messages=USER)
            with pytest.raises(openai.AuthenticationError):
                await bad_azure.chat.completions.create(model="gpt-4o", messages=USER)
            with pytest.raises(anthropic.AuthenticationError) as caught:
                await bad.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=USER)
            assert caught.value.body["error"]["type"] == "authentication_error"

            assert (await good_oai.chat.completions.create(model="gpt-4o", messages=USER)).choices
            assert (await good_azure.chat.completions.create(model="gpt-4o", messages=USER)).choices
            assert (
                await good.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=USER)
            ).content


# -- scripted faults -----------------------------------------------------------------------


async def test_fault_429_exposes_retry_after(srv: LoopbackServer, oai: openai.AsyncOpenAI) -> None:
    srv.script(Fault(status=429, retry_after=2))
    with pytest.raises(openai.RateLimitError) as caught:
        await oai.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.body["code"] == "rate_limit_exceeded"
    # The fault is used up: the next call succeeds.
    assert (await oai.chat.completions.create(model="gpt-4o-mini", messages=USER)).choices


@pytest.mark.parametrize(
    ("status", "openai_error", "anthropic_error", "anthropic_type"),
    [
        (400, openai.BadRequestError, anthropic.BadRequestError, "invalid_request_error"),
        (429, openai.RateLimitError, anthropic.RateLimitError, "rate_limit_error"),
        (500, openai.InternalServerError, anthropic.InternalServerError, "api_error"),
        (503, openai.InternalServerError, anthropic.InternalServerError, "overloaded_error"),
        (529, openai.InternalServerError, anthropic.OverloadedError, "overloaded_error"),
    ],
)
async def test_status_faults_in_each_wire_format(
    srv: LoopbackServer,
    oai: openai.AsyncOpenAI,
    claude: anthropic.AsyncAnthropic,
    status: int,
    openai_error: type[openai.APIStatusError],
    anthropic_error: type[anthropic.APIStatusError],
    anthropic_type: str,
) -> None:
    srv.script(Fault(status=status, retry_after=0.5), Fault(status=status))
    with pytest.raises(openai_error) as from_openai:
        await oai.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert from_openai.value.status_code == status
    assert set(from_openai.value.body) >= {"message", "type", "code"}
    assert from_openai.value.response.headers["retry-after"] == "0.5"

    with pytest.raises(anthropic_error) as from_anthropic:
        await claude.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=USER)
    assert from_anthropic.value.status_code == status
    assert from_anthropic.value.body["type"] == "error"
    assert from_anthropic.value.body["error"]["type"] == anthropic_type
    assert "retry-after" not in from_anthropic.value.response.headers


async def test_fault_body_override(srv: LoopbackServer, oai: openai.AsyncOpenAI) -> None:
    srv.script(Fault(status=502, body="upstream exploded"))
    with pytest.raises(openai.InternalServerError) as caught:
        await oai.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert caught.value.status_code == 502
    assert caught.value.response.text == "upstream exploded"


async def test_faults_are_fifo_and_filtered_by_path_and_model(
    srv: LoopbackServer, oai: openai.AsyncOpenAI
) -> None:
    srv.script(Fault(status=500), path="/embeddings")
    srv.script(Fault(status=503), model="gpt-4o")
    srv.script(Fault(status=429), Fault(status=400), path="/chat/completions")

    # gpt-4o-mini chat skips the embeddings and gpt-4o faults and takes the 429, then the 400.
    with pytest.raises(openai.RateLimitError):
        await oai.chat.completions.create(model="gpt-4o-mini", messages=USER)
    with pytest.raises(openai.BadRequestError):
        await oai.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert (await oai.chat.completions.create(model="gpt-4o-mini", messages=USER)).choices
    with pytest.raises(openai.InternalServerError) as caught:
        await oai.chat.completions.create(model="gpt-4o", messages=USER)
    assert caught.value.status_code == 503
    with pytest.raises(openai.InternalServerError) as caught:
        await oai.embeddings.create(model="text-embedding-3-small", input="x")
    assert caught.value.status_code == 500
    assert (await oai.embeddings.create(model="text-embedding-3-small", input="x")).data


async def test_fault_delay_answers_normally_after_its_delay(
    srv: LoopbackServer, oai: openai.AsyncOpenAI
) -> None:
    srv.script(Fault(kind="delay", delay_s=30.0), Fault(kind="delay", delay_s=0.01))
    with pytest.raises(openai.APITimeoutError):
        await oai.chat.completions.create(model="gpt-4o-mini", messages=USER, timeout=0.5)
    completion = await oai.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert completion.choices[0].message.content == reply_text(USER[0]["content"])


async def test_fault_timeout_hangs_and_stop_releases_it(
    srv: LoopbackServer, oai: openai.AsyncOpenAI
) -> None:
    srv.script(Fault(kind="timeout", hang_s=30.0))
    with pytest.raises(openai.APITimeoutError):
        await oai.chat.completions.create(model="gpt-4o-mini", messages=USER, timeout=0.5)
    srv.stop()
    # stop() woke the held handler instead of waiting out its 30 s hang.
    assert srv.in_flight == 0


async def test_reset_releases_held_requests(srv: LoopbackServer) -> None:
    srv.script(Fault(kind="timeout", hang_s=30.0))
    async with httpx.AsyncClient(base_url=srv.openai_base_url) as client:
        call = asyncio.create_task(
            client.post("/chat/completions", json={"model": "gpt-4o-mini", "messages": USER})
        )
        assert await asyncio.to_thread(srv.wait_for_requests, 1)
        srv.reset()
        with pytest.raises(httpx.TransportError):
            await call


async def test_fault_malformed_json(
    srv: LoopbackServer, oai: openai.AsyncOpenAI, raw: httpx.AsyncClient
) -> None:
    srv.script(Fault(kind="malformed"))
    with pytest.raises(json.JSONDecodeError):
        await oai.chat.completions.create(model="gpt-4o-mini", messages=USER)

    srv.script(Fault(kind="malformed"))
    response = await raw.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.text == '{"id": "x", "choices": ['


async def test_fault_malformed_stream(srv: LoopbackServer, oai: openai.AsyncOpenAI) -> None:
    srv.script(Fault(kind="malformed"))
    stream = await oai.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True)
    with pytest.raises(json.JSONDecodeError):
        async for _ in stream:
            pass


async def test_fault_wrong_content_type(srv: LoopbackServer) -> None:
    # Lenient SDK clients hand the text back instead of a model; strict ones raise.
    srv.script(Fault(kind="wrong_content_type"), Fault(kind="wrong_content_type"))
    async with openai.AsyncOpenAI(
        base_url=srv.openai_base_url, api_key="k", max_retries=0
    ) as lenient:
        result = await lenient.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert result == "<html><body>Bad gateway</body></html>"
    async with openai.AsyncOpenAI(
        base_url=srv.openai_base_url,
        api_key="k",
        max_retries=0,
        _strict_response_validation=True,
    ) as strict:
        with pytest.raises(openai.APIResponseValidationError) as caught:
            await strict.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert caught.value.response.status_code == 200
    assert caught.value.response.headers["content-type"].startswith("text/html")


async def test_fault_reset(
    srv: LoopbackServer, oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic
) -> None:
    srv.script(Fault(kind="reset"), Fault(kind="reset"))
    with pytest.raises(openai.APIConnectionError) as caught:
        await oai.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert not isinstance(caught.value, openai.APITimeoutError)
    with pytest.raises(anthropic.APIConnectionError):
        await claude.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=USER)
    # The server keeps serving after dropping connections.
    assert (await oai.chat.completions.create(model="gpt-4o-mini", messages=USER)).choices


def test_fault_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault(kind="explode")


# -- concurrency, failure rate, bookkeeping ------------------------------------------------


async def test_max_in_flight_counts_concurrent_posts(
    srv: LoopbackServer, oai: openai.AsyncOpenAI
) -> None:
    srv.delay_s = 0.5
    concurrency = 8
    results = await asyncio.gather(
        *(
            oai.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"q{i}"}]
            )
            for i in range(concurrency)
        )
    )
    assert [r.choices[0].message.content for r in results] == [
        reply_text(f"q{i}") for i in range(concurrency)
    ]
    assert srv.max_in_flight == concurrency
    assert await asyncio.to_thread(srv.wait_until_idle)  # handlers finish after replying
    assert srv.in_flight == 0


def _statuses(server: LoopbackServer, n: int = 40) -> list[tuple[int, str | None]]:
    outcomes = []
    with httpx.Client(base_url=server.openai_base_url) as client:
        for i in range(n):
            response = client.post(
                "/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"p{i}"}]},
            )
            outcomes.append((response.status_code, response.headers.get("retry-after")))
    return outcomes


def test_failure_rate_is_deterministic_per_seed(srv: LoopbackServer) -> None:
    srv.set_failure_rate(transient=0.5, seed=1)
    first = _statuses(srv)
    srv.reset()
    srv.set_failure_rate(transient=0.5, seed=1)
    again = _statuses(srv)
    srv.reset()
    srv.set_failure_rate(transient=0.5, seed=2)
    other = _statuses(srv)

    assert first == again
    assert first != other
    codes = {status for status, _ in first}
    assert codes == {200, 429, 503}
    assert all(retry == "0" for status, retry in first if status == 429)
    assert all(retry is None for status, retry in first if status != 429)


def test_failure_rate_permanent_and_scope(srv: LoopbackServer) -> None:
    srv.set_failure_rate(permanent=1.0, seed=3)
    assert {status for status, _ in _statuses(srv, 5)} == {400}
    # Listings are not completion/message/embedding calls and are never failed.
    assert httpx.get(srv.openai_base_url + "/models").status_code == 200
    srv.reset()
    assert {status for status, _ in _statuses(srv, 5)} == {200}


def test_failure_rate_validates_rates(srv: LoopbackServer) -> None:
    with pytest.raises(ValueError):
        srv.set_failure_rate(transient=0.8, permanent=0.3)


def test_reset_clears_script_and_records(srv: LoopbackServer) -> None:
    srv.script(Fault(status=500))
    httpx.get(srv.openai_base_url + "/models")
    assert srv.request_count == 1
    srv.reset()
    assert srv.requests == []
    assert srv.request_count == 0
    assert srv.max_in_flight == 0
    response = httpx.post(
        srv.openai_base_url + "/chat/completions", json={"model": "gpt-4o", "messages": USER}
    )
    assert response.status_code == 200


def test_recorded_request_fields(srv: LoopbackServer) -> None:
    httpx.get(srv.openai_base_url + "/models", params={"limit": "5"}, headers={"X-Trace": "abc"})
    (request,) = srv.requests
    assert request.method == "GET"
    assert request.path == "/v1/models"
    assert request.query == {"limit": "5"}
    assert request.headers["x-trace"] == "abc"
    assert request.json is None
    assert request.model is None


def test_command_line_serves_until_stopped() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "study_query_llm.testing.server", "--port", "0", "--delay-ms", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        response = httpx.post(
            url + "/v1/chat/completions", json={"model": "mock-model", "messages": USER}
        )
        assert response.json()["choices"][0]["message"]["content"] == reply_text(USER[0]["content"])
    finally:
        process.terminate()
        process.wait(timeout=10)
