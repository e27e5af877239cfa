"""Schema revisions of the state database (Alembic), shipped inside the package.

:mod:`dicom_node.state.migrate` runs them at every start-up and from ``dicom-node db upgrade``;
there is no ``alembic.ini``: ``env.py`` receives the connection from ``migrate``.

Revisions, oldest first (``versions/``):

* ``0001`` — baseline: the schema of dicom-node 0.1.0, which made its tables with
  ``create_all``. A database of that release (tables, no version table) is stamped ``0001``
  and upgraded from there.
* ``0002`` — indexes on the foreign keys that completion, QIDO-RS and the reconciler look rows
  up by.
* ``0003`` — keyed hashes of the accession number and patient ID on ``studies``, indexed, for
  finding a study (:mod:`dicom_node.study_lookup`); NULL on the rows already there.
* ``0004`` — ``jobs.priority`` (``stat``, ``routine``, ``research``; NULL on the rows already
  there, read as ``routine``) and the ``probe_results`` table (the recent checks of each
  destination, :mod:`dicom_node.delivery.probe`).
* ``0005`` — ``instances.purged_at`` and ``outputs.purged_at``: when the retention sweep
  removed the file (:mod:`dicom_node.retention`); NULL on the rows already there.
* ``0006`` — the ``model_versions`` table (what each worker runs,
  :mod:`dicom_node.state.model_versions`) and ``jobs.generation`` (0 on the rows already
  there; re-runs of one input set for a new model version), part of ``uq_job_input``.

Adding a revision (the models in :mod:`dicom_node.state.models` change in the same commit):

1. Write ``versions/NNNN_what_it_does.py`` with ``revision = "NNNN"`` (the next number) and
   ``down_revision`` = the current :data:`HEAD`; or let Alembic draft it from the models::

       python -c "from dicom_node.state.migrate import draft_revision; draft_revision('what')"

   and review it: explicit names for every index and constraint, data kept (``op.execute``
   for a data step), ``with op.batch_alter_table(...)`` for anything SQLite cannot ALTER
   in place (``migrate`` runs SQLite revisions with foreign keys off, so the table copy does
   not cascade-delete, and checks ``PRAGMA foreign_key_check`` before it commits).
2. Set :data:`HEAD` below to the new number.
3. ``pytest tests/test_migrations.py``: the release fixtures upgrade with their data intact and
   the upgraded schema equals the models on SQLite and PostgreSQL (no drift).

Revisions run in one transaction per upgrade (PostgreSQL and SQLite both have transactional
DDL): an upgrade that fails leaves the database as it was.
"""

from __future__ import annotations

from pathlib import Path

HEAD = "0006"
"""The newest revision this code knows. The fast start-up check compares against it without
loading Alembic; tests/test_migrations.py checks it equals the head of ``versions/``."""

BASELINE = "0001"
"""The revision a database made by dicom-node 0.1.0 (no version table) is stamped with."""

BASELINE_TABLES = frozenset(
    {
        "meta",
        "studies",
        "series",
        "instances",
        "duplicate_events",
        "jobs",
        "outbox",
        "outputs",
        "deliveries",
        "audit_events",
    }
)
"""The tables dicom-node 0.1.0 created (all in one transaction, so all or none)."""

VERSION_TABLE = "alembic_version"

LOCATION = Path(__file__).resolve().parent
