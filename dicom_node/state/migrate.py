"""Bring a state database's schema to the revision this code needs (Alembic).

:func:`upgrade` runs at every start-up (through :func:`dicom_node.state.open_database`) and
from ``dicom-node db upgrade``:

* a database already at :data:`~dicom_node.state.migrations.HEAD` costs one ``SELECT`` on the
  version table, and Alembic is not even imported;
* an empty database gets every revision;
* a database made by dicom-node 0.1.0 (its tables, no version table) is stamped with the
  baseline and upgraded from there;
* a database at an older revision is upgraded to the head;
* a database at a revision this code does not know (made by a newer release) is refused with a
  :class:`SchemaError`: running old code on a newer schema would corrupt it.

Two processes starting at once never both migrate: the check and the upgrade run under a lock,
``pg_advisory_xact_lock`` on PostgreSQL (held until the migration transaction ends) and an
exclusive ``flock`` on ``<database file>.migrate.lock`` next to a SQLite file. The second
process waits, then finds the database at the head and does nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from dicom_node import __version__
from dicom_node.errors import ConfigError
from dicom_node.state.database import SQLITE_BUSY_TIMEOUT_MS, sqlite_on_connect
from dicom_node.state.migrations import (
    BASELINE,
    BASELINE_TABLES,
    HEAD,
    LOCATION,
    VERSION_TABLE,
)

if TYPE_CHECKING:
    from alembic.config import Config

LOGGER = logging.getLogger(__name__)

PG_LOCK_KEY = int.from_bytes(b"dicomnod", "big")
"""The advisory lock key of schema migrations ("dicomnod"); advisory locks are per database."""

Kind = Literal["head", "behind", "release-0.1.0", "empty", "newer"]


class SchemaError(ConfigError):
    """The database's schema cannot be brought to this code's revision (exit code 2)."""


@dataclass(frozen=True)
class SchemaState:
    """What a database holds, as found before any change."""

    revision: str | None
    """The revision recorded in the version table; None when there is none."""
    kind: Kind

    def describe(self) -> str:
        """One line for people (``dicom-node db current``)."""
        return {
            "head": f"{self.revision} (head)",
            "behind": f"{self.revision} (head is {HEAD}: run `dicom-node db upgrade`)",
            "release-0.1.0": (
                f"none: made by dicom-node 0.1.0, will be stamped {BASELINE} and upgraded to {HEAD}"
            ),
            "empty": f"none: empty database, the upgrade creates the schema at {HEAD}",
            "newer": f"{self.revision} (newer than this dicom-node knows; its head is {HEAD})",
        }[self.kind]


@dataclass(frozen=True)
class UpgradeResult:
    """What :func:`upgrade` did."""

    before: SchemaState
    after: str

    @property
    def changed(self) -> bool:
        """Whether this call migrated (False when the database was already at the head)."""
        return self.before.kind != "head"


def upgrade(engine: Engine) -> UpgradeResult:
    """Bring the database behind ``engine`` to :data:`HEAD` (see the module docstring).

    Raises :class:`SchemaError` for a database this code must not touch (a newer revision, or
    only some of the tables of a 0.1.0 database); database errors propagate unchanged.
    """
    if _recorded_revision(engine) == HEAD:
        return UpgradeResult(SchemaState(HEAD, "head"), HEAD)
    with _migration_connection(engine) as conn:
        found = inspect_schema(conn)
        if found.kind == "head":
            return UpgradeResult(found, HEAD)  # another process migrated while we waited
        if found.kind == "newer":
            raise SchemaError(
                f"the state database is at schema revision {found.revision}, which "
                f"dicom-node {__version__} does not know (its newest is {HEAD}): a newer release "
                "upgraded it; run that release, or restore the backup taken before the upgrade"
            )
        _run_alembic(conn, stamp_baseline=found.kind == "release-0.1.0")
        if conn.dialect.name == "sqlite":
            broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:  # the transaction rolls back: the database stays as it was
                raise SchemaError(
                    f"schema upgrade to {HEAD} would break {len(broken)} foreign keys "
                    f"(first in table {broken[0][0]}); the database was left unchanged"
                )
        conn.commit()
    LOGGER.info("state database schema upgraded: %s -> %s", found.revision or found.kind, HEAD)
    return UpgradeResult(found, HEAD)


def current(engine: Engine) -> SchemaState:
    """The database's schema state, read only (no lock, no change)."""
    with engine.connect() as conn:
        return inspect_schema(conn)


def inspect_schema(conn: Connection) -> SchemaState:
    """Classify the database behind ``conn`` (reads the catalogue and the version table)."""
    tables = set(inspect(conn).get_table_names())
    revision = None
    if VERSION_TABLE in tables:
        revision = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    if revision is None:
        ours = tables & BASELINE_TABLES
        if not ours:
            return SchemaState(None, "empty")
        if ours != BASELINE_TABLES:
            missing = ", ".join(sorted(BASELINE_TABLES - ours))
            raise SchemaError(
                f"the state database has some of dicom-node's tables but not {missing}, and no "
                "schema revision: restore it from a backup or point database_url at an empty one"
            )
        return SchemaState(None, "release-0.1.0")
    if revision == HEAD:
        return SchemaState(revision, "head")
    return SchemaState(revision, "behind" if revision in _known_revisions() else "newer")


def _recorded_revision(engine: Engine) -> str | None:
    """The version table's value, or None if it cannot be read (no table yet, an empty file).

    Read on the driver's cursor: with SQLite that takes no ``BEGIN IMMEDIATE`` write lock just
    to look. A database that cannot be reached raises here (SQLAlchemy's OperationalError).
    """
    with engine.connect() as conn:
        cursor = conn.connection.cursor()
        try:
            cursor.execute(f"SELECT version_num FROM {VERSION_TABLE}")
            row = cursor.fetchone()
        except engine.dialect.loaded_dbapi.Error:
            return None  # the connection's reset (a rollback) clears a failed PG transaction
        finally:
            cursor.close()
    return str(row[0]) if row else None


@contextlib.contextmanager
def _migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection inside a transaction, holding the migration lock of its database."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            # Transaction-scoped: released by the commit or rollback that ends the migration.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
            yield conn
        return
    if engine.dialect.name != "sqlite":
        raise SchemaError(f"unsupported state database backend {engine.dialect.name!r}")
    path = engine.url.database
    if not path or path == ":memory:":
        with engine.connect() as conn:  # private to this process: nothing to race with
            yield conn
        return
    with open(f"{path}.migrate.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even on a crash
        migration_engine = _sqlite_migration_engine(engine)
        try:
            with migration_engine.connect() as conn:
                yield conn
        finally:
            migration_engine.dispose()


def _sqlite_migration_engine(engine: Engine) -> Engine:
    """An engine for the migration alone: foreign keys off, every transaction ``IMMEDIATE``.

    Batch operations rebuild a table by copying it and dropping the original; with foreign keys
    on, that DROP would cascade-delete the rows that refer to it (SQLite documents disabling
    them for such changes, https://www.sqlite.org/lang_altertable.html). The pragma cannot
    change inside a transaction, so it is set per connection before any.
    """
    migration_engine = create_engine(
        engine.url,
        poolclass=NullPool,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "isolation_level": None},
    )

    def on_connect(dbapi_connection: Any, record: Any) -> None:
        sqlite_on_connect(dbapi_connection, record)  # the node's own settings, then:
        dbapi_connection.execute("PRAGMA foreign_keys=OFF")

    def on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(migration_engine, "connect", on_connect)
    event.listen(migration_engine, "begin", on_begin)
    return migration_engine


def alembic_config(conn: Connection | None = None) -> Config:
    """Alembic's configuration for the revisions in :mod:`dicom_node.state.migrations`, with
    ``conn`` for ``env.py`` to run on (for tests and :func:`draft_revision`)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(LOCATION))
    config.attributes["connection"] = conn
    return config


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    return {rev.revision for rev in script.walk_revisions()}


def _run_alembic(conn: Connection, *, stamp_baseline: bool) -> None:
    from alembic import command

    config = alembic_config(conn)
    # Alembic narrates its set-up at INFO ("Will assume non-transactional DDL", untrue here:
    # it runs inside our transaction); upgrade() logs the one line that matters.
    alembic_logger = logging.getLogger("alembic")
    level = alembic_logger.level
    alembic_logger.setLevel(max(level, logging.WARNING))
    try:
        if stamp_baseline:
            command.stamp(config, BASELINE)
        command.upgrade(config, "head")
    finally:
        alembic_logger.setLevel(level)


def draft_revision(message: str) -> None:
    """Write a draft revision file from the difference between the models and :data:`HEAD`.

    For developers (see :mod:`dicom_node.state.migrations`): it upgrades a scratch SQLite
    database to the head and lets Alembic compare it with the models. Review the draft; then
    set ``HEAD``.
    """
    import tempfile

    from alembic import command

    number = f"{int(HEAD) + 1:04d}"
    with tempfile.TemporaryDirectory() as scratch:
        engine = create_engine(f"sqlite:///{Path(scratch) / 'draft.sqlite'}")
        upgrade(engine)
        with engine.connect() as conn:
            config = alembic_config(conn)
            command.revision(
                config,
                message=message,
                autogenerate=True,
                rev_id=number,
            )
        engine.dispose()
