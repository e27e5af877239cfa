"""Job priority and the destinations' probe history.

Revision ID: 0004
Revises: 0003

* ``jobs.priority`` — the routing rule's ``priority`` (``stat``, ``routine``, ``research``):
  the dispatcher sends stat jobs first and gives their Celery messages the broker's highest
  priority (``dicom_node/dispatch.py``, ``dicom_node/broker.py``). Nullable without a default,
  so SQLite adds it in place; the jobs already there keep NULL, which the node reads as
  ``routine`` (what they were).
* ``probe_results`` — one row per check of a destination (C-ECHO or QIDO-RS), kept for the
  last ``probes.history`` checks of each (``dicom_node/delivery/probe.py``), indexed by
  destination and time for the dashboard's "last probe" query.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("priority", sa.String(length=16), nullable=True))
    op.create_table(
        "probe_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_probe_results_destination_at", "probe_results", ["destination", "at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_probe_results_destination_at", table_name="probe_results")
    op.drop_table("probe_results")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("priority")
