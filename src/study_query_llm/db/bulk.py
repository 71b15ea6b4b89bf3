"""Insert many rows in one batched statement and learn their ids, in input order."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, Table, func, insert, select, text
from sqlalchemy.orm import Session

from study_query_llm.db.base import Base

SQLITE_MAX_VARIABLES = 32_000  # bound values per statement (SQLite allows 32,766)
COPY_FROM_ROWS = 100  # PostgreSQL: batches this big go in with COPY
POSTGRES_MAX_PARAMS = 65_535  # bound values per statement (the protocol's limit)


def insert_rows(
    session: Session,
    model: type[Base],
    rows: Sequence[dict[str, Any]],
    *,
    ids: Sequence[int] | None = None,
) -> list[int]:
    """INSERT `rows` into `model`'s table as a batch; return the new ids in input order.

    The rows go in as one Core ``executemany`` (no ORM unit of work per row): keys a row
    leaves out get the column's Python-side default, so every row carries the same keys
    and the driver sends them as one batch. Pass `ids` (from `allocate_ids`) to insert
    with ids chosen beforehand.

    PostgreSQL: with `ids` and at least `COPY_FROM_ROWS` rows, one ``COPY ... FROM
    STDIN`` (the cheapest way in for the client; it fires the same triggers); fewer
    rows go in as one multi-row INSERT. Without ids, multi-row INSERTs with
    ``RETURNING id`` (SQLAlchemy's "insertmanyvalues", about 1000 rows per statement,
    ids sorted into input order).

    SQLite does not promise the order of RETURNING rows, so ids are always assigned
    here (see `allocate_ids`), and the rows go in as multi-row VALUES statements.
    """
    if not rows:
        return []
    table: Table = model.__table__  # type: ignore[assignment]
    uniform = _with_defaults(table, _by_column(model, rows))
    target: Any = table if uniform is not None else model
    if uniform is None:  # rows that leave out a server-default-only column: the ORM path
        uniform = [dict(row) for row in rows]
    postgres = session.get_bind().dialect.name == "postgresql"
    if ids is None and postgres:
        stmt = insert(target).returning(table.c.id, sort_by_parameter_order=True)
        return list(session.scalars(stmt, uniform))
    if ids is None:
        ids = allocate_ids(session, model, len(rows))
    elif len(ids) != len(rows):
        raise ValueError(f"{len(ids)} ids for {len(rows)} rows")
    for row, row_id in zip(uniform, ids, strict=True):
        row["id"] = row_id
    if target is not table:
        session.execute(insert(target), uniform)
    elif postgres and len(uniform) < COPY_FROM_ROWS:
        # One statement, not psycopg's executemany (an INSERT per row): statement-level
        # triggers then see the whole batch at once, and the rollup trigger locks its cells
        # in key order, so concurrent writers cannot deadlock on them.
        _multirow_values(session, table, uniform, placeholder="%s", max_values=POSTGRES_MAX_PARAMS)
    elif postgres:
        _copy(session, table, uniform)
    else:
        _multirow_values(session, table, uniform, placeholder="?", max_values=SQLITE_MAX_VARIABLES)
    return list(ids)


def allocate_ids(session: Session, model: type[Base], n: int) -> list[int]:
    """`n` new ids for `model`'s table, ascending, for an insert in this transaction.

    PostgreSQL: the next `n` values of the id sequence (in one round trip; another
    session may take values in between, so they need not be consecutive).

    SQLite: consecutive ids counting up from the current maximum. This cannot hand
    out an id twice: the insert that follows takes SQLite's only write lock, and if
    another connection wrote after `max(id)` was read, SQLite refuses the write
    (``SQLITE_BUSY_SNAPSHOT``, a retried transient error) rather than let it through.
    """
    if n <= 0:
        return []
    table: Table = model.__table__  # type: ignore[assignment]
    connection = session.connection()  # plain statements: no ORM work on a hot path
    if connection.dialect.name == "postgresql":
        values = connection.scalars(_NEXT_IDS, {"table": table.name, "n": n})
        return sorted(int(v) for v in values)
    first = int(connection.scalar(_max_id(table)) or 0) + 1
    return list(range(first, first + n))


_NEXT_IDS = text("SELECT nextval(pg_get_serial_sequence(:table, 'id')) FROM generate_series(1, :n)")


@functools.cache
def _max_id(table: Table) -> Select[tuple[int]]:
    """`SELECT coalesce(max(id), 0)` for `table`, built once."""
    return select(func.coalesce(func.max(table.c.id), 0))


def id_ranges(ids: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending `ids` as (first, last) runs of consecutive values."""
    ranges: list[tuple[int, int]] = []
    for value in ids:
        if ranges and value == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], value)
        else:
            ranges.append((value, value))
    return ranges


def _processed(
    session: Session, table: Table, rows: Sequence[dict[str, Any]]
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """(columns, value tuples) of `rows` with each column type's bind processing applied
    (JSON serialised, datetimes in UTC as the type stores them), as the ORM would."""
    dialect = session.get_bind().dialect
    columns = list(rows[0])
    processors = [
        table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in columns
    ]
    # Column by column: one pass per column instead of a generator per row and value.
    values_by_column = []
    for name, process in zip(columns, processors, strict=True):
        column = [row[name] for row in rows]
        if process is not None:
            column = [None if value is None else process(value) for value in column]
        values_by_column.append(column)
    return columns, list(zip(*values_by_column, strict=True))


def _multirow_values(
    session: Session,
    table: Table,
    rows: Sequence[dict[str, Any]],
    *,
    placeholder: str,
    max_values: int,
) -> None:
    """INSERT `rows` (all with the same keys) into `table` with multi-row VALUES statements
    of at most `max_values` bound values each, written here and sent to the driver as they
    are (values bind-processed as the ORM would).

    SQLite opens one statement journal per statement rather than per row (several times
    faster when the table has triggers). The text is not an SQLAlchemy construct because
    compiling one for every row count a batch can have cost more than the insert itself
    (two thirds of the recorder's time on PostgreSQL, where small batches go in this way).
    """
    columns, values = _processed(session, table, rows)
    quote = session.get_bind().dialect.identifier_preparer.quote
    per_statement = max(1, max_values // len(columns))
    head = f"INSERT INTO {quote(table.name)} ({', '.join(quote(c) for c in columns)}) VALUES "
    one = "(" + ", ".join(placeholder for _ in columns) + ")"
    connection = session.connection()
    for start in range(0, len(values), per_statement):
        part = values[start : start + per_statement]
        connection.exec_driver_sql(
            head + ", ".join([one] * len(part)), tuple(v for row in part for v in row)
        )


def _copy(session: Session, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """COPY `rows` (all with the same keys) into `table` on PostgreSQL (psycopg 3).

    COPY goes to the driver directly, so the engine's before/after-execute events are
    fired here by hand: statement logging and timing see it like any other statement.
    """
    columns, values = _processed(session, table, rows)
    quote = session.get_bind().dialect.identifier_preparer.quote
    sql = f"COPY {quote(table.name)} ({', '.join(quote(c) for c in columns)}) FROM STDIN"
    connection = session.connection()
    driver = connection.connection.driver_connection
    with driver.cursor() as cursor:  # type: ignore[union-attr]
        events = connection.dispatch
        events.before_cursor_execute(connection, cursor, sql, (), None, False)
        with cursor.copy(sql) as copy:
            for row in values:
                copy.write_row(row)
        events.after_cursor_execute(connection, cursor, sql, (), None, False)


def _by_column(model: type[Base], rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` keyed by column (a mapped attribute may name its column differently, like
    `InferenceRun.metadata_json` for the column "metadata"); unknown keys are an error."""
    keys = {attr.key: attr.columns[0].key for attr in model.__mapper__.column_attrs}
    if all(k == v for k, v in keys.items()):
        unknown = {k for row in rows for k in row} - set(keys)
        if unknown:
            raise TypeError(f"{model.__name__} has no column {sorted(unknown)[0]!r}")
        return list(rows)
    renamed = []
    for row in rows:
        try:
            renamed.append({keys[k]: v for k, v in row.items()})
        except KeyError as exc:
            raise TypeError(f"{model.__name__} has no column {exc.args[0]!r}") from None
    return renamed


def _with_defaults(table: Table, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Copies of `rows` that all have the same keys, missing ones filled with defaults.

    A key missing from some rows but present in others is filled with the column's
    Python-side default (a constant or a callable such as `utcnow`), or NULL when the
    column has no default at all, exactly what a separate INSERT leaving it out would
    store. Columns no row mentions that have a Python-side default are filled too, as
    the ORM would. None when a row leaves out a column only the server can fill in.
    """
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    for column in table.columns:
        if column.key not in keys and column.default is not None and not column.primary_key:
            keys[column.key] = None
    uniform = []
    for row in rows:
        copy = dict(row)
        if len(copy) != len(keys):
            for key in keys:
                if key in copy:
                    continue
                column = table.columns.get(key)
                if column is not None and column.default is None and column.server_default:
                    return None
                copy[key] = _default(table, key)
        uniform.append(copy)
    return uniform


def _default(table: Table, key: str) -> Any:
    column = table.columns.get(key)
    default = None if column is None else column.default
    if default is None:
        return None
    if default.is_callable:
        return default.arg(None)  # type: ignore[operator, union-attr]
    if default.is_scalar:
        return default.arg  # type: ignore[union-attr]
    return None
