"""The state database: engine set-up for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.errors import ConfigError
from dicom_node.state.models import Meta

if TYPE_CHECKING:
    from dicom_node.state.migrate import UpgradeResult

SQLITE_BUSY_TIMEOUT_MS = 30000
"""How long a SQLite writer waits for another process's transaction (ms)."""


class Database:
    """Engine and session factory for one state database URL.

    Sessions are short: open one per unit of work with :meth:`session`, which commits on success
    and rolls back on error. On SQLite every transaction starts with ``BEGIN IMMEDIATE`` so that
    concurrent writers in several processes queue on the busy timeout instead of failing with
    "database is locked" when a read lock is upgraded.
    """

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {
                "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
                "isolation_level": None,
            }
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["pool_size"] = 5
            kwargs["max_overflow"] = 10
        try:
            self.engine: Engine = create_engine(url, **kwargs)
        except Exception as exc:  # bad URL or missing driver
            raise ConfigError(f"cannot use database_url: {exc}") from exc
        if self.is_sqlite:
            event.listen(self.engine, "connect", sqlite_on_connect)
            event.listen(self.engine, "begin", _sqlite_on_begin)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def upgrade_schema(self) -> UpgradeResult:
        """Bring the schema to this code's revision (see :mod:`dicom_node.state.migrate`).

        Cheap when it is already there (one ``SELECT``); safe from several processes at once.
        """
        from dicom_node.state import migrate  # it builds on this module's SQLite set-up

        return migrate.upgrade(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commit when the block ends, roll back if it raises."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @cached_property
    def salt(self) -> str:
        """The installation's secret salt for storage keys, created on first use."""
        with self.session() as s:
            row = s.get(Meta, "uid_salt")
            if row is not None:
                return row.value
        candidate = secrets.token_hex(16)
        try:
            with self.session() as s:
                s.add(Meta(key="uid_salt", value=candidate))
        except IntegrityError:
            pass  # another process won the race; use its value
        with self.session() as s:
            value = s.scalar(select(Meta.value).where(Meta.key == "uid_salt"))
            assert value is not None
            return value

    def ping(self) -> None:
        """Raise if the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def dispose(self) -> None:
        self.engine.dispose()


def sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    """Per-connection SQLite set-up: WAL, durable commits, foreign keys, busy timeout."""
    cur = dbapi_connection.cursor()
    _set_wal(cur)
    # FULL: a committed index row survives a power cut, matching the fsynced spool file.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.close()


def _set_wal(cur: Any) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another connection holds the lock.

    Switching a new database file to WAL needs an exclusive lock, and SQLite answers "database
    is locked" at once instead of waiting out the busy timeout when another connection is doing
    the same: processes that open a fresh database together (``serve``, a worker, ``db
    upgrade``) would otherwise fail at random. Bounded by the busy timeout.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    delay = 0.01
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _sqlite_on_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def open_database(url: str) -> Database:
    """Open the state database, its schema upgraded to this code's revision.

    The one place every process (node, workers, CLI commands) opens it: an empty database gets
    the schema, an older one is migrated (under a lock, one process at a time), and one newer
    than this code is refused with :class:`~dicom_node.state.migrate.SchemaError`.
    """
    db = Database(url)
    try:
        db.upgrade_schema()
    except BaseException:
        db.dispose()
        raise
    return db
