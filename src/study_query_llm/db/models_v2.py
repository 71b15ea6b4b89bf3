"""v2 schema: immutable `raw_calls` plus groups, artifacts and embedding vectors.

Rows of `raw_calls` and `embedding_vectors` are never updated or deleted; database
triggers (created by the migrations) refuse it. Groups and their members stay editable.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column

from study_query_llm.db.base import Base
from study_query_llm.db.column_types import (
    IdType,
    JSONType,
    UTCDateTime,
    VectorType,
    utcnow,
)

MODALITIES = ("chat", "embedding", "completion")
STATUSES = ("success", "failed", "timeout", "cancelled")


def _in(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{v}'" for v in values)
    return f"{column} IN ({quoted})"


class RawCall(Base):
    """One provider call exactly as it happened, success or failure. Append-only."""

    __tablename__ = "raw_calls"
    __table_args__ = (
        CheckConstraint(_in("modality", MODALITIES), name="modality"),
        CheckConstraint(_in("status", STATUSES), name="status"),
        Index("ix_raw_calls_created_at_id", "created_at", "id"),
        Index("ix_raw_calls_provider_model_created_at", "provider", "model", "created_at"),
        Index("ix_raw_calls_request_hash", "request_hash"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    provider: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(200))
    modality: Mapped[str] = mapped_column(String(20), default="chat")
    status: Mapped[str] = mapped_column(String(20))
    request_json: Mapped[dict[str, Any]] = mapped_column(JSONType)
    response_json: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error_json: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    total_tokens: Mapped[int | None] = mapped_column(Integer)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    request_hash: Mapped[str | None] = mapped_column(String(128))
    metadata_json: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime, default=utcnow, server_default=func.now()
    )


class Group(Base):
    """A named set of calls: an experiment, batch, sweep, label or conversation."""

    __tablename__ = "groups"
    __table_args__ = (UniqueConstraint("group_type", "name"),)

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    group_type: Mapped[str] = mapped_column(String(50))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    metadata_json: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime, default=utcnow, server_default=func.now()
    )


class GroupMember(Base):
    """A call's place in a group; `position` counts from 0 in the order calls were added."""

    __tablename__ = "group_members"
    __table_args__ = (
        UniqueConstraint("group_id", "call_id"),
        Index("ix_group_members_group_id_position", "group_id", "position"),
        Index("ix_group_members_call_id", "call_id"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("groups.id", ondelete="CASCADE"))
    call_id: Mapped[int] = mapped_column(ForeignKey("raw_calls.id"))
    position: Mapped[int] = mapped_column(Integer)
    role: Mapped[str | None] = mapped_column(String(50))
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime, default=utcnow, server_default=func.now()
    )


class CallArtifact(Base):
    """A reference to a large or multimodal payload of a call, stored outside the row."""

    __tablename__ = "call_artifacts"
    __table_args__ = (Index("ix_call_artifacts_call_id", "call_id"),)

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    call_id: Mapped[int] = mapped_column(ForeignKey("raw_calls.id"))
    uri: Mapped[str] = mapped_column(Text)
    content_type: Mapped[str | None] = mapped_column(String(200))
    byte_size: Mapped[int | None] = mapped_column(IdType)
    metadata_json: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime, default=utcnow, server_default=func.now()
    )


class EmbeddingVector(Base):
    """One embedding returned by a call. Append-only.

    `input_index` is the position of the input in the call's request (0 for one input),
    so a batched embedding call stores one row per input.
    """

    __tablename__ = "embedding_vectors"
    __table_args__ = (
        UniqueConstraint("call_id", "model", "input_index"),
        Index("ix_embedding_vectors_model_call_id", "model", "call_id"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    call_id: Mapped[int] = mapped_column(ForeignKey("raw_calls.id"))
    model: Mapped[str] = mapped_column(String(200))
    input_index: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    dimension: Mapped[int] = mapped_column(Integer)
    norm: Mapped[float] = mapped_column(Float)
    vector: Mapped[list[float]] = mapped_column(VectorType)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime, default=utcnow, server_default=func.now()
    )


class CallRollup(Base):
    """Aggregates of the calls of one UTC hour and one (provider, model, modality, status).

    Additive measures (counts, sums) are kept in step with `raw_calls` in the inserting
    transaction: by the repository's bulk path, or by insert triggers for any other
    INSERT. `latencies` holds the cell's non-null latencies, sorted ascending, as
    little-endian float64 bytes, for exact percentiles; it is current when
    `latencies_count` equals `latency_count` (the bulk path keeps it so; readers that
    find it behind read the cell's latencies from `raw_calls` instead).
    See `study_query_llm.db.rollups`.
    """

    __tablename__ = "call_rollup"
    __table_args__ = (
        UniqueConstraint("bucket", "provider", "model", "modality", "status"),
        Index("ix_call_rollup_provider_model_bucket", "provider", "model", "bucket"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    bucket: Mapped[datetime] = mapped_column(UTCDateTime)
    provider: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(200))
    modality: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20))
    calls: Mapped[int] = mapped_column(BigInteger)
    latency_count: Mapped[int] = mapped_column(BigInteger)
    latency_sum: Mapped[float] = mapped_column(Float)
    prompt_tokens_count: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens_sum: Mapped[int] = mapped_column(BigInteger)
    completion_tokens_count: Mapped[int] = mapped_column(BigInteger)
    completion_tokens_sum: Mapped[int] = mapped_column(BigInteger)
    total_tokens_count: Mapped[int] = mapped_column(BigInteger)
    total_tokens_sum: Mapped[int] = mapped_column(BigInteger)
    cost_sum: Mapped[float] = mapped_column(Float)
    latencies: Mapped[bytes | None] = mapped_column(LargeBinary)
    latencies_count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class RollupState(Base):
    """One row: a random token naming this database, so cached rollup cells of one
    database are never taken for another's (see `study_query_llm.db.rollups`)."""

    __tablename__ = "rollup_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance: Mapped[str] = mapped_column(String(64))


class BulkInsertRange(Base):
    """Ids of `raw_calls` rows being inserted by the bulk path, inside its transaction.

    SQLite's per-row insert triggers (search index, rollups) skip these rows because
    the bulk path does the same work once per batch; the row is deleted before the
    transaction commits, so the table is empty whenever nothing is being inserted.
    """

    __tablename__ = "bulk_insert_ranges"

    first_id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=False)
    last_id: Mapped[int] = mapped_column(IdType)


class SearchBacklog(Base):
    """Ids of `raw_calls` rows whose search text is not indexed yet (deferred by a bulk
    insert). Search still finds them, by a scan; `search_index.catch_up` indexes them and
    deletes the range. See `study_query_llm.db.search_index`."""

    __tablename__ = "search_backlog"
    __table_args__ = (Index("ix_search_backlog_first_call_id", "first_call_id"),)

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    first_call_id: Mapped[int] = mapped_column(IdType)
    last_call_id: Mapped[int] = mapped_column(IdType)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime, default=utcnow, server_default=func.now()
    )
