"""Shared fixtures: real peers on loopback, a fresh state database per test (SQLite and
PostgreSQL), and settings that point everything at the test's temporary directory."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers import Orthanc, RedisServer, free_port

REAL_CT = Path(
    os.environ.get(
        "DICOM_NODE_REAL_CT", Path(__file__).resolve().parents[2] / "shared" / "data" / "real-ct"
    )
)
REAL_CHEST_CT = Path(
    os.environ.get(
        "DICOM_NODE_REAL_CHEST_CT",
        Path(__file__).resolve().parents[2] / "shared" / "data" / "real-chest-ct",
    )
)

PG_ADMIN_URL = os.environ.get(
    "DICOM_NODE_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)

IN_CI = os.environ.get("CI") == "true"
"""Under CI a missing prerequisite (server, tool, data) fails the test instead of skipping it."""
CI_ALLOWED_SKIPS = (
    "this machine has CUDA",  # the CPU-only branch of a test: not a missing prerequisite
    "cannot mount a tmpfs here",  # needs root; the same A700 paths are covered without it
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    """Under CI=true, turn a skip into a failure unless its reason is in CI_ALLOWED_SKIPS."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not (IN_CI and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if any(allowed in reason for allowed in CI_ALLOWED_SKIPS):
        return
    report.outcome = "failed"
    report.longrepr = f"CI=true: a missing prerequisite fails instead of skipping ({reason})"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """The same for a whole module skipped while it is collected (``pytest.importorskip`` at
    module level, e.g. the ``monai`` extra for tests/test_bundles.py)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not (IN_CI and report.skipped):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if any(allowed in reason for allowed in CI_ALLOWED_SKIPS):
        return
    report.outcome = "failed"
    report.longrepr = f"CI=true: a missing prerequisite fails instead of skipping ({reason})"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never inherit the developer's DICOM_NODE_* settings."""
    for key in list(os.environ):
        if key.startswith("DICOM_NODE_") and not key.startswith(
            ("DICOM_NODE_TEST_", "DICOM_NODE_REAL_CT")
        ):
            monkeypatch.delenv(key)


@pytest.fixture(autouse=True)
def _restore_pynetdicom_globals() -> Iterator[None]:
    """pynetdicom keeps its switches in module globals; put them back after each test."""
    from pynetdicom import _config

    names = [n for n in dir(_config) if n.isupper()]
    saved = {n: getattr(_config, n) for n in names}
    saved_tempdir = tempfile.tempdir
    yield
    for n, v in saved.items():
        setattr(_config, n, v)
    tempfile.tempdir = saved_tempdir


def _pg_create() -> str:
    import sqlalchemy as sa

    name = f"dn_test_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        engine.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def _pg_drop(url: str) -> None:
    import sqlalchemy as sa

    name = url.rsplit("/", 1)[1]
    engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        engine.dispose()


def _pg_available() -> str | None:
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        engine.dispose()
        return None
    except Exception as exc:
        return f"PostgreSQL not reachable at {PG_ADMIN_URL} ({type(exc).__name__}); set DICOM_NODE_TEST_PG_ADMIN_URL"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty state database; every test using it runs once per backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'var' / 'state.sqlite'}"
        return
    with _fresh_pg_database() as url:
        yield url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database (for tests about PostgreSQL itself)."""
    with _fresh_pg_database() as url:
        yield url


@contextlib.contextmanager
def _fresh_pg_database() -> Iterator[str]:
    """A new, empty PostgreSQL database, dropped afterwards; skips the test without a server."""
    problem = _pg_available()
    if problem:
        pytest.skip(problem)
    url = _pg_create()
    try:
        yield url
    finally:
        _pg_drop(url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'var' / 'state.sqlite'}"


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Any]:
    """Build validated Settings rooted in the test's temporary directory."""
    from dicom_node.settings import load_settings

    def factory(**overrides: Any) -> Any:
        base: dict[str, Any] = {
            "data_dir": tmp_path / "var",
            "dicom_port": free_port(),
            "http_port": free_port(),
            "bind": "127.0.0.1",
            "stable_seconds": 1.0,
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        return load_settings(None, **base)

    return factory


@pytest.fixture
def receiver(make_settings: Callable[..., Any], database_url: str) -> Iterator[Any]:
    """An in-process storage SCP on a free port, with its own spool and state database."""
    from dicom_node.scp.server import Receiver
    from dicom_node.state import open_database

    settings = make_settings(database_url=database_url, scp={"receivers": 1})
    db = open_database(settings.resolved_database_url)
    rcv = Receiver(settings, db, reuse_port=False)
    rcv.start()
    try:
        yield rcv
    finally:
        rcv.stop(grace=2)
        db.dispose()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One real Orthanc (with DICOMweb) for the session; tests clear it with ``clean_orthanc``."""
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def clean_orthanc(orthanc: Orthanc) -> Orthanc:
    orthanc.clear()
    return orthanc


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server the test may kill and restart."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def real_ct() -> Path:
    if not REAL_CT.is_dir():
        pytest.skip(f"real CT data not found at {REAL_CT} (set DICOM_NODE_REAL_CT)")
    return REAL_CT


@pytest.fixture
def real_chest_ct() -> Path:
    """The real chest CT collection (``../shared/data/real-chest-ct``); a skip fails under CI."""
    if not REAL_CHEST_CT.is_dir():
        pytest.skip(
            f"real chest CT data not found at {REAL_CHEST_CT} (set DICOM_NODE_REAL_CHEST_CT)"
        )
    return REAL_CHEST_CT
