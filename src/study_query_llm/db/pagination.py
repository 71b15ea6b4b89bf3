"""Keyset pagination on (created_at, id), newest first.

A page never skips or repeats a row, even when many rows share one `created_at`,
because the id breaks ties and the next page starts strictly after the last row seen.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, literal, tuple_
from sqlalchemy.orm import InstrumentedAttribute, Session

from study_query_llm.db.column_types import IdType, UTCDateTime, as_utc
from study_query_llm.db.errors import InvalidCursorError

T = TypeVar("T")

MAX_PAGE_SIZE = 10_000


@dataclass(frozen=True)
class Cursor:
    """Where the next page starts: after the row with this (created_at, id)."""

    created_at: datetime
    id: int

    def encode(self) -> str:
        """An opaque URL-safe token for this cursor."""
        raw = json.dumps([as_utc(self.created_at).isoformat(), self.id])
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        """The cursor behind a token from `encode()`; anything else is `InvalidCursorError`."""
        try:
            padded = token + "=" * (-len(token) % 4)
            created_at, row_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
            if not isinstance(row_id, int) or isinstance(row_id, bool):
                raise TypeError("id is not an integer")
            return cls(as_utc(datetime.fromisoformat(created_at)), row_id)
        except (ValueError, TypeError, binascii.Error) as exc:
            raise InvalidCursorError(f"not a pagination cursor: {token[:40]!r}") from exc

    @classmethod
    def coerce(cls, value: Cursor | str | None) -> Cursor | None:
        """Accept a cursor, its token, or None."""
        if value is None or isinstance(value, Cursor):
            return value
        return cls.decode(value)


@dataclass(frozen=True)
class Page(Generic[T]):
    """Rows of one page, newest first, and the cursor of the next page (None at the end)."""

    rows: list[T]
    next_cursor: Cursor | None


def keyset_page(
    session: Session,
    stmt: Select[Any],
    created_at: InstrumentedAttribute[datetime],
    row_id: InstrumentedAttribute[int],
    *,
    limit: int,
    after: Cursor | str | None,
) -> Page[Any]:
    """Run `stmt` (selecting one mapped entity) as one keyset page ordered newest first."""
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE_SIZE}, got {limit}")
    cursor = Cursor.coerce(after)
    if cursor is not None:
        # A row-value comparison: both databases walk the (created_at, id) index with it.
        stmt = stmt.where(
            tuple_(created_at, row_id)
            < tuple_(literal(cursor.created_at, UTCDateTime()), literal(cursor.id, IdType))
        )
    stmt = stmt.order_by(created_at.desc(), row_id.desc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    if len(rows) <= limit:
        return Page(rows, None)
    rows = rows[:limit]
    last = rows[-1]
    return Page(rows, Cursor(getattr(last, created_at.key), getattr(last, row_id.key)))
