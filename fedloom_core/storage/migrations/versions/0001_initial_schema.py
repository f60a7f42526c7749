"""The schema of databases created before migrations (commit 17210a3), written out table by table.

Revision ID: 0001
Revises:
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The column types SQLModel created: str fields as VARCHAR, datetimes timezone-aware.
ID = sa.String(length=128)
TEXT = sa.String()
TIME = sa.DateTime(timezone=True)


def _json(name: str) -> sa.Column:
    return sa.Column(name, sa.JSON(), nullable=False)


def _index(table: str, *columns: str, unique: bool = False) -> None:
    op.create_index(f"ix_{table}_{'_'.join(columns)}", table, list(columns), unique=unique)


def upgrade() -> None:
    # The whole first schema, one create_table per table: long, but a migration reads best as one script.
    op.create_table(
        "experiment",
        sa.Column("experiment_id", ID, nullable=False),
        sa.Column("name", TEXT, nullable=False),
        sa.Column("description", TEXT, nullable=False),
        sa.Column("status", TEXT, nullable=False),
        sa.Column("dataset", TEXT, nullable=False),
        sa.Column("model_architecture", TEXT, nullable=False),
        sa.Column("total_rounds", sa.Integer(), nullable=False),
        sa.Column("current_round", sa.Integer(), nullable=False),
        _json("config"),
        _json("dataset_config"),
        _json("model_config"),
        _json("training_config"),
        _json("policy_config"),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("started_at", TIME, nullable=True),
        sa.Column("finished_at", TIME, nullable=True),
        sa.Column("stop_reason", TEXT, nullable=True),
        sa.Column("error_code", TEXT, nullable=True),
        sa.Column("error", TEXT, nullable=True),
        sa.Column("final_model_id", TEXT, nullable=True),
        sa.PrimaryKeyConstraint("experiment_id"),
    )
    _index("experiment", "status")

    op.create_table(
        "api_key",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("role", TEXT, nullable=False),
        sa.Column("client_id", ID, nullable=True),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    _index("api_key", "client_id")
    _index("api_key", "key_hash", unique=True)

    op.create_table(
        "client",
        sa.Column("client_id", ID, nullable=False),
        sa.Column("registration_id", TEXT, nullable=False),
        sa.Column("status", TEXT, nullable=False),
        _json("client_config"),
        _json("capabilities"),
        _json("location"),
        sa.Column("registered_at", TIME, nullable=False),
        sa.Column("last_seen", TIME, nullable=True),
        sa.Column("last_update", TIME, nullable=True),
        sa.Column("current_round", sa.Integer(), nullable=False),
        sa.Column("trust_score", sa.Float(), nullable=False),
        sa.Column("contribution_score", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("client_id"),
    )
    _index("client", "status")

    op.create_table(
        "round",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("experiment_id", ID, nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("status", TEXT, nullable=False),
        _json("selected_clients"),
        _json("exclusions"),
        _json("policy_results"),
        _json("client_config"),
        _json("strategy_info"),
        sa.Column("global_model_id", TEXT, nullable=False),
        sa.Column("upload_count", sa.Integer(), nullable=False),
        sa.Column("started_at", TIME, nullable=False),
        sa.Column("deadline", TIME, nullable=True),
        sa.Column("closed_at", TIME, nullable=True),
        sa.Column("completed_at", TIME, nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("experiment_id", "round"),
    )
    _index("round", "experiment_id")

    op.create_table(
        "update",
        sa.Column("update_id", sa.String(length=64), nullable=False),
        sa.Column("experiment_id", ID, nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("client_id", ID, nullable=False),
        sa.Column("blob_key", TEXT, nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("num_samples", sa.Integer(), nullable=False),
        _json("metrics"),
        sa.Column("validation_status", TEXT, nullable=False),
        sa.Column("reason", TEXT, nullable=True),
        sa.Column("received_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("update_id"),
        sa.UniqueConstraint("experiment_id", "round", "client_id"),
    )
    _index("update", "client_id")
    _index("update", "experiment_id")

    op.create_table(
        "experiment_client",
        sa.Column("experiment_id", ID, nullable=False),
        sa.Column("client_id", ID, nullable=False),
        sa.Column("status", TEXT, nullable=False),
        sa.Column("trust_score", sa.Float(), nullable=False),
        sa.Column("contribution_score", sa.Float(), nullable=False),
        sa.Column("selections", sa.Integer(), nullable=False),
        sa.Column("deliveries", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_round", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("experiment_id", "client_id"),
    )

    op.create_table(
        "client_round_score",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("experiment_id", ID, nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("client_id", ID, nullable=False),
        sa.Column("delivered", sa.Boolean(), nullable=False),
        sa.Column("accepted", sa.Boolean(), nullable=False),
        sa.Column("reason", TEXT, nullable=True),
        sa.Column("update_norm", sa.Float(), nullable=True),
        sa.Column("norm_ratio", sa.Float(), nullable=True),
        sa.Column("cosine_similarity", sa.Float(), nullable=True),
        sa.Column("anomaly", sa.Float(), nullable=True),
        sa.Column("trust_score", sa.Float(), nullable=False),
        sa.Column("contribution", sa.Float(), nullable=True),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("experiment_id", "round", "client_id"),
    )
    _index("client_round_score", "client_id")
    _index("client_round_score", "experiment_id")

    op.create_table(
        "global_model",
        sa.Column("model_id", sa.String(length=200), nullable=False),
        sa.Column("experiment_id", ID, nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("blob_key", TEXT, nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("parameters_count", sa.Integer(), nullable=False),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("model_id"),
    )
    _index("global_model", "experiment_id")

    op.create_table(
        "round_metrics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("experiment_id", ID, nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("global_accuracy", sa.Float(), nullable=False),
        sa.Column("global_loss", sa.Float(), nullable=True),
        sa.Column("participating_clients", sa.Integer(), nullable=False),
        sa.Column("round_duration", sa.Float(), nullable=False),
        sa.Column("aggregation_time", sa.Float(), nullable=False),
        sa.Column("evaluation_time", sa.Float(), nullable=False),
        sa.Column("model_id", TEXT, nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("experiment_id", "round"),
    )
    _index("round_metrics", "experiment_id")

    op.create_table(
        "client_metrics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("experiment_id", ID, nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("client_id", ID, nullable=False),
        sa.Column("local_accuracy", sa.Float(), nullable=True),
        sa.Column("local_loss", sa.Float(), nullable=True),
        sa.Column("training_time", sa.Float(), nullable=True),
        sa.Column("communication_time", sa.Float(), nullable=True),
        sa.Column("data_samples", sa.Integer(), nullable=False),
        sa.Column("epochs_completed", sa.Integer(), nullable=True),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("experiment_id", "round", "client_id"),
    )
    _index("client_metrics", "client_id")
    _index("client_metrics", "experiment_id")

    op.create_table(
        "event",
        sa.Column("event_id", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("experiment_id", ID, nullable=True),
        sa.Column("client_id", ID, nullable=True),
        _json("payload"),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("event_id"),
    )
    _index("event", "experiment_id")
    _index("event", "type")

    op.create_table(
        "rate_counter",
        sa.Column("bucket", sa.String(length=300), nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("bucket"),
    )

    # The pre-migrations version marker, with the row every such database has.
    schema_version = op.create_table(
        "schema_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(schema_version, [{"id": 1, "version": 1}])


def downgrade() -> None:
    for table in (
        "schema_version",
        "rate_counter",
        "event",
        "client_metrics",
        "round_metrics",
        "global_model",
        "client_round_score",
        "experiment_client",
        "update",
        "round",
        "client",
        "api_key",
        "experiment",
    ):
        op.drop_table(table)
