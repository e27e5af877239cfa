"""Per-process state of a worker: settings, database connection, loaded models.

Created by ``dicom-node worker`` before Celery starts. After Celery forks a child, the child
drops the parent's database connections (sockets must not be shared across fork) and loads models
lazily on first use (CUDA must not be initialised before fork, and ``worker_process_init``
handlers are killed after 4 s, too short for a large model).
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
from typing import Any

from dicom_node.errors import ModelLoadError
from dicom_node.settings import Settings
from dicom_node.state import Database, open_database

LOGGER = logging.getLogger(__name__)


class WorkerRuntime:
    def __init__(
        self, settings: Settings, name: str | None = None, *, delivers: bool = False
    ) -> None:
        self.settings = settings
        self.name = name or f"worker@{socket.gethostname()}"
        self.delivers = delivers
        """Consumes the ``delivery`` queue: delivers its own jobs' results right after recording."""
        self._db: Database | None = None
        self._detectors: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def owner_id(self) -> str:
        """Lease owner id: unique per process (a restarted child is a new owner)."""
        return f"{self.name}:{os.getpid()}"

    @property
    def db(self) -> Database:
        if self._db is None:
            self._db = open_database(self.settings.resolved_database_url)
        return self._db

    def after_fork(self) -> None:
        """Called in each new child process."""
        if self._db is not None:
            self._db.engine.dispose(close=False)
            self._db = None
        self._detectors.clear()

    def detector(self, name: str) -> Any:
        """The detector for a model name, loaded once per process."""
        with self._lock:
            if name not in self._detectors:
                self._detectors[name] = resolve_detector(name, self.settings)
                self._publish(name, self._detectors[name])
            return self._detectors[name]

    def _publish(self, name: str, detector: Any) -> None:
        """Record the loaded model's identity (``model_versions``: what the edge reads as the
        version the workers run now). A failure is logged: the job runs regardless."""
        from dicom_node.state.model_versions import publish

        try:
            info = detector.info
            publish(self.db, self.name, name, info.version, info.weights_sha256)
        except Exception as exc:
            LOGGER.warning("could not publish model %s: %s", name, type(exc).__name__)


def resolve_detector(name: str, settings: Settings) -> Any:
    """A ``plugin = "module:attr"`` from settings, else the model registry (entry points, folders)."""
    cfg = settings.models.get(name)
    if cfg is not None and cfg.plugin:
        module_name, _, attr = cfg.plugin.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ModelLoadError(
                f"model {name!r}: plug-in {cfg.plugin!r} cannot be imported: {exc}"
            ) from exc
        try:
            return factory(cfg)
        except TypeError:
            return factory()
    from workers.models.registry import get_detector

    return get_detector(name, settings)


_RUNTIME: WorkerRuntime | None = None


def set_runtime(runtime: WorkerRuntime) -> None:
    global _RUNTIME
    _RUNTIME = runtime


def get_runtime() -> WorkerRuntime:
    if _RUNTIME is None:
        raise RuntimeError("worker runtime not initialised; start workers with `dicom-node worker`")
    return _RUNTIME
