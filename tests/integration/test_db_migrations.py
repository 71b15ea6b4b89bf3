"""Migrations: one head, idempotent upgrades, a round trip with rows, schema == models."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from study_query_llm.db import migrate
from study_query_llm.db.base import Base
from study_query_llm.db.connection import UnitOfWork, dispose_engine, get_engine
from study_query_llm.db.filters import RunFilters
from study_query_llm.db.records import NewCall, NewRun

V1 = "0001_v1_schema"
V2_TABLES = {"raw_calls", "groups", "group_members", "call_artifacts", "embedding_vectors"}


def _tables(url: str) -> set[str]:
    with get_engine(url).connect() as conn:
        return set(inspect(conn).get_table_names())


def _add_rows(url: str, make_call: Callable[..., NewCall]) -> tuple[list[int], list[int]]:
    with UnitOfWork(get_engine(url)) as uow:
        run_ids = uow.runs.add_many(
            [NewRun(prompt=f"p{i}", response=f"r{i}", provider="mock") for i in range(3)]
        )
        call_ids = uow.calls.add_many([make_call(prompt=f"kept {i}") for i in range(3)])
        group = uow.groups.create("experiment", "round-trip")
        uow.groups.add_members(group.id, call_ids)
        uow.commit()
    return run_ids, call_ids


def test_migrations_have_exactly_one_head() -> None:
    assert len(migrate.heads()) == 1
    assert migrate.head() == migrate.heads()[0]


def test_upgrade_builds_schema_and_is_a_no_op_when_current(
    empty_db_url: str, make_call: Callable[..., NewCall]
) -> None:
    assert migrate.current(empty_db_url) is None
    migrate.upgrade(empty_db_url)
    assert migrate.current(empty_db_url) == migrate.head()
    assert {"inference_runs", *V2_TABLES} <= _tables(empty_db_url)

    run_ids, call_ids = _add_rows(empty_db_url, make_call)
    migrate.upgrade(empty_db_url)  # already at head: nothing happens, nothing is lost

    assert migrate.current(empty_db_url) == migrate.head()
    with UnitOfWork(get_engine(empty_db_url)) as uow:
        assert [uow.calls.get(i).request_json for i in call_ids] == [
            make_call(prompt=f"kept {i}").request_json for i in range(3)
        ]
        assert uow.runs.get(run_ids[0]).prompt == "p0"
        assert uow.calls.search("kept")  # the search index survived too


def test_upgrade_downgrade_upgrade_with_rows_present(
    empty_db_url: str, make_call: Callable[..., NewCall]
) -> None:
    migrate.upgrade(empty_db_url)
    run_ids, _ = _add_rows(empty_db_url, make_call)

    migrate.downgrade(empty_db_url, V1)
    assert migrate.current(empty_db_url) == V1
    assert not V2_TABLES & _tables(empty_db_url)
    with UnitOfWork(get_engine(empty_db_url)) as uow:
        assert len(uow.runs.query(RunFilters()).rows) == 3  # v1 rows untouched

    migrate.upgrade(empty_db_url)
    assert migrate.current(empty_db_url) == migrate.head()
    with UnitOfWork(get_engine(empty_db_url)) as uow:
        assert [r.id for r in uow.runs.query().rows] == sorted(run_ids, reverse=True)
        call_id = uow.calls.add(make_call(prompt="after the round trip"))
        uow.commit()
    with UnitOfWork(get_engine(empty_db_url)) as uow:
        assert [h.call_id for h in uow.calls.search("round trip")] == [call_id]
        with pytest.raises(Exception, match="append-only"):
            uow.session.execute(text("DELETE FROM raw_calls"))

    migrate.downgrade(empty_db_url, "base")
    assert migrate.current(empty_db_url) is None
    assert not ({"inference_runs"} | V2_TABLES) & _tables(empty_db_url)
    migrate.upgrade(empty_db_url)
    assert migrate.current(empty_db_url) == migrate.head()


def test_migrated_schema_matches_the_models(db_url: str) -> None:
    """Autogenerate finds nothing to do: the shipped migrations build exactly the models."""
    migrate.load_models()
    with get_engine(db_url).connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"include_object": migrate.include_object, "compare_type": True}
        )
        diffs = compare_metadata(context, Base.metadata)
    assert diffs == [], "models and migrations differ; write a migration for:\n" + "\n".join(
        repr(d) for d in diffs
    )


def test_created_at_round_trips_as_aware_utc(
    db_url: str, make_call: Callable[..., NewCall]
) -> None:
    moment = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    with UnitOfWork(get_engine(db_url)) as uow:
        call_id = uow.calls.add(make_call(created_at=moment))
        uow.commit()
    with UnitOfWork(get_engine(db_url)) as uow:
        assert uow.calls.get(call_id).created_at == moment
        assert uow.calls.get(call_id).created_at.tzinfo is not None


@pytest.mark.postgres
def test_postgres_vectors_are_json_plus_pgvector_when_available(pg_db_url: str) -> None:
    with get_engine(pg_db_url).connect() as conn:
        has_pgvector = conn.scalar(
            text("SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'")
        )
        columns = dict(
            conn.execute(
                text(
                    "SELECT column_name, udt_name FROM information_schema.columns "
                    "WHERE table_name = 'embedding_vectors' AND column_name IN "
                    "('vector', 'embedding')"
                )
            ).all()
        )
        trgm_indexes = conn.scalars(
            text("SELECT indexname FROM pg_indexes WHERE indexname LIKE '%trgm'")
        ).all()
    expected = {"vector": "jsonb", "embedding": "vector"} if has_pgvector else {"vector": "jsonb"}
    assert columns == expected
    assert sorted(trgm_indexes) == [
        "ix_raw_call_search_text_prompt_text_trgm",
        "ix_raw_call_search_text_response_text_trgm",
    ]


def test_sqlite_search_index_writes_big_segments(tmp_path) -> None:
    """FTS5 is set to buffer a whole indexed batch and merge 8 segments at a time (its
    defaults made bulk indexing ~40x slower); a downgrade restores the defaults."""
    url = f"sqlite:///{tmp_path / 'fts.db'}"
    migrate.upgrade(url)

    def settings() -> dict[str, int]:
        with get_engine(url).connect() as conn:
            rows = conn.exec_driver_sql("SELECT k, v FROM raw_calls_fts_config").all()
        return {k: v for k, v in rows if k in ("automerge", "hashsize")}

    assert settings() == {"automerge": 8, "hashsize": 256 * 1024 * 1024}
    migrate.downgrade(url, "0004_legacy_import")
    assert settings() == {"automerge": 4, "hashsize": 1024 * 1024}
    dispose_engine(url)
