"""The state database: engine set-up for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.errors import ConfigError
from dicom_node.state.models import Base, Meta

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
            event.listen(self.engine, "connect", _sqlite_on_connect)
            event.listen(self.engine, "begin", _sqlite_on_begin)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        """Create missing tables (idempotent; safe from several processes at once)."""
        try:
            Base.metadata.create_all(self.engine)
        except (OperationalError, IntegrityError):
            # Another process created the tables between our check and our CREATE.
            Base.metadata.create_all(self.engine)

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


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed index row survives a power cut, matching the fsynced spool file.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.close()


def _sqlite_on_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def open_database(url: str) -> Database:
    """Open the state database and make sure its schema exists."""
    db = Database(url)
    db.create_schema()
    return db
