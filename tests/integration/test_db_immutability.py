"""The database itself refuses to change or remove recorded calls and embeddings."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import Engine, delete, text, update
from sqlalchemy.exc import DBAPIError

from study_query_llm.db.connection import UnitOfWork, is_transient_error
from study_query_llm.db.models_v2 import EmbeddingVector, RawCall
from study_query_llm.db.records import NewCall


@pytest.fixture
def recorded(engine: Engine, make_call: Callable[..., NewCall]) -> tuple[int, int]:
    """(call id, embedding vector id) of one committed call with one vector."""
    with UnitOfWork(engine) as uow:
        call_id = uow.calls.add(make_call(prompt="original", modality="embedding"))
        vector_id = uow.embeddings.add(call_id, "embed-1", [0.6, 0.8])
        uow.commit()
    return call_id, vector_id


STATEMENTS = {
    "sql update call": "UPDATE raw_calls SET model = 'changed'",
    "sql delete call": "DELETE FROM raw_calls",
    "sql update vector": "UPDATE embedding_vectors SET norm = 0",
    "sql delete vector": "DELETE FROM embedding_vectors",
}


@pytest.mark.parametrize("sql", STATEMENTS.values(), ids=STATEMENTS.keys())
def test_update_and_delete_are_refused(engine: Engine, recorded: tuple[int, int], sql: str) -> None:
    with UnitOfWork(engine) as uow, pytest.raises(DBAPIError, match="append-only") as info:
        uow.session.execute(text(sql))
    assert not is_transient_error(info.value)  # a refusal is never retried
    _assert_untouched(engine, recorded)


def test_core_and_orm_changes_are_refused(engine: Engine, recorded: tuple[int, int]) -> None:
    call_id, vector_id = recorded
    attempts = [
        lambda uow: uow.session.execute(update(RawCall).values(status="failed")),
        lambda uow: uow.session.execute(delete(EmbeddingVector)),
        lambda uow: setattr(uow.calls.get(call_id), "request_json", {"prompt": "edited"}),
        lambda uow: uow.session.delete(uow.calls.get(call_id)),
        lambda uow: setattr(uow.embeddings.get(vector_id), "vector", [1.0, 0.0]),
    ]
    for attempt in attempts:
        with UnitOfWork(engine) as uow, pytest.raises(DBAPIError, match="append-only"):
            attempt(uow)
            uow.commit()
    _assert_untouched(engine, recorded)


def test_groups_stay_editable(engine: Engine, recorded: tuple[int, int]) -> None:
    call_id, _ = recorded
    with UnitOfWork(engine) as uow:
        group = uow.groups.create("label", "editable")
        uow.groups.add_members(group.id, [call_id])
        uow.session.execute(text("UPDATE groups SET description = 'changed'"))
        uow.session.execute(text("DELETE FROM group_members"))
        uow.session.execute(text("DELETE FROM groups"))
        uow.commit()
    _assert_untouched(engine, recorded)


@pytest.mark.postgres
def test_truncate_is_refused_on_postgres(pg_db_url: str, make_call: Callable[..., NewCall]) -> None:
    from study_query_llm.db.connection import get_engine

    engine = get_engine(pg_db_url)
    with UnitOfWork(engine) as uow:
        uow.calls.add(make_call())
        uow.commit()
    for table in ("raw_calls", "embedding_vectors"):
        with UnitOfWork(engine) as uow, pytest.raises(DBAPIError, match="append-only"):
            uow.session.execute(text(f"TRUNCATE {table} CASCADE"))
    with UnitOfWork(engine) as uow:
        assert uow.calls.count() == 1


def _assert_untouched(engine: Engine, recorded: tuple[int, int]) -> None:
    call_id, vector_id = recorded
    with UnitOfWork(engine) as uow:
        call = uow.calls.get(call_id)
        vector = uow.embeddings.get(vector_id)
        assert call is not None and vector is not None
        assert (call.model, call.status, call.request_json) == (
            "mock-1",
            "success",
            {"messages": [{"role": "user", "content": "original"}]},
        )
        assert (vector.vector, vector.norm) == ([0.6, 0.8], pytest.approx(1.0))
