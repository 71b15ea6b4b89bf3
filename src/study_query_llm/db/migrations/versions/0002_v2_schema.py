"""v2 schema: raw_calls (append-only), groups, group_members, call_artifacts,
embedding_vectors, and full-text search over prompt and response text.

- Append-only: triggers refuse UPDATE and DELETE (and TRUNCATE on PostgreSQL) on
  raw_calls and embedding_vectors, with a message saying the table is append-only.
- Search text: the prompt text of a call is every text part of its request's "system",
  "prompt", "messages[*].content" and "input" (each a string, a {"text": ...} object,
  or a list of those), in that order, joined by newlines; the response text is
  response_json.text.
  SQLite: the view raw_call_search_text computes both; the FTS5 table raw_calls_fts
  (trigram tokenizer, external content = that view) is filled by an INSERT trigger.
  PostgreSQL: the functions sqllm_prompt_text(jsonb) and sqllm_response_text(jsonb)
  compute both; a statement-level INSERT trigger on raw_calls stores them in the table
  raw_call_search_text (same name and columns as SQLite's view, plus a generated
  tsvector `document` for ranking), with pg_trgm GIN indexes on both texts for ILIKE
  substring search (when pg_trgm can be installed).
- embedding_vectors.vector is a JSON list of floats on both databases (JSONB on
  PostgreSQL). Where the server has pgvector, embedding_vectors also gets
  `embedding vector GENERATED ALWAYS AS (vector::text::vector) STORED`, the same values
  as a pgvector vector for similarity search in SQL; the application never writes it.

Revision ID: 0002_v2_schema
Revises: 0001_v1_schema
Create Date: 2025-01-01
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_v2_schema"
down_revision: str | Sequence[str] | None = "0001_v1_schema"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
APPEND_ONLY_TABLES = ("raw_calls", "embedding_vectors")
RANK_TEXT_CHARS = 100_000  # PostgreSQL ranks on this much text (tsvector size limit)


def _created_at() -> sa.Column[Any]:
    return sa.Column(
        "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
    )


def _try_create_extension(bind: sa.Connection, name: str) -> bool:
    """CREATE EXTENSION if the server has it and we may; False (and no harm) otherwise."""
    available = bind.scalar(
        sa.text("SELECT count(*) FROM pg_available_extensions WHERE name = :name"),
        {"name": name},
    )
    if not available:
        return False
    try:
        with bind.begin_nested():
            bind.exec_driver_sql(f'CREATE EXTENSION IF NOT EXISTS "{name}"')
    except sa.exc.DBAPIError:  # e.g. not allowed to create extensions on this server
        return False
    return True


def upgrade() -> None:
    bind = op.get_bind()
    postgres = bind.dialect.name == "postgresql"
    op.create_table(
        "raw_calls",
        sa.Column("id", ID, nullable=False),
        sa.Column("provider", sa.String(100), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("modality", sa.String(20), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("request_json", JSON, nullable=False),
        sa.Column("response_json", JSON, nullable=True),
        sa.Column("error_json", JSON, nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("total_tokens", sa.Integer(), nullable=True),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("request_hash", sa.String(128), nullable=True),
        sa.Column("metadata_json", JSON, nullable=True),
        _created_at(),
        sa.CheckConstraint(
            "modality IN ('chat', 'embedding', 'completion')", name="ck_raw_calls_modality"
        ),
        sa.CheckConstraint(
            "status IN ('success', 'failed', 'timeout', 'cancelled')", name="ck_raw_calls_status"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_raw_calls"),
    )
    op.create_index("ix_raw_calls_created_at_id", "raw_calls", ["created_at", "id"])
    op.create_index(
        "ix_raw_calls_provider_model_created_at",
        "raw_calls",
        ["provider", "model", "created_at"],
    )
    op.create_index("ix_raw_calls_status_created_at", "raw_calls", ["status", "created_at"])
    op.create_index("ix_raw_calls_modality_created_at", "raw_calls", ["modality", "created_at"])
    op.create_index("ix_raw_calls_request_hash", "raw_calls", ["request_hash"])

    op.create_table(
        "groups",
        sa.Column("id", ID, nullable=False),
        sa.Column("group_type", sa.String(50), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("metadata_json", JSON, nullable=True),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_groups"),
        sa.UniqueConstraint("group_type", "name", name="uq_groups_group_type_name"),
    )

    op.create_table(
        "group_members",
        sa.Column("id", ID, nullable=False),
        sa.Column("group_id", ID, nullable=False),
        sa.Column("call_id", ID, nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(50), nullable=True),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_group_members"),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["groups.id"],
            name="fk_group_members_group_id_groups",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["call_id"], ["raw_calls.id"], name="fk_group_members_call_id_raw_calls"
        ),
        sa.UniqueConstraint("group_id", "call_id", name="uq_group_members_group_id_call_id"),
    )
    op.create_index("ix_group_members_group_id_position", "group_members", ["group_id", "position"])
    op.create_index("ix_group_members_call_id", "group_members", ["call_id"])

    op.create_table(
        "call_artifacts",
        sa.Column("id", ID, nullable=False),
        sa.Column("call_id", ID, nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("content_type", sa.String(200), nullable=True),
        sa.Column("byte_size", ID, nullable=True),
        sa.Column("metadata_json", JSON, nullable=True),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_call_artifacts"),
        sa.ForeignKeyConstraint(
            ["call_id"], ["raw_calls.id"], name="fk_call_artifacts_call_id_raw_calls"
        ),
    )
    op.create_index("ix_call_artifacts_call_id", "call_artifacts", ["call_id"])

    op.create_table(
        "embedding_vectors",
        sa.Column("id", ID, nullable=False),
        sa.Column("call_id", ID, nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("input_index", sa.Integer(), server_default="0", nullable=False),
        sa.Column("dimension", sa.Integer(), nullable=False),
        sa.Column("norm", sa.Float(), nullable=False),
        sa.Column("vector", JSON, nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_embedding_vectors"),
        sa.ForeignKeyConstraint(
            ["call_id"], ["raw_calls.id"], name="fk_embedding_vectors_call_id_raw_calls"
        ),
        sa.UniqueConstraint(
            "call_id",
            "model",
            "input_index",
            name="uq_embedding_vectors_call_id_model_input_index",
        ),
    )
    op.create_index("ix_embedding_vectors_model_call_id", "embedding_vectors", ["model", "call_id"])

    if postgres:
        _postgres_append_only()
        _postgres_search(bind)
        _postgres_pgvector(bind)
    else:
        _sqlite_append_only()
        _sqlite_search()


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for table in APPEND_ONLY_TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        op.execute("DROP TRIGGER IF EXISTS raw_calls_search_insert ON raw_calls")
        op.execute("DROP TABLE IF EXISTS raw_call_search_text")
    else:
        op.execute("DROP TRIGGER IF EXISTS raw_calls_fts_insert")
        op.execute("DROP TABLE IF EXISTS raw_calls_fts")
        op.execute("DROP VIEW IF EXISTS raw_call_search_text")
        for table in APPEND_ONLY_TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_update")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_delete")
    op.drop_table("embedding_vectors")
    op.drop_table("call_artifacts")
    op.drop_table("group_members")
    op.drop_table("groups")
    op.drop_table("raw_calls")
    if bind.dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS sqllm_index_calls()")
        op.execute("DROP FUNCTION IF EXISTS sqllm_prompt_text(jsonb)")
        op.execute("DROP FUNCTION IF EXISTS sqllm_response_text(jsonb)")
        op.execute("DROP FUNCTION IF EXISTS sqllm_refuse_change()")
    # Extensions (pg_trgm, vector) stay installed: other schemas may use them.


# --- append-only triggers ---------------------------------------------------------------


def _sqlite_append_only() -> None:
    for table in APPEND_ONLY_TABLES:
        for verb, name in (("UPDATE", "no_update"), ("DELETE", "no_delete")):
            op.execute(
                f"CREATE TRIGGER {table}_{name} BEFORE {verb} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {verb} is not allowed'); "
                "END"
            )


def _postgres_append_only() -> None:
    # Default SQLSTATE P0001 (raise_exception): not an "operational" error, so the
    # write-retry logic never mistakes a refusal for a dropped connection.
    op.execute(
        """
        CREATE FUNCTION sqllm_refuse_change() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP;
        END
        $$
        """
    )
    for table in APPEND_ONLY_TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION sqllm_refuse_change()"
        )
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION sqllm_refuse_change()"
        )


# --- search -----------------------------------------------------------------------------

# The text parts of a request field, the same on both databases (PostgreSQL:
# sqllm_prompt_text below): a string is one part; an object is its "text"; a list holds
# strings and {"text": ...} objects. Anything else has no text.
_SQLITE_PART = (
    "CASE p.type WHEN 'text' THEN p.value WHEN 'object' THEN json_extract(p.value, '$.text') END"
)


def _sqlite_as_list(doc: str, path: str) -> str:
    """The JSON value at `path` as a JSON list (a lone string or object becomes [it])."""
    value = f"json_extract({doc}, '{path}')"
    return (
        f"CASE json_type({doc}, '{path}') WHEN 'array' THEN {value} "
        f"WHEN 'object' THEN json_array(json({value})) "
        f"WHEN 'text' THEN json_array({value}) ELSE '[]' END"
    )


# A message that is not an object has no content.
_SQLITE_MESSAGE = "CASE m.type WHEN 'object' THEN m.value ELSE '{}' END"

_SQLITE_PROMPT_TEXT = f"""coalesce((
    SELECT group_concat(part, char(10)) FROM (
        SELECT {_SQLITE_PART} AS part
          FROM json_each({_sqlite_as_list("rc.request_json", "$.system")}) AS p
        UNION ALL
        SELECT {_SQLITE_PART}
          FROM json_each({_sqlite_as_list("rc.request_json", "$.prompt")}) AS p
        UNION ALL
        SELECT {_SQLITE_PART}
          FROM json_each({_sqlite_as_list("rc.request_json", "$.messages")}) AS m,
               json_each({_sqlite_as_list(_SQLITE_MESSAGE, "$.content")}) AS p
        UNION ALL
        SELECT {_SQLITE_PART}
          FROM json_each({_sqlite_as_list("rc.request_json", "$.input")}) AS p
    )
), '')"""

_SQLITE_RESPONSE_TEXT = (
    "coalesce(CASE json_type(rc.response_json, '$.text') "
    "WHEN 'text' THEN json_extract(rc.response_json, '$.text') END, '')"
)


def _sqlite_search() -> None:
    op.execute(
        "CREATE VIEW raw_call_search_text AS "
        f"SELECT rc.id AS id, {_SQLITE_PROMPT_TEXT} AS prompt_text, "
        f"{_SQLITE_RESPONSE_TEXT} AS response_text FROM raw_calls AS rc"
    )
    op.execute(
        "CREATE VIRTUAL TABLE raw_calls_fts USING fts5("
        "prompt_text, response_text, content='raw_call_search_text', content_rowid='id', "
        "tokenize='trigram')"
    )
    # raw_calls never changes or loses rows, so an INSERT trigger keeps the index whole.
    op.execute(
        "CREATE TRIGGER raw_calls_fts_insert AFTER INSERT ON raw_calls BEGIN "
        "INSERT INTO raw_calls_fts(rowid, prompt_text, response_text) "
        "SELECT id, prompt_text, response_text FROM raw_call_search_text WHERE id = new.id; "
        "END"
    )


def _postgres_search(bind: sa.Connection) -> None:
    schema = bind.dialect.identifier_preparer.quote_schema(
        bind.scalar(sa.text("SELECT current_schema()"))
    )
    # Functions call each other schema-qualified, so they work whatever the search_path
    # of the session that inserts.
    # jsonpath in lax mode: "[*]" yields a string itself and each element of a list;
    # a message that is not an object has no .content and yields nothing.
    op.execute(
        f"""
        CREATE FUNCTION {schema}.sqllm_prompt_text(request jsonb) RETURNS text
        LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
            SELECT coalesce(string_agg(
                       CASE jsonb_typeof(e) WHEN 'string' THEN e #>> '{{}}'
                                            WHEN 'object' THEN e ->> 'text' END,
                       E'\\n' ORDER BY k, n), '')
              FROM (
                SELECT 1, n, e FROM jsonb_path_query(request, 'lax $.system[*]')
                       WITH ORDINALITY AS q(e, n)
                UNION ALL
                SELECT 2, n, e FROM jsonb_path_query(request, 'lax $.prompt[*]')
                       WITH ORDINALITY AS q(e, n)
                UNION ALL
                SELECT 3, n, e FROM jsonb_path_query(request, 'lax $.messages[*].content[*]')
                       WITH ORDINALITY AS q(e, n)
                UNION ALL
                SELECT 4, n, e FROM jsonb_path_query(request, 'lax $.input[*]')
                       WITH ORDINALITY AS q(e, n)
              ) AS parts(k, n, e)
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION {schema}.sqllm_response_text(response jsonb) RETURNS text
        LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
            SELECT CASE jsonb_typeof(response -> 'text')
                       WHEN 'string' THEN response ->> 'text' ELSE '' END
        $$
        """
    )
    # The search text of every call, stored once at insert time by a statement-level
    # trigger (one INSERT ... SELECT per INSERT statement, however many rows it has).
    # `document` holds the words for ranking; matching is by substring (pg_trgm).
    op.execute(
        f"""
        CREATE TABLE raw_call_search_text (
            id bigint NOT NULL,
            prompt_text text NOT NULL,
            response_text text NOT NULL,
            document tsvector GENERATED ALWAYS AS (
                to_tsvector('simple'::regconfig,
                            left(prompt_text || ' ' || response_text, {RANK_TEXT_CHARS}))
            ) STORED,
            CONSTRAINT pk_raw_call_search_text PRIMARY KEY (id),
            CONSTRAINT fk_raw_call_search_text_id_raw_calls
                FOREIGN KEY (id) REFERENCES raw_calls (id)
        )
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION {schema}.sqllm_index_calls() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
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
    op.execute(
        "CREATE TRIGGER raw_calls_search_insert AFTER INSERT ON raw_calls "
        "REFERENCING NEW TABLE AS new_calls "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {schema}.sqllm_index_calls()"
    )
    if _try_create_extension(bind, "pg_trgm"):
        for column in ("prompt_text", "response_text"):
            op.execute(
                f"CREATE INDEX ix_raw_call_search_text_{column}_trgm ON raw_call_search_text "
                f"USING gin ({column} gin_trgm_ops)"
            )


# --- pgvector ---------------------------------------------------------------------------


def _postgres_pgvector(bind: sa.Connection) -> None:
    """Add the generated pgvector column, if the server has pgvector and lets us use it."""
    if not _try_create_extension(bind, "vector"):
        return
    try:
        with bind.begin_nested():
            bind.exec_driver_sql(
                "ALTER TABLE embedding_vectors ADD COLUMN embedding vector "
                "GENERATED ALWAYS AS ((vector::text)::vector) STORED"
            )
    except sa.exc.DBAPIError:  # an old pgvector, say: the JSON column is still complete
        return
