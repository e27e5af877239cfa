"""Schema migrations of the state database, on SQLite and PostgreSQL.

The fixtures in tests/fixtures are databases made by dicom-node 0.1.0 (see
tests/fixtures/make_state_fixture.py): every table holds rows, and the upgrade must keep each
of them, value for value.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from dicom_node.state import Database, migrate, open_database
from dicom_node.state.migrate import SchemaError
from dicom_node.state.migrations import BASELINE, BASELINE_TABLES, HEAD, VERSION_TABLE
from dicom_node.state.models import AuditEvent, Base, Delivery, Job, Meta, Outbox, Study
from tests.conftest import _fresh_pg_database

FIXTURES = Path(__file__).parent / "fixtures"
RELEASE = "0.1.0"
T0 = datetime(2026, 11, 2, 9, 30, 0, 123456, tzinfo=UTC)


def _psql_url(url: str) -> str:
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def release_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A copy of the 0.1.0 fixture database (never the file in the repository itself)."""
    if request.param == "sqlite":
        target = tmp_path / "var" / "state.sqlite"
        target.parent.mkdir()
        shutil.copyfile(FIXTURES / f"state-{RELEASE}.sqlite", target)
        yield f"sqlite:///{target}"
        return
    with _fresh_pg_database() as url:
        dump = FIXTURES / f"state-{RELEASE}.postgresql.sql"
        subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", _psql_url(url), "-f", str(dump)],
            check=True,
            capture_output=True,
        )
        yield url


def _rows(url: str, *, added: bool = True) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every 0.1.0 table, as the driver returns it, in primary-key order.

    ``added=False``: only the columns 0.1.0 had (later revisions add nullable columns, which
    are checked to be NULL on the old rows instead)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            meta = sa.MetaData()
            meta.reflect(conn, only=sorted(BASELINE_TABLES))
            out = {}
            for name, table in meta.tables.items():
                columns = [
                    c for c in table.columns if added or c.name not in ADDED_COLUMNS.get(name, ())
                ]
                query = sa.select(*columns).order_by(*table.primary_key.columns)
                out[name] = [tuple(r) for r in conn.execute(query).all()]
            return out
    finally:
        engine.dispose()


ADDED_COLUMNS: dict[str, tuple[str, ...]] = {
    "studies": ("accession_number_hmac", "patient_id_hmac"),  # 0003: lookup keys
    "jobs": ("priority", "generation"),  # 0004: routing priority; 0006: re-runs
    "instances": ("purged_at",),  # 0005: retention
    "outputs": ("purged_at",),  # 0005: retention
}
"""Columns revisions after the baseline added to 0.1.0's tables (NULL on old rows, unless
:data:`ADDED_DEFAULTS` gives their value)."""

ADDED_DEFAULTS: dict[tuple[str, str], Any] = {
    ("jobs", "generation"): 0,  # 0006: NOT NULL, server default 0
}
"""Added columns that are NOT NULL: the value every old row gets."""


def _schema(url: str, *, skip: frozenset[str] = frozenset({VERSION_TABLE})) -> dict[str, Any]:
    """Tables, columns, keys, indexes and constraint names as the database reports them."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            insp = sa.inspect(conn)
            out: dict[str, Any] = {}
            for table in sorted(set(insp.get_table_names()) - skip):
                out[table] = {
                    "columns": [
                        (c["name"], str(c["type"]), c["nullable"], c.get("default"))
                        for c in insp.get_columns(table)
                    ],
                    "pk": insp.get_pk_constraint(table),
                    "fks": sorted(
                        (
                            str(fk["name"]),
                            tuple(fk["constrained_columns"]),
                            fk["referred_table"],
                            str(fk.get("options")),
                        )
                        for fk in insp.get_foreign_keys(table)
                    ),
                    "indexes": sorted(
                        (str(i["name"]), tuple(i["column_names"]), bool(i["unique"]))
                        for i in insp.get_indexes(table)
                    ),
                    "uniques": sorted(
                        (str(u["name"]), tuple(u["column_names"]))
                        for u in insp.get_unique_constraints(table)
                    ),
                }
            if engine.dialect.name == "sqlite":  # the CREATE statements themselves
                out["sqlite_master"] = conn.exec_driver_sql(
                    "SELECT type, name, sql FROM sqlite_master "
                    f"WHERE name != '{VERSION_TABLE}' AND name NOT LIKE 'sqlite_autoindex_{VERSION_TABLE}%' "
                    "ORDER BY type, name"
                ).all()
            return out
    finally:
        engine.dispose()


def _drift(url: str) -> list[Any]:
    """Alembic's comparison of the database with the models: empty when they agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def _current(url: str) -> migrate.SchemaState:
    engine = sa.create_engine(url)
    try:
        return migrate.current(engine)
    finally:
        engine.dispose()


def _set_revision(url: str, revision: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = :r"), {"r": revision})
    engine.dispose()


def test_head_is_the_last_revision_file() -> None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(migrate.alembic_config())
    assert script.get_heads() == [HEAD], "set migrations.HEAD to the newest revision"
    chain = [s.revision for s in script.walk_revisions()]
    assert chain[-1] == BASELINE
    assert chain == sorted(chain, reverse=True), "revisions are numbered in order"


def test_release_database_upgrades_with_data_intact(release_db: str) -> None:
    before_rows = _rows(release_db)
    assert {name for name, rows in before_rows.items() if not rows} == set(), (
        "fixture: a row per table"
    )
    assert _current(release_db).kind == "release-0.1.0"

    db = open_database(release_db)
    try:
        found = migrate.current(db.engine)
        assert (found.revision, found.kind) == (HEAD, "head")
        # every value of every row, unchanged; the columns added since are NULL on them
        assert _rows(release_db, added=False) == before_rows
        with db.engine.connect() as conn:
            for table, columns in ADDED_COLUMNS.items():
                for column in columns:
                    if (table, column) in ADDED_DEFAULTS:
                        found = conn.execute(sa.text(f"SELECT DISTINCT {column} FROM {table}"))
                        assert found.scalars().all() == [ADDED_DEFAULTS[(table, column)]]
                        continue
                    assert conn.execute(
                        sa.text(f"SELECT count(*) FROM {table} WHERE {column} IS NOT NULL")
                    ).scalar_one() == 0
        assert _drift(release_db) == []  # and the upgraded schema is the models'

        with db.session() as s:  # values as the node reads them
            assert s.get(Meta, "uid_salt").value == "5f0c9d8e7a6b5c4d3e2f1a0b9c8d7e6f"  # type: ignore[union-attr]
            ct = s.scalars(sa.select(Study).where(Study.calling_ae_title == "CT_SCANNER_01")).one()
            assert ct.total_bytes == 5_368_709_120
            assert ct.first_received_at == T0 and ct.first_received_at.tzinfo is not None
            assert ct.dirty is False and ct.version == 2
            assert [se.series_description for se in sorted(ct.series, key=lambda x: x.id)] == [
                "Thorax natif 1.25 mm – Lunge",
                "Topogramm",
            ]
            done = s.scalars(sa.select(Job).where(Job.state == "done")).one()
            assert done.summary["items"][0] == {
                "label": "nodule",
                "confidence": 0.91,
                "diameter_mm": 6.4,
            }
            assert done.summary["note"] == "µ-nodules < 3 mm not reported"
            assert done.destinations == ["pacs", "orthanc-zürich"]
            assert done.timings == {"load": 1.5, "detect": 12.75, "encode": 0.5, "deliver": 2.0}
            assert [o.kind for o in done.outputs] == ["seg", "sr", "preview"]
            assert {d.destination: d.state for d in done.deliveries} == {
                "pacs": "done",
                "orthanc-zürich": "done",
            }
            assert sorted(s.scalars(sa.select(Job.state))) == sorted(
                [
                    "done",
                    "failed",
                    "skipped",
                    "running",
                    "queued",
                    "waiting",
                    "delivering",
                    "cancelled",
                ]
            )
            running = s.scalars(sa.select(Job).where(Job.state == "running")).one()
            assert running.lease_expires_at == datetime(2026, 11, 2, 9, 36, 40, 123456, tzinfo=UTC)
            failed = s.scalars(sa.select(Job).where(Job.state == "failed")).one()
            assert failed.reason == "model error: out of memory — after 3 attempts"
            assert failed.model_version is None
            waiting_box = s.scalars(sa.select(Outbox).where(Outbox.not_before.is_not(None))).one()
            assert waiting_box.not_before == datetime(2026, 11, 2, 9, 33, 0, 123456, tzinfo=UTC)
            retry = s.scalars(sa.select(Delivery).where(Delivery.state == "retry")).one()
            assert retry.next_attempt_at is not None and retry.next_attempt_at.tzinfo is not None
            denied = s.scalars(sa.select(AuditEvent).where(AuditEvent.outcome == "failure")).one()
            assert denied.detail == {
                "path": "/api/jobs",
                "reason": "bad token",
                "nested": {"n": None},
            }
        with db.session() as s:  # the database keeps working: ids continue after the old rows
            event = AuditEvent(at=T0, event="node-started", outcome="success", detail={})
            s.add(event)
            s.flush()
            assert event.id == len(before_rows["audit_events"]) + 1
        # A second upgrade finds the head and changes nothing.
        again = migrate.upgrade(db.engine)
        assert not again.changed
    finally:
        db.dispose()


def test_baseline_is_the_schema_of_the_release(release_db: str, tmp_path: Path) -> None:
    """Revision 0001 alone makes exactly what 0.1.0's create_all made (names included)."""
    if release_db.startswith("sqlite"):
        scratch = f"sqlite:///{tmp_path / 'baseline.sqlite'}"
        _baseline_only(scratch)
        assert _schema(scratch) == _schema(release_db)
        return
    with _fresh_pg_database() as scratch:
        _baseline_only(scratch)
        assert _schema(scratch) == _schema(release_db)


def _baseline_only(url: str) -> None:
    from alembic import command

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        command.upgrade(migrate.alembic_config(conn), BASELINE)
    engine.dispose()


def test_empty_database_gets_the_models_schema(database_url: str) -> None:
    db = open_database(database_url)
    try:
        assert migrate.current(db.engine).revision == HEAD
        assert _drift(database_url) == []
        assert not migrate.upgrade(db.engine).changed
    finally:
        db.dispose()


def test_upgrade_adds_the_foreign_key_indexes_the_queries_use(release_db: str) -> None:
    open_database(release_db).dispose()
    engine = sa.create_engine(release_db)
    query = "SELECT DISTINCT sop_class_uid FROM instances WHERE series_id = 1"
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            plan = " ".join(str(r) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {query}"))
        else:  # tiny tables: make the planner show whether an index applies at all
            conn.exec_driver_sql("SET enable_seqscan = off")
            plan = " ".join(str(r) for r in conn.exec_driver_sql(f"EXPLAIN {query}"))
    engine.dispose()
    assert "ix_instances_series" in plan
    indexes = {
        t: [i[0] for i in v["indexes"]]
        for t, v in _schema(release_db).items()
        if t != "sqlite_master"
    }
    assert "ix_series_study" in indexes["series"]
    assert "ix_outbox_job" in indexes["outbox"]


def test_newer_revision_is_refused(database_url: str, tmp_path: Path) -> None:
    open_database(database_url).dispose()
    _set_revision(database_url, "9999")
    with pytest.raises(SchemaError, match=r"revision 9999, which dicom-node .* does not know"):
        open_database(database_url)
    assert _current(database_url).kind == "newer"
    result = _cli(database_url, tmp_path, "db", "upgrade")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: the state database is at schema revision 9999"
    )
    _set_revision(database_url, HEAD)  # untouched otherwise: back at the head it opens again
    open_database(database_url).dispose()


def test_partial_schema_is_refused(database_url: str) -> None:
    db = Database(database_url)
    Base.metadata.tables["meta"].create(db.engine)
    db.dispose()
    with pytest.raises(SchemaError, match="some of dicom-node's tables but not audit_events"):
        open_database(database_url)


def test_sqlite_table_rebuild_in_a_migration_keeps_referring_rows(tmp_path: Path) -> None:
    """A batch (copy-and-swap) operation must not cascade-delete: migrations run with SQLite's
    foreign keys off, as the node's own connections have them on."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    target = tmp_path / "state.sqlite"
    shutil.copyfile(FIXTURES / f"state-{RELEASE}.sqlite", target)
    url = f"sqlite:///{target}"
    open_database(url).dispose()
    before = _rows(url)
    db_engine = sa.create_engine(url)
    with migrate._migration_connection(db_engine) as conn:
        ops = Operations(MigrationContext.configure(conn))
        with ops.batch_alter_table("jobs", recreate="always"):
            pass  # rebuilds jobs: CREATE _alembic_tmp_jobs, copy, DROP jobs, RENAME
        assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
        conn.commit()
    db_engine.dispose()
    assert _rows(url) == before


def test_racing_upgrades_migrate_once(database_url: str, tmp_path: Path) -> None:
    """Two CLI processes and four threads upgrade one fresh database at once: the lock lets
    exactly one migrate; everyone else finds the head."""
    procs = [_cli(database_url, tmp_path, "db", "upgrade", wait=False) for _ in range(2)]
    barrier = threading.Barrier(4)
    results: list[Any] = []

    def racer() -> None:
        db = Database(database_url)  # makes the SQLite file's directory, as the node does
        try:
            barrier.wait()
            results.append(migrate.upgrade(db.engine))
        except Exception as exc:  # collected: a failure in a thread must fail the test
            results.append(exc)
        finally:
            db.dispose()

    threads = [threading.Thread(target=racer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all(not isinstance(r, Exception) for r in results), results
    migrated = [r for r in results if r.changed] + [o for o, _ in outputs if "created at" in o]
    assert len(migrated) == 1, (results, outputs)
    assert _current(database_url).revision == HEAD
    assert _drift(database_url) == []


def test_connections_opening_a_fresh_sqlite_file_together_never_fail(tmp_path: Path) -> None:
    """Switching a new file to WAL answers "database is locked" at once, not after the busy
    timeout, when another connection does the same (a fresh-clone run of the racing test above
    hit it). Six connections at a time, 60 fresh files: without the retry in
    ``dicom_node.state.database`` about one file in five fails."""
    import sqlite3

    from dicom_node.state.database import sqlite_on_connect

    errors: list[Exception] = []
    for n in range(60):
        path = tmp_path / f"fresh-{n}.sqlite"
        barrier = threading.Barrier(6)

        def opener(path: Path = path, barrier: threading.Barrier = barrier) -> None:
            conn = sqlite3.connect(path, timeout=30, isolation_level=None)
            try:
                barrier.wait()
                sqlite_on_connect(conn, None)
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("CREATE TABLE IF NOT EXISTS t (a)")
                conn.execute("COMMIT")
            except Exception as exc:  # collected: a failure in a thread must fail the test
                errors.append(exc)
            finally:
                conn.close()

        threads = [threading.Thread(target=opener) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert errors == []


def test_upgrade_waits_for_the_migration_lock(database_url: str, tmp_path: Path) -> None:
    """While another process holds the lock, `db upgrade` waits and touches nothing."""
    import fcntl

    db = Database(database_url)
    with contextlib.ExitStack() as held:
        if db.is_sqlite:
            lock = held.enter_context(open(f"{db.engine.url.database}.migrate.lock", "a+b"))
            fcntl.flock(lock, fcntl.LOCK_EX)
        else:
            conn = held.enter_context(db.engine.connect())
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": migrate.PG_LOCK_KEY})
            conn.commit()  # the session-level lock outlives the transaction
        waiting = _cli(database_url, tmp_path, "db", "upgrade", wait=False)
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=6)
        assert _current(database_url).kind == "empty"
    db.dispose()  # releases the lock: the file is closed, the PostgreSQL session ends
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert "created at" in out


def test_opening_a_current_database_does_not_load_alembic(database_url: str) -> None:
    open_database(database_url).dispose()
    code = (
        "import sys, time\n"
        "from dicom_node.state import open_database\n"
        "t = time.perf_counter(); db = open_database(sys.argv[1]); dt = time.perf_counter() - t\n"
        "assert 'alembic' not in sys.modules, 'the at-head check imported alembic'\n"
        "print(f'{dt * 1000:.1f}')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, database_url], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 1000  # ms; typically a few


def test_db_current_names_the_revision(release_db: str, tmp_path: Path) -> None:
    result = _cli(release_db, tmp_path, "db", "current")
    assert result.returncode == 0, result.stderr
    assert "made by dicom-node 0.1.0" in result.stdout
    result = _cli(release_db, tmp_path, "db", "upgrade")
    assert result.returncode == 0, result.stderr
    assert f"stamped {BASELINE}, upgraded to {HEAD}" in result.stdout
    result = _cli(release_db, tmp_path, "db", "current")
    assert result.stdout.strip() == f"state database: {HEAD} (head)"


def _cli(url: str, tmp_path: Path, *args: str, wait: bool = True) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    env.update(DICOM_NODE_DATABASE_URL=url, DICOM_NODE_DATA_DIR=str(tmp_path / "cli-var"))
    command = [sys.executable, "-m", "dicom_node", *args]
    if not wait:
        return subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
