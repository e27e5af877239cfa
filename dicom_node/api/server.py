"""Runs the HTTP app with uvicorn in a thread of ``dicom-node serve``."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import uvicorn

from dicom_node.api.app import create_app
from dicom_node.api.auth import check_exposure
from dicom_node.settings import Settings
from dicom_node.state import Database

LOGGER = logging.getLogger(__name__)


def broker_checker(settings: Settings) -> Any:
    """A callable that raises when the broker cannot be reached."""
    if settings.embedded_broker:
        from sqlalchemy import create_engine

        url = settings.resolved_broker_url.removeprefix("sqla+")
        engine = create_engine(url)

        def check_sqlite() -> None:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")

        return check_sqlite

    from kombu import Connection

    def check_broker() -> None:
        with Connection(settings.resolved_broker_url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=0, timeout=2)

    return check_broker


class HttpServer:
    """Component for ``dicom-node serve``."""

    def __init__(self, settings: Settings, db: Database) -> None:
        check_exposure(settings)
        self.settings = settings
        self.app = create_app(settings, db, broker_check=broker_checker(settings))
        config = uvicorn.Config(
            self.app,
            host=settings.http_bind,
            port=settings.http_port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.run, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError(
                    f"HTTP server failed to start on {self.settings.http_bind}:{self.settings.http_port}"
                )
            time.sleep(0.05)
        LOGGER.info("HTTP API on http://%s:%d", self.settings.http_bind, self.settings.http_port)

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
