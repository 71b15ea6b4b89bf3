"""Resumable batch jobs: a job and its planned items, persisted before any call is made.

Items move pending → claimed (by a worker, with a lease) → succeeded | failed. A worker
that dies leaves its items claimed until their lease expires; then any worker may claim
them again. An item's final call id is set in the same transaction that records the call,
so an item can never end with two successful records.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, Integer, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from study_query_llm.db.base import Base
from study_query_llm.db.column_types import IdType, JSONType, UTCDateTime, utcnow

JOB_STATUSES = ("pending", "running", "completed", "cancelled")
ITEM_STATUSES = ("pending", "claimed", "succeeded", "failed", "cancelled")


class BatchJob(Base):
    """One batch: prompts × targets × samples, with its options and its group."""

    __tablename__ = "batch_jobs"
    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'running', 'completed', 'cancelled')", name="status"
        ),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="pending")
    group_id: Mapped[int | None] = mapped_column(ForeignKey("groups.id", ondelete="SET NULL"))
    spec_json: Mapped[dict[str, Any]] = mapped_column(JSONType)
    total_items: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime, default=utcnow, server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime, default=utcnow, server_default=func.now()
    )


class BatchJobItem(Base):
    """One planned call of a job."""

    __tablename__ = "batch_job_items"
    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'claimed', 'succeeded', 'failed', 'cancelled')",
            name="status",
        ),
        Index("ix_batch_job_items_job_id_status_position", "job_id", "status", "position"),
        Index("ix_batch_job_items_job_id_position", "job_id", "position", unique=True),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("batch_jobs.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    provider: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(200))
    sample_index: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    claims: Mapped[int] = mapped_column(Integer, default=0)
    call_id: Mapped[int | None] = mapped_column(ForeignKey("raw_calls.id"))
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime, default=utcnow, server_default=func.now()
    )
