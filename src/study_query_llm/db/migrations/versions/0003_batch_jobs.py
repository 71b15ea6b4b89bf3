"""Resumable batch jobs: batch_jobs and batch_job_items.

Revision ID: 0003_batch_jobs
Revises: 0002_v2_schema
Create Date: 2025-01-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003_batch_jobs"
down_revision: str | Sequence[str] | None = "0002_v2_schema"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _now_column(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "batch_jobs",
        sa.Column("id", ID, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("group_id", ID, nullable=True),
        sa.Column("spec_json", JSON, nullable=False),
        sa.Column("total_items", sa.Integer(), nullable=False),
        _now_column("created_at"),
        _now_column("updated_at"),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'completed', 'cancelled')",
            name="ck_batch_jobs_status",
        ),
        sa.ForeignKeyConstraint(
            ["group_id"], ["groups.id"], name="fk_batch_jobs_group_id_groups", ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_batch_jobs"),
    )
    op.create_table(
        "batch_job_items",
        sa.Column("id", ID, nullable=False),
        sa.Column("job_id", ID, nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("provider", sa.String(100), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("sample_index", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("claimed_by", sa.String(100), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claims", sa.Integer(), nullable=False),
        sa.Column("call_id", ID, nullable=True),
        _now_column("updated_at"),
        sa.CheckConstraint(
            "status IN ('pending', 'claimed', 'succeeded', 'failed', 'cancelled')",
            name="ck_batch_job_items_status",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["batch_jobs.id"],
            name="fk_batch_job_items_job_id_batch_jobs",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["call_id"], ["raw_calls.id"], name="fk_batch_job_items_call_id_raw_calls"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_batch_job_items"),
    )
    op.create_index(
        "ix_batch_job_items_job_id_status_position",
        "batch_job_items",
        ["job_id", "status", "position"],
    )
    op.create_index(
        "ix_batch_job_items_job_id_position", "batch_job_items", ["job_id", "position"], unique=True
    )


def downgrade() -> None:
    op.drop_index("ix_batch_job_items_job_id_position", table_name="batch_job_items")
    op.drop_index("ix_batch_job_items_job_id_status_position", table_name="batch_job_items")
    op.drop_table("batch_job_items")
    op.drop_table("batch_jobs")
