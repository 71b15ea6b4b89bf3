"""InferenceRepository: the v1 inference_runs table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from study_query_llm.db.connection import UnitOfWork
from study_query_llm.db.filters import RunFilters
from study_query_llm.db.records import NewRun

T0 = datetime(2024, 2, 1, tzinfo=UTC)


def test_add_get_and_query_runs(engine: Engine) -> None:
    with UnitOfWork(engine) as uow:
        first = uow.runs.add(
            {
                "prompt": "Hi",
                "response": "Hello",
                "provider": "openai",
                "model": "gpt",
                "tokens": 12,
                "latency_ms": 230.5,
                "metadata": {"temperature": 0.7},
                "batch_id": "b1",
                "created_at": T0,
            }
        )
        more = uow.runs.add_many(
            [
                NewRun(
                    prompt=f"p{i}",
                    provider="anthropic" if i % 2 else "openai",
                    batch_id="b2",
                    created_at=T0 + timedelta(minutes=i),
                )
                for i in range(1, 26)
            ]
        )
        uow.commit()
    assert len(more) == 25 and first not in more

    with UnitOfWork(engine) as uow:
        run = uow.runs.get(first)
        assert (run.prompt, run.response, run.tokens, run.latency_ms) == ("Hi", "Hello", 12, 230.5)
        assert run.metadata_json == {"temperature": 0.7}
        assert run.created_at == T0

        assert [r.id for r in uow.runs.query(RunFilters(batch_id="b1")).rows] == [first]
        anthropic = uow.runs.query(RunFilters(providers=("anthropic",)), limit=100).rows
        assert len(anthropic) == 13
        window = uow.runs.query(
            RunFilters(start=T0 + timedelta(minutes=5), end=T0 + timedelta(minutes=8))
        )
        assert [r.prompt for r in window.rows] == ["p7", "p6", "p5"]

        seen: list[int] = []
        page = uow.runs.query(limit=10)
        while True:
            seen += [r.id for r in page.rows]
            if page.next_cursor is None:
                break
            page = uow.runs.query(limit=10, after=page.next_cursor)
        assert seen == sorted([first, *more], reverse=True)
