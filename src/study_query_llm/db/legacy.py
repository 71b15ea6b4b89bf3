"""Read a legacy (v1) database's `inference_runs` table, read-only and in bounded chunks.

```python
with LegacyDatabase("sqlite:///old/app.db") as legacy:
    for ids in legacy.id_chunks(2000):          # keyset by id: memory stays flat
        rows = legacy.rows_by_id(ids)
```

A SQLite source is opened read-only (a missing file is an error, never a new empty
database); a PostgreSQL source is read in one read-only transaction, so counts and rows
come from one snapshot. Values are normalised the same way for the importer and the
validator: text as `str`, `metadata` parsed from JSON where it is JSON text,
`created_at` as an aware UTC datetime (naive values are taken as UTC).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    create_engine,
    func,
    inspect,
    literal,
    select,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.sql import column, table

from study_query_llm.db.column_types import as_utc
from study_query_llm.db.errors import StorageError
from study_query_llm.db.urls import redact_url

TABLE = "inference_runs"
REQUIRED_COLUMNS = ("id", "prompt", "response", "provider", "created_at")
OPTIONAL_COLUMNS = ("model", "tokens", "latency_ms", "metadata", "batch_id")


class LegacySourceError(StorageError, ValueError):
    """The legacy database cannot be used: missing, unreadable, or without `inference_runs`."""


@dataclass(frozen=True, slots=True)
class LegacyRow:
    """One `inference_runs` row, normalised."""

    id: int
    prompt: str
    response: str | None
    provider: str | None
    model: str | None
    tokens: int | None
    latency_ms: float | None
    metadata: Any
    batch_id: str | None
    created_at: datetime


def database_identity(url: str | URL) -> str:
    """A stable name for the database at `url`, with no user name or password.

    SQLite: ``sqlite:`` and the resolved absolute path of the file. PostgreSQL:
    ``postgresql://host:port/database``. Two URLs for one database give the same name.
    """
    parsed = make_url(url) if isinstance(url, str) else url
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or database.startswith("file::memory:"):
            return "sqlite::memory:"
        return f"sqlite:{Path(database).expanduser().resolve()}"
    host = parsed.host or "localhost"
    port = parsed.port or (5432 if backend == "postgresql" else "")
    return f"{backend}://{host}:{port}/{parsed.database or ''}"


def _one_line(exc: BaseException) -> str:
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _sqlite_engine(url: URL, shown: str) -> Engine:
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        raise LegacySourceError(f"the legacy database must be a SQLite file, got {shown}")
    path = Path(database).expanduser().resolve()
    if not path.exists():
        raise LegacySourceError(f"legacy database not found: {path}")
    if not path.is_file():
        raise LegacySourceError(f"legacy database {path} is not a file")
    if not os.access(path, os.R_OK):
        raise LegacySourceError(f"legacy database {path} is not readable (permission denied)")
    uri = f"{path.as_uri()}?mode=ro"

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(uri, uri=True, check_same_thread=False)

    return create_engine("sqlite://", creator=connect)


def _postgres_engine(url: URL) -> Engine:
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return create_engine(
        url,
        connect_args={"application_name": "study-query-llm legacy import", "connect_timeout": 10},
        execution_options={"isolation_level": "REPEATABLE READ", "postgresql_readonly": True},
    )


def _timestamp(value: Any, row_id: Any) -> datetime:
    if isinstance(value, datetime):
        return as_utc(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            return as_utc(datetime.fromisoformat(value.strip()))
        except ValueError:
            pass
    raise LegacySourceError(f"{TABLE} row {row_id}: created_at {value!r} is not a timestamp")


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _metadata(value: Any) -> Any:
    if isinstance(value, bytes | memoryview):
        value = bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value  # not JSON: kept as the text it is
    return value


def _int(value: Any) -> int | None:
    if value is None or isinstance(value, int):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    if value is None or isinstance(value, float):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class LegacyDatabase:
    """A legacy database holding a v1 `inference_runs` table, open for reading."""

    def __init__(self, url: str) -> None:
        """Connect and check the table; `LegacySourceError` (one line) when that fails."""
        try:
            parsed = make_url(url.replace("postgres://", "postgresql://", 1))
        except sa_exc.ArgumentError:
            raise LegacySourceError(f"not a database URL: {redact_url(url)}") from None
        self.url = parsed
        self.shown = redact_url(url)
        self.identity = database_identity(parsed)
        backend = parsed.get_backend_name()
        if backend == "sqlite":
            self.engine = _sqlite_engine(parsed, self.shown)
        elif backend == "postgresql":
            self.engine = _postgres_engine(parsed)
        else:
            raise LegacySourceError(
                f"unsupported legacy database URL {self.shown}: use sqlite:/// or postgresql://"
            )
        self.dialect = backend
        self._connection: Connection | None = None
        try:
            self._connection = self.engine.connect()
            columns = self._check_table(self._connection)
        except LegacySourceError:
            self.close()
            raise
        except sa_exc.DBAPIError as exc:
            self.close()
            if isinstance(exc.orig, sqlite3.DatabaseError) and "not a database" in str(exc.orig):
                raise LegacySourceError(
                    f"legacy database {self.shown} is not a SQLite database"
                ) from None
            raise LegacySourceError(
                f"cannot read legacy database {self.shown}: {_one_line(exc)}"
            ) from None
        self.columns = columns
        self._table = table(TABLE, *(column(name) for name in columns))
        self.has_raw_calls = "raw_calls" in self._tables

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection and the engine."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self.engine.dispose()

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            raise RuntimeError("the legacy database is closed")
        return self._connection

    def _check_table(self, connection: Connection) -> tuple[str, ...]:
        inspector = inspect(connection)
        self._tables = set(inspector.get_table_names())
        if TABLE not in self._tables:
            found = ", ".join(sorted(self._tables)) or "none"
            raise LegacySourceError(
                f"legacy database {self.shown} has no {TABLE} table (tables: {found})"
            )
        present = {c["name"] for c in inspector.get_columns(TABLE)}
        missing = [name for name in REQUIRED_COLUMNS if name not in present]
        if missing:
            raise LegacySourceError(
                f"{TABLE} in legacy database {self.shown} lacks column(s): {', '.join(missing)}"
            )
        return tuple(n for n in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if n in present)

    # --- reading ---------------------------------------------------------------------------

    def _col(self, name: str) -> ColumnElement[Any]:
        if name in self.columns:
            return self._table.c[name]
        return literal(None).label(name)

    def _batch_key(self) -> ColumnElement[Any]:
        """`batch_id` ordered by code point on both databases (byte order of UTF-8)."""
        batch = self._table.c.batch_id
        return batch.collate("C") if self.dialect == "postgresql" else batch

    def _row_select(self) -> Any:
        names = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)
        return select(*(self._col(n) for n in names)).select_from(self._table)

    def _row(self, values: Sequence[Any]) -> LegacyRow:
        (id_, prompt, response, provider, created_at, model, tokens, latency, meta, batch) = values
        batch_text = _text(batch)
        return LegacyRow(
            id=int(id_),
            prompt=_text(prompt) or "",
            response=_text(response),
            provider=_text(provider),
            model=_text(model),
            tokens=_int(tokens),
            latency_ms=_float(latency),
            metadata=_metadata(meta),
            batch_id=batch_text,
            created_at=_timestamp(created_at, id_),
        )

    def count(self) -> int:
        """How many rows `inference_runs` holds."""
        stmt = select(func.count()).select_from(self._table)
        return int(self.connection.scalar(stmt) or 0)

    def count_batched(self) -> int:
        """How many rows have a `batch_id`."""
        if "batch_id" not in self.columns:
            return 0
        stmt = (
            select(func.count()).select_from(self._table).where(self._table.c.batch_id.is_not(None))
        )
        return int(self.connection.scalar(stmt) or 0)

    def id_range(self) -> tuple[int, int] | None:
        """The smallest and largest row id, or None for an empty table."""
        ids = self._table.c.id
        low, high = self.connection.execute(select(func.min(ids), func.max(ids))).one()
        return None if low is None else (int(low), int(high))

    def time_range(self) -> tuple[datetime, datetime] | None:
        """The earliest and latest `created_at`, or None for an empty table."""
        at = self._table.c.created_at
        low, high = self.connection.execute(select(func.min(at), func.max(at))).one()
        if low is None:
            return None
        return _timestamp(low, "(min)"), _timestamp(high, "(max)")

    def id_chunks(self, size: int) -> Iterator[list[int]]:
        """Every row id in order, `size` at a time (keyset pagination)."""
        ids = self._table.c.id
        last: int | None = None
        while True:
            stmt = select(ids).order_by(ids).limit(size)
            if last is not None:
                stmt = stmt.where(ids > last)
            chunk = [int(i) for i in self.connection.scalars(stmt)]
            if not chunk:
                return
            yield chunk
            last = chunk[-1]

    def rows_by_id(self, row_ids: Sequence[int]) -> dict[int, LegacyRow]:
        """The rows with these ids, by id (unknown ids are left out)."""
        if not row_ids:
            return {}
        stmt = self._row_select().where(self._table.c.id.in_(list(row_ids)))
        return {row.id: row for row in map(self._row, self.connection.execute(stmt))}

    def first_id_at_or_after(self, row_id: int) -> int | None:
        """The smallest row id that is at least `row_id` (for seeded sampling)."""
        ids = self._table.c.id
        return self.connection.scalar(select(func.min(ids)).where(ids >= row_id))

    def batch_entries(self, fetch: int = 5000) -> Iterator[tuple[str, int, datetime]]:
        """(batch_id, row id, created_at) of every batched row, batch by batch.

        Batches come in code-point order of `batch_id`, and rows within a batch in the
        order they were made (created_at, then id). Streamed (a server-side cursor on
        PostgreSQL), so the whole table is never in memory.
        """
        if "batch_id" not in self.columns:
            return
        t = self._table
        stmt = (
            select(t.c.batch_id, t.c.id, t.c.created_at)
            .where(t.c.batch_id.is_not(None))
            .order_by(self._batch_key(), t.c.created_at, t.c.id)
        )
        result = self.connection.execution_options(stream_results=True, yield_per=fetch).execute(
            stmt
        )
        try:
            for batch, row_id, created_at in result:
                yield str(_text(batch)), int(row_id), _timestamp(created_at, row_id)
        finally:
            result.close()

    def batch_sizes(self) -> Iterator[tuple[str, int]]:
        """(batch_id, number of rows) for every batch, in code-point order of batch_id."""
        if "batch_id" not in self.columns:
            return
        t = self._table
        key = self._batch_key()
        stmt = (
            select(t.c.batch_id, func.count())
            .where(t.c.batch_id.is_not(None))
            .group_by(t.c.batch_id)
            .order_by(key)
        )
        result = self.connection.execution_options(stream_results=True, yield_per=5000).execute(
            stmt
        )
        try:
            for batch, size in result:
                yield str(_text(batch)), int(size)
        finally:
            result.close()
