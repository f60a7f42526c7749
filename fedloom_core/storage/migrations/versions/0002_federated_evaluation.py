"""Federated evaluation: clients' reports, the round's evaluators, and round metrics without central evaluation.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(length=128)
TEXT = sa.String()
TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    # Batch mode: SQLite alters a column by copying the table; PostgreSQL alters it in place.
    with op.batch_alter_table("round_metrics") as batch:
        batch.alter_column("global_accuracy", existing_type=sa.Float(), nullable=True)
        batch.add_column(sa.Column("federated_metrics", sa.JSON(), nullable=True))
    with op.batch_alter_table("round") as batch:
        batch.add_column(sa.Column("evaluators", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("evaluation_status", TEXT, nullable=True))

    op.create_table(
        "client_evaluation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("experiment_id", ID, nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("client_id", ID, nullable=False),
        sa.Column("data_samples", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("received_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("experiment_id", "round", "client_id"),
    )
    op.create_index("ix_client_evaluation_client_id", "client_evaluation", ["client_id"])
    op.create_index("ix_client_evaluation_experiment_id", "client_evaluation", ["experiment_id"])


def downgrade() -> None:
    op.drop_table("client_evaluation")
    with op.batch_alter_table("round") as batch:
        batch.drop_column("evaluation_status")
        batch.drop_column("evaluators")
    # Rounds recorded without central evaluation have no accuracy to keep under NOT NULL.
    op.execute("DELETE FROM round_metrics WHERE global_accuracy IS NULL")
    with op.batch_alter_table("round_metrics") as batch:
        batch.drop_column("federated_metrics")
        batch.alter_column("global_accuracy", existing_type=sa.Float(), nullable=False)
