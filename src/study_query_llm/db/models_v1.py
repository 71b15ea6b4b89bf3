"""v1 schema: `inference_runs`, the legacy one-row-per-call table kept for compatibility."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Float, Index, Integer, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from study_query_llm.db.base import Base
from study_query_llm.db.column_types import IdType, JSONType, UTCDateTime, utcnow


class InferenceRun(Base):
    """One prompt and its response, as the first version of the app recorded it."""

    __tablename__ = "inference_runs"
    __table_args__ = (
        Index("ix_inference_runs_provider", "provider"),
        Index("ix_inference_runs_created_at", "created_at"),
        Index("ix_inference_runs_batch_id", "batch_id"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    prompt: Mapped[str] = mapped_column(Text)
    response: Mapped[str | None] = mapped_column(Text)
    provider: Mapped[str] = mapped_column(String(100))
    model: Mapped[str | None] = mapped_column(String(200))
    tokens: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    # The column is called "metadata"; the attribute cannot be (SQLAlchemy reserves it).
    metadata_json: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONType)
    batch_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime, default=utcnow, server_default=func.now()
    )
