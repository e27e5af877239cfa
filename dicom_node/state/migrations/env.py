"""Alembic environment of the state database.

Run only through :mod:`dicom_node.state.migrate`, which passes the connection (already inside
its transaction and under the migration lock) in ``config.attributes["connection"]``; there is
no ``alembic.ini``.
"""

from __future__ import annotations

from alembic import context

from dicom_node.state.migrations import VERSION_TABLE
from dicom_node.state.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    # SQLite can alter little in place: autogenerate writes "batch" operations (copy the table,
    # swap it in) that dicom_node.state.migrate runs with foreign keys off.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
    compare_server_default=True,
)
with context.begin_transaction():  # inside the caller's transaction: a no-op, it commits
    context.run_migrations()
