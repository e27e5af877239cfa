"""Lookup keys on studies: keyed hashes of the accession number and the patient ID.

Revision ID: 0003
Revises: 0002

Finding a study by accession number or patient ID (``GET /api/studies``, ``dicom-node jobs
--accession/--patient``, the dashboard's search box) compares HMAC-SHA256 keys of these
identifiers, never the identifiers themselves, which the node does not store
(``dicom_node/study_lookup.py``). Two nullable columns, each indexed.

Rows already there keep NULL: their identifiers were never stored, so no key can be computed
for them. Such a study gets its keys when another instance of it arrives, and is found by its
Study Instance UID meanwhile.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable columns without a default: SQLite adds them in place (no table copy).
    op.add_column(
        "studies", sa.Column("accession_number_hmac", sa.String(length=64), nullable=True)
    )
    op.add_column("studies", sa.Column("patient_id_hmac", sa.String(length=64), nullable=True))
    op.create_index("ix_studies_accession_number_hmac", "studies", ["accession_number_hmac"])
    op.create_index("ix_studies_patient_id_hmac", "studies", ["patient_id_hmac"])


def downgrade() -> None:
    op.drop_index("ix_studies_patient_id_hmac", table_name="studies")
    op.drop_index("ix_studies_accession_number_hmac", table_name="studies")
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("patient_id_hmac")
        batch.drop_column("accession_number_hmac")
