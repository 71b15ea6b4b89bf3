"""Insert many rows in one batched statement and learn their ids, in input order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from study_query_llm.db.base import Base


def insert_rows(session: Session, model: type[Base], rows: Sequence[dict[str, Any]]) -> list[int]:
    """INSERT `rows` into `model`'s table as a batch; return the new ids in input order.

    PostgreSQL: multi-row ``INSERT ... RETURNING id`` (SQLAlchemy's "insertmanyvalues",
    about 1000 rows per statement), with the ids sorted back into input order.

    SQLite does not promise the order of RETURNING rows, so SQLAlchemy would fall back
    to one INSERT per row. Instead the ids are assigned here, counting up from the
    current maximum, and the rows go in with one ``executemany``. This cannot hand out
    an id twice: once this transaction writes it holds SQLite's only write lock, and if
    another connection wrote after `max(id)` was read, SQLite refuses the write
    (``SQLITE_BUSY_SNAPSHOT``, a retried transient error) rather than let it through.
    """
    if not rows:
        return []
    table_id = model.__mapper__.primary_key[0]
    if session.get_bind().dialect.name == "sqlite":
        first = int(session.scalar(select(func.coalesce(func.max(table_id), 0))) or 0) + 1
        ids = list(range(first, first + len(rows)))
        session.execute(insert(model), [{**row, "id": i} for row, i in zip(rows, ids, strict=True)])
        return ids
    stmt = insert(model).returning(table_id, sort_by_parameter_order=True)
    return list(session.scalars(stmt, rows))
