"""The record of v1 imports: legacy_sources, legacy_calls and legacy_batches.

legacy_calls maps (source, legacy inference_runs id) to the raw_calls row made from it;
legacy_batches maps (source, legacy batch_id) to the batch group made for it. Both are
written in the same transactions as what they point at, so an import can be run again
or resumed after a crash without duplicating anything.

Revision ID: 0004_legacy_import
Revises: 0003_batch_jobs
Create Date: 2025-01-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_legacy_import"
down_revision: str | Sequence[str] | None = "0003_batch_jobs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "legacy_sources",
        sa.Column("id", ID, nullable=False),
        sa.Column("name", sa.String(500), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name="pk_legacy_sources"),
        sa.UniqueConstraint("name", name="uq_legacy_sources_name"),
    )
    op.create_table(
        "legacy_calls",
        sa.Column("source_id", ID, nullable=False),
        sa.Column("legacy_id", ID, nullable=False),
        sa.Column("call_id", ID, nullable=False),
        sa.ForeignKeyConstraint(
            ["source_id"],
            ["legacy_sources.id"],
            name="fk_legacy_calls_source_id_legacy_sources",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["call_id"], ["raw_calls.id"], name="fk_legacy_calls_call_id_raw_calls"
        ),
        sa.PrimaryKeyConstraint("source_id", "legacy_id", name="pk_legacy_calls"),
        sa.UniqueConstraint("call_id", name="uq_legacy_calls_call_id"),
    )
    op.create_table(
        "legacy_batches",
        sa.Column("source_id", ID, nullable=False),
        sa.Column("batch_id", sa.Text(), nullable=False),
        sa.Column("group_id", ID, nullable=False),
        sa.ForeignKeyConstraint(
            ["source_id"],
            ["legacy_sources.id"],
            name="fk_legacy_batches_source_id_legacy_sources",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["groups.id"],
            name="fk_legacy_batches_group_id_groups",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("source_id", "batch_id", name="pk_legacy_batches"),
        sa.UniqueConstraint("group_id", name="uq_legacy_batches_group_id"),
    )


def downgrade() -> None:
    op.drop_table("legacy_batches")
    op.drop_table("legacy_calls")
    op.drop_table("legacy_sources")
