"""Runs the HTTP app with uvicorn in a thread of ``dicom-node serve``."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import uvicorn

from dicom_node.api.app import create_app
from dicom_node.api.auth import check_exposure
from dicom_node.api.https import http_ssl_context
from dicom_node.api.protocol import with_header_timeout
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
    """Component for ``dicom-node serve``: uvicorn (h11) in a thread, hardened for an edge.

    Slow or stuck clients are bounded (``http.header_timeout``, ``http.body_timeout``,
    ``http.keep_alive_timeout``), so are header sizes (``http.max_header_bytes``) and
    concurrency (``http.max_connections``, 503 beyond); ``http.tls_certificate`` turns on
    HTTPS.
    """

    def __init__(self, settings: Settings, db: Database) -> None:
        check_exposure(settings)
        self.settings = settings
        http = settings.http
        ssl_context = http_ssl_context(http) if http.tls_enabled else None
        self.scheme = "https" if ssl_context else "http"
        self.app = create_app(settings, db, broker_check=broker_checker(settings))
        config = uvicorn.Config(
            self.app,
            host=settings.http_bind,
            port=settings.http_port,
            log_level="warning",
            # uvicorn's default log config attaches its own handlers, which would bypass the
            # scrubbing filter of dicom_node.logs (a handler's traceback can carry values).
            log_config=None,
            access_log=False,
            lifespan="off",
            http=with_header_timeout(http.header_timeout),
            ws="none",
            timeout_keep_alive=http.keep_alive_timeout,
            limit_concurrency=http.max_connections,
            h11_max_incomplete_event_size=http.max_header_bytes,
            timeout_graceful_shutdown=http.shutdown_timeout,
            # Ours, not uvicorn's FORWARDED_ALLOW_IPS environment variable.
            proxy_headers=bool(http.trusted_proxies),
            forwarded_allow_ips=list(http.trusted_proxies),
        )
        config.load()
        # Our own context (TLS >= 1.2, BCP 195 suites, errors as ConfigError) rather than
        # uvicorn's ssl_* options, which cannot set a minimum version.
        config.ssl = ssl_context
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
        LOGGER.info(
            "HTTP API on %s://%s:%d", self.scheme, self.settings.http_bind, self.settings.http_port
        )

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=self.settings.http.shutdown_timeout + 5)
