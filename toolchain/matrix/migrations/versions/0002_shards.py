"""Runs of one shard of a matrix (`matrix run --target`): a shard resumes and interrupts only its own runs.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("runs") as runs:
        runs.add_column(sa.Column("shard", sa.String(400)))  # the targets a run was limited to; NULL: all of them


def downgrade() -> None:
    with op.batch_alter_table("runs") as runs:
        runs.drop_column("shard")
