"""The index writer: one transaction per received instance, adding its rows to the state database.

A new instance adds an ``instances`` row and counts itself into its series and study (creating
them when new); the unique SOP Instance UID decides, in the same statement, whether it is new
or a duplicate, also between receiver processes. The statements are SQLAlchemy Core, built once
and fed from one :class:`~dicom_node.ingest.received.Received` record.

On SQLite the common case (study and series already known) runs the same compiled statements
through the DB-API cursor: SQLAlchemy's per-execution machinery cost ~0.4 ms per instance, more
than the three statements themselves (``benchmarks/profile_ingest.py``). Writers queue on a
lock rather than in SQLite's busy handler (:meth:`IndexWriter._writer`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Dialect, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

from dicom_node.ingest.received import Received
from dicom_node.state import Database, Instance, Series, Study
from dicom_node.state.text import storable_text


@dataclass(frozen=True)
class Indexed:
    """What :meth:`IndexWriter.add` did."""

    inserted: bool
    """False: an instance with this SOP Instance UID is already indexed (a duplicate)."""
    new_study: bool
    placed: bool
    """Whether the spool file at the record's path is this copy (placed, or adopted)."""


class _CompiledForDBAPI:
    """A Core statement compiled once for SQLite, run on a DB-API cursor.

    The SQL is SQLAlchemy's and the values go through the column types' own bind processing
    (naive UTC timestamps in SQLAlchemy's SQLite format, booleans as 0/1), so what this writes
    is what the Core path writes; only the per-execution machinery is left out.
    """

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        self.sql = compiled.string
        self._binds: list[tuple[str, Any, Callable[[Any], Any] | None]] = []
        for name in compiled.positiontup or ():
            bind = compiled.binds[name]
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            self._binds.append((name, bind.value, process))

    def execute(self, cursor: sqlite3.Cursor, values: Mapping[str, Any]) -> sqlite3.Cursor:
        params = []
        for name, literal, process in self._binds:
            value = values.get(name, literal)
            params.append(value if process is None else process(value))
        return cursor.execute(self.sql, params)


class IndexWriter:
    """Adds received instances to the index. Thread-safe; one per process."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._ids: dict[str, int] = {}  # study/series UID -> row id, once committed
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._lock_fd: int | None = None
        database = make_url(db.url).database if db.is_sqlite else None
        if database and database != ":memory:":
            self._lock_fd = os.open(
                f"{database}.writer-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        self._insert = sqlite_insert if db.is_sqlite else postgresql_insert
        # Statements built once: building them per instance cost more than executing them.
        instances, series, studies = (cast(Table, m.__table__) for m in (Instance, Series, Study))
        # purged_at is left out: a row being added has its file (NULL, dicom_node.retention).
        columns = [c.name for c in instances.columns if c.name not in ("id", "purged_at")]
        self._add_instance = (
            self._insert(instances)
            .values({name: bindparam(name, type_=instances.c[name].type) for name in columns})
            .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
            # RETURNING tells whether a row was inserted: psycopg reports rowcount -1 for
            # INSERT ... ON CONFLICT DO NOTHING, which would make every duplicate look new.
            .returning(instances.c.id)
        )
        self._count_series = (
            update(series)
            .where(series.c.id == bindparam("b_series"))
            .values(instance_count=series.c.instance_count + 1)
        )
        self._count_study = (
            update(studies)
            .where(studies.c.id == bindparam("b_study"))
            .values(
                instance_count=studies.c.instance_count + 1,
                total_bytes=studies.c.total_bytes + bindparam("b_size"),
                last_received_at=bindparam("b_now", type_=studies.c.last_received_at.type),
                dirty=True,
            )
        )
        self._dbapi: tuple[_CompiledForDBAPI, ...] | None = None
        if db.is_sqlite:
            dialect = db.engine.dialect
            self._dbapi = tuple(
                _CompiledForDBAPI(s, dialect)
                for s in (self._add_instance, self._count_series, self._count_study)
            )

    def add(self, received: Received, *, placed: bool, adopt: Callable[[], None]) -> Indexed:
        """Add ``received`` (its study and series too when new) in one transaction.

        ``placed``: whether the spool file at ``received.path`` is this copy. When it is not
        and no row names it, the file was left by a crash between placing and committing:
        ``adopt`` is called (inside the transaction) to put this copy in its place.
        Raises the database's errors (the caller revokes the file and answers A700).
        """
        for attempt in (1, 2):
            try:
                if placed:
                    known = self._known_ids(received)
                    if known is not None and self._dbapi is not None:
                        inserted = self._add_known_sqlite(received, *known)
                        return Indexed(inserted, new_study=False, placed=True)
                return self._add_core(received, placed, adopt)
            except (IntegrityError, sqlite3.IntegrityError):
                # A cached study/series row vanished (deleted by retention): forget the cache
                # and look the rows up again, once.
                self._forget(received)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # -- the statements' values, for both paths ----------------------------------------------

    @staticmethod
    def _values(received: Received, study_id: int, series_id: int) -> tuple[dict[str, Any], ...]:
        return (
            {**received.instance_values(), "series_id": series_id, "study_id": study_id},
            {"b_series": series_id},
            {"b_study": study_id, "b_size": received.size, "b_now": received.received_at},
        )

    # -- the general path (SQLAlchemy Core; PostgreSQL, and new studies/series on SQLite) ----

    def _add_core(self, received: Received, placed: bool, adopt: Callable[[], None]) -> Indexed:
        remember: dict[str, int] = {}
        with self._writer(), self.db.engine.begin() as conn:
            study_id, new_study = self._study_id(conn, received, remember)
            series_id = self._series_id(conn, received, study_id, remember)
            if not placed and not self._has_row(conn, received.sop_instance_uid):
                adopt()
                placed = True
            add_instance, count_series, count_study = self._values(received, study_id, series_id)
            # One statement both checks for a duplicate and inserts.
            inserted = conn.execute(self._add_instance, add_instance).first() is not None
            if inserted:
                conn.execute(self._count_series, count_series)
                conn.execute(self._count_study, count_study)
        if remember:
            with self._lock:
                self._ids.update(remember)
        return Indexed(inserted, new_study=new_study and inserted, placed=placed)

    def _study_id(
        self, conn: Connection, received: Received, remember: dict[str, int]
    ) -> tuple[int, bool]:
        uid = received.study_instance_uid
        cached = self._ids.get(uid)
        if cached is not None:
            return cached, False
        now = received.received_at
        # Once per study and process (the row id is cached afterwards), not per instance.
        lookup_keys = received.study_lookup_keys()
        created = conn.execute(
            self._insert(cast(Table, Study.__table__))
            .values(
                study_key=received.study_key,
                study_instance_uid=uid,
                first_received_at=now,
                last_received_at=now,
                instance_count=0,
                total_bytes=0,
                dirty=True,
                completed_at=None,
                version=0,
                calling_ae_title=received.calling_ae_title,
                source=received.source,
                **lookup_keys,
            )
            .on_conflict_do_nothing(index_elements=["study_instance_uid"])
            .returning(Study.__table__.c.id)  # not rowcount: psycopg reports -1 here
        ).first()
        if created is not None:
            row = int(created[0])
        else:
            row = conn.execute(select(Study.id).where(Study.study_instance_uid == uid)).scalar_one()
            self._fill_lookup_keys(conn, row, lookup_keys)
        remember[uid] = row  # cached once the transaction commits
        return row, created is not None

    @staticmethod
    def _fill_lookup_keys(conn: Connection, study_id: int, keys: Mapping[str, str | None]) -> None:
        """Give a known study the lookup keys it lacks (indexed before schema revision 0003, or
        first received without the identifier); a key already there is kept."""
        studies = cast(Table, Study.__table__)
        for column, key in keys.items():
            if key is not None:
                conn.execute(
                    update(studies)
                    .where(studies.c.id == study_id, studies.c[column].is_(None))
                    .values({column: key})
                )

    def _series_id(
        self, conn: Connection, received: Received, study_id: int, remember: dict[str, int]
    ) -> int:
        uid = received.series_instance_uid
        cached = self._ids.get(uid)
        if cached is not None:
            return cached
        conn.execute(
            self._insert(cast(Table, Series.__table__))
            .values(
                study_id=study_id,
                series_key=received.series_key,
                series_instance_uid=uid,
                instance_count=0,
                # Descriptions lose the characters PostgreSQL refuses (NUL) rather than the
                # instance being refused for ever (dicom_node/state/text.py).
                **{
                    name: storable_text(value) if isinstance(value, str) else value
                    for name, value in received.series_attributes().items()
                },
            )
            .on_conflict_do_nothing(index_elements=["series_instance_uid"])
        )
        row = conn.execute(select(Series.id).where(Series.series_instance_uid == uid)).scalar_one()
        remember[uid] = row
        return row

    @staticmethod
    def _has_row(conn: Connection, sop_instance_uid: str) -> bool:
        found = conn.execute(
            select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
        ).first()
        return found is not None

    # -- the SQLite fast path ------------------------------------------------------------------

    def _known_ids(self, received: Received) -> tuple[int, int] | None:
        study = self._ids.get(received.study_instance_uid)
        series = self._ids.get(received.series_instance_uid)
        return None if study is None or series is None else (study, series)

    def _add_known_sqlite(self, received: Received, study_id: int, series_id: int) -> bool:
        """The common case on SQLite: known study and series, new file. Returns whether the
        instance row was inserted (False: a duplicate)."""
        assert self._dbapi is not None
        statements = zip(self._dbapi, self._values(received, study_id, series_id), strict=True)
        (add_instance, add_values), *counts = statements
        with self._writer():
            raw = self.db.engine.raw_connection()
            try:
                cur = cast(sqlite3.Cursor, raw.cursor())
                cur.execute("BEGIN IMMEDIATE")
                try:
                    inserted = bool(add_instance.execute(cur, add_values).fetchall())
                    if inserted:
                        for statement, values in counts:
                            statement.execute(cur, values)
                    cur.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        cur.execute("ROLLBACK")
                    raise
                finally:
                    cur.close()
            finally:
                raw.close()
        return inserted

    # -- locks and the id cache ----------------------------------------------------------------

    @contextmanager
    def _writer(self) -> Iterator[None]:
        """Queue SQLite writers on a lock instead of SQLite's busy handler.

        SQLite lets one writer in at a time; a second one waits in its busy handler, which
        sleeps 1, 2, 5, 10... ms between retries. With several associations (threads) and
        receiver processes committing an instance every few milliseconds, those sleeps cost
        more than the transactions. A thread lock plus an ``flock`` on a file next to the
        database wakes the next writer the moment the previous one commits.
        """
        if self._lock_fd is None:
            yield
            return
        with self._write_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _forget(self, received: Received) -> None:
        with self._lock:
            self._ids.pop(received.study_instance_uid, None)
            self._ids.pop(received.series_instance_uid, None)
