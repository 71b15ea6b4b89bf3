"""Column types that behave the same on SQLite and PostgreSQL.

- `JSONType`: JSON on SQLite, JSONB on PostgreSQL; Python ``None`` is SQL NULL.
- `UTCDateTime`: always returns timezone-aware UTC datetimes (SQLite stores naive text).
- `VectorType`: a float list stored as JSON (plus a generated pgvector column where the
  server has pgvector); reads back as ``list[float]``.
- `IdType`: BIGINT on PostgreSQL, INTEGER (the rowid alias) on SQLite.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Dialect, Integer
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator, TypeEngine

JSONType = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
IdType = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """`value` in UTC; a naive datetime is taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """``TIMESTAMP WITH TIME ZONE`` that reads back tz-aware UTC on every database.

    Values are converted to UTC before they are stored (naive values are taken as UTC).
    SQLite keeps them as naive ISO text, which sorts and compares correctly because
    every value is UTC and formatted the same way.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = as_utc(value)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return as_utc(value)


class VectorType(TypeDecorator[list[float]]):
    """A float vector stored as a JSON list (JSONB on PostgreSQL); reads back floats.

    The column is JSON on every database, so the model works the same everywhere. Where
    the server has pgvector, the migration adds a generated ``embedding vector`` column
    computed from it, for similarity search in SQL.
    """

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(JSON())

    def process_bind_param(self, value: Sequence[float] | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        values = [float(x) for x in value]
        if not all(math.isfinite(x) for x in values):
            raise ValueError("a vector must not contain NaN or infinity")
        return values

    def process_result_value(self, value: Any, dialect: Dialect) -> list[float] | None:
        if value is None:
            return None
        if isinstance(value, str | bytes):
            value = json.loads(value)
        return [float(x) for x in value]
