"""Logging set-up for entry points: plain or JSON lines, with study key and job id on each line.

Library modules only call ``logging.getLogger(__name__)``; handlers are configured here, by the
command that runs. Records never carry patient data; control characters in messages are
escaped so that one record is always one line.

Other libraries' records and warnings go through the same handler, and its filter
(:class:`PhiFilter`) keeps their values out: pydicom warns ``Invalid value for VR DA: '<the
birth date>'``, highdicom logs a patient name it finds odd, pynetdicom dumps datasets at debug
level, SQLAlchemy logs query parameters, Celery logs a failed task's exception text. The rules
are in ``dicom_node.phi``; tracebacks keep their frames and lose library exception messages.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from dicom_node.phi import ExcInfo, describe_exception, is_ours, safe_traceback, scrub_text
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


# Loggers whose messages we write ourselves (patient-free by contract). Everything else is a
# library's, and its text is scrubbed.
_OWN_LOGGERS = ("dicom_node", "workers")
_DICOM_UID = re.compile(r"\d+(?:\.\d+){2,}")


def _own(name: str) -> bool:
    return any(name == own or name.startswith(own + ".") for own in _OWN_LOGGERS)


class PhiFilter(logging.Filter):
    """Keeps dataset values out of every record that reaches the node's handler.

    * our records: an exception passed as an argument is replaced by its description
      (``ValueError``; a library's message may quote a value);
    * uvicorn access lines: the query string is dropped and UIDs in the path are withheld;
    * pynetdicom debug records (PDU and dataset dumps) are dropped;
    * any other library's record (pydicom, highdicom, celery, sqlalchemy, ``py.warnings``...)
      is reduced to its message with every quoted or bracketed part, UID and long number
      withheld.

    Tracebacks are made safe by the formatters (:func:`dicom_node.phi.safe_traceback`).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if _own(record.name):
            if isinstance(record.args, tuple) and any(
                isinstance(a, BaseException) and not is_ours(a) for a in record.args
            ):
                record.args = tuple(
                    describe_exception(a) if isinstance(a, BaseException) else a
                    for a in record.args
                )
            return True
        if record.name.startswith("pynetdicom") and record.levelno < logging.INFO:
            return False
        if (
            record.name == "uvicorn.access"
            and isinstance(record.args, tuple)
            and len(record.args) == 5
        ):
            client, method, path, version, status = record.args
            path = _DICOM_UID.sub("<uid>", str(path).split("?", 1)[0])
            record.args = (client, method, path, version, status)
            return True
        try:
            message = record.getMessage()
        except Exception:  # a library's broken format string: keep only the template
            message = str(record.msg)
        record.msg = scrub_text(message)
        record.args = None
        return True


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n").replace("\x1b", "\\x1b")


class PlainFormatter(logging.Formatter):
    def formatException(self, ei: ExcInfo | tuple[None, None, None]) -> str:
        return safe_traceback(ei)

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
    def formatException(self, ei: ExcInfo | tuple[None, None, None]) -> str:
        return safe_traceback(ei)

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
    handler.addFilter(PhiFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level)
    # Libraries that log identifiers or per-PDU details at INFO stay quiet.
    for noisy in ("pynetdicom", "celery", "kombu", "urllib3", "uvicorn.access", "highdicom"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # Library warnings (pydicom's "Invalid value for VR DA: '...'") become records of the
    # ``py.warnings`` logger, so they pass the same filter instead of going to stderr raw.
    logging.captureWarnings(True)
    _keep_celery_off_the_root_logger()


def _celery_keeps_our_logging(**_: object) -> None:
    """Receiver of Celery's ``setup_logging`` signal: its presence tells Celery to configure no
    handler of its own (``worker_hijack_root_logger=False`` still gives its task and
    multiprocessing loggers their own unfiltered handlers)."""


def _keep_celery_off_the_root_logger() -> None:
    try:
        from celery.signals import setup_logging as celery_setup_logging
    except ImportError:  # pragma: no cover - celery is a dependency; nothing to keep off
        return
    celery_setup_logging.connect(
        _celery_keeps_our_logging, weak=False, dispatch_uid="dicom-node-logs"
    )
