"""Retention: when an instance's file or a result file was removed from the node's disk.

Revision ID: 0005
Revises: 0004

* ``instances.purged_at`` — set when the retention sweep removed the instance's spool file
  (``dicom_node/retention.py``); the row stays (it is patient-free) so the study's history,
  its jobs and the input sets they were run on remain readable.
* ``outputs.purged_at`` — the same for a job's result file in the result store.

Both nullable without a default, so SQLite adds them in place; every row already there keeps
NULL (its file is on disk).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("purged_at", sa.DateTime(), nullable=True))
    op.add_column("outputs", sa.Column("purged_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outputs") as batch:
        batch.drop_column("purged_at")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("purged_at")
