"""InferenceService against real HTTP and real databases: what is called, and what is recorded.

Providers are the real `openai` SDK provider talking to the loopback server (and the mock
provider where only the service's own logic matters); the record is read back from real
SQLite and PostgreSQL databases. Waits between retries go to an injected fake `sleep`
that only records them, so nothing here really sleeps and nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, ClassVar

import pytest
from sqlalchemy import Engine, select, text

from study_query_llm.config import Settings
from study_query_llm.db.connection import UnitOfWork
from study_query_llm.db.models_v1 import InferenceRun
from study_query_llm.db.models_v2 import GroupMember, RawCall
from study_query_llm.db.records import NewCall
from study_query_llm.providers import (
    BadRequestError,
    BaseLLMProvider,
    ModelNotFoundError,
    ProviderTimeoutError,
    ProviderUnavailableError,
    create,
)
from study_query_llm.providers.pricing import PricingTable
from study_query_llm.services._common import MODEL_MEMORY, ModelMemory, ProviderPool
from study_query_llm.services.context import build_services
from study_query_llm.services.inference import (
    NO_RETRY,
    InferenceService,
    RetryPolicy,
    request_hash,
)
from study_query_llm.services.preprocessing import PreprocessConfig
from study_query_llm.services.recorder import CallRecorder, RecordingError, WrittenTogether
from study_query_llm.testing.server import Fault, LoopbackServer, count_tokens, reply_text

MODEL = "gpt-4o-mini"
CHAT = "/chat/completions"


class FakeSleep:
    """Records every wait the service asks for and returns at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def factory(loopback: LoopbackServer, *, timeout_s: float = 10.0):
    settings = Settings(_env_file=None)

    def build(provider_id: str) -> BaseLLMProvider:
        if provider_id == "openai":
            return create(
                "openai",
                settings,
                api_key="k",
                base_url=loopback.openai_base_url,
                model=MODEL,
                timeout_s=timeout_s,
            )
        if provider_id == "mock":
            return create("mock", settings, latency_ms=0)
        raise KeyError(provider_id)

    return build


def calls(engine: Engine) -> list[RawCall]:
    with UnitOfWork(engine) as uow:
        return list(uow.session.scalars(select(RawCall).order_by(RawCall.id)))


def runs(engine: Engine) -> list[InferenceRun]:
    with UnitOfWork(engine) as uow:
        return list(uow.session.scalars(select(InferenceRun).order_by(InferenceRun.id)))


@pytest.fixture
def fake_sleep() -> FakeSleep:
    return FakeSleep()


@pytest.fixture
async def service(engine: Engine, loopback: LoopbackServer, fake_sleep: FakeSleep):
    svc = InferenceService(
        CallRecorder(engine),
        providers=factory(loopback),
        retry=RetryPolicy(max_attempts=4),
        sleep=fake_sleep,
    )
    yield svc
    await svc.aclose()


@pytest.fixture
def sqlite_engine(tmp_path) -> Engine:
    from study_query_llm.db import migrate
    from study_query_llm.db.connection import get_engine

    url = f"sqlite:///{tmp_path / 'inference.db'}"
    migrate.upgrade(url)
    return get_engine(url)


@pytest.fixture
async def sqlite_service(sqlite_engine: Engine, loopback: LoopbackServer, fake_sleep: FakeSleep):
    svc = InferenceService(
        CallRecorder(sqlite_engine),
        providers=factory(loopback),
        retry=RetryPolicy(max_attempts=4),
        sleep=fake_sleep,
    )
    yield svc
    await svc.aclose()


# --- one successful call ----------------------------------------------------------------


async def test_success_records_one_raw_call_and_one_v1_run(
    service: InferenceService, engine: Engine, loopback: LoopbackServer
):
    result = await service.run(
        "Hello there", provider="openai", model=MODEL, options={"temperature": 0.5}
    )

    assert result.ok and result.status == "success"
    assert result.text == reply_text("Hello there")
    assert len(result.call_ids) == 1 and len(result.attempts) == 1
    assert loopback.count(CHAT) == 1
    assert loopback.requests[0].json["temperature"] == 0.5

    [call] = calls(engine)
    sent = [{"role": "user", "content": "Hello there"}]
    assert call.id == result.call_id
    assert (call.provider, call.model, call.modality, call.status) == (
        "openai",
        MODEL,
        "chat",
        "success",
    )
    assert call.request_json == {"messages": sent, "options": {"temperature": 0.5}}
    assert call.response_json["text"] == reply_text("Hello there")
    assert call.response_json["finish_reason"] == "stop"
    assert call.response_json["raw"]["usage"]["prompt_tokens"] == 2
    assert call.error_json is None
    prompt_tokens = count_tokens("Hello there")
    completion_tokens = count_tokens(reply_text("Hello there"))
    assert (call.prompt_tokens, call.completion_tokens, call.total_tokens) == (
        prompt_tokens,
        completion_tokens,
        prompt_tokens + completion_tokens,
    )
    expected_cost = (prompt_tokens * 0.15 + completion_tokens * 0.60) / 1_000_000
    assert call.cost_usd == pytest.approx(expected_cost)
    assert result.cost_usd == pytest.approx(expected_cost)
    assert call.latency_ms is not None and call.latency_ms > 0
    assert call.request_hash == request_hash("openai", MODEL, sent, {"temperature": 0.5})
    assert call.metadata_json["attempt"] == 1

    [run] = runs(engine)
    assert run.prompt == "Hello there"
    assert run.response == reply_text("Hello there")
    assert (run.provider, run.model) == ("openai", MODEL)
    assert run.tokens == prompt_tokens + completion_tokens
    assert run.latency_ms == call.latency_ms
    assert run.metadata_json["raw_call_id"] == call.id
    assert run.metadata_json["attempt"] == 1


async def test_request_hash_differs_with_options_and_is_stable(
    sqlite_service: InferenceService, sqlite_engine: Engine
):
    await sqlite_service.run("Same", provider="openai")
    await sqlite_service.run("Same", provider="openai")
    await sqlite_service.run("Same", provider="openai", options={"temperature": 1.0})
    first, second, third = calls(sqlite_engine)
    assert first.request_hash == second.request_hash
    assert third.request_hash != first.request_hash


async def test_messages_are_sent_in_order_and_only_the_last_user_message_is_preprocessed(
    sqlite_service: InferenceService, sqlite_engine: Engine, loopback: LoopbackServer
):
    messages = [
        {"role": "system", "content": "Be   brief."},
        {"role": "user", "content": "First   question"},
        {"role": "assistant", "content": "First answer"},
        {"role": "user", "content": "  Second   question  "},
    ]
    result = await sqlite_service.run(messages, provider="openai")
    assert result.ok
    sent = loopback.requests[0].json["messages"]
    assert [m["content"] for m in sent] == [
        "Be   brief.",
        "First   question",
        "First answer",
        "Second question",
    ]
    [call] = calls(sqlite_engine)
    assert call.request_json["messages"] == sent
    assert call.request_json["original_messages"] == messages


# --- retries ------------------------------------------------------------------------------


async def test_transient_failures_are_retried_and_every_attempt_recorded(
    service: InferenceService, engine: Engine, loopback: LoopbackServer, fake_sleep: FakeSleep
):
    loopback.script(Fault(status=503), Fault(status=503), path=CHAT)

    result = await service.run("Retry me", provider="openai")

    assert result.ok
    assert loopback.count(CHAT) == 3
    assert [a.number for a in result.attempts] == [1, 2, 3]
    assert [a.status for a in result.attempts] == ["failed", "failed", "success"]
    assert len(fake_sleep.waits) == 2 and all(w > 0 for w in fake_sleep.waits)
    assert [a.waited_s for a in result.attempts] == [0.0, *fake_sleep.waits]

    rows = calls(engine)
    assert [r.id for r in rows] == result.call_ids
    assert [r.status for r in rows] == ["failed", "failed", "success"]
    assert [r.metadata_json["attempt"] for r in rows] == [1, 2, 3]
    for failed in rows[:2]:
        assert failed.metadata_json["final_attempt"] is False
        assert failed.error_json["status_code"] == 503
        assert failed.error_json["transient"] is True
        assert failed.error_json["type"] == "server_error"
        assert failed.response_json is None
        assert failed.request_hash == rows[2].request_hash
    assert rows[2].error_json is None
    [run] = runs(engine)
    assert run.metadata_json["raw_call_id"] == rows[2].id
    assert run.metadata_json["attempt"] == 3


def test_backoff_grows_exponentially_with_bounded_jitter():
    error = ProviderUnavailableError("down", status_code=503)
    exact = RetryPolicy(initial_backoff_s=1, max_backoff_s=5, jitter_s=0)
    assert [exact.delay_for(error, n) for n in range(1, 6)] == [1, 2, 4, 5, 5]
    jittered = RetryPolicy(initial_backoff_s=1, max_backoff_s=100, jitter_s=0.5)
    for n in range(1, 5):
        assert 2 ** (n - 1) <= jittered.delay_for(error, n) <= 2 ** (n - 1) + 0.5


async def test_backoff_waits_reach_the_injected_sleep(
    sqlite_engine: Engine, loopback: LoopbackServer, fake_sleep: FakeSleep
):
    policy = RetryPolicy(initial_backoff_s=0.5, jitter_s=0)
    svc = InferenceService(
        CallRecorder(sqlite_engine), providers=factory(loopback), retry=policy, sleep=fake_sleep
    )
    loopback.script(Fault(status=503), Fault(status=503), Fault(status=503), path=CHAT)
    try:
        result = await svc.run("Back off", provider="openai")
    finally:
        await svc.aclose()
    assert result.ok
    assert fake_sleep.waits == [0.5, 1.0, 2.0]


async def test_retry_after_on_429_is_what_the_service_waits(
    sqlite_service: InferenceService,
    sqlite_engine: Engine,
    loopback: LoopbackServer,
    fake_sleep: FakeSleep,
):
    loopback.script(Fault(status=429, retry_after=3), path=CHAT)

    result = await sqlite_service.run("Slow down", provider="openai")

    assert result.ok
    assert fake_sleep.waits == [3.0]
    assert loopback.count(CHAT) == 2
    failed, success = calls(sqlite_engine)
    assert failed.status == "failed"
    assert failed.error_json["type"] == "rate_limited"
    assert failed.error_json["retry_after"] == 3.0
    assert success.status == "success"
    assert result.attempts[1].waited_s == 3.0


async def test_retry_after_is_capped_by_the_policy(
    sqlite_engine: Engine, loopback: LoopbackServer, fake_sleep: FakeSleep
):
    svc = InferenceService(
        CallRecorder(sqlite_engine),
        providers=factory(loopback),
        retry=RetryPolicy(max_retry_after_s=5),
        sleep=fake_sleep,
    )
    loopback.script(Fault(status=429, retry_after=3600), path=CHAT)
    try:
        result = await svc.run("Very slow down", provider="openai")
    finally:
        await svc.aclose()
    assert result.ok
    assert fake_sleep.waits == [5.0]


async def test_permanent_error_is_recorded_once_and_not_retried(
    service: InferenceService, engine: Engine, loopback: LoopbackServer, fake_sleep: FakeSleep
):
    loopback.script(Fault(status=400), path=CHAT)

    result = await service.run("Bad request", provider="openai")

    assert not result.ok and result.status == "failed"
    assert isinstance(result.error, BadRequestError)
    assert loopback.count(CHAT) == 1
    assert fake_sleep.waits == []
    [row] = calls(engine)
    assert row.id == result.call_id
    assert row.status == "failed"
    assert row.error_json["status_code"] == 400
    assert row.error_json["transient"] is False
    assert row.metadata_json == {"attempt": 1, "final_attempt": True}
    assert runs(engine) == []


async def test_timeout_is_recorded_with_status_timeout(
    sqlite_engine: Engine, loopback: LoopbackServer, fake_sleep: FakeSleep
):
    svc = InferenceService(
        CallRecorder(sqlite_engine),
        providers=factory(loopback, timeout_s=0.3),
        retry=NO_RETRY,
        sleep=fake_sleep,
    )
    loopback.script(Fault(kind="timeout", hang_s=5), path=CHAT)
    try:
        result = await svc.run("Hang on", provider="openai")
    finally:
        await svc.aclose()

    assert result.status == "timeout"
    assert isinstance(result.error, ProviderTimeoutError)
    [row] = calls(sqlite_engine)
    assert row.status == "timeout"
    assert row.error_json["type"] == "timeout"
    assert row.metadata_json["final_attempt"] is True
    assert runs(sqlite_engine) == []


async def test_timeout_is_transient_and_retried(
    sqlite_engine: Engine, loopback: LoopbackServer, fake_sleep: FakeSleep
):
    svc = InferenceService(
        CallRecorder(sqlite_engine),
        providers=factory(loopback, timeout_s=0.3),
        sleep=fake_sleep,
    )
    loopback.script(Fault(kind="timeout", hang_s=5), path=CHAT)
    try:
        result = await svc.run("Hang on, then answer", provider="openai")
    finally:
        await svc.aclose()

    assert result.ok
    assert [r.status for r in calls(sqlite_engine)] == ["timeout", "success"]
    assert len(fake_sleep.waits) == 1


async def test_exhausted_attempts_end_in_a_final_failure(
    sqlite_engine: Engine, loopback: LoopbackServer, fake_sleep: FakeSleep
):
    svc = InferenceService(
        CallRecorder(sqlite_engine),
        providers=factory(loopback),
        retry=RetryPolicy(max_attempts=3),
        sleep=fake_sleep,
    )
    loopback.script(*[Fault(status=502)] * 4, path=CHAT)
    try:
        result = await svc.run("Never works", provider="openai")
    finally:
        await svc.aclose()

    assert result.status == "failed"
    assert isinstance(result.error, ProviderUnavailableError)
    assert loopback.count(CHAT) == 3
    assert len(fake_sleep.waits) == 2
    rows = calls(sqlite_engine)
    assert [r.metadata_json["attempt"] for r in rows] == [1, 2, 3]
    assert [r.metadata_json["final_attempt"] for r in rows] == [False, False, True]
    assert all(r.status == "failed" for r in rows)
    assert runs(sqlite_engine) == []


async def test_total_time_limit_stops_retrying(
    sqlite_engine: Engine, loopback: LoopbackServer, fake_sleep: FakeSleep
):
    svc = InferenceService(
        CallRecorder(sqlite_engine),
        providers=factory(loopback),
        retry=RetryPolicy(max_attempts=10, max_total_s=0.0),
        sleep=fake_sleep,
    )
    loopback.script(Fault(status=503), path=CHAT)
    try:
        result = await svc.run("No time left", provider="openai")
    finally:
        await svc.aclose()
    assert result.status == "failed"
    assert loopback.count(CHAT) == 1
    assert fake_sleep.waits == []
    [row] = calls(sqlite_engine)
    assert row.metadata_json["final_attempt"] is True


@pytest.mark.parametrize(
    "fault",
    [
        Fault(kind="malformed"),
        Fault(kind="wrong_content_type"),
        Fault(kind="reset"),
        Fault(status=500),
        Fault(status=429),
    ],
    ids=lambda f: f.kind if f.kind != "status" else str(f.status),
)
async def test_garbled_or_dropped_answers_are_retried(
    sqlite_service: InferenceService,
    sqlite_engine: Engine,
    loopback: LoopbackServer,
    fault: Fault,
):
    loopback.script(fault, path=CHAT)

    result = await sqlite_service.run("Try again", provider="openai")

    assert result.ok
    assert loopback.count(CHAT) == 2
    failed, success = calls(sqlite_engine)
    assert failed.status == "failed"
    assert failed.error_json["transient"] is True
    assert success.status == "success"
    assert success.response_json["text"] == reply_text("Try again")


# --- preprocessing -----------------------------------------------------------------------


async def test_preprocessing_is_visible_in_the_record(
    sqlite_service: InferenceService, sqlite_engine: Engine, loopback: LoopbackServer
):
    original = "  Hello \x07  world \u200b \n\n\n\n again  "

    result = await sqlite_service.run(original, provider="openai")

    assert result.ok
    sent_text = "Hello world\n\nagain"
    assert loopback.requests[0].json["messages"] == [{"role": "user", "content": sent_text}]
    [call] = calls(sqlite_engine)
    assert call.request_json["messages"] == [{"role": "user", "content": sent_text}]
    assert call.request_json["original_messages"] == [{"role": "user", "content": original}]
    prep = call.request_json["preprocessing"]
    assert prep["steps"] == ["strip_control_chars", "normalise_whitespace"]
    assert prep["original_chars"] == len(original)
    assert prep["sent_chars"] == len(sent_text)
    assert result.preprocessing is not None and result.preprocessing.sent == sent_text
    [run] = runs(sqlite_engine)
    assert run.prompt == sent_text


async def test_unchanged_prompt_has_no_preprocessing_entry(
    sqlite_service: InferenceService, sqlite_engine: Engine
):
    await sqlite_service.run("Already clean", provider="openai")
    [call] = calls(sqlite_engine)
    assert "original_messages" not in call.request_json
    assert "preprocessing" not in call.request_json


async def test_template_with_braces_in_template_and_prompt(
    sqlite_service: InferenceService, sqlite_engine: Engine, loopback: LoopbackServer
):
    template = 'Answer as JSON like {"answer": "..."} for: {user_input}'
    prompt = 'What does f"{x}" print when x = {0}? And {user}?'

    result = await sqlite_service.run(prompt, provider="openai", template=template)

    assert result.ok
    expected = 'Answer as JSON like {"answer": "..."} for: ' + prompt
    assert loopback.requests[0].json["messages"][-1]["content"] == expected
    [call] = calls(sqlite_engine)
    assert call.request_json["messages"][-1]["content"] == expected
    assert call.request_json["original_messages"][-1]["content"] == prompt
    assert call.request_json["preprocessing"]["steps"] == ["template"]


async def test_truncation_marks_the_record(
    sqlite_service: InferenceService, sqlite_engine: Engine, loopback: LoopbackServer
):
    config = PreprocessConfig(max_chars=40)
    result = await sqlite_service.run("word " * 50, provider="openai", preprocess_config=config)
    assert result.ok
    sent = loopback.requests[0].json["messages"][-1]["content"]
    assert len(sent) <= 40 and sent.endswith("…[truncated]")
    [call] = calls(sqlite_engine)
    assert call.request_json["preprocessing"]["truncated"] is True
    assert "truncate" in call.request_json["preprocessing"]["steps"]


async def test_pii_is_scrubbed_before_sending(
    sqlite_service: InferenceService, sqlite_engine: Engine, loopback: LoopbackServer
):
    prompt = (
        "Mail jane.doe@example.com or call +44 20 7946 0958; card 4111 1111 1111 1111; "
        "IBAN GB82 WEST 1234 5698 7654 32."
    )
    config = PreprocessConfig(scrub_pii=True)

    result = await sqlite_service.run(prompt, provider="openai", preprocess_config=config)

    assert result.ok
    sent = loopback.requests[0].json["messages"][-1]["content"]
    for secret in ("jane.doe@example.com", "7946", "4111", "GB82"):
        assert secret not in sent
    for label in ("[EMAIL]", "[PHONE]", "[CARD]", "[IBAN]"):
        assert label in sent
    [call] = calls(sqlite_engine)
    assert call.request_json["messages"][-1]["content"] == sent
    assert "jane.doe@example.com" not in str(call.response_json)
    assert call.request_json["preprocessing"]["redactions"] == {
        "EMAIL": 1,
        "PHONE": 1,
        "CARD": 1,
        "IBAN": 1,
    }
    [run] = runs(sqlite_engine)
    assert "jane.doe@example.com" not in run.prompt


async def test_invalid_options_are_refused_before_any_call(
    sqlite_service: InferenceService, sqlite_engine: Engine, loopback: LoopbackServer
):
    with pytest.raises(BadRequestError, match="temprature"):
        await sqlite_service.run("Hi", provider="openai", options={"temprature": 0.2})
    assert loopback.count(CHAT) == 0
    assert calls(sqlite_engine) == []


# --- in-flight de-duplication ------------------------------------------------------------


async def test_identical_concurrent_requests_share_one_call(
    service: InferenceService, engine: Engine, loopback: LoopbackServer
):
    loopback.delay_s = 0.2
    results = await asyncio.gather(
        *[service.run("Same question", provider="openai", dedup=True) for _ in range(5)]
    )

    assert loopback.count(CHAT) == 1
    assert all(r.ok for r in results)
    assert len({tuple(r.call_ids) for r in results}) == 1
    assert sum(r.deduplicated for r in results) == 4
    assert all(r.text == reply_text("Same question") for r in results)
    assert len(calls(engine)) == 1
    assert len(runs(engine)) == 1


async def test_different_prompts_are_not_deduplicated(
    sqlite_service: InferenceService, sqlite_engine: Engine, loopback: LoopbackServer
):
    loopback.delay_s = 0.1
    results = await asyncio.gather(
        *[sqlite_service.run(f"Question {i}", provider="openai", dedup=True) for i in range(5)]
    )
    assert loopback.count(CHAT) == 5
    assert len({r.call_id for r in results}) == 5
    assert not any(r.deduplicated for r in results)
    assert [r.text for r in results] == [reply_text(f"Question {i}") for i in range(5)]


async def test_different_options_are_not_deduplicated(
    sqlite_service: InferenceService, loopback: LoopbackServer
):
    loopback.delay_s = 0.1
    results = await asyncio.gather(
        *[
            sqlite_service.run("Same", provider="openai", options={"seed": i}, dedup=True)
            for i in range(3)
        ]
    )
    assert loopback.count(CHAT) == 3
    assert len({r.call_id for r in results}) == 3


async def test_without_dedup_identical_requests_each_make_a_call(
    sqlite_service: InferenceService, sqlite_engine: Engine, loopback: LoopbackServer
):
    loopback.delay_s = 0.1
    results = await asyncio.gather(
        *[sqlite_service.run("Same question", provider="openai") for _ in range(5)]
    )
    assert loopback.count(CHAT) == 5
    assert len({r.call_id for r in results}) == 5
    assert len(calls(sqlite_engine)) == 5


async def test_a_shared_failure_reaches_every_waiter(
    sqlite_service: InferenceService, sqlite_engine: Engine, loopback: LoopbackServer
):
    loopback.delay_s = 0.1
    loopback.script(Fault(status=400), path=CHAT)
    results = await asyncio.gather(
        *[sqlite_service.run("Doomed", provider="openai", dedup=True) for _ in range(3)]
    )
    assert loopback.count(CHAT) == 1
    assert [r.status for r in results] == ["failed"] * 3
    assert len({r.call_id for r in results}) == 1
    assert len(calls(sqlite_engine)) == 1


async def test_cancelling_the_leader_does_not_cancel_the_followers(
    sqlite_service: InferenceService, sqlite_engine: Engine, loopback: LoopbackServer
):
    loopback.script(Fault(kind="delay", delay_s=5), path=CHAT)  # the leader's request hangs
    leader = asyncio.create_task(sqlite_service.run("Shared", provider="openai", dedup=True))
    follower = asyncio.create_task(sqlite_service.run("Shared", provider="openai", dedup=True))
    assert await asyncio.to_thread(loopback.wait_for_requests, 1)
    leader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await leader

    result = await follower  # not cancelled itself: it must get an answer

    assert result.ok
    assert loopback.count(CHAT) == 2
    statuses = sorted(r.status for r in calls(sqlite_engine))
    assert statuses == ["cancelled", "success"]


async def test_cancelling_a_follower_does_not_cancel_the_shared_call(
    sqlite_service: InferenceService, sqlite_engine: Engine, loopback: LoopbackServer
):
    loopback.script(Fault(kind="delay", delay_s=0.5), path=CHAT)
    leader = asyncio.create_task(sqlite_service.run("Shared", provider="openai", dedup=True))
    follower = asyncio.create_task(sqlite_service.run("Shared", provider="openai", dedup=True))
    assert await asyncio.to_thread(loopback.wait_for_requests, 1)
    follower.cancel()
    with pytest.raises(asyncio.CancelledError):
        await follower

    result = await leader

    assert result.ok and not result.deduplicated
    assert loopback.count(CHAT) == 1
    assert [r.status for r in calls(sqlite_engine)] == ["success"]


# --- many calls at once ------------------------------------------------------------------


async def test_concurrent_runs_are_recorded_in_few_transactions(
    sqlite_engine: Engine, loopback: LoopbackServer
):
    recorder = CallRecorder(sqlite_engine)
    svc = InferenceService(recorder, providers=factory(loopback))
    try:
        results = await asyncio.gather(
            *[svc.run(f"Prompt {i}", provider="mock") for i in range(200)]
        )
    finally:
        await svc.aclose()

    assert all(r.ok for r in results)
    ids = [r.call_id for r in results]
    assert len(set(ids)) == 200
    assert recorder.transactions < 20  # group commit, not one transaction per call
    rows = calls(sqlite_engine)
    assert {r.id for r in rows} == set(ids)
    by_id = {r.id: r for r in rows}
    for i, result in enumerate(results):
        assert by_id[result.call_id].request_json["messages"][0]["content"] == f"Prompt {i}"
    assert len(runs(sqlite_engine)) == 200


async def test_extra_work_of_one_kind_is_done_together_per_transaction(sqlite_engine: Engine):
    """Records queued together are written in one transaction, and their `WrittenTogether`
    extra work is handed over in one call, in queue order, with each record's id."""

    class Together(WrittenTogether):
        handed: ClassVar[list[list[tuple[int, int, str]]]] = []

        def __init__(self, n: int) -> None:
            self.n = n

        @classmethod
        def write_all(cls, uow: UnitOfWork, entries: list[tuple[Any, int, str]]) -> None:
            assert uow.calls.get(entries[-1][1]) is not None  # in the same transaction
            cls.handed.append([(after.n, call_id, status) for after, call_id, status in entries])

    recorder = CallRecorder(sqlite_engine)
    statuses = ["success", "failed", "success", "timeout", "success"]
    try:
        ids = await asyncio.gather(
            *[
                recorder.record(
                    NewCall(provider="mock", model="m", modality="chat", status=status,
                            request_json={"n": n}),
                    after=Together(n),
                )
                for n, status in enumerate(statuses)
            ]
        )  # fmt: skip
    finally:
        await recorder.aclose()

    assert recorder.transactions == 1
    assert Together.handed == [[(n, ids[n], status) for n, status in enumerate(statuses)]]


async def _run_many(
    svc: InferenceService, prompts: list[str], concurrency: int, policy: RetryPolicy
) -> list[Any]:
    """Run every prompt, at most `concurrency` at once (a retrying item holds one slot)."""
    slots = asyncio.Semaphore(concurrency)

    async def one(prompt: str):
        async with slots:
            return await svc.run(prompt, provider="openai", retry=policy)

    return await asyncio.gather(*[one(p) for p in prompts])


async def _check_fault_injection(engine: Engine, loopback: LoopbackServer, n: int, seed: int):
    sleep = FakeSleep()
    svc = InferenceService(CallRecorder(engine), providers=factory(loopback), sleep=sleep)
    policy = RetryPolicy(max_attempts=20, max_total_s=600)
    loopback.set_failure_rate(transient=0.3, permanent=0.05, seed=seed)
    try:
        results = await _run_many(svc, [f"Item {i}" for i in range(n)], 100, policy)
    finally:
        await svc.aclose()

    attempts = sum(len(r.attempts) for r in results)
    succeeded = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    assert len(succeeded) + len(failed) == n
    assert loopback.count(CHAT) == attempts
    rows = calls(engine)
    assert len(rows) == attempts
    assert {r.id for r in rows} == {cid for res in results for cid in res.call_ids}
    assert len(runs(engine)) == len(succeeded)
    assert sum(r.status == "success" for r in rows) == len(succeeded)
    final_failures = [r for r in rows if r.status != "success" and r.metadata_json["final_attempt"]]
    assert len(final_failures) == len(failed)
    assert attempts > n  # the failure rate really bit
    assert failed, "with 5% permanent failures some items must fail"
    assert any(len(r.attempts) > 1 for r in succeeded)

    for result in results:
        errors = [a.error for a in result.attempts if a.error is not None]
        assert [a.number for a in result.attempts] == list(range(1, len(result.attempts) + 1))
        if result.ok:
            assert all(e["transient"] for e in errors)  # only transient failures: succeeded
            assert result.attempts[-1].status == "success"
        else:
            # a permanent failure ends the item at once: it is never retried
            assert errors[-1]["transient"] is False and errors[-1]["status_code"] == 400
            assert all(e["transient"] for e in errors[:-1])
    # every wait was asked of the injected sleep: one per retried attempt
    assert len(sleep.waits) == attempts - n


async def test_fault_injection_at_scale_counts_add_up(
    sqlite_engine: Engine, loopback: LoopbackServer
):
    await _check_fault_injection(sqlite_engine, loopback, 1000, seed=7)


@pytest.mark.postgres
async def test_fault_injection_on_postgres_counts_add_up(pg_db_url: str, loopback: LoopbackServer):
    from study_query_llm.db.connection import get_engine

    await _check_fault_injection(get_engine(pg_db_url), loopback, 200, seed=11)


# --- recording problems are surfaced -----------------------------------------------------


def _refuse_v1_inserts(engine: Engine) -> None:
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(
                text(
                    "CREATE TRIGGER refuse_v1 BEFORE INSERT ON inference_runs "
                    "BEGIN SELECT RAISE(ABORT, 'v1 refused by the test'); END"
                )
            )
        else:
            conn.execute(
                text(
                    "CREATE FUNCTION refuse_v1() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'v1 refused by the test'; END $$"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER refuse_v1 BEFORE INSERT ON inference_runs "
                    "FOR EACH ROW EXECUTE FUNCTION refuse_v1()"
                )
            )


async def test_a_failed_v1_write_is_surfaced_and_v2_kept(service: InferenceService, engine: Engine):
    _refuse_v1_inserts(engine)

    with pytest.raises(RecordingError, match="v1 refused") as info:
        await service.run("Dual write", provider="openai")

    assert info.value.call_id is not None
    [row] = calls(engine)
    assert row.id == info.value.call_id
    assert row.status == "success"
    assert runs(engine) == []


async def test_failed_v1_writes_in_one_batch_are_each_surfaced(
    sqlite_engine: Engine, loopback: LoopbackServer
):
    _refuse_v1_inserts(sqlite_engine)
    svc = InferenceService(CallRecorder(sqlite_engine), providers=factory(loopback))
    try:
        outcomes = await asyncio.gather(
            *[svc.run(f"P{i}", provider="mock") for i in range(10)], return_exceptions=True
        )
    finally:
        await svc.aclose()
    assert all(isinstance(o, RecordingError) for o in outcomes)
    ids = {o.call_id for o in outcomes}
    assert None not in ids and len(ids) == 10
    assert {r.id for r in calls(sqlite_engine)} == ids


async def test_a_failed_v2_write_is_surfaced(sqlite_engine: Engine, loopback: LoopbackServer):
    with sqlite_engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TRIGGER refuse_v2 BEFORE INSERT ON raw_calls "
                "BEGIN SELECT RAISE(ABORT, 'v2 refused by the test'); END"
            )
        )
    svc = InferenceService(CallRecorder(sqlite_engine), providers=factory(loopback))
    try:
        with pytest.raises(RecordingError, match="v2 refused") as info:
            await svc.run("Nowhere to go", provider="openai")
    finally:
        await svc.aclose()
    assert info.value.call_id is None


async def test_nul_characters_are_stored_sanitised(
    service: InferenceService, engine: Engine, loopback: LoopbackServer
):
    config = PreprocessConfig(strip_control_chars=False)

    result = await service.run("before\x00after", provider="openai", preprocess_config=config)

    assert result.ok
    assert "\x00" in result.text  # the provider really answered with a NUL
    [call] = calls(engine)
    assert call.request_json["messages"][0]["content"] == "before\ufffdafter"
    assert call.response_json["text"] == reply_text("before\ufffdafter")
    assert call.metadata_json["sanitised"] is True
    [run] = runs(engine)
    assert run.prompt == "before\ufffdafter"
    assert run.response == reply_text("before\ufffdafter")


async def test_nul_in_an_error_message_is_stored_sanitised(
    service: InferenceService, engine: Engine, loopback: LoopbackServer
):
    body = '{"error": {"message": "bad\\u0000thing", "type": "invalid_request_error"}}'
    loopback.script(Fault(status=400, body=body), path=CHAT)

    result = await service.run("Error with NUL", provider="openai")

    assert result.status == "failed"
    [call] = calls(engine)
    assert "\ufffd" in call.error_json["message"]
    assert call.metadata_json["sanitised"] is True


async def test_caller_metadata_that_json_cannot_hold_is_sanitised_in_both_tables(
    service: InferenceService, engine: Engine
):
    metadata = {"note": "tab\x00separated", "score": float("nan"), "batch_id": "b1"}

    result = await service.run("With odd metadata", provider="openai", metadata=metadata)

    assert result.ok
    [call] = calls(engine)
    assert call.metadata_json["note"] == "tab\ufffdseparated"
    assert call.metadata_json["score"] is None
    [run] = runs(engine)
    assert run.metadata_json["note"] == "tab\ufffdseparated"
    assert run.metadata_json["score"] is None
    assert run.metadata_json["raw_call_id"] == call.id
    assert run.batch_id == "b1"


async def test_one_bad_record_does_not_sink_the_others_written_with_it(
    sqlite_engine: Engine, loopback: LoopbackServer
):
    recorder = CallRecorder(sqlite_engine)
    svc = InferenceService(recorder, providers=factory(loopback))

    def refuse(uow, call_id, status):
        raise RuntimeError("the extra work failed")

    try:
        outcomes = await asyncio.gather(
            *[
                svc.run(f"P{i}", provider="mock", on_final=refuse if i == 3 else None)
                for i in range(10)
            ],
            return_exceptions=True,
        )
    finally:
        await svc.aclose()

    assert isinstance(outcomes[3], RecordingError)
    good = [o for i, o in enumerate(outcomes) if i != 3]
    assert all(o.ok for o in good)
    assert {r.id for r in calls(sqlite_engine)} == {o.call_id for o in good}
    assert len(runs(sqlite_engine)) == 9


# --- streaming ---------------------------------------------------------------------------


async def _consume(stream) -> tuple[list[str], Any]:
    chunks: list[str] = []
    final = None
    async for item in stream:
        if isinstance(item, str):
            chunks.append(item)
        else:
            final = item
    return chunks, final


async def test_stream_chunks_join_to_the_recorded_text(
    service: InferenceService, engine: Engine, loopback: LoopbackServer
):
    prompt = "Tell me a fairly long story about streaming chunks over HTTP"
    chunks, result = await _consume(service.stream(prompt, provider="openai"))

    assert len(chunks) > 1
    assert "".join(chunks) == reply_text(prompt)
    assert result.ok and result.text == "".join(chunks)
    assert loopback.requests[0].json["stream"] is True
    [call] = calls(engine)
    assert call.id == result.call_id
    assert call.status == "success"
    assert call.response_json["text"] == reply_text(prompt)
    assert call.total_tokens == count_tokens(prompt) + count_tokens(reply_text(prompt))
    [run] = runs(engine)
    assert run.metadata_json["raw_call_id"] == call.id


async def test_stream_retries_a_429_before_the_first_chunk(
    sqlite_service: InferenceService,
    sqlite_engine: Engine,
    loopback: LoopbackServer,
    fake_sleep: FakeSleep,
):
    loopback.script(Fault(status=429, retry_after=2), path=CHAT)

    chunks, result = await _consume(sqlite_service.stream("Stream after 429", provider="openai"))

    assert result.ok
    assert "".join(chunks) == reply_text("Stream after 429")
    assert fake_sleep.waits == [2.0]
    assert loopback.count(CHAT) == 2
    assert [r.status for r in calls(sqlite_engine)] == ["failed", "success"]
    assert [a.number for a in result.attempts] == [1, 2]


async def test_stream_permanent_error_is_final(
    sqlite_service: InferenceService, sqlite_engine: Engine, loopback: LoopbackServer
):
    loopback.script(Fault(status=400), path=CHAT)
    chunks, result = await _consume(sqlite_service.stream("Nope", provider="openai"))
    assert chunks == []
    assert result.status == "failed"
    assert loopback.count(CHAT) == 1
    [row] = calls(sqlite_engine)
    assert row.metadata_json["final_attempt"] is True


async def test_stream_abandoned_by_the_reader_is_recorded(
    sqlite_service: InferenceService, sqlite_engine: Engine
):
    prompt = "A long answer that the reader stops reading after the first chunk"
    async with contextlib.aclosing(sqlite_service.stream(prompt, provider="openai")) as stream:
        async for first in stream:
            assert isinstance(first, str)
            break

    [row] = calls(sqlite_engine)
    assert row.status == "cancelled"
    assert row.metadata_json["partial_text"] == first
    assert reply_text(prompt).startswith(first)


# --- unknown models are remembered ------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_an_unknown_model_fails_fast_until_the_memory_expires(
    sqlite_engine: Engine, loopback: LoopbackServer, fake_sleep: FakeSleep
):
    clock = FakeClock()
    memory = ModelMemory(ttl_s=600, clock=clock)
    svc = InferenceService(
        CallRecorder(sqlite_engine),
        providers=ProviderPool(factory(loopback), models=memory),
        retry=RetryPolicy(max_attempts=4),
        sleep=fake_sleep,
    )
    model = "deployed-later"
    try:
        first = await svc.run("Hello", provider="openai", model=model)
        second = await svc.run("Hello again", provider="openai", model=model)
        _, streamed = await _consume(svc.stream("Stream it", provider="openai", model=model))
        assert loopback.count(CHAT) == 1  # only the first was sent

        # The deployment is created; until the memory expires it is still not asked.
        loopback.models.append(model)
        clock.now += 599
        still = await svc.run("Not yet", provider="openai", model=model)
        clock.now += 1
        later = await svc.run("Now it exists", provider="openai", model=model)
    finally:
        await svc.aclose()
        with contextlib.suppress(ValueError):
            loopback.models.remove(model)  # the server outlives this test

    assert isinstance(first.error, ModelNotFoundError)
    assert "deployed-later" in str(first.error)
    for result in (second, streamed, still):
        assert result.status == "failed" and isinstance(result.error, ModelNotFoundError)
        assert result.error.message == first.error.message  # the same clear error
    assert later.ok and later.text == reply_text("Now it exists")
    assert loopback.count(CHAT) == 2
    assert fake_sleep.waits == []  # a 404 is never retried

    rows = calls(sqlite_engine)
    assert [r.status for r in rows] == ["failed"] * 4 + ["success"]
    assert [r.id for r in rows[:4]] == [
        first.call_id,
        second.call_id,
        streamed.call_id,
        still.call_id,
    ]
    assert "remembered" not in rows[0].error_json
    for row in rows[1:4]:
        assert row.error_json["remembered"] is True
        assert row.error_json["status_code"] == 404
        assert row.error_json["message"] == rows[0].error_json["message"]
        assert "remembered as unknown" in row.error_json["detail"]
        assert row.metadata_json["final_attempt"] is True
        assert row.latency_ms is None
    assert "asked again in 600 s" in rows[1].error_json["detail"]
    assert "asked again in 1 s" in rows[3].error_json["detail"]


def test_the_memory_is_bounded():
    clock = FakeClock()
    memory = ModelMemory(ttl_s=600, max_entries=3, clock=clock)
    error = ModelNotFoundError("not found (404)", provider="openai", status_code=404)
    for index in range(5):
        memory.learn(("openai", None, f"m{index}", "chat"), error)
    assert len(memory) == 3
    assert memory.unknown(("openai", None, "m0", "chat")) is None  # the oldest went first
    assert memory.unknown(("openai", None, "m4", "chat")) is not None
    clock.now += 600
    assert memory.unknown(("openai", None, "m4", "chat")) is None
    assert len(memory) == 2


async def test_services_built_separately_share_what_they_learnt(
    sqlite_engine: Engine, loopback: LoopbackServer
):
    """Two browser sessions build their own services: one 404 serves both."""
    settings = Settings(
        _env_file=None,
        database_url=str(sqlite_engine.url),
        openai_api_key="k",
        openai_base_url=loopback.openai_base_url,
    )
    model = "no-such-model-for-sessions"
    first = build_services(settings, migrate_first=False)
    second = build_services(settings, migrate_first=False)
    try:
        asked = await first.inference.run("Hi", provider="openai", model=model)
        told = await second.inference.run("Hi", provider="openai", model=model)
    finally:
        await first.aclose()
        await second.aclose()
        MODEL_MEMORY.forget()
    assert loopback.count(CHAT) == 1
    assert isinstance(asked.error, ModelNotFoundError)
    assert isinstance(told.error, ModelNotFoundError)
    assert told.error.to_json()["remembered"] is True
    assert [r.status for r in calls(sqlite_engine)] == ["failed", "failed"]


# --- groups ------------------------------------------------------------------------------


async def test_every_attempt_joins_the_group_with_its_role(
    sqlite_service: InferenceService, sqlite_engine: Engine, loopback: LoopbackServer
):
    with UnitOfWork(sqlite_engine) as uow:
        group_id = uow.groups.create("experiment", "retries").id
        uow.commit()
    loopback.script(Fault(status=503), path=CHAT)

    result = await sqlite_service.run("Grouped", provider="openai", group_id=group_id, position=7)

    assert result.ok
    with UnitOfWork(sqlite_engine) as uow:
        members = list(
            uow.session.scalars(select(GroupMember).where(GroupMember.group_id == group_id))
        )
    assert sorted((m.call_id, m.role, m.position) for m in members) == [
        (result.call_ids[0], "retry", 7),
        (result.call_ids[1], "final", 7),
    ]


def test_pricing_knows_the_model_used_here():
    # The cost assertion above is only meaningful if the model has a price.
    assert PricingTable().cost_usd(MODEL, 1_000_000, 0) == pytest.approx(0.15)
