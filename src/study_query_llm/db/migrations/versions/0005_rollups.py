"""Hourly rollups of raw_calls for the dashboard, and deferrable search indexing.

- call_rollup: one row per (UTC hour, provider, model, modality, status) with counts and
  sums (calls, non-null counts and sums of latency and tokens, cost) and the cell's
  latencies, sorted, as little-endian float64 bytes (`latencies`, current when
  `latencies_count` = `latency_count`). Counts and sums are kept in step in the
  inserting transaction: PostgreSQL by a statement-level INSERT trigger on raw_calls;
  SQLite by a row-level INSERT trigger, which the repository's bulk path bypasses (it
  adds a whole batch with one statement). The sorted latencies are written by the bulk
  path; existing rows are rolled up here.
- rollup_state: one row with a random token naming this database (cache keys).
- bulk_insert_ranges: ids being inserted by the bulk path in the current transaction;
  SQLite's per-row triggers (search index and rollups) skip them. Always empty outside
  such a transaction.
- raw_calls loses its (status, created_at) and (modality, created_at) indexes: the
  aggregates they served now come from call_rollup, and every index costs each insert.
- search_backlog: id ranges of calls whose search text a bulk insert chose not to index
  yet; search scans them, `search_index.catch_up` indexes them. SQLite's FTS5 index
  writes bigger segments and merges them less often (see `FTS_HASH_BYTES`). PostgreSQL's search
  trigger skips the rows of a transaction that sets ``sqllm.defer_search_index``.

Revision ID: 0005_rollups
Revises: 0004_legacy_import
Create Date: 2025-01-05
"""

import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa
from alembic import op

revision: str = "0005_rollups"
down_revision: str | Sequence[str] | None = "0004_legacy_import"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
KEYS = ("bucket", "provider", "model", "modality", "status")
# (column, aggregate over the inserted rows): the measures of one rollup cell.
MEASURES = (
    ("calls", "count(*)"),
    ("latency_count", "count(latency_ms)"),
    ("latency_sum", "coalesce(sum(latency_ms), 0.0)"),
    ("prompt_tokens_count", "count(prompt_tokens)"),
    ("prompt_tokens_sum", "coalesce(sum(prompt_tokens), 0)"),
    ("completion_tokens_count", "count(completion_tokens)"),
    ("completion_tokens_sum", "coalesce(sum(completion_tokens), 0)"),
    ("total_tokens_count", "count(total_tokens)"),
    ("total_tokens_sum", "coalesce(sum(total_tokens), 0)"),
    ("cost_sum", "coalesce(sum(cost_usd), 0.0)"),
)
# The UTC hour of created_at, as stored by each database.
PG_BUCKET = "date_trunc('hour', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
SQLITE_BUCKET = "substr(created_at, 1, 13) || ':00:00.000000'"
SQLITE_SKIP_BULK = (
    "NOT EXISTS (SELECT 1 FROM bulk_insert_ranges WHERE new.id BETWEEN first_id AND last_id)"
)


def _upsert(source: str, bucket: str, table: str = "call_rollup") -> str:
    """INSERT the rollup of `source`'s rows, adding to cells that exist (keys in order,
    so concurrent inserters lock cells in the same order)."""
    columns = ", ".join([*KEYS, *(name for name, _ in MEASURES)])
    aggregates = ", ".join(expr for _, expr in MEASURES)
    updates = ", ".join(f"{name} = cell.{name} + excluded.{name}" for name, _ in MEASURES)
    return (
        f"INSERT INTO {table} AS cell ({columns}) "
        f"SELECT {bucket}, provider, model, modality, status, {aggregates} FROM {source} "
        "WHERE true GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5 "
        f"ON CONFLICT ({', '.join(KEYS)}) DO UPDATE SET {updates}"
    )


def upgrade() -> None:
    bind = op.get_bind()
    postgres = bind.dialect.name == "postgresql"
    op.create_table(
        "call_rollup",
        sa.Column("id", ID, nullable=False),
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
        sa.Column("provider", sa.String(100), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("modality", sa.String(20), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        *(
            sa.Column(
                name,
                sa.Float() if name.endswith("_sum") and "tokens" not in name else sa.BigInteger(),
                nullable=False,
            )
            for name, _ in MEASURES
        ),
        sa.Column("latencies", sa.LargeBinary(), nullable=True),
        sa.Column("latencies_count", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_call_rollup"),
        sa.UniqueConstraint(*KEYS, name="uq_call_rollup_bucket_provider_model_modality_status"),
    )
    op.create_index(
        "ix_call_rollup_provider_model_bucket", "call_rollup", ["provider", "model", "bucket"]
    )
    op.create_table(
        "rollup_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rollup_state"),
    )
    op.create_table(
        "bulk_insert_ranges",
        sa.Column("first_id", ID, autoincrement=False, nullable=False),
        sa.Column("last_id", ID, nullable=False),
        sa.PrimaryKeyConstraint("first_id", name="pk_bulk_insert_ranges"),
    )
    op.create_table(
        "search_backlog",
        sa.Column("id", ID, nullable=False),
        sa.Column("first_call_id", ID, nullable=False),
        sa.Column("last_call_id", ID, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name="pk_search_backlog"),
    )
    op.create_index("ix_search_backlog_first_call_id", "search_backlog", ["first_call_id"])
    if postgres:
        # SQLAlchemy's PostgreSQL LargeBinary is bytea: store it uncompressed, so a
        # reader fetching many cells pays no decompression.
        op.execute("ALTER TABLE call_rollup ALTER COLUMN latencies SET STORAGE EXTERNAL")
    bind.execute(
        sa.text("INSERT INTO rollup_state (id, instance) VALUES (1, :token)"),
        {"token": uuid.uuid4().hex},
    )

    op.drop_index("ix_raw_calls_status_created_at", table_name="raw_calls")
    op.drop_index("ix_raw_calls_modality_created_at", table_name="raw_calls")

    # Roll up what is there already, then switch the triggers on.
    bucket = PG_BUCKET if postgres else SQLITE_BUCKET
    op.execute(_upsert("raw_calls", bucket))
    _backfill_latencies(bind)
    if postgres:
        _postgres_triggers(bind)
    else:
        _sqlite_triggers()
        _fts_settings(automerge=8, hashsize=FTS_HASH_BYTES)


# SQLite FTS5 keeps up to `hashsize` bytes of new index entries in memory before writing a
# segment, and merges segments when `automerge` of them share a level. The defaults (1 MB,
# 4) make a trigram index write and re-merge small segments all the time: indexing a
# 1,000,000-call record ran at ~150 calls/s. With one segment per indexed batch (the
# memory is bounded by the batch: what one transaction indexes) and merges of 8, it ran at
# ~6,000 calls/s (bench/RESULTS.md); queries read at most a few more segments per term.
FTS_HASH_BYTES = 256 * 1024 * 1024


def _fts_settings(*, automerge: int, hashsize: int) -> None:
    for name, value in (("automerge", automerge), ("hashsize", hashsize)):
        op.execute(
            f"INSERT INTO raw_calls_fts(raw_calls_fts, rank) VALUES ('{name}', {int(value)})"
        )


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        schema = _schema(bind)
        op.execute("DROP TRIGGER IF EXISTS raw_calls_rollup_insert ON raw_calls")
        op.execute(f"DROP FUNCTION IF EXISTS {schema}.sqllm_rollup_calls()")
        _postgres_index_function(schema, deferrable=False)
    else:
        _fts_settings(automerge=4, hashsize=1024 * 1024)  # FTS5's defaults
        op.execute("DROP TRIGGER IF EXISTS raw_calls_rollup_insert")
        op.execute("DROP TRIGGER IF EXISTS raw_calls_fts_insert")
        op.execute(
            "CREATE TRIGGER raw_calls_fts_insert AFTER INSERT ON raw_calls BEGIN "
            "INSERT INTO raw_calls_fts(rowid, prompt_text, response_text) "
            "SELECT id, prompt_text, response_text FROM raw_call_search_text "
            "WHERE id = new.id; END"
        )
        # Calls whose indexing was deferred: index them now, as 0004's trigger would have.
        op.execute(
            "INSERT INTO raw_calls_fts(rowid, prompt_text, response_text) "
            "SELECT t.id, t.prompt_text, t.response_text FROM raw_call_search_text AS t "
            "JOIN search_backlog AS b ON t.id BETWEEN b.first_call_id AND b.last_call_id"
        )
    if bind.dialect.name == "postgresql":
        schema = _schema(bind)
        op.execute(
            f"INSERT INTO {schema}.raw_call_search_text (id, prompt_text, response_text) "
            f"SELECT c.id, {schema}.sqllm_prompt_text(c.request_json), "
            f"{schema}.sqllm_response_text(c.response_json) FROM raw_calls AS c "
            "JOIN search_backlog AS b ON c.id BETWEEN b.first_call_id AND b.last_call_id "
            "ON CONFLICT (id) DO NOTHING"
        )
    op.create_index("ix_raw_calls_status_created_at", "raw_calls", ["status", "created_at"])
    op.create_index("ix_raw_calls_modality_created_at", "raw_calls", ["modality", "created_at"])
    op.drop_table("search_backlog")
    op.drop_table("bulk_insert_ranges")
    op.drop_table("rollup_state")
    op.drop_table("call_rollup")


def _schema(bind: sa.Connection) -> str:
    return bind.dialect.identifier_preparer.quote_schema(
        bind.scalar(sa.text("SELECT current_schema()"))
    )


def _sqlite_triggers() -> None:
    # Row by row, for INSERTs that do not come through the bulk path.
    columns = ", ".join([*KEYS, *(name for name, _ in MEASURES)])
    values = ", ".join(
        [
            SQLITE_BUCKET.replace("created_at", "new.created_at"),
            "new.provider",
            "new.model",
            "new.modality",
            "new.status",
            "1",
            "new.latency_ms IS NOT NULL",
            "coalesce(new.latency_ms, 0.0)",
            "new.prompt_tokens IS NOT NULL",
            "coalesce(new.prompt_tokens, 0)",
            "new.completion_tokens IS NOT NULL",
            "coalesce(new.completion_tokens, 0)",
            "new.total_tokens IS NOT NULL",
            "coalesce(new.total_tokens, 0)",
            "coalesce(new.cost_usd, 0.0)",
        ]
    )
    updates = ", ".join(f"{name} = {name} + excluded.{name}" for name, _ in MEASURES)
    op.execute(
        f"CREATE TRIGGER raw_calls_rollup_insert AFTER INSERT ON raw_calls "
        f"WHEN {SQLITE_SKIP_BULK} BEGIN "
        f"INSERT INTO call_rollup ({columns}) VALUES ({values}) "
        f"ON CONFLICT ({', '.join(KEYS)}) DO UPDATE SET {updates}; END"
    )
    op.execute("DROP TRIGGER IF EXISTS raw_calls_fts_insert")
    op.execute(
        "CREATE TRIGGER raw_calls_fts_insert AFTER INSERT ON raw_calls "
        f"WHEN {SQLITE_SKIP_BULK} BEGIN "
        "INSERT INTO raw_calls_fts(rowid, prompt_text, response_text) "
        "SELECT id, prompt_text, response_text FROM raw_call_search_text WHERE id = new.id; "
        "END"
    )


def _postgres_index_function(schema: str, *, deferrable: bool) -> None:
    """(Re)define 0002's search trigger function; `deferrable` lets a transaction that
    sets ``sqllm.defer_search_index`` to ``on`` leave its rows to the backlog."""
    skip = (
        "IF coalesce(current_setting('sqllm.defer_search_index', true), '') = 'on' THEN "
        "RETURN NULL; END IF;"
        if deferrable
        else ""
    )
    op.execute(
        f"""
        CREATE OR REPLACE FUNCTION {schema}.sqllm_index_calls() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            {skip}
            INSERT INTO {schema}.raw_call_search_text (id, prompt_text, response_text)
            SELECT id,
                   {schema}.sqllm_prompt_text(request_json),
                   {schema}.sqllm_response_text(response_json)
              FROM new_calls;
            RETURN NULL;
        END
        $$
        """
    )


def _postgres_triggers(bind: sa.Connection) -> None:
    schema = _schema(bind)
    _postgres_index_function(schema, deferrable=True)
    op.execute(
        f"""
        CREATE FUNCTION {schema}.sqllm_rollup_calls() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            {_upsert("new_calls", PG_BUCKET, table=f"{schema}.call_rollup")};
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER raw_calls_rollup_insert AFTER INSERT ON raw_calls "
        "REFERENCING NEW TABLE AS new_calls "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {schema}.sqllm_rollup_calls()"
    )


def _backfill_latencies(bind: sa.Connection) -> None:
    """Store every cell's sorted latencies, reading raw_calls once in id order."""
    postgres = bind.dialect.name == "postgresql"
    bucket = PG_BUCKET if postgres else SQLITE_BUCKET
    cells: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    last_id = 0
    while True:
        rows = bind.execute(
            sa.text(
                f"SELECT id, {bucket} AS bucket, provider, model, modality, status, latency_ms "
                "FROM raw_calls WHERE id > :last AND latency_ms IS NOT NULL "
                "ORDER BY id LIMIT 100000"
            ),
            {"last": last_id},
        ).all()
        if not rows:
            break
        for row in rows:
            cells[(_bucket_key(row.bucket), *row[2:6])].append(float(row.latency_ms))
        last_id = rows[-1].id
    if not cells:
        return
    ids = {
        (_bucket_key(row.bucket), *row[2:6]): row.id
        for row in bind.execute(
            sa.text("SELECT id, bucket, provider, model, modality, status FROM call_rollup")
        )
    }
    bind.execute(
        sa.text("UPDATE call_rollup SET latencies = :blob, latencies_count = :n WHERE id = :id"),
        [
            {
                "id": ids[key],
                "n": len(values),
                "blob": np.sort(np.asarray(values, dtype="<f8"), kind="stable").tobytes(),
            }
            for key, values in cells.items()
        ],
    )


def _bucket_key(value: Any) -> str:
    """A bucket as comparable text (SQLite gives text, PostgreSQL a datetime)."""
    if isinstance(value, datetime):
        value = value.astimezone(UTC) if value.tzinfo else value
        return value.strftime("%Y-%m-%d %H")
    return str(value)[:13]
