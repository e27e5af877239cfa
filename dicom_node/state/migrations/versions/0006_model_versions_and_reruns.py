"""Re-runs for a new model version: what the workers run, and a job's generation.

Revision ID: 0006
Revises: 0005

* ``model_versions`` — one row per model and worker: the version (and weights' SHA-256) the
  worker runs, written when it starts and when it loads a model; the edge reads the newest
  row of a model as that model's current version (``dicom_node/state/model_versions.py``).
* ``jobs.generation`` — 0 for the job routing made when the study completed, 1, 2, ... for
  each re-run of the same input set, rule and model (``dicom_node/completion.py``,
  ``rerun_study``). NOT NULL with the server default 0, so every job already there is
  generation 0, and its id (derived from study, input set, rule and model; generation 0 adds
  nothing to it: ``dicom_node/jobs/lifecycle.py``) stays what it is.
* ``uq_job_input`` gains ``generation``: the same input set, rule and model may have one job
  per generation. SQLite cannot alter a constraint in place: the ``jobs`` table is copied
  (``batch_alter_table``; ``migrate`` runs it with foreign keys off, so the rows of
  ``outbox``, ``outputs`` and ``deliveries`` that reference jobs stay).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("weights_sha256", sa.String(length=64), nullable=True),
        sa.Column("worker", sa.String(length=128), nullable=False),
        sa.Column("seen_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model", "worker", name="uq_model_version_worker"),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("generation", sa.Integer(), nullable=False, server_default="0"))
        batch.drop_constraint("uq_job_input", type_="unique")
        batch.create_unique_constraint(
            "uq_job_input", ["study_id", "input_hash", "rule", "model", "generation"]
        )


def downgrade() -> None:
    # Only generation 0 fits the old constraint: the re-runs go (their outputs, deliveries and
    # outbox records with them, by the foreign keys' ON DELETE CASCADE on PostgreSQL).
    op.execute("DELETE FROM jobs WHERE generation != 0")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("uq_job_input", type_="unique")
        batch.create_unique_constraint("uq_job_input", ["study_id", "input_hash", "rule", "model"])
        batch.drop_column("generation")
    op.drop_table("model_versions")
