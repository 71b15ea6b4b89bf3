"""ConversationService: multi-turn history sent in order, kept in the record, resumed after
a restart, cleared without losing calls. Real HTTP (loopback) and real databases."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import Engine, func, select

from study_query_llm.config import Settings
from study_query_llm.db.connection import UnitOfWork, dispose_engine, get_engine
from study_query_llm.db.models_v2 import RawCall
from study_query_llm.providers import BaseLLMProvider, create
from study_query_llm.services.conversation import ConversationService
from study_query_llm.services.inference import InferenceService
from study_query_llm.services.recorder import CallRecorder
from study_query_llm.testing.server import Fault, LoopbackServer, reply_text

MODEL = "gpt-4o-mini"
CHAT = "/chat/completions"
SYSTEM = "You are a terse assistant."


class FakeSleep:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def build_services(engine: Engine, loopback: LoopbackServer) -> ConversationService:
    settings = Settings(_env_file=None)

    def providers(provider_id: str) -> BaseLLMProvider:
        if provider_id == "openai":
            return create(
                "openai",
                settings,
                api_key="k",
                base_url=loopback.openai_base_url,
                model=MODEL,
                timeout_s=10,
            )
        raise KeyError(provider_id)

    inference = InferenceService(CallRecorder(engine), providers=providers, sleep=FakeSleep())
    return ConversationService(engine, inference)


def call_count(engine: Engine) -> int:
    with UnitOfWork(engine) as uow:
        return uow.session.scalar(select(func.count()).select_from(RawCall))


def chat_messages(loopback: LoopbackServer) -> list[list[dict]]:
    return [r.json["messages"] for r in loopback.requests if r.path.endswith(CHAT)]


@pytest.fixture
async def conversations(engine: Engine, loopback: LoopbackServer):
    service = build_services(engine, loopback)
    yield service
    await service.inference.aclose()


def expected_history(turns: list[str]) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}]
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        messages.append({"role": "assistant", "content": reply_text(turn)})
    return messages


async def test_turns_carry_the_whole_history_and_resume_after_restart(
    db_url: str, loopback: LoopbackServer
):
    engine = get_engine(db_url)
    service = build_services(engine, loopback)
    conversation = await service.start(provider="openai", model=MODEL, system_prompt=SYSTEM)
    turns = ["What is a cat?", "And a dog?", "Which is older?"]
    for turn in turns:
        result = await service.send(conversation.id, turn)
        assert result.ok and result.text == reply_text(turn)
    await service.inference.aclose()

    sent = chat_messages(loopback)
    assert sent[0] == [*expected_history([])[:1], {"role": "user", "content": turns[0]}]
    assert sent[2] == [*expected_history(turns[:2]), {"role": "user", "content": turns[2]}]
    assert await service.history(conversation.id) == expected_history(turns)

    # A restart: new engine, recorder and services; only the database is shared.
    dispose_engine(db_url)
    engine = get_engine(db_url)
    restarted = build_services(engine, loopback)
    try:
        assert await restarted.history(conversation.id) == expected_history(turns)
        [listed] = [c for c in await restarted.list() if c.id == conversation.id]
        assert (listed.system_prompt, listed.provider, listed.model) == (SYSTEM, "openai", MODEL)
        result = await restarted.send(conversation.id, "Tell me more")
    finally:
        await restarted.inference.aclose()
    assert result.ok
    assert chat_messages(loopback)[-1] == [
        *expected_history(turns),
        {"role": "user", "content": "Tell me more"},
    ]
    assert await restarted.history(conversation.id) == expected_history([*turns, "Tell me more"])


async def test_clear_empties_history_but_keeps_the_calls(
    conversations: ConversationService, engine: Engine, loopback: LoopbackServer
):
    conversation = await conversations.start(provider="openai", system_prompt=SYSTEM)
    await conversations.send(conversation.id, "One")
    await conversations.send(conversation.id, "Two")
    assert call_count(engine) == 2

    removed = await conversations.clear(conversation.id)

    assert removed == 2
    assert await conversations.history(conversation.id) == expected_history([])
    assert call_count(engine) == 2
    await conversations.send(conversation.id, "Fresh start")
    assert chat_messages(loopback)[-1] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Fresh start"},
    ]


async def test_conversation_without_system_prompt(
    conversations: ConversationService, loopback: LoopbackServer
):
    conversation = await conversations.start(provider="openai", model=MODEL)
    await conversations.send(conversation.id, "Hi")
    await conversations.send(conversation.id, "Again")
    assert chat_messages(loopback)[-1] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": reply_text("Hi")},
        {"role": "user", "content": "Again"},
    ]


async def test_conversations_are_kept_apart(
    conversations: ConversationService, loopback: LoopbackServer
):
    first = await conversations.start(provider="openai", system_prompt="first", name="a")
    second = await conversations.start(provider="openai", system_prompt="second", name="b")
    await conversations.send(first.id, "to first")
    await conversations.send(second.id, "to second")
    await conversations.send(first.id, "first again")
    assert chat_messages(loopback)[-1] == [
        {"role": "system", "content": "first"},
        {"role": "user", "content": "to first"},
        {"role": "assistant", "content": reply_text("to first")},
        {"role": "user", "content": "first again"},
    ]
    assert {c.name for c in await conversations.list()} >= {"a", "b"}


async def test_retried_turn_appears_once_and_failed_turn_not_at_all(
    conversations: ConversationService, engine: Engine, loopback: LoopbackServer
):
    conversation = await conversations.start(provider="openai", system_prompt=SYSTEM)
    loopback.script(Fault(status=503), path=CHAT)
    retried = await conversations.send(conversation.id, "Retried turn")
    assert retried.ok and len(retried.call_ids) == 2
    loopback.script(Fault(status=400), path=CHAT)
    failed = await conversations.send(conversation.id, "Failed turn")
    assert failed.status == "failed"

    assert await conversations.history(conversation.id) == expected_history(["Retried turn"])
    await conversations.send(conversation.id, "Next")
    assert chat_messages(loopback)[-1] == [
        *expected_history(["Retried turn"]),
        {"role": "user", "content": "Next"},
    ]
    assert call_count(engine) == 4  # every attempt is recorded: 2 + 1 + 1


async def test_unknown_conversation_is_a_lookup_error(
    conversations: ConversationService, engine: Engine, loopback: LoopbackServer
):
    with pytest.raises(LookupError):
        await conversations.send(987654, "hello")
    with pytest.raises(LookupError):
        await conversations.history(987654)
    with pytest.raises(LookupError):
        await conversations.clear(987654)
    with UnitOfWork(engine) as uow:  # a group that is not a conversation
        batch_id = uow.groups.create("batch", "not a conversation").id
        uow.commit()
    with pytest.raises(LookupError):
        await conversations.send(batch_id, "hello")
    assert loopback.count(CHAT) == 0


@pytest.mark.parametrize("text", ["", "   \n\t "])
async def test_empty_message_is_refused(
    conversations: ConversationService, loopback: LoopbackServer, text: str
):
    conversation = await conversations.start(provider="openai")
    with pytest.raises(ValueError, match="empty"):
        await conversations.send(conversation.id, text)
    assert loopback.count(CHAT) == 0


async def test_conversations_started_at_once_get_distinct_names(
    conversations: ConversationService,
):
    started = await asyncio.gather(
        *[conversations.start(provider="openai", system_prompt=str(i)) for i in range(10)]
    )
    assert len({c.id for c in started}) == 10
    assert len({c.name for c in started}) == 10


async def test_unknown_provider_fails_at_start(conversations: ConversationService):
    with pytest.raises(KeyError):
        await conversations.start(provider="nope")
