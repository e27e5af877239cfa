"""Logging set-up for entry points: plain or JSON lines, with study key and job id on each line.

Library modules only call ``logging.getLogger(__name__)``; handlers are configured here, by the
command that runs. Records never carry patient data; control characters in messages are
escaped so that one record is always one line.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from dicom_node.settings import LogSettings

_study_key: contextvars.ContextVar[str | None] = contextvars.ContextVar("study_key", default=None)
_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)


@contextmanager
def log_context(*, study_key: str | None = None, job_id: str | None = None) -> Iterator[None]:
    """Attach a study key and job id to every record logged inside the block."""
    t1 = _study_key.set(study_key)
    t2 = _job_id.set(job_id)
    try:
        yield
    finally:
        _study_key.reset(t1)
        _job_id.reset(t2)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "study_key", None) is None:
            record.__dict__["study_key"] = _study_key.get()
        if getattr(record, "job_id", None) is None:
            record.__dict__["job_id"] = _job_id.get()
        return True


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n").replace("\x1b", "\\x1b")


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        ctx = []
        study_key = getattr(record, "study_key", None)
        job_id = getattr(record, "job_id", None)
        if study_key:
            ctx.append(f"study={study_key}")
        if job_id:
            ctx.append(f"job={job_id}")
        line = _one_line(base)
        return f"{line} [{' '.join(ctx)}]" if ctx else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "study_key": getattr(record, "study_key", None),
            "job_id": getattr(record, "job_id", None),
            "process": record.process,
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=True)


def setup_logging(settings: LogSettings, *, stream: object = None) -> None:
    """Configure the root logger once for this process."""
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    if settings.json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            PlainFormatter("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
        )
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level)
    # Libraries that log identifiers or per-PDU details at INFO stay quiet.
    for noisy in ("pynetdicom", "celery", "kombu", "urllib3", "uvicorn.access", "highdicom"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
