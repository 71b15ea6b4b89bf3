"""v1 schema: inference_runs.

Revision ID: 0001_v1_schema
Revises:
Create Date: 2025-01-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_v1_schema"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "inference_runs",
        sa.Column("id", ID, nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("response", sa.Text(), nullable=True),
        sa.Column("provider", sa.String(100), nullable=False),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("tokens", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("metadata", JSON, nullable=True),
        sa.Column("batch_id", sa.String(64), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name="pk_inference_runs"),
    )
    op.create_index("ix_inference_runs_provider", "inference_runs", ["provider"])
    op.create_index("ix_inference_runs_created_at", "inference_runs", ["created_at"])
    op.create_index("ix_inference_runs_batch_id", "inference_runs", ["batch_id"])


def downgrade() -> None:
    op.drop_index("ix_inference_runs_batch_id", table_name="inference_runs")
    op.drop_index("ix_inference_runs_created_at", table_name="inference_runs")
    op.drop_index("ix_inference_runs_provider", table_name="inference_runs")
    op.drop_table("inference_runs")
