"""The record of v1 imports: which legacy rows and batches already have their v2 counterpart.

A legacy database is a `LegacySource`, known by a stable name. Each imported
`inference_runs` row has one `LegacyCall` (primary key: source and legacy row id), written
in the same transaction as its `raw_calls` row, so an import run again, or resumed after
a crash, skips exactly what is already there without touching the append-only calls.
Each legacy `batch_id` has one `LegacyBatch` pointing at the batch group made for it.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String, Text, UniqueConstraint, func
from sqlalchemy.orm import Mapped, mapped_column

from study_query_llm.db.base import Base
from study_query_llm.db.column_types import IdType, UTCDateTime, utcnow


class LegacySource(Base):
    """One legacy database imported (or being imported) into this one."""

    __tablename__ = "legacy_sources"
    __table_args__ = (UniqueConstraint("name"),)

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    # The source's identity: its resolved file path or host/port/database, or a name
    # given with --source-name; never a password.
    name: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime, default=utcnow, server_default=func.now()
    )


class LegacyCall(Base):
    """One imported `inference_runs` row and the `raw_calls` row made from it."""

    __tablename__ = "legacy_calls"
    __table_args__ = (UniqueConstraint("call_id"),)

    source_id: Mapped[int] = mapped_column(
        ForeignKey("legacy_sources.id", ondelete="CASCADE"), primary_key=True
    )
    legacy_id: Mapped[int] = mapped_column(IdType, primary_key=True)
    call_id: Mapped[int] = mapped_column(ForeignKey("raw_calls.id"))


class LegacyBatch(Base):
    """One legacy `batch_id` and the batch group made for it.

    Deleting the group deletes this row too, so the next import makes the group again.
    """

    __tablename__ = "legacy_batches"
    __table_args__ = (UniqueConstraint("group_id"),)

    source_id: Mapped[int] = mapped_column(
        ForeignKey("legacy_sources.id", ondelete="CASCADE"), primary_key=True
    )
    batch_id: Mapped[str] = mapped_column(Text, primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("groups.id", ondelete="CASCADE"))
