"""Indexes on the foreign keys the node looks rows up by.

Revision ID: 0002
Revises: 0001

0.1.0 indexed ``instances.study_id`` but not the other foreign keys its queries follow, so each
of these read a whole table (neither SQLite nor PostgreSQL indexes a foreign key by itself):

* ``instances.series_id`` — completion reads the SOP classes and calling AE titles of each
  series (``dicom_node/completion.py``, ``_series_facts``): two scans of every instance ever
  received, per series, per completed study;
* ``series.study_id`` — completion and QIDO-RS list a study's series
  (``dicom_node/completion.py``, ``dicom_node/dicomweb/qido.py``);
* ``outbox.job_id`` — the reconciler's "no outbox record for this job" test
  (``dicom_node/reconcile.py``), retry and cancel deleting a job's records, and the cascade
  when a job is deleted.

Only indexes are added: no row changes.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_instances_series", "instances", ["series_id"])
    op.create_index("ix_series_study", "series", ["study_id"])
    op.create_index("ix_outbox_job", "outbox", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_outbox_job", table_name="outbox")
    op.drop_index("ix_series_study", table_name="series")
    op.drop_index("ix_instances_series", table_name="instances")
