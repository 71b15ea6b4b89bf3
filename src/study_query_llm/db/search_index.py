"""Deferred search indexing: bulk inserts that leave their search text to a catch-up pass.

Indexing a call's prompt and response text (trigrams) costs far more than storing the
call, so a bulk load can ask to defer it (`RawCallRepository.add_many(...,
defer_search_index=True)`): its id ranges go to `search_backlog` in the same transaction
as the calls, and the database's insert triggers leave those rows alone (SQLite: the
bulk path indexes or defers each batch itself; PostgreSQL: the transaction sets
``sqllm.defer_search_index``). Search stays exact meanwhile: it also scans the backlog's
calls (see `study_query_llm.db.search`). `catch_up` indexes the backlog range by range,
each range in its own transaction that also deletes it, so it can stop and resume at any
point, and several processes can run it at once (PostgreSQL hands out ranges with
``FOR UPDATE SKIP LOCKED``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from sqlalchemy import Engine, delete, func, insert, select, text
from sqlalchemy.orm import Session

from study_query_llm.db.models_v2 import SearchBacklog


def defer(session: Session, ranges: Sequence[tuple[int, int]]) -> None:
    """Record that the calls with ids in `ranges` (first, last) are not indexed yet."""
    if ranges:
        session.execute(
            insert(SearchBacklog),
            [{"first_call_id": first, "last_call_id": last} for first, last in ranges],
        )


_INDEX_POSTGRES = text(
    "INSERT INTO raw_call_search_text (id, prompt_text, response_text) "
    "SELECT id, sqllm_prompt_text(request_json), sqllm_response_text(response_json) "
    "FROM raw_calls WHERE id BETWEEN :first AND :last ON CONFLICT (id) DO NOTHING"
)
_INDEX_SQLITE = text(
    "INSERT INTO raw_calls_fts(rowid, prompt_text, response_text) "
    "SELECT id, prompt_text, response_text FROM raw_call_search_text "
    "WHERE id BETWEEN :first AND :last"
)


def index_range(session: Session, first_id: int, last_id: int) -> None:
    """Index the search text of the calls with ids in [first_id, last_id]."""
    connection = session.connection()
    postgres = connection.dialect.name == "postgresql"
    connection.execute(
        _INDEX_POSTGRES if postgres else _INDEX_SQLITE, {"first": first_id, "last": last_id}
    )


def backlog(session: Session) -> list[tuple[int, int]]:
    """The (first, last) id ranges of calls not indexed yet, oldest first."""
    rows = session.execute(
        select(SearchBacklog.first_call_id, SearchBacklog.last_call_id).order_by(
            SearchBacklog.first_call_id
        )
    )
    return [(int(a), int(b)) for a, b in rows]


def pending(session: Session) -> int:
    """How many calls wait to be indexed."""
    total = session.scalar(
        select(
            func.coalesce(func.sum(SearchBacklog.last_call_id - SearchBacklog.first_call_id + 1), 0)
        )
    )
    return int(total or 0)


def catch_up(
    engine: Engine, *, max_ranges: int | None = None, time_budget_s: float | None = None
) -> int:
    """Index backlog ranges until none is left (or `max_ranges` / `time_budget_s` is
    reached); returns how many calls were indexed. Safe to run in several processes."""
    from study_query_llm.db.connection import UnitOfWork

    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    indexed = done = 0
    while max_ranges is None or done < max_ranges:
        if deadline is not None and time.monotonic() >= deadline:
            break
        with UnitOfWork(engine, write=True) as uow:
            stmt = select(
                SearchBacklog.id, SearchBacklog.first_call_id, SearchBacklog.last_call_id
            ).order_by(SearchBacklog.first_call_id)
            if engine.dialect.name == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True)
            row = uow.session.execute(stmt.limit(1)).first()
            if row is None:
                break
            index_range(uow.session, row.first_call_id, row.last_call_id)
            uow.session.execute(delete(SearchBacklog).where(SearchBacklog.id == row.id))
            uow.commit()
        indexed += row.last_call_id - row.first_call_id + 1
        done += 1
    return indexed
