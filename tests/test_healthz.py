"""`/healthz` of a real `dicom-node serve` follows its dependencies: the broker, the state
database and the spool's free space."""

from __future__ import annotations

from pathlib import Path

import requests
import sqlalchemy as sa

from tests.conftest import PG_ADMIN_URL
from tests.peers import NodeProcess, RedisServer, wait_until


def _health(node: NodeProcess) -> tuple[int, dict]:
    r = requests.get(f"http://127.0.0.1:{node.http_port}/healthz", timeout=10)
    return r.status_code, r.json()


def test_healthz_follows_the_broker(
    tmp_path: Path, sqlite_url: str, redis_server: RedisServer
) -> None:
    node = NodeProcess(
        tmp_path / "var",
        {"DICOM_NODE_DATABASE_URL": sqlite_url, "DICOM_NODE_BROKER_URL": redis_server.url},
    ).start()
    try:
        wait_until(lambda: _health(node)[0] == 200, 30, message="healthy")
        redis_server.kill()
        _, body = wait_until(
            lambda: (h := _health(node))[0] == 503 and h, 30, message="unhealthy without Redis"
        )
        assert body["status"] == "unhealthy" and body["checks"]["broker"].startswith("error")
        assert body["checks"]["database"] == "ok"
        redis_server.start()
        wait_until(lambda: _health(node)[0] == 200, 30, message="healthy again")
    finally:
        node.stop()


def test_healthz_follows_the_database(tmp_path: Path, postgres_url: str) -> None:
    # PostgreSQL: a database server that goes away (a file-based SQLite database cannot).
    database_url = postgres_url
    name = database_url.rsplit("/", 1)[1]
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    node = NodeProcess(tmp_path / "var", {"DICOM_NODE_DATABASE_URL": database_url}).start()
    try:
        wait_until(lambda: _health(node)[0] == 200, 30, message="healthy")
        with admin.connect() as conn:  # the database server refuses this database from now on
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
            )
        _, body = wait_until(
            lambda: (h := _health(node))[0] == 503 and h,
            30,
            message="unhealthy without the database",
        )
        assert body["checks"]["database"].startswith("error")
        with admin.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        wait_until(lambda: _health(node)[0] == 200, 30, message="healthy again")
    finally:
        node.stop()
        admin.dispose()


def test_healthz_reports_the_spool_floor(tmp_path: Path, sqlite_url: str) -> None:
    node = NodeProcess(
        tmp_path / "var",
        {"DICOM_NODE_DATABASE_URL": sqlite_url, "DICOM_NODE_SCP__MIN_FREE_BYTES": str(2**62)},
    ).start()
    try:
        status, body = wait_until(lambda: (h := _health(node))[0] and h, 30, message="an answer")
        assert status == 503 and body["checks"]["spool"] == "below free-space floor"
    finally:
        node.stop()
