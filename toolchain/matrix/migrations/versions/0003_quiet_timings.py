"""How busy the machine was while a cell's latency was re-measured: only quiet timings are compared.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    with op.batch_alter_table("cells") as cells:
        cells.add_column(sa.Column("timing_busy", sa.Float))  # share of the machine other processes used; NULL: unknown


def downgrade() -> None:
    with op.batch_alter_table("cells") as cells:
        cells.drop_column("timing_busy")
