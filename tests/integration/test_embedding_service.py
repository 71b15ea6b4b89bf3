"""EmbeddingService: the deterministic cache, batching, retries and the record.

The `openai` provider talks to the loopback server through the real SDK; the server's
request counter tells whether a provider request was made. The mock provider and, when
installed, the local MiniLM model go through the same service.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from sqlalchemy import Engine, event, select
from sqlalchemy import text as sql

from study_query_llm.config import Settings
from study_query_llm.db import migrate
from study_query_llm.db.connection import UnitOfWork, get_engine
from study_query_llm.db.models_v2 import EmbeddingVector, GroupMember, RawCall
from study_query_llm.providers import (
    BadRequestError,
    BaseLLMProvider,
    ModelNotFoundError,
    create,
    local_minilm,
)
from study_query_llm.services._common import MODEL_MEMORY, ProviderPool
from study_query_llm.services.context import build_services
from study_query_llm.services.embedding import EmbeddingService, embedding_hash
from study_query_llm.services.inference import RetryPolicy
from study_query_llm.testing.server import Fault, LoopbackServer, count_tokens, embedding_vector

MODEL = "text-embedding-3-small"
EMB = "/v1/embeddings"


class FakeSleep:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def factory(loopback: LoopbackServer):
    settings = Settings(_env_file=None)

    def build(provider_id: str) -> BaseLLMProvider:
        if provider_id == "openai":
            return create(
                "openai",
                settings,
                api_key="k",
                base_url=loopback.openai_base_url,
                model="gpt-4o-mini",
                timeout_s=10,
            )
        if provider_id == "mock":
            return create("mock", settings, latency_ms=0)
        if provider_id == "local-minilm":
            return create("local-minilm", settings)
        raise KeyError(provider_id)

    return build


def calls(engine: Engine) -> list[RawCall]:
    with UnitOfWork(engine) as uow:
        return list(uow.session.scalars(select(RawCall).order_by(RawCall.id)))


def vectors(engine: Engine) -> list[EmbeddingVector]:
    with UnitOfWork(engine) as uow:
        return list(uow.session.scalars(select(EmbeddingVector).order_by(EmbeddingVector.id)))


def sent_inputs(loopback: LoopbackServer) -> list[list[str]]:
    return [r.json["input"] for r in loopback.requests if r.path.endswith("/embeddings")]


@pytest.fixture
def fake_sleep() -> FakeSleep:
    return FakeSleep()


def _service(engine: Engine, loopback: LoopbackServer, sleep: FakeSleep, **kw) -> EmbeddingService:
    return EmbeddingService(engine, providers=factory(loopback), sleep=sleep, **kw)


@pytest.fixture
async def service(engine: Engine, loopback: LoopbackServer, fake_sleep: FakeSleep):
    svc = _service(engine, loopback, fake_sleep)
    yield svc
    await svc.aclose()


@pytest.fixture
def sqlite_engine(tmp_path) -> Engine:
    url = f"sqlite:///{tmp_path / 'embeddings.db'}"
    migrate.upgrade(url)
    return get_engine(url)


@pytest.fixture
async def sqlite_service(sqlite_engine: Engine, loopback: LoopbackServer, fake_sleep: FakeSleep):
    svc = _service(sqlite_engine, loopback, fake_sleep)
    yield svc
    await svc.aclose()


# --- the cache ---------------------------------------------------------------------------


async def test_second_call_is_answered_from_the_record(
    service: EmbeddingService, engine: Engine, loopback: LoopbackServer
):
    texts = ["alpha beta", "gamma"]

    first = await service.embed(texts, provider="openai", model=MODEL)

    assert loopback.count(EMB) == 1
    assert sent_inputs(loopback) == [texts]
    assert [r.text for r in first] == texts
    assert not any(r.cached for r in first)
    for result, text in zip(first, texts, strict=True):
        assert result.vector == pytest.approx(embedding_vector(text))
    rows = calls(engine)
    assert [r.id for r in rows] == [r.call_id for r in first]
    for row, text in zip(rows, texts, strict=True):
        assert (row.provider, row.model, row.modality, row.status) == (
            "openai",
            MODEL,
            "embedding",
            "success",
        )
        assert row.request_json["input"] == text
        assert row.request_hash == embedding_hash("openai", MODEL, text)
    stored = vectors(engine)
    assert [v.call_id for v in stored] == [r.call_id for r in first]
    assert all(v.dimension == 16 and v.model == MODEL for v in stored)
    assert all(math.isclose(v.norm, 1.0, rel_tol=1e-5) for v in stored)

    second = await service.embed(texts, provider="openai", model=MODEL)

    assert loopback.count(EMB) == 1  # no provider request
    assert all(r.cached for r in second)
    assert [r.call_id for r in second] == [r.call_id for r in first]
    for a, b in zip(first, second, strict=True):
        assert b.vector == pytest.approx(a.vector)
    assert len(calls(engine)) == 2  # a cache hit records nothing new


async def test_the_cache_survives_a_new_service(
    sqlite_engine: Engine, loopback: LoopbackServer, fake_sleep: FakeSleep
):
    first = _service(sqlite_engine, loopback, fake_sleep)
    await first.embed(["persisted"], provider="openai", model=MODEL)
    await first.aclose()
    second = _service(sqlite_engine, loopback, fake_sleep)
    try:
        [result] = await second.embed(["persisted"], provider="openai", model=MODEL)
    finally:
        await second.aclose()
    assert result.cached
    assert loopback.count(EMB) == 1
    assert second.provider_calls == 0


def _explain(engine: Engine, statement: str, parameters: Any) -> str:
    """The database's plan for a statement exactly as the driver was given it."""
    prefix = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(prefix + statement, parameters).all()
    return "\n".join(" ".join(str(part) for part in row) for row in rows)


async def test_cache_lookups_use_the_request_hash_index(service: EmbeddingService, engine: Engine):
    """The lookup the service runs is planned as an index search, not a scan of recent rows."""
    texts = [f"cached text {i}" for i in range(3000)]
    await service.embed(texts, provider="mock", model="mock-embed", batch_size=500)
    with engine.begin() as conn:
        conn.execute(sql("ANALYZE"))  # planner statistics for a table of this size

    lookups: list[tuple[str, Any]] = []

    def capture(_conn, _cursor, statement, parameters, _context, _executemany) -> None:
        if "embedding_vectors" in statement and "request_hash IN" in statement:
            lookups.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        hits = await service.embed(texts[:3], provider="mock", model="mock-embed")
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert all(hit.cached for hit in hits)
    [(statement, parameters)] = lookups

    plan = _explain(engine, statement, parameters)
    assert "ix_raw_calls_request_hash" in plan, plan
    if engine.dialect.name == "sqlite":
        # SEARCH is an index lookup; "SCAN raw_calls" would read every row.
        assert "SCAN raw_calls" not in plan and "SCAN embedding_vectors" not in plan, plan
    else:
        assert "Seq Scan" not in plan, plan


async def test_mixed_batch_only_sends_the_missing_texts(
    sqlite_service: EmbeddingService, loopback: LoopbackServer
):
    await sqlite_service.embed(["a one", "b two"], provider="openai", model=MODEL)

    results = await sqlite_service.embed(
        ["a one", "c three", "b two", "d four"], provider="openai", model=MODEL
    )

    assert sent_inputs(loopback) == [["a one", "b two"], ["c three", "d four"]]
    assert [r.text for r in results] == ["a one", "c three", "b two", "d four"]
    assert [r.cached for r in results] == [True, False, True, False]
    for result in results:
        assert result.vector == pytest.approx(embedding_vector(result.text))


async def test_whitespace_variants_hit_the_cache(
    sqlite_service: EmbeddingService, loopback: LoopbackServer
):
    [first] = await sqlite_service.embed(["hello world"], provider="openai", model=MODEL)
    [again] = await sqlite_service.embed(["  hello \n\t world  "], provider="openai", model=MODEL)
    assert again.cached and again.call_id == first.call_id
    assert again.text == "  hello \n\t world  "
    assert loopback.count(EMB) == 1


async def test_duplicates_in_one_call_are_sent_once(
    sqlite_service: EmbeddingService, sqlite_engine: Engine, loopback: LoopbackServer
):
    results = await sqlite_service.embed(["same", "other", "same"], provider="openai", model=MODEL)
    assert sent_inputs(loopback) == [["same", "other"]]
    assert results[0].call_id == results[2].call_id != results[1].call_id
    assert len(calls(sqlite_engine)) == 2


async def test_dimensions_and_model_are_part_of_the_cache_key(
    sqlite_service: EmbeddingService, loopback: LoopbackServer
):
    await sqlite_service.embed(["keyed"], provider="openai", model=MODEL)
    [small] = await sqlite_service.embed(["keyed"], provider="openai", model=MODEL, dimensions=8)
    [other] = await sqlite_service.embed(["keyed"], provider="openai", model="gpt-4o")
    assert not small.cached and len(small.vector) == 8
    assert not other.cached
    assert loopback.count(EMB) == 3
    assert loopback.requests[1].json["dimensions"] == 8
    [again] = await sqlite_service.embed(["keyed"], provider="openai", model=MODEL, dimensions=8)
    assert again.cached and again.vector == pytest.approx(small.vector)
    assert loopback.count(EMB) == 3


# --- batching and tokens -----------------------------------------------------------------


async def test_batches_follow_batch_size(
    sqlite_service: EmbeddingService, loopback: LoopbackServer
):
    texts = [f"text {i}" for i in range(5)]
    results = await sqlite_service.embed(texts, provider="openai", model=MODEL, batch_size=2)
    assert [len(batch) for batch in sent_inputs(loopback)] == [2, 2, 1]
    assert [r.text for r in results] == texts
    assert sqlite_service.provider_calls == 3


async def test_token_shares_add_up_to_the_provider_usage(
    service: EmbeddingService, engine: Engine, loopback: LoopbackServer
):
    texts = ["one two three", "four", "five, six and seven!", "x"]

    await service.embed(texts, provider="openai", model=MODEL)

    usage = sum(count_tokens(t) for t in texts)  # what the server reported for the request
    rows = calls(engine)
    assert sum(r.prompt_tokens for r in rows) == usage
    assert sum(r.total_tokens for r in rows) == usage
    assert all(r.metadata_json["batch_prompt_tokens"] == usage for r in rows)
    assert len({r.metadata_json["batch_request"] for r in rows}) == 1
    assert sum(r.cost_usd for r in rows) == pytest.approx(usage * 0.02 / 1_000_000)


async def test_members_join_the_group(sqlite_service: EmbeddingService, sqlite_engine: Engine):
    with UnitOfWork(sqlite_engine) as uow:
        group_id = uow.groups.create("experiment", "embedded").id
        uow.commit()
    results = await sqlite_service.embed(
        ["g1", "g2"], provider="openai", model=MODEL, group_id=group_id
    )
    with UnitOfWork(sqlite_engine) as uow:
        members = list(
            uow.session.scalars(
                select(GroupMember)
                .where(GroupMember.group_id == group_id)
                .order_by(GroupMember.position)
            )
        )
    assert [m.call_id for m in members] == [r.call_id for r in results]


async def test_empty_text_is_refused_before_any_request(
    sqlite_service: EmbeddingService, loopback: LoopbackServer
):
    with pytest.raises(ValueError, match="text 2 is empty"):
        await sqlite_service.embed(["fine", "   "], provider="openai", model=MODEL)
    assert loopback.count(EMB) == 0
    assert await sqlite_service.embed([], provider="openai", model=MODEL) == []


# --- failures ----------------------------------------------------------------------------


async def test_unknown_model_is_remembered(
    sqlite_service: EmbeddingService, sqlite_engine: Engine, loopback: LoopbackServer
):
    with pytest.raises(ModelNotFoundError):
        await sqlite_service.embed(["probe"], provider="openai", model="no-such-model")
    assert loopback.count(EMB) == 1
    [row] = calls(sqlite_engine)
    assert row.status == "failed" and row.error_json["status_code"] == 404

    with pytest.raises(ModelNotFoundError):
        await sqlite_service.embed(["other text"], provider="openai", model="no-such-model")
    with pytest.raises(ModelNotFoundError):
        await sqlite_service.validate("openai", "no-such-model")
    assert loopback.count(EMB) == 1


async def test_validate_probes_once(sqlite_service: EmbeddingService, loopback: LoopbackServer):
    await sqlite_service.validate("openai", MODEL)
    await sqlite_service.validate("openai", MODEL)
    assert loopback.count(EMB) == 1


async def test_services_sharing_a_pool_probe_once(
    sqlite_engine: Engine, loopback: LoopbackServer, fake_sleep: FakeSleep
):
    pool = ProviderPool(factory(loopback))
    first = EmbeddingService(sqlite_engine, providers=pool, sleep=fake_sleep)
    second = EmbeddingService(sqlite_engine, providers=pool, sleep=fake_sleep)
    try:
        await first.validate("openai", MODEL)
        await second.validate("openai", MODEL)
        with pytest.raises(ModelNotFoundError):
            await first.validate("openai", "no-such-embedder")
        with pytest.raises(ModelNotFoundError) as remembered:
            await second.validate("openai", "no-such-embedder")
    finally:
        await pool.aclose()
    assert loopback.count(EMB) == 2  # one probe per model
    assert remembered.value.to_json()["remembered"] is True
    assert second.provider_calls == 0


async def test_sessions_built_separately_probe_once(
    sqlite_engine: Engine, loopback: LoopbackServer
):
    """Each browser session builds its own services; the process probes a model once."""
    settings = Settings(
        _env_file=None,
        database_url=str(sqlite_engine.url),
        openai_api_key="k",
        openai_base_url=loopback.openai_base_url,
    )
    sessions = [build_services(settings, migrate_first=False) for _ in range(2)]
    try:
        for services in sessions:
            await services.embeddings.validate("openai", MODEL)
        for services in sessions:
            with pytest.raises(ModelNotFoundError):
                await services.embeddings.validate("openai", "no-such-session-embedder")
    finally:
        for services in sessions:
            await services.aclose()
        MODEL_MEMORY.forget()
    assert loopback.count(EMB) == 2
    assert [r.status for r in calls(sqlite_engine)] == ["success", "failed"]


async def test_transient_error_is_retried(
    service: EmbeddingService, engine: Engine, loopback: LoopbackServer, fake_sleep: FakeSleep
):
    loopback.script(Fault(status=503), path=EMB)

    results = await service.embed(["r1", "r2"], provider="openai", model=MODEL)

    assert loopback.count(EMB) == 2
    assert len(fake_sleep.waits) == 1
    assert not any(r.cached for r in results)
    rows = calls(engine)
    assert [(r.status, r.metadata_json["attempt"]) for r in rows] == [
        ("failed", 1),
        ("failed", 1),
        ("success", 2),
        ("success", 2),
    ]
    assert all(r.metadata_json["final_attempt"] is False for r in rows[:2])
    assert all(r.error_json["status_code"] == 503 for r in rows[:2])
    assert [r.call_id for r in results] == [rows[2].id, rows[3].id]


async def test_retry_after_is_honoured(
    sqlite_service: EmbeddingService, loopback: LoopbackServer, fake_sleep: FakeSleep
):
    loopback.script(Fault(status=429, retry_after=4), path=EMB)
    await sqlite_service.embed(["wait for it"], provider="openai", model=MODEL)
    assert fake_sleep.waits == [4.0]


async def test_exhausted_retries_raise_and_record_every_attempt(
    sqlite_engine: Engine, loopback: LoopbackServer, fake_sleep: FakeSleep
):
    svc = _service(sqlite_engine, loopback, fake_sleep, retry=RetryPolicy(max_attempts=2))
    loopback.script(Fault(status=500), Fault(status=500), path=EMB)
    try:
        with pytest.raises(Exception, match="500"):
            await svc.embed(["never"], provider="openai", model=MODEL)
    finally:
        await svc.aclose()
    rows = calls(sqlite_engine)
    assert [r.metadata_json["final_attempt"] for r in rows] == [False, True]
    assert vectors(sqlite_engine) == []


async def test_permanent_error_is_recorded_as_failed(
    service: EmbeddingService, engine: Engine, loopback: LoopbackServer, fake_sleep: FakeSleep
):
    loopback.script(Fault(status=400), path=EMB)

    with pytest.raises(BadRequestError):
        await service.embed(["p1", "p2"], provider="openai", model=MODEL)

    assert loopback.count(EMB) == 1
    assert fake_sleep.waits == []
    rows = calls(engine)
    assert [r.request_json["input"] for r in rows] == ["p1", "p2"]
    for row in rows:
        assert row.status == "failed" and row.modality == "embedding"
        assert row.error_json["status_code"] == 400
        assert row.metadata_json["final_attempt"] is True
    assert vectors(engine) == []

    # A failure is not a cache entry: the next call asks the provider again.
    results = await service.embed(["p1", "p2"], provider="openai", model=MODEL)
    assert loopback.count(EMB) == 2
    assert not any(r.cached for r in results)


async def test_total_time_limit_stops_retrying(
    sqlite_engine: Engine, loopback: LoopbackServer, fake_sleep: FakeSleep
):
    svc = _service(
        sqlite_engine, loopback, fake_sleep, retry=RetryPolicy(max_attempts=5, max_total_s=0)
    )
    loopback.script(Fault(status=503), path=EMB)
    try:
        with pytest.raises(Exception, match="503"):
            await svc.embed(["out of time"], provider="openai", model=MODEL)
    finally:
        await svc.aclose()
    assert loopback.count(EMB) == 1
    assert fake_sleep.waits == []
    [row] = calls(sqlite_engine)
    assert row.metadata_json["final_attempt"] is True


async def test_nul_characters_are_stored_sanitised(
    service: EmbeddingService, engine: Engine, loopback: LoopbackServer
):
    [result] = await service.embed(["before\x00after"], provider="openai", model=MODEL)

    assert result.vector == pytest.approx(embedding_vector("before\x00after"))
    [row] = calls(engine)
    assert row.request_json["input"] == "before\ufffdafter"
    assert row.metadata_json["sanitised"] is True
    [again] = await service.embed(["before\x00after"], provider="openai", model=MODEL)
    assert again.cached and loopback.count(EMB) == 1


async def test_nul_in_a_failed_request_is_stored_sanitised(
    service: EmbeddingService, engine: Engine, loopback: LoopbackServer
):
    loopback.script(Fault(status=400), path=EMB)
    with pytest.raises(BadRequestError):
        await service.embed(["bad\x00input"], provider="openai", model=MODEL)
    [row] = calls(engine)
    assert row.status == "failed"
    assert row.request_json["input"] == "bad\ufffdinput"


# --- other providers ---------------------------------------------------------------------


async def test_mock_provider_embeds_and_caches(
    sqlite_service: EmbeddingService, sqlite_engine: Engine
):
    first = await sqlite_service.embed(["mock a", "mock b"], provider="mock", model="mock-embed")
    assert sqlite_service.provider_calls == 1
    assert all(len(r.vector) == 32 for r in first)
    assert first[0].vector != first[1].vector
    second = await sqlite_service.embed(["mock a", "mock b"], provider="mock", model="mock-embed")
    assert sqlite_service.provider_calls == 1
    assert all(r.cached for r in second)
    for a, b in zip(first, second, strict=True):
        assert b.vector == pytest.approx(a.vector)
    assert {r.provider for r in calls(sqlite_engine)} == {"mock"}


@pytest.mark.skipif(
    local_minilm.unavailable_reason() is not None,
    reason=str(local_minilm.unavailable_reason()),
)
async def test_local_minilm_embeds_offline_and_caches(
    sqlite_service: EmbeddingService, sqlite_engine: Engine, loopback: LoopbackServer
):
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Bond yields rose."]

    first = await sqlite_service.embed(texts, provider="local-minilm", model=local_minilm.MODEL_ID)

    assert all(len(r.vector) == local_minilm.DIMENSION for r in first)

    def cosine(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    assert cosine(first[0].vector, first[1].vector) > cosine(first[0].vector, first[2].vector)
    stored = vectors(sqlite_engine)
    assert [v.dimension for v in stored] == [local_minilm.DIMENSION] * 3
    second = await sqlite_service.embed(texts, provider="local-minilm", model=local_minilm.MODEL_ID)
    assert all(r.cached for r in second)
    assert sqlite_service.provider_calls == 1
    assert loopback.request_count == 0  # nothing went over the network
