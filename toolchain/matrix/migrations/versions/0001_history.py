"""The first schema: runs, cells, artifacts, alarms.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("matrix", sa.String(200), nullable=False, index=True),
        sa.Column("matrix_sha256", sa.String(64), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("started", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished", sa.DateTime(timezone=True)),
        sa.Column("cells_total", sa.Integer, nullable=False),
        sa.Column("executor", sa.String(200), nullable=False),
        sa.Column("workers", sa.Integer),
        sa.Column("host_cpu", sa.String(200)),
        sa.Column("toolchain_version", sa.String(40)),
        sa.Column("toolchain_commit", sa.String(40)),
    )
    op.create_table(
        "cells",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False, index=True),
        sa.Column("key", sa.String(400), nullable=False, index=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("verdict", sa.Text),
        sa.Column("started", sa.String(40), nullable=False),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("build_seconds", sa.Float),
        sa.Column("folder", sa.Text),
        sa.Column("log", sa.Text, nullable=False),
        sa.Column("host_cpu", sa.String(200)),
        sa.Column("model_sha256", sa.String(64)),
        sa.Column("data_sha256", sa.String(64)),
        sa.Column("profile_sha256", sa.String(64)),
        sa.Column("versions", sa.JSON, nullable=False),
        sa.Column("reference_accuracy", sa.Float),
        sa.Column("reference_latency_ms", sa.Float),
        sa.UniqueConstraint("run_id", "key", name="uq_cells_run_key"),
    )
    op.create_table(
        "artifacts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("cell_id", sa.Integer, sa.ForeignKey("cells.id"), nullable=False, index=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("precision", sa.String(20)),
        sa.Column("is_primary", sa.Boolean, nullable=False),
        sa.Column("passed", sa.Boolean),
        sa.Column("sqnr_db", sa.Float),
        sa.Column("cosine", sa.Float),
        sa.Column("top1_agreement", sa.Float),
        sa.Column("accuracy", sa.Float),
        sa.Column("metric", sa.Float),
        sa.Column("latency_p50_ms", sa.Float),
        sa.Column("latency_p95_ms", sa.Float),
        sa.Column("latency_p99_ms", sa.Float),
        sa.Column("latency_repeats", sa.JSON, nullable=False),
        sa.Column("size_bytes", sa.BigInteger),
        sa.Column("sha256", sa.String(64)),
        sa.Column("recovery_status", sa.String(40)),
        sa.Column("recovery_summary", sa.Text),
        sa.Column("failures", sa.JSON, nullable=False),
    )
    op.create_table(
        "alarms",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False, index=True),
        sa.Column("cell_id", sa.Integer, sa.ForeignKey("cells.id"), nullable=False),
        sa.Column("key", sa.String(400), nullable=False),
        sa.Column("artifact", sa.String(200)),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("baseline_run_id", sa.Integer, nullable=False),
        sa.Column("changes", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    for table in ("alarms", "artifacts", "cells", "runs"):
        op.drop_table(table)
